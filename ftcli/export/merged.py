"""The merged model as a Hugging Face folder: 16-bit safetensors shards, config, tokenizer, generation config.

Shards mirror the base model's, each merged and written before the next is read, so memory holds one shard.
"""

import json
from pathlib import Path

from safetensors.torch import save_file

from ftcli.export.source import ExportSource, merged_shards
from ftcli.loader import redact_origin


def write_merged(source: ExportSource, folder: Path) -> dict:
    """Write the merged model into `folder` (which exists and is empty); returns a summary."""
    from transformers import AutoTokenizer, GenerationConfig

    names = [f"model-{index:05d}-of-{len(source.shards):05d}.safetensors" for index in range(1, len(source.shards) + 1)]
    if len(names) == 1:
        names = ["model.safetensors"]
    weight_map, total_bytes = {}, 0
    for name, tensors in zip(names, merged_shards(source)):
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({tensor_name: name for tensor_name in tensors})
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    if len(names) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = source.config
    redact_origin(config)
    config.dtype = source.dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(source.base_folder)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    # the tokenizer saved with the adapter: the one training used, chat template included
    tokenizer = AutoTokenizer.from_pretrained(source.out_dir, trust_remote_code=source.trust_remote_code)
    redact_origin(tokenizer)
    tokenizer.save_pretrained(folder)
    return {"path": str(folder), "bytes": total_bytes, "shards": len(names)}
