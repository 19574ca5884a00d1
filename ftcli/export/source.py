"""The merged model's weights, read from a training output folder one base shard at a time.

A training output folder holds a PEFT adapter; its base model is named by recipe.yaml's model.name (or by
adapter_config.json's base_model_name_or_path). Merging is W + scale * B @ A per adapted weight, done while
each base shard streams through, so memory never holds more than one shard of the base model. Where the
adapter was trained over an NF4 base, the base weight first goes through the same NF4 round trip
(bitsandbytes, blocks of 64, double quantization) so the merged model is the one that was trained.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ftcli.errors import FtcliError, ModelError, OutputFolderError
from ftcli.trained import trained_model_section

ADAPTER_PREFIX = "base_model.model."


@dataclass
class ExportSource:
    """What an export reads: the trained output folder, its base model folder and the adapter's deltas."""

    out_dir: Path
    base_folder: Path
    shards: list[Path]               # the base model's safetensors files, in order
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # base weight name -> (A, B, scale)
    replaced: dict[str, torch.Tensor]  # weights the adapter stores whole (trained biases)
    nf4_weights: set[str]            # base weights that were NF4 during training
    dtype: torch.dtype               # 16-bit dtype of the merged weights
    trust_remote_code: bool = False  # run the model's own Python code (--trust-remote-code)

    @property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.base_folder, trust_remote_code=self.trust_remote_code)


def open_source(out_dir: Path, trust_remote_code: bool = False) -> ExportSource:
    """Check the training output folder and find everything an export needs, without reading base weights."""
    adapter_config_path = out_dir / "adapter_config.json"
    adapter_weights_path = out_dir / "adapter_model.safetensors"
    if not out_dir.is_dir() or not adapter_config_path.is_file() or not adapter_weights_path.is_file():
        raise OutputFolderError(f"{out_dir} is not a training output folder: it needs adapter_config.json and "
                                "adapter_model.safetensors, as `ftcli train` writes them. Pass the folder a training "
                                "run wrote (its output.dir).")
    adapter_config = json.loads(adapter_config_path.read_text())
    recipe_model = trained_model_section(out_dir)
    base_name = recipe_model.get("name")
    if not base_name:
        raise OutputFolderError(f"Neither {out_dir / 'recipe.yaml'} (model.name) nor {adapter_config_path} "
                                "(base_model_name_or_path) names the base model, so there is nothing to merge into.")
    base_folder = _base_folder(str(base_name))
    config = _load_config(base_folder, trust_remote_code)
    lora, replaced = _adapter_deltas(adapter_weights_path, adapter_config)
    trained_in_4bit = bool(recipe_model.get("load_in_4bit", False))
    return ExportSource(out_dir=out_dir, base_folder=base_folder, shards=safetensors_shards(base_folder), lora=lora,
                        replaced=replaced, nf4_weights=_linear_weights(config, trust_remote_code) if trained_in_4bit
                        else set(), dtype=merged_dtype(config), trust_remote_code=trust_remote_code)


def merged_dtype(config) -> torch.dtype:
    """float16 for a float16 base, else bfloat16 (which keeps float32's range)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.float16 if str(stored).removeprefix("torch.") == "float16" else torch.bfloat16


def merged_shards(source: ExportSource) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the merged weights one base shard at a time, as {hf name: 16-bit tensor}."""
    for shard in source.shards:
        yield dict(_merged_tensors_of(source, shard))


def merged_tensors(source: ExportSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf name, 16-bit merged tensor) one at a time, in shard order: memory holds one tensor."""
    for shard in source.shards:
        yield from _merged_tensors_of(source, shard)


def _merged_tensors_of(source: ExportSource, shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(shard), framework="pt") as handle:
        for name in handle.keys():
            yield name, merge_weight(source, name, handle.get_tensor(name))


def shard_shapes(source: ExportSource) -> list[dict[str, tuple[int, ...]]]:
    """Every base tensor's shape per shard, read from the safetensors headers only."""
    shapes = []
    for shard in source.shards:
        with safe_open(str(shard), framework="pt") as handle:
            shapes.append({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes


def merge_weight(source: ExportSource, name: str, weight: torch.Tensor) -> torch.Tensor:
    if name in source.replaced:
        return source.replaced[name].to(source.dtype)
    if name in source.nf4_weights:
        weight = nf4_round_trip(weight.to(source.dtype))
    if name in source.lora:
        lora_a, lora_b, scale = source.lora[name]
        weight = weight.float() + scale * (lora_b.float() @ lora_a.float())
    return weight.to(source.dtype).contiguous()


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the NF4 base held it in training: quantized as transformers does for QLoRA, then restored."""
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb.dequantize_4bit(packed, state).reshape(weight.shape)


def _base_folder(name: str) -> Path:
    """A local folder (a .gguf base becomes its cached converted folder, as in training), or a hub snapshot."""
    from ftcli.loader import model_folder

    folder = model_folder(name)
    if Path(folder).is_dir():
        return Path(folder)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(folder, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many kinds; all mean the same to the user
        raise ModelError(f"The base model {name!r} is neither a local folder nor downloadable here ({err}). Set "
                         "model.name in the output folder's recipe.yaml to a local copy of the base model.") from None


def _load_config(base_folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"Could not read the base model's config in {base_folder}: {err}") from None


def safetensors_shards(base_folder: Path) -> list[Path]:
    index = base_folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_folder / file for file in files]
    single = base_folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"The base model folder {base_folder} has no safetensors weights (model.safetensors or "
                     "model.safetensors.index.json). Export reads safetensors only; re-save the base model with "
                     "save_pretrained(..., safe_serialization=True).")


def _adapter_deltas(weights_path: Path, adapter_config: dict):
    """Pair each lora_A with its lora_B under the base weight's name, with the adapter's scale."""
    state = load_file(str(weights_path))
    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    rank_pattern = adapter_config.get("rank_pattern") or {}
    lora, replaced = {}, {}
    for key, tensor in state.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            lora_b = state[key.replace(".lora_A.", ".lora_B.")]
            rank = tensor.shape[0]
            alpha = _pattern_value(module, alpha_pattern, adapter_config["lora_alpha"])
            rank = _pattern_value(module, rank_pattern, rank)
            scale = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
            lora[module + ".weight"] = (tensor, lora_b, scale)
        elif ".lora_B." in name:
            continue
        elif name.endswith(".bias"):
            replaced[name] = tensor
        else:
            raise FtcliError(f"The adapter in {weights_path} holds {key}, which export cannot merge (only LoRA A/B "
                             "pairs and trained biases). Merge it with peft's merge_and_unload instead.")
    return lora, replaced


def _pattern_value(module: str, patterns: dict, default):
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return default


def _linear_weights(config, trust_remote_code: bool) -> set[str]:
    """Names of the weights bitsandbytes quantized for QLoRA: every Linear but the LM head."""
    from ftcli.loader import meta_model

    model = meta_model(config, trust_remote_code)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}


def adapter_files(out_dir: Path) -> list[Path]:
    """The files that make up the adapter folder itself, for the plain (no flag) export."""
    return sorted(path for path in out_dir.iterdir() if path.is_file() and not path.name.startswith("."))


def source_summary(source: ExportSource) -> dict:
    return {"base": str(source.base_folder), "adapted_weights": len(source.lora),
            "trained_in_4bit": bool(source.nf4_weights), "dtype": str(source.dtype).removeprefix("torch.")}
