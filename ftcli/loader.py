"""Loading the base model and tokenizer a recipe names, quantizing it, and adding LoRA adapters.

transformers, bitsandbytes and peft do the work; this module chooses their settings and turns their
failures into model errors. A .gguf file is first converted once into a cached Hugging Face folder,
so every later step sees an ordinary, trainable model. Messages name the model by where its name came from
(`named_by`): model.name in a recipe, or what `ftcli chat` was given.
"""

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ftcli.architectures import Architecture, architecture_of
from ftcli.errors import ModelError, RecipeError, first_line, redact
from ftcli.recipe import LoraSettings, ModelSettings
from ftcli.staging import staged_folder

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RECIPE_MODEL = "model.name"  # `named_by` of a model a recipe names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINED_ADAPTER = "default"  # peft's name for the adapter it creates or loads first: the one training updates
REFERENCE_ADAPTER = "reference"  # the frozen copy of model.adapter that preference losses compare against


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the GPU has it, float16 on older GPUs, float32 on the CPU."""
    if settings.dtype != "auto":
        return DTYPES[settings.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_folder(name: str, named_by: str = RECIPE_MODEL) -> str:
    """A local folder or hub id that transformers can load; a .gguf file becomes a cached converted folder."""
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelError(f"{named_by} {name!r} does not exist. Give the path of a .gguf file, a Hugging Face "
                             "model folder, or a hub id.")
        return str(converted_gguf_folder(Path(name)))
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise ModelError(f"{named_by} {name!r} is a folder without config.json, so it is not a Hugging Face model "
                         "folder. Point it at the folder that holds config.json and the weights.")
    return name


def converted_gguf_folder(gguf_path: Path) -> Path:
    """The GGUF model dequantized into a plain Hugging Face folder, converted once and cached by file identity."""
    stat = gguf_path.resolve().stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FTCLI_CACHE", Path.home() / ".cache" / "ftcli")) / "gguf" / f"{gguf_path.stem}-{key}"
    if not (cache / "config.json").is_file():
        convert_gguf(gguf_path, cache)
    return cache


def convert_gguf(gguf_path: Path, destination: Path) -> None:
    """Dequantize a GGUF checkpoint into `destination` as float32 safetensors with its tokenizer.

    transformers dequantizes on load but marks the model as quantized, which blocks saving and training;
    moving the weights into a model built from the cleaned config gives an ordinary one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelError(f"{gguf_path} could not be read as a GGUF model: {first_line(err)}. Give a GGUF file "
                         "of a supported model, as llama.cpp or `ftcli export --gguf` writes it.") from None
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    redact_origin(plain)
    redact_origin(tokenizer)
    with staged_folder(destination) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def load_tokenizer(settings: ModelSettings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder(settings.name), trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(_cannot_load(settings.name, RECIPE_MODEL, "tokenizer", err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    redact_origin(tokenizer)
    return tokenizer


def load_config(settings: ModelSettings, named_by: str = RECIPE_MODEL):
    """The model's config and its architecture entry, checked before any weight is read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_folder(settings.name, named_by),
                                            trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(_cannot_load(settings.name, named_by, "config", err)) from None
    return config, architecture_of(config, f"{named_by} {settings.name!r}")


def load_model(settings: ModelSettings, architecture: Architecture, device: torch.device, dtype: torch.dtype,
               named_by: str = RECIPE_MODEL, sharded: bool = False):
    """The frozen base model on `device`: NF4 with double quantization, or plain weights in `dtype`.

    `sharded`: for ftcli/sharding.py to shard next. 16-bit weights stay on the CPU, so that a model larger than one
    GPU loads and each decoder layer reaches `device` as this process's shard; NF4 weights (which bitsandbytes
    quantizes on the GPU) go to `device`, their packed bytes stored in `dtype`, because FSDP2 (torch 2.11) shards
    only floating-point parameters."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = dict(dtype=dtype, trust_remote_code=settings.trust_remote_code,
                   attn_implementation=architecture.attention)
    if settings.load_in_4bit:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if sharded else torch.uint8)
        options["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_folder(settings.name, named_by), **options)
    except (OSError, ValueError) as err:
        raise ModelError(_cannot_load(settings.name, named_by, "weights", err)) from None
    redact_origin(model)
    if not (settings.load_in_4bit or sharded):  # else where from_pretrained put it
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def redact_origin(loaded) -> None:
    """Redact where a model, config or tokenizer was loaded from, as soon as it is loaded.

    transformers and peft copy that path or hub id into the files saved from it (adapter_config.json's
    base_model_name_or_path, the model card's base_model, and with transformers 4 config.json's _name_or_path and
    tokenizer_config.json's name_or_path), so a token in it would reach every adapter folder, checkpoint and
    merged model."""
    origin = redact(str(loaded.name_or_path))
    loaded.name_or_path = origin
    if hasattr(loaded, "config"):
        loaded.config.name_or_path = origin
    if hasattr(loaded, "init_kwargs"):
        loaded.init_kwargs["name_or_path"] = origin


def add_lora(model, settings: LoraSettings, architecture: Architecture, seed: int, adapter: Optional[str] = None):
    """Wrap the base model with trainable LoRA adapters (float32): new ones on the requested projections, or the
    weights of the `adapter` folder, whose settings start_adapter.start_from_adapter has put in `settings`."""
    from peft import LoraConfig, get_peft_model

    if adapter is not None:
        return load_start_adapter(model, Path(adapter), settings.dropout)
    targets = settings.target_modules
    if targets != "all-linear":
        targets = architecture.lora_targets(targets)
        check_lora_targets(model, targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias=settings.bias,
                        use_rslora=settings.use_rslora, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def load_start_adapter(model, folder: Path, dropout: float):
    """The adapter in `folder` on the base model, trainable and in float32 (peft upcasts 16-bit adapter weights)
    like a new one, with the recipe's dropout; its config records this base model, as a new adapter's would."""
    from peft import LoraConfig, PeftModel
    from safetensors import SafetensorError

    config = LoraConfig.from_pretrained(str(folder))
    config.lora_dropout = dropout
    config.base_model_name_or_path = model.name_or_path
    try:
        return PeftModel.from_pretrained(model, str(folder), config=config, is_trainable=True)
    except SafetensorError as err:
        raise unreadable_adapter(folder, err) from None


def unreadable_adapter(folder: Path, err: Exception) -> ModelError:
    return ModelError(f"{folder / ADAPTER_WEIGHTS} cannot be read ({first_line(err)}); the adapter folder of "
                      "model.adapter is damaged. Restore the file the training run wrote.")


def load_reference_adapter(model, folder: Union[str, Path]) -> None:
    """Load the adapter in `folder` a second time on the same peft model, frozen and without dropout, as the
    adapter named "reference": the policy a preference loss measures the trained adapter against. The trained
    adapter stays the active one, and the model keeps its train or eval mode (peft's load_adapter sets eval)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    config.lora_dropout = 0.0
    config.inference_mode = True
    training = model.training
    model.add_adapter(REFERENCE_ADAPTER, config)
    model.load_adapter(str(folder), REFERENCE_ADAPTER, is_trainable=False)
    model.train(training)


@contextmanager
def reference_adapter(model) -> Iterator[None]:
    """Forward passes inside run on the reference adapter, without gradients; afterwards the trained adapter is
    active and trainable again. peft's set_adapter makes the adapter it activates trainable unless told
    inference_mode, which freezes every adapter until the trained one is set again."""
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        with torch.no_grad():
            yield
    finally:
        model.set_adapter(TRAINED_ADAPTER)


@contextmanager
def reference_policy(model) -> Iterator[None]:
    """The model as the reference of DPO and of GRPO's KL term: its "reference" adapter active when it has one (the
    run started from an adapter), else no adapter at all."""
    if REFERENCE_ADAPTER in model.peft_config:
        with reference_adapter(model):
            yield
    else:
        with model.disable_adapter():
            yield


def check_lora_targets(model, targets: list[str]) -> None:
    """Every requested projection must exist, else peft would silently adapt fewer layers than asked."""
    available = linear_projection_names(model)
    missing = [target for target in targets if target not in available]
    if missing:
        raise RecipeError(f"lora.target_modules names {', '.join(missing)}, which this model does not have. "
                          f"Its linear projections are: {', '.join(available)} (or use \"all-linear\").")


def linear_projection_names(model) -> list[str]:
    """The names LoRA can target: those of the model's linear layers, the LM head aside."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"})


def meta_model(config, trust_remote_code: bool = False):
    """The model's module tree without weights, to check LoRA targets in a dry run."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _cannot_load(name: str, named_by: str, what: str, err: Exception) -> str:
    if "trust_remote_code" in str(err):
        allow = ("set model.trust_remote_code: true in the recipe" if named_by == RECIPE_MODEL
                 else "pass --trust-remote-code")
        return (f"The {what} of {named_by} {name!r} is defined by Python code shipped with the model, which ftcli "
                f"runs only when told to. If you trust its source, {allow}.")
    return (f"Could not load the {what} of {named_by} {name!r}: {first_line(err)}. Use a local Hugging Face "
            "folder, a .gguf file, or a hub id reachable from this machine.")
