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

BYTES_PER_PROGRAM = 1024


@triton.jit
def block_scale(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, block, mask,
                SCALE_BLOCK: tl.constexpr, NESTED: tl.constexpr):
    """The float32 scale of each quantization block in `block` (2 * HALF_BLOCK weights share one): stored as is,
    or under double quantization rebuilt from its 8-bit code, its group's scale and the offset."""
    # one return after the branches: the compiler would type the statements after a return in a taken branch too
    if NESTED:
        quantized_scale = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = (tl.load(absmax_code_ptr + quantized_scale, mask=mask, other=0.0)
                 * tl.load(absmax_scale_ptr + block // SCALE_BLOCK, mask=mask, other=0.0) + tl.load(offset_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize(packed_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, out_ptr, n_bytes,
                HALF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
    scale = block_scale(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, byte // HALF_BLOCK, mask,
                        SCALE_BLOCK, NESTED)
    high = tl.load(code_ptr + (packed >> 4), mask=mask, other=0.0) * scale  # the first weight of the pair
    low = tl.load(code_ptr + (packed & 15), mask=mask, other=0.0) * scale
    pairs = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
    position = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + position, pairs, mask=position < 2 * n_bytes)


def plain_nf4(op: str, packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The packed bytes as a plain tensor, after a loud error on anything but NF4 bytes that hold the whole weight.

    bitsandbytes' Params4bit routes every attribute read through __torch_function__; a plain view skips that."""
    packed = packed.as_subclass(torch.Tensor)
    if quant_state.quant_type != "nf4" or packed.dtype != torch.uint8:
        raise ValueError(f"{op}: expects NF4 weights packed in uint8, got {quant_state.quant_type} in {packed.dtype}")
    shape = tuple(quant_state.shape)
    numel = shape[0] * shape[1]
    if numel % 2 or packed.numel() * 2 != numel or quant_state.blocksize % 2:
        raise ValueError(f"{op}: {packed.numel()} packed bytes do not hold a {shape} weight")
    return packed


def nf4_dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (out, in) weight in `dtype` of a bitsandbytes NF4 Params4bit and its quant_state, written into
    `out` when given (a contiguous block of a larger buffer, such as rows of stacked q, k, v weights)."""
    packed = plain_nf4("nf4_dequantize", packed, quant_state)
    shape = tuple(quant_state.shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be a contiguous {shape} {dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    _dequantize[(triton.cdiv(packed.numel(), BYTES_PER_PROGRAM),)](
        packed, quant_state.code, *scale_tensors(quant_state), out, packed.numel(),
        HALF_BLOCK=quant_state.blocksize // 2, **scale_constants(quant_state), BYTES=BYTES_PER_PROGRAM)
    return out


def scale_tensors(quant_state) -> tuple[torch.Tensor, ...]:
    """block_scale's absmax, absmax code, absmax scale and offset (the offset read on the device, never the host);
    without double quantization only the first is read, and absmax stands in for the others."""
    if not quant_state.nested:
        return (quant_state.absmax,) * 4
    state2 = quant_state.state2
    return quant_state.absmax, state2.code, state2.absmax, quant_state.offset


def scale_constants(quant_state) -> dict:
    """block_scale's compile-time arguments."""
    nested = quant_state.nested
    return {"SCALE_BLOCK": quant_state.state2.blocksize if nested else 1, "NESTED": nested}


def nf4_dequantize_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch: both levels of scales rebuilt in float32, each byte split into its high and low weight."""
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
