"""The merged model as one GGUF file for llama.cpp and Ollama, written with the `gguf` package's writer.

Tensor names come from gguf's TensorNameMap; hyper-parameters, rope settings and the tokenizer are written as
llama.cpp's convert_hf_to_gguf.py writes them, with its two weight conventions: Llama-style q/k rows permuted
into llama.cpp's rope layout, and Gemma's norm weights stored as 1 + w. Tensor types follow llama-quantize's
choices for each file type (`tensor_type`), including the _M mixes and the fallbacks for rows that are not a
multiple of 256. The header is written from the safetensors shapes first; weights then stream in one tensor
at a time, so memory holds one merged tensor and its quantized copy.
"""

import math
from dataclasses import dataclass
from pathlib import Path
import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType, MODEL_ARCH

from ftcli.errors import ExportError, FtcliError
from ftcli.export.kquants import quantize_k
from ftcli.export.source import ExportSource, merged_tensors, shard_shapes
from ftcli.export.vocab import add_vocab
from ftcli.loader import pick_device


@dataclass(frozen=True)
class FileType:
    """One `--gguf` choice: llama.cpp's file type and the type most tensors get."""

    file_type: LlamaFileType
    default: Q


FILE_TYPES = {
    "f32": FileType(LlamaFileType.ALL_F32, Q.F32),
    "f16": FileType(LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": FileType(LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": FileType(LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": FileType(LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "q4_k_m": FileType(LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    "q5_k_m": FileType(LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    "q6_k": FileType(LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
}

# Hugging Face model_type -> (llama.cpp architecture, q/k rows permuted for rope, norm weights stored as 1 + w)
ARCHITECTURES = {
    "llama": (MODEL_ARCH.LLAMA, True, False),
    "mistral": (MODEL_ARCH.LLAMA, True, False),  # llama.cpp runs Mistral as Llama
    "qwen2": (MODEL_ARCH.QWEN2, False, False),
    "qwen3": (MODEL_ARCH.QWEN3, False, False),
    "gemma": (MODEL_ARCH.GEMMA, False, True),
    "gemma2": (MODEL_ARCH.GEMMA2, False, True),
    "gemma3_text": (MODEL_ARCH.GEMMA3, False, True),
    "phi3": (MODEL_ARCH.PHI3, False, False),
}
# block sizes of the fallbacks llama-quantize uses when a row is not a multiple of 256
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def parse_types(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FILE_TYPES]
    if unknown or not names:
        raise ExportError(f"--gguf {text!r}: unknown type {', '.join(unknown) or '(none)'}. Choose one or more of "
                          f"{', '.join(FILE_TYPES)}, separated by commas, e.g. --gguf q4_k_m,q8_0.")
    return list(dict.fromkeys(names))


def write_gguf(source: ExportSource, type_name: str, path: Path, tokenizer_folder: Path) -> dict:
    """Write the merged model as a GGUF file of `type_name` at `path`; returns a summary with tensor type counts."""
    config = source.config
    plan = plan_tensors(source, config, FILE_TYPES[type_name])
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config.model_type][0]])
    add_hyperparameters(writer, config, FILE_TYPES[type_name].file_type, source.out_dir.name)
    add_vocab(writer, tokenizer_folder, config.vocab_size, source.trust_remote_code)
    for entry in plan.values():
        writer.add_tensor_info(entry.gguf_name, entry.byte_shape, np.dtype(np.uint8), entry.nbytes, raw_dtype=entry.qtype)
    for entry in _extra_tensors(config):
        writer.add_tensor_info(entry[0], entry[1].shape, np.dtype(np.float32), entry[1].nbytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, weight in merged_tensors(source):
        entry = plan.get(hf_name)
        if entry is not None:
            writer.write_tensor_data(encode(gguf_weight(config, hf_name, weight), entry.qtype))
    for _, values in _extra_tensors(config):
        writer.write_tensor_data(values)
    writer.close()
    counts: dict[str, int] = {}
    for entry in plan.values():
        counts[entry.qtype.name] = counts.get(entry.qtype.name, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "tensor_types": counts}


@dataclass
class PlannedTensor:
    gguf_name: str
    qtype: Q
    byte_shape: tuple[int, ...]
    nbytes: int


def plan_tensors(source: ExportSource, config, file_type: FileType) -> dict[str, PlannedTensor]:
    """Every base tensor's GGUF name and type, in the order the shards hold them (the order data is written)."""
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is {model_type!r}.")
    shapes = {name: shape for shard in shard_shapes(source) for name, shape in shard.items()}
    tied = _tied_head(config, shapes)
    plan = {}
    for hf_name, gguf_name in gguf_names(config, list(shapes)).items():
        qtype = tensor_type(gguf_name, shapes[hf_name], file_type, config.num_hidden_layers, tied)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shapes[hf_name], qtype)
        plan[hf_name] = PlannedTensor(gguf_name, qtype, byte_shape, int(np.prod(byte_shape)))
    return plan


def gguf_names(config, hf_names: list[str]) -> dict[str, str]:
    """The GGUF name of each Hugging Face weight the file holds, by gguf's TensorNameMap; a tied head has none, as
    llama.cpp reads it from token_embd."""
    names = gguf.get_tensor_name_map(ARCHITECTURES[config.model_type][0], config.num_hidden_layers)
    tied = _tied_head(config, hf_names)
    found = {}
    for hf_name in hf_names:
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise FtcliError(f"No GGUF name for the tensor {hf_name} of this {config.model_type} model; GGUF export "
                             "cannot place it.")
        found[hf_name] = gguf_name
    return found


def _tied_head(config, hf_names) -> bool:
    """The LM head is the token embedding: the checkpoint has no head of its own, or the config ties them."""
    return "lm_head.weight" not in hf_names or getattr(config, "tie_word_embeddings", False)


def tensor_type(gguf_name: str, shape: tuple[int, ...], file_type: FileType, n_layer: int, tied: bool) -> Q:
    """The type llama.cpp gives this tensor: convert_hf_to_gguf's for f32/f16/bf16/q8_0, llama-quantize's
    (llama_tensor_get_type) for the rest, for models without experts."""
    is_matrix = len(shape) >= 2 and gguf_name.endswith(".weight") and "_norm." not in gguf_name
    if not is_matrix:
        return Q.F32
    default = file_type.default
    if default in (Q.F32, Q.F16, Q.BF16):
        return default
    columns = shape[-1]
    if default == Q.Q8_0:  # converted directly, as convert_hf_to_gguf --outtype q8_0 does
        return Q.Q8_0 if columns % 32 == 0 else Q.F16
    mix = file_type.file_type
    chosen = default
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        chosen = Q.Q8_0 if columns % 256 else Q.Q6_K
    elif gguf_name == "token_embd.weight":
        chosen = default
    elif ".attn_v." in gguf_name or ".attn_qkv." in gguf_name:
        if mix in (LlamaFileType.MOSTLY_Q4_K_M, LlamaFileType.MOSTLY_Q5_K_M) and _use_more_bits(layer, n_layer):
            chosen = Q.Q6_K
    elif ".ffn_down." in gguf_name:
        if mix in (LlamaFileType.MOSTLY_Q4_K_M, LlamaFileType.MOSTLY_Q5_K_M) and _use_more_bits(layer, n_layer):
            chosen = Q.Q6_K
    block = gguf.GGML_QUANT_SIZES[chosen][0]
    if columns % block:
        chosen = K_FALLBACK.get(chosen, Q.F16)
        if columns % gguf.GGML_QUANT_SIZES[chosen][0]:
            chosen = Q.F16
    return chosen


def _use_more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third one between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def gguf_weight(config, hf_name: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight in llama.cpp's conventions: permuted q/k rows for Llama-style rope, Gemma's norms as 1 + w."""
    weight = weight.float()
    heads = _rope_permuted_heads(config, hf_name)
    if heads:
        weight = (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
                  .swapaxes(1, 2).reshape(weight.shape))
    return weight + 1 if _shifted_norm(config, hf_name) else weight


def hf_weight(config, hf_name: str, stored: torch.Tensor) -> torch.Tensor:
    """`gguf_weight` undone: a weight read back from a GGUF file in Hugging Face's conventions."""
    weight = stored.float()
    heads = _rope_permuted_heads(config, hf_name)
    if heads:
        weight = (weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
                  .swapaxes(1, 2).reshape(weight.shape))
    return weight - 1 if _shifted_norm(config, hf_name) else weight


def _rope_permuted_heads(config, hf_name: str) -> int:
    """The heads of a q or k weight whose rows llama.cpp's Llama-style rope takes in another order; 0 otherwise."""
    _, permute, _ = ARCHITECTURES[config.model_type]
    if not permute or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return 0
    return config.num_key_value_heads if hf_name.endswith("k_proj.weight") else config.num_attention_heads


def _shifted_norm(config, hf_name: str) -> bool:
    """A norm weight llama.cpp stores as 1 + w (Gemma's)."""
    return ARCHITECTURES[config.model_type][2] and hf_name.endswith("norm.weight")


def encode(weight: torch.Tensor, qtype: Q) -> np.ndarray:
    """The tensor's bytes in `qtype`: torch for floats and k-quants, gguf's quantizers for the legacy types."""
    if qtype == Q.F32:
        data = weight.float().numpy()
    elif qtype == Q.F16:
        data = weight.half().numpy()
    elif qtype == Q.BF16:
        data = weight.to(torch.bfloat16).view(torch.int16).numpy()
    elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return quantize_k(weight.to(pick_device()), qtype)
    else:
        return gguf.quants.quantize(weight.float().numpy(), qtype)
    return data.view(np.uint8).reshape(*data.shape[:-1], -1)


def add_hyperparameters(writer: gguf.GGUFWriter, config, file_type: LlamaFileType, name: str) -> None:
    """Architecture hyper-parameters and rope settings under the keys llama.cpp reads for this family."""
    model_type = config.model_type
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim * float(rope.get("partial_rotary_factor", 1.0) or 1.0)))
    _add_rope_scaling(writer, config, rope)
    if model_type in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(config.sliding_window)
        if model_type == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        else:
            local = _rope_parameters(config, "sliding_attention")
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    elif model_type in ("mistral", "phi3", "qwen2") and getattr(config, "sliding_window", None) and \
            getattr(config, "use_sliding_window", True):
        writer.add_sliding_window(config.sliding_window)


def _rope_parameters(config, layer_kind: str = "full_attention") -> dict:
    """transformers 5 keeps rope settings in rope_parameters (per layer kind for Gemma 3); older ones flat."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if layer_kind in parameters:
        parameters = parameters[layer_kind]
    merged = dict(getattr(config, "rope_scaling", None) or {})
    merged.update(parameters)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in merged and getattr(config, key, None) is not None:
            merged[key] = getattr(config, key)
    return merged


def _add_rope_scaling(writer: gguf.GGUFWriter, config, rope: dict) -> None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind != "llama3":  # llama3's scaling travels as the rope_freqs tensor (_extra_tensors)
        raise FtcliError(f"GGUF export does not support the rope scaling {kind!r} of this model yet; export "
                         "--merged and convert that folder with llama.cpp's convert_hf_to_gguf.py.")


def _extra_tensors(config) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the checkpoint lacks: Llama 3.1's rope frequency factors."""
    rope = _rope_parameters(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return []
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config, rope))]


def llama3_rope_factors(config, rope: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope: long wavelengths stretched by `factor`, short ones kept,
    a smooth ramp between (the same curve transformers applies to inv_freq)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rope.get("rope_theta", 10000.0))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)

