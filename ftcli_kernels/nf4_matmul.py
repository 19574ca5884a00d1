"""x W^T for a few rows of x over an NF4 weight (bitsandbytes' layout, with or without double quantization),
reading the 4-bit weight once and never writing it out dense.

A decode step multiplies a handful of rows (prompts x G completions) by every projection. Dequantizing the
weight to bf16 first writes and reads four times the bytes of the packed weight, for a matmul that then does
almost no arithmetic on them: at 8 rows the dense copy is the whole cost. Here each program unpacks a
(BLOCK_N, BLOCK_K) tile of W in registers (both nibbles of each byte, the NF4 code, the scale of its
quantization block) and multiplies x's matching columns into it in float32. Rows are padded to
the 16 that tl.dot needs; where N gives too few programs to fill the GPU, K is split across programs too and
their float32 partial sums are added by a second small pass (in a fixed order, so a result does not depend on
which program finished first).

There is no autograd: the op serves forwards whose backward, where there is one, dequantizes W itself (the
LoRA kernels' backward does). K must be a multiple of the quantization blocksize, itself a divisor of BLOCK_K
(QLoRA's 64 is); tails of N, K and the rows are masked.
"""

import torch
import triton
import triton.language as tl

from ftcli_kernels.limits import require_kernel_dtype
from ftcli_kernels.nf4_dequantize import (block_scale, nf4_dequantize_reference, plain_nf4, scale_constants,
                                          scale_tensors)

BLOCK_M = 16  # tl.dot's smallest operand; fewer rows are masked
BLOCK_N = 64
BLOCK_K = 128  # weights, so 64 packed bytes of each of BLOCK_N rows per step
PROGRAMS_TO_FILL_GPU = 2 * 132  # two per SM of an H100 or H200, enough loads in flight to stream the weight
# Compiled for sm_90 (triton 3.9, ptxas -v): 184 registers and no spills for 16-bit x, at most 75 KB of shared
# memory for any x, under the 99 KB that sm_86 and sm_89 allow; 4 warps need 254 registers, 3 stages 117 KB
NUM_WARPS, NUM_STAGES = 8, 2


@triton.jit
def _nf4_matmul(x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, partial_ptr,
                rows, n_out, n_in, x_row_stride, k_per_split,
                HALF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, NESTED: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Byte j of a row of W holds its weights 2j (high nibble) and 2j + 1 (low): rather than interleaving the two
    # halves into one tile (a shuffle through shared memory), the high weights meet x's even columns and the low
    # weights its odd ones, in two dots over (BLOCK_N, BLOCK_K / 2) tiles
    PAIRS: tl.constexpr = BLOCK_K // 2
    row = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    x_rows = x_ptr + row[:, None].to(tl.int64) * x_row_stride
    out_col = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # a row of W
    out_mask = out_col < n_out
    split_start = tl.program_id(1) * k_per_split
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, k_per_split, BLOCK_K):
        pair = (split_start + step) // 2 + tl.arange(0, PAIRS)  # byte within a row of W
        pair_mask = 2 * pair < n_in
        byte = out_col[:, None] * (n_in // 2) + pair[None, :]
        mask = out_mask[:, None] & pair_mask[None, :]
        packed = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
        scale = block_scale(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr, byte // HALF_BLOCK, mask,
                            SCALE_BLOCK, NESTED)
        # rounded to x's dtype as the dequantized weight would be; dot_precision says why float32 operands
        high = (tl.load(code_ptr + (packed >> 4)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        low = (tl.load(code_ptr + (packed & 15)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        # masked columns of x are zero, so the masked weights (the offset, under double quantization) add nothing
        x_mask = row_mask[:, None] & pair_mask[None, :]
        x_even = tl.load(x_rows + 2 * pair[None, :], mask=x_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows + 2 * pair[None, :] + 1, mask=x_mask, other=0.0).to(tl.float32)
        accumulator += tl.dot(x_even, tl.trans(high), input_precision=PRECISION)
        accumulator += tl.dot(x_odd, tl.trans(low), input_precision=PRECISION)
    partial = partial_ptr + (tl.program_id(1).to(tl.int64) * rows + row[:, None]) * n_out + out_col[None, :]
    tl.store(partial, accumulator, mask=row_mask[:, None] & out_mask[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's precision for float32 operands holding values of `dtype`: TF32 tensor cores multiply bfloat16 and
    float16 values exactly (their mantissas fit TF32's 10 bits), and full float32 needs "ieee". The operands are
    float32 even for 16-bit x because Triton's interpreter, which runs the CPU tests, multiplies bfloat16 dots'
    bit patterns (https://github.com/triton-lang/triton/issues/11584); at 16 rows the tensor cores' rate is not
    what bounds the op, the weight's bytes are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def k_split(n_out: int, n_in: int) -> tuple[int, int]:
    """(splits of K, columns per split, a multiple of BLOCK_K): as few splits as give PROGRAMS_TO_FILL_GPU programs."""
    steps = triton.cdiv(n_in, BLOCK_K)
    splits = min(steps, triton.cdiv(PROGRAMS_TO_FILL_GPU, triton.cdiv(n_out, BLOCK_N)))
    k_per_split = triton.cdiv(steps, splits) * BLOCK_K
    return triton.cdiv(n_in, k_per_split), k_per_split


def takes_layout(quant_state) -> bool:
    """Whether the weight's quantization blocks tile its rows and a tile's columns: bitsandbytes' blocksize of 64
    (QLoRA's) and any input width that is a multiple of it."""
    blocksize = quant_state.blocksize
    return quant_state.shape[1] % blocksize == 0 and BLOCK_K % blocksize == 0


def nf4_matmul(x2d: torch.Tensor, packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """x2d @ W^T in x2d's dtype for the NF4 (out, in) weight W of a bitsandbytes Params4bit and its quant_state,
    written into `out` when given (any (rows, out) view, such as a column block of stacked q, k, v outputs)."""
    require_kernel_dtype("nf4_matmul", x2d.dtype)
    packed = plain_nf4("nf4_matmul", packed, quant_state)
    n_out, n_in = tuple(quant_state.shape)
    if not takes_layout(quant_state):
        raise ValueError(f"nf4_matmul: a ({n_out}, {n_in}) weight in blocks of {quant_state.blocksize} is not taken: "
                         f"the input width must be a multiple of the blocksize, and the blocksize divide {BLOCK_K}; "
                         "dequantize it instead (ftcli_kernels/nf4_dequantize)")
    if x2d.dim() != 2 or x2d.shape[1] != n_in:
        raise ValueError(f"nf4_matmul: x {tuple(x2d.shape)} does not fit a ({n_out}, {n_in}) weight; x must be "
                         f"(rows, {n_in})")
    rows = x2d.shape[0]
    if out is None:
        out = torch.empty(rows, n_out, dtype=x2d.dtype, device=x2d.device)
    elif tuple(out.shape) != (rows, n_out) or out.dtype != x2d.dtype:
        raise ValueError(f"nf4_matmul: out must be a ({rows}, {n_out}) {x2d.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    splits, k_per_split = k_split(n_out, n_in)
    partials = torch.empty(splits, rows, n_out, dtype=torch.float32, device=x2d.device)
    grid = (triton.cdiv(n_out, BLOCK_N), splits, triton.cdiv(rows, BLOCK_M))
    _nf4_matmul[grid](x2d, packed, quant_state.code, *scale_tensors(quant_state), partials,
                      rows, n_out, n_in, x2d.stride(0), k_per_split,
                      HALF_BLOCK=quant_state.blocksize // 2, **scale_constants(quant_state),
                      PRECISION=dot_precision(x2d.dtype),
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out.copy_(partials.sum(dim=0))


def nf4_matmul_reference(x2d: torch.Tensor, packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Plain PyTorch: the weight dequantized to x's dtype, then the matmul in float32, rounded to x's dtype."""
    weight = nf4_dequantize_reference(packed.as_subclass(torch.Tensor), quant_state, x2d.dtype)
    return (x2d.float() @ weight.float().t()).to(x2d.dtype)
