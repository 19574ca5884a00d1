"""NF4 weights (bitsandbytes' layout, with or without double quantization) dequantized in one Triton launch.

bitsandbytes first dequantizes the 8-bit block scales into a new tensor, adds their offset in another kernel,
and only then unpacks the weights: three launches and as many Python calls for every projection, three times
per training step. On a GPU that waits on the host between small launches, that overhead is the cost; here
the block scale is rebuilt inline from its two levels, and each packed byte gives its two weights.

There is no backward: the base weight is frozen.
"""

import torch
import triton
import triton.language as tl

BYTES_PER_PROGRAM = 4096  # 41 us for a Llama-3-8B gate (3.5 TB/s of 2.5 bytes a weight) on an H200; 1024: 48 us


@triton.jit
def _dequantize(packed_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, out_ptr, n_bytes,
                HALF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr):
    """BLOCKS blocks of 2 * HALF_BLOCK weights, one row each: a block's scale is read and rebuilt once, then
    broadcast over its row."""
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    byte = block[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    mask = byte < n_bytes
    in_range = block * HALF_BLOCK < n_bytes
    if NESTED:
        quantized_scale = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = (tl.load(absmax_code_ptr + quantized_scale)
                 * tl.load(absmax_scale_ptr + block // SCALE_BLOCK, mask=in_range, other=0.0) + tl.load(offset_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    packed = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4)) * scale[:, None]  # the first weight of the pair; any nibble is a code
    low = tl.load(code_ptr + (packed & 15)) * scale[:, None]
    pairs = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
    position = block[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
    tl.store(out_ptr + position, pairs, mask=position < 2 * n_bytes)


def nf4_dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (out, in) weight in `dtype` of a bitsandbytes NF4 Params4bit and its quant_state, written into
    `out` when given (a contiguous block of a larger buffer, such as rows of stacked q, k, v weights).

    The packed bytes may be stored in a wider dtype (bitsandbytes' quant_storage, as FSDP needs: ftcli/sharding.py);
    they are read as bytes."""
    # bitsandbytes' Params4bit routes every attribute read through __torch_function__; a plain view skips that
    packed = packed_bytes(packed.as_subclass(torch.Tensor))
    if quant_state.quant_type != "nf4":
        raise ValueError(f"nf4_dequantize: expects NF4 weights, got {quant_state.quant_type}")
    shape = tuple(quant_state.shape)
    numel = shape[0] * shape[1]
    if numel % 2 or packed.numel() * 2 != numel:
        raise ValueError(f"nf4_dequantize: {packed.numel()} packed bytes do not hold a {shape} weight")
    if quant_state.blocksize < 2 or quant_state.blocksize & (quant_state.blocksize - 1):
        raise ValueError(f"nf4_dequantize: a block of {quant_state.blocksize} weights is not a power of two, as "
                         "bitsandbytes' block sizes are")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be a contiguous {shape} {dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    nested = quant_state.nested
    state2 = quant_state.state2 if nested else None
    half_block = quant_state.blocksize // 2
    blocks = max(1, BYTES_PER_PROGRAM // half_block)
    _dequantize[(triton.cdiv(packed.numel(), blocks * half_block),)](
        packed, quant_state.code, quant_state.absmax,
        state2.code if nested else quant_state.absmax, state2.absmax if nested else quant_state.absmax,
        quant_state.offset if nested else quant_state.absmax, out, packed.numel(),  # offset: read on the device
        HALF_BLOCK=half_block, SCALE_BLOCK=state2.blocksize if nested else 1, NESTED=nested, BLOCKS=blocks)
    return out


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """NF4 weights as the uint8 bytes they are, whatever dtype stores them."""
    return packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)


def nf4_dequantize_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch: both levels of scales rebuilt in float32, each byte split into its high and low weight."""
    packed = packed_bytes(packed.as_subclass(torch.Tensor))
    if quant_state.nested:
        state2 = quant_state.state2
        scales = state2.code[quant_state.absmax.long()].view(-1, 1) * state2.absmax.repeat_interleave(
            state2.blocksize)[:quant_state.absmax.numel()].view(-1, 1)
        scales = scales.view(-1) + quant_state.offset
    else:
        scales = quant_state.absmax.float()
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1).long()
    weights = quant_state.code[nibbles].view(-1, quant_state.blocksize) * scales.view(-1, 1)
    return weights.view(tuple(quant_state.shape)).to(dtype)
