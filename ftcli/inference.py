"""Opening a model to talk to: an output folder of `ftcli train`, a merged or Hugging Face folder, or a .gguf file.

An adapter folder names its base in recipe.yaml (or peft's adapter_config.json). The base is loaded as it was
trained: NF4 on a GPU when the recipe trained in 4 bits, 16-bit or float32 otherwise. A 16-bit adapter is
merged into the base weights, so answering costs no more than the base model; an NF4 base keeps the adapter
beside it, since merging would round the adapter into 4-bit weights.

A model's own Python code (transformers' trust_remote_code) runs only when the person passes
--trust-remote-code: a folder's recipe.yaml may come from anyone, so it cannot turn that on.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ftcli.errors import InputError, ModelError, first_line
from ftcli.loader import compute_dtype, converted_gguf_folder, load_config, load_model, pick_device
from ftcli.recipe import ModelSettings
from ftcli.trained import trained_model_section

KINDS = ("an output folder of `ftcli train` (an adapter folder), a merged or Hugging Face model folder, "
         "or a .gguf file")


@dataclass
class OpenedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    context_length: int
    description: str  # one line for the terminal: what was loaded, where, in which precision


def open_model(path: Path, base: Optional[Path] = None, trust_remote_code: bool = False) -> OpenedModel:
    """Load what `path` holds for generation, in eval mode, on the GPU when there is one."""
    if not path.exists():
        raise InputError(f"{path} does not exist. Give {KINDS}.")
    if base is not None and not (path / "adapter_config.json").is_file():
        raise InputError(f"--base is for adapter folders, but {path} has no adapter_config.json; "
                         "drop --base to load it as it is.")
    if (path / "adapter_config.json").is_file():
        return _open_adapter(path, base, trust_remote_code)
    if path.is_file() and path.suffix == ".gguf":
        folder = converted_gguf_folder(path)
        return _open_plain(folder, f"{path} (GGUF, dequantized)", trust_remote_code)
    if (path / "config.json").is_file():
        return _open_plain(path, str(path), trust_remote_code)
    raise InputError(f"{path} is neither an adapter folder (adapter_config.json), a model folder (config.json) "
                     f"nor a .gguf file. Give {KINDS}.")


def _open_plain(folder: Path, shown: str, trust_remote_code: bool) -> OpenedModel:
    settings = ModelSettings(name=str(folder), load_in_4bit=False, kernels=False, trust_remote_code=trust_remote_code)
    model = _load_base(settings, "the model")
    precision = str(next(model.parameters()).dtype).removeprefix("torch.")
    return _opened(model, _tokenizer(folder, trust_remote_code), f"{shown} on {model.device.type}, {precision}")


def _open_adapter(folder: Path, base: Optional[Path], trust_remote_code: bool) -> OpenedModel:
    from peft import PeftModel

    trained = trained_model_section(folder)
    base_name = str(base) if base else trained.get("name")
    where = "--base" if base else "its recipe.yaml or adapter_config.json"
    if not base_name:
        raise InputError(f"{folder} does not say which base model its adapter belongs to. Pass the base "
                         "with --base PATH.")
    looks_local = base is not None or base_name.startswith((".", "/", "~")) or base_name.endswith(".gguf")
    if looks_local and not Path(base_name).expanduser().exists():
        raise InputError(f"The base model of {folder}, {base_name!r} (from {where}), does not exist here. Pass "
                         "its location with --base PATH (a Hugging Face folder or the .gguf file it was trained on).")
    in_4bit = bool(trained.get("load_in_4bit", False)) and torch.cuda.is_available()
    settings = ModelSettings(name=str(Path(base_name).expanduser()) if looks_local else base_name,
                             load_in_4bit=in_4bit, dtype=trained.get("dtype", "auto"), kernels=False,
                             trust_remote_code=trust_remote_code)
    named_by = "--base" if base else f"the base model of {folder}"
    model = PeftModel.from_pretrained(_load_base(settings, named_by), folder)
    if not in_4bit:
        model = model.merge_and_unload()
    model.eval()
    precision = "nf4 + adapter" if in_4bit else str(next(model.parameters()).dtype).removeprefix("torch.") + ", merged"
    return _opened(model, _tokenizer(folder, trust_remote_code),
                   f"{folder} on base {base_name} on {pick_device().type}, {precision}")


def _load_base(settings: ModelSettings, named_by: str):
    """The model through the loader training uses (same attention implementation, same quantization)."""
    device = pick_device()
    _, architecture = load_config(settings, named_by)
    model = load_model(settings, architecture, device, compute_dtype(settings, device), named_by)
    model.config.use_cache = True
    return model.eval()


def _tokenizer(folder: Path, trust_remote_code: bool):
    """The tokenizer saved with the model: `ftcli train` saves it with the chat template it trained with."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder} has no loadable tokenizer ({first_line(err)}). Save the "
                         "tokenizer into that folder, as `ftcli train` does.") from None
    if not tokenizer.chat_template:
        raise ModelError(f"The tokenizer in {folder} has no chat template, so ftcli cannot lay out a conversation "
                         "for it. Chat with an instruction-tuned model, or with an adapter trained by ftcli (it "
                         "saves the template it trained with).")
    return tokenizer


def _opened(model, tokenizer, description: str) -> OpenedModel:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None) or 4096
    return OpenedModel(model, tokenizer, next(model.parameters()).device, context, description)
