"""GGUF tensor bytes -> float32 values in torch, on whatever device holds the bytes.

`ftcli export --check` compares every tensor of a file with the trained weight and runs the model it holds; on a
GPU that model is there, so the file's bytes go there and are dequantized there, which takes milliseconds where
the `gguf` package's numpy port of ggml's dequantizers (`gguf.quants.dequantize`) takes minutes for an 8B model.
The block layouts are llama.cpp's (ggml-common.h), as that port reads them; each type here reads all blocks of a
tensor at once and does the port's float32 operations in the port's order (a product, then a sum, never fused),
so the values are bit-identical to it (tests/test_export_dequantize.py). The types are those ftcli's export
writes: the float types, Q8_0, Q4_0, the k-quants and their fallbacks for rows that are not a multiple of 256.
"""

import torch
from gguf import GGML_QUANT_SIZES, QK_K
from gguf import GGMLQuantizationType as Q

from ftcli.errors import FtcliError


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """The values of a tensor of `qtype` and `shape` (numpy order, rows first) from its bytes (uint8, on any
    device): float32, of `shape`, on the bytes' device."""
    expected = tensor_bytes(qtype, shape)
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise FtcliError(f"A {qtype.name} tensor of shape {list(shape)} takes {expected} bytes, but "
                         f"{raw.numel()} {raw.dtype} values were read for it: the GGUF file is truncated or damaged. "
                         "Export it again with --overwrite.")
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    return _BLOCK_DEQUANTIZERS[qtype](blocks).reshape(shape)


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    """How many bytes a tensor of `qtype` and `shape` takes in a GGUF file."""
    if qtype not in _BLOCK_DEQUANTIZERS:
        raise FtcliError(f"The GGUF file holds a tensor of type {qtype.name}, which the export check cannot read: "
                         f"it reads {', '.join(kind.name for kind in _BLOCK_DEQUANTIZERS)}, the types ftcli's export "
                         "writes. Check files ftcli exported, or pass --no-check to skip the check.")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_size:
        raise FtcliError(f"The GGUF file holds a {qtype.name} tensor of shape {list(shape)}, whose rows are not made "
                         f"of whole {block_size}-value blocks: the file is damaged. Export it again with --overwrite.")
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows * shape[-1] // block_size * type_size


def _as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Little-endian bytes (last dimension a multiple of the dtype's size) read as `dtype`."""
    return data.contiguous().view(dtype)


def _f16(data: torch.Tensor) -> torch.Tensor:
    """Half-precision values (a block's scale, or an F16 tensor's values) as float32."""
    return _as(data, torch.float16).float()


def _nibbles(data: torch.Tensor, groups: int) -> torch.Tensor:
    """Bytes split into `groups` runs, each run's low nibbles then its high nibbles: (blocks, 2 * groups, run)."""
    count = data.shape[0]
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=data.device)
    return ((data.reshape(count, groups, 1, -1) >> shifts[:, None]) & 0xF).reshape(count, 2 * groups, -1)


def _bits(data: torch.Tensor, width: int) -> torch.Tensor:
    """Each byte's `8 // width` fields of `width` bits, lowest first, as (blocks, field, byte)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=data.device)
    return (data[:, None, :] >> shifts[None, :, None]) & ((1 << width) - 1)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return _as(blocks, torch.float32)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return _as(blocks, torch.bfloat16).float()  # bfloat16 -> float32 appends 16 zero bits, as ggml does


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """d (fp16), then 32 signed bytes: d * q."""
    return _as(blocks[:, 2:], torch.int8).float() * _f16(blocks[:, :2])


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """d (fp16), then 16 bytes of 4-bit levels (value j in byte j's low nibble, j + 16 in its high): d * (q - 8)."""
    levels = _nibbles(blocks[:, 2:], 1).reshape(blocks.shape[0], 32)
    return _f16(blocks[:, :2]) * (levels.float() - 8)


def _five_bit_levels(high_bits: torch.Tensor, low_nibbles: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's levels: 32 fifth bits (a little-endian uint32, bit j for value j) over Q4_0's nibbles."""
    fifth = _bits(high_bits, 1).transpose(1, 2).reshape(high_bits.shape[0], 32)
    return _nibbles(low_nibbles, 1).reshape(low_nibbles.shape[0], 32) | (fifth << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """d (fp16), 4 bytes of fifth bits, 16 bytes of nibbles: d * (q - 16)."""
    levels = _five_bit_levels(blocks[:, 2:6], blocks[:, 6:])
    return _f16(blocks[:, :2]) * (levels.float() - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """d and m (fp16), 4 bytes of fifth bits, 16 bytes of nibbles: d * q + m."""
    levels = _five_bit_levels(blocks[:, 4:8], blocks[:, 8:])
    return _f16(blocks[:, :2]) * levels.float() + _f16(blocks[:, 2:4])


def _k_scales_mins(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's scale and minimum of each 32-value sub-block, float32 (blocks, 8, 1): d * 6-bit scale code and
    dmin * 6-bit min code. The 12 code bytes: sub-blocks 0-3's codes whole in bytes 0-3 (scales) and 4-7 (mins),
    sub-blocks 4-7's low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and top 2 bits in the top 2 bits
    of bytes 0-3 and 4-7."""
    codes = blocks[:, 4:16].reshape(-1, 3, 4)
    scale_low, min_low, high = codes[:, 0], codes[:, 1], codes[:, 2]
    scale_codes = torch.cat([scale_low & 0x3F, (high & 0x0F) | ((scale_low >> 2) & 0x30)], dim=-1)
    min_codes = torch.cat([min_low & 0x3F, (high >> 4) | ((min_low >> 2) & 0x30)], dim=-1)
    scales = _f16(blocks[:, :2]) * scale_codes.float()
    mins = _f16(blocks[:, 2:4]) * min_codes.float()
    return scales[..., None], mins[..., None]


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """d, dmin (fp16), 12 bytes of scale and min codes, 128 bytes of nibbles (32-byte chunk c: sub-block 2c in
    the low nibbles, 2c + 1 in the high): scale * q - min per sub-block."""
    scales, mins = _k_scales_mins(blocks)
    levels = _nibbles(blocks[:, 16:], 4)
    return (scales * levels.float() - mins).reshape(-1, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K with 32 bytes of fifth bits before the nibbles (bit i of byte j: value j of sub-block i)."""
    scales, mins = _k_scales_mins(blocks)
    levels = _nibbles(blocks[:, 48:], 4) | (_bits(blocks[:, 16:48], 1) << 4)
    return (scales * levels.float() - mins).reshape(-1, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """128 bytes of low nibbles (two 64-byte halves, each low nibbles then high), 64 bytes of 2-bit high parts
    (two 32-byte halves, each four fields), 16 signed 8-bit scales, d (fp16): d * scale * (q - 32) per 16 values."""
    count = blocks.shape[0]
    low = _nibbles(blocks[:, :128], 2).reshape(count, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(count * 2, 32), 2).reshape(count, 8, 32)
    levels = ((low | (high << 4)).float() - 32).reshape(count, 16, 16)
    scales = _f16(blocks[:, 208:]) * _as(blocks[:, 192:208], torch.int8).float()
    return (scales[..., None] * levels).reshape(count, QK_K)


_BLOCK_DEQUANTIZERS = {Q.F32: _f32, Q.F16: _f16, Q.BF16: _bf16, Q.Q8_0: _q8_0, Q.Q4_0: _q4_0,
                       Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
