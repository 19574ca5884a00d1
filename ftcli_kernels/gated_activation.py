"""The gated MLP activation `act(gate) * up` in one Triton pass: SwiGLU (SiLU, Llama, Mistral, Qwen, Phi-3)
and GeGLU (tanh-approximated GELU, Gemma).

PyTorch runs the activation and the product as separate kernels and keeps act(gate) for backward; here the
forward reads gate and up once, and backward recomputes the activation from gate instead of storing it. Given the
r-wide LoRA products of gate and up (`LoraTerms`), the kernels add those terms to each tile they read, so that the
fused LoRA MLP (lora_mlp.py) never adds them by a pass of its own.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ftcli_kernels.limits import require_kernel_dtype

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
BLOCK_M, BLOCK_N = 32, 128  # 4,096 elements a program
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _activation_and_slope(g, KIND: tl.constexpr):
    """act(g) and act'(g), in float32."""
    if KIND == 0:
        sigmoid = tl.sigmoid(g)
        return g * sigmoid, sigmoid * (1.0 + g * (1.0 - sigmoid))
    inner = SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g)
    t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
    slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * g * g)
    return 0.5 * g * (1.0 + t), slope


class LoraTerms(NamedTuple):
    """The LoRA terms s (x A^T) B^T of gate and up, for gate and up tensors computed without them: the kernels add
    them tile by tile (r-wide products, cheap) instead of a pass of their own over each gate-wide tensor. `*_xa` are
    the (rows, r) x A^T, `*_B` the (width, r) B, in the inputs' dtype."""

    gate_xa: torch.Tensor
    gate_B: torch.Tensor
    gate_scaling: float
    up_xa: torch.Tensor
    up_B: torch.Tensor
    up_scaling: float


@triton.jit
def _plus_lora_term(tile, scaling, xa_ptr, xa_stride, b_ptr, b_stride, rank, rows, cols, row_mask, col_mask,
                    BLOCK_R: tl.constexpr, DOT_FLOAT32: tl.constexpr):
    """A float32 tile plus s (x A^T) B^T over it; ranks past `rank` load as zeros, so BLOCK_R may exceed it. The tile is
    the product's accumulator, so it stays in the product's layout (measured 10 us less over Llama-3-8B's 4,096 x
    14,336 than adding the product to it), and s scales x A^T, rounded to its dtype: exact for the usual powers of
    two (alpha = r, 2 r) and for 0 (a disabled adapter)."""
    ranks = tl.arange(0, BLOCK_R)
    xa = tl.load(xa_ptr + rows[:, None] * xa_stride + ranks[None, :],
                 mask=row_mask[:, None] & (ranks[None, :] < rank), other=0.0)
    b = tl.load(b_ptr + cols[None, :] * b_stride + ranks[:, None],
                mask=col_mask[None, :] & (ranks[:, None] < rank), other=0.0)
    if DOT_FLOAT32:
        return tl.dot(xa.to(tl.float32) * scaling, b.to(tl.float32), tile, input_precision="ieee")
    return tl.dot((xa.to(tl.float32) * scaling).to(xa.dtype), b, tile)


@triton.jit
def _gate_and_up_tile(gate_ptr, gate_stride, up_ptr, up_stride, n_rows, n_cols,
                      gate_xa_ptr, gate_xa_stride, gate_b_ptr, gate_b_stride, gate_scaling, gate_rank,
                      up_xa_ptr, up_xa_stride, up_b_ptr, up_b_stride, up_scaling, up_rank,
                      LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      DOT_FLOAT32: tl.constexpr):
    """This program's tile of gate and up in float32, their LoRA terms added when LORA; its offsets and mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < n_rows, cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(gate_ptr + rows[:, None] * gate_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * up_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if LORA:
        g = _plus_lora_term(g, gate_scaling, gate_xa_ptr, gate_xa_stride, gate_b_ptr, gate_b_stride, gate_rank, rows,
                            cols, row_mask, col_mask, BLOCK_R, DOT_FLOAT32)
        u = _plus_lora_term(u, up_scaling, up_xa_ptr, up_xa_stride, up_b_ptr, up_b_stride, up_rank, rows, cols,
                            row_mask, col_mask, BLOCK_R, DOT_FLOAT32)
    return g, u, rows, cols, mask


@triton.jit
def _forward(gate_ptr, gate_stride, up_ptr, up_stride, out_ptr, n_rows, n_cols,
             gate_xa_ptr, gate_xa_stride, gate_b_ptr, gate_b_stride, gate_scaling, gate_rank,
             up_xa_ptr, up_xa_stride, up_b_ptr, up_b_stride, up_scaling, up_rank, KIND: tl.constexpr,
             LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
             DOT_FLOAT32: tl.constexpr):
    g, u, rows, cols, mask = _gate_and_up_tile(
        gate_ptr, gate_stride, up_ptr, up_stride, n_rows, n_cols, gate_xa_ptr, gate_xa_stride, gate_b_ptr,
        gate_b_stride, gate_scaling, gate_rank, up_xa_ptr, up_xa_stride, up_b_ptr, up_b_stride, up_scaling, up_rank,
        LORA, BLOCK_M, BLOCK_N, BLOCK_R, DOT_FLOAT32)
    activated, _ = _activation_and_slope(g, KIND)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], (activated * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward(gate_ptr, gate_stride, up_ptr, up_stride, grad_ptr, dgate_ptr, dup_ptr, n_rows, n_cols,
              gate_xa_ptr, gate_xa_stride, gate_b_ptr, gate_b_stride, gate_scaling, gate_rank,
              up_xa_ptr, up_xa_stride, up_b_ptr, up_b_stride, up_scaling, up_rank, KIND: tl.constexpr,
              LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
              DOT_FLOAT32: tl.constexpr, OUTPUT_INTO_GRAD: tl.constexpr):
    g, u, rows, cols, mask = _gate_and_up_tile(
        gate_ptr, gate_stride, up_ptr, up_stride, n_rows, n_cols, gate_xa_ptr, gate_xa_stride, gate_b_ptr,
        gate_b_stride, gate_scaling, gate_rank, up_xa_ptr, up_xa_stride, up_b_ptr, up_b_stride, up_scaling, up_rank,
        LORA, BLOCK_M, BLOCK_N, BLOCK_R, DOT_FLOAT32)
    offsets = rows[:, None] * n_cols + cols[None, :]
    d = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    activated, slope = _activation_and_slope(g, KIND)
    tl.store(dgate_ptr + offsets, (d * u * slope).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (d * activated).to(dup_ptr.dtype.element_ty), mask=mask)
    if OUTPUT_INTO_GRAD:  # each element read above by this program alone
        tl.store(grad_ptr + offsets, (activated * u).to(grad_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, gate: torch.Tensor, up: torch.Tensor, lora: Optional[LoraTerms], outputs: tuple, activation: str,
            **options):
    """Run `kernel` over 2-D gate and up (rows may be strided, as the halves of a fused gate_up are), writing the
    contiguous `outputs` after the tensors it reads."""
    if lora is None:
        lora_args, block_r = (gate, 0, gate, 0, 1.0, 0) * 2, 16
    else:
        if any(t.stride(-1) != 1 for t in lora if isinstance(t, torch.Tensor)):
            raise ValueError("gated activation: the LoRA terms' x A^T and B must have unit column strides")
        lora_args = (lora.gate_xa, lora.gate_xa.stride(0), lora.gate_B, lora.gate_B.stride(0), float(lora.gate_scaling),
                     lora.gate_B.shape[1], lora.up_xa, lora.up_xa.stride(0), lora.up_B, lora.up_B.stride(0),
                     float(lora.up_scaling), lora.up_B.shape[1])
        # tl.dot's smallest inner size is 16; the ranks past each adapter's own load as zeros
        block_r = max(16, triton.next_power_of_2(max(lora.gate_B.shape[1], lora.up_B.shape[1])))
    rows, cols = gate.shape
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    # float32 products for float32 inputs, and on the CPU, where Triton's interpreter multiplies bfloat16 as integers
    dot_float32 = gate.dtype == torch.float32 or not gate.is_cuda
    kernel[grid](gate, gate.stride(0), up, up.stride(0), *outputs, rows, cols, *lora_args, KIND=ACTIVATIONS[activation],
                 LORA=lora is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r, DOT_FLOAT32=dot_float32,
                 **options)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as (rows, width) with unit column stride, copied only when it has to be."""
    matrix = tensor.reshape(-1, tensor.shape[-1])
    return matrix if matrix.stride(-1) == 1 else matrix.contiguous()


def activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str,
                       lora: Optional[LoraTerms] = None) -> torch.Tensor:
    """act(gate) * up without autograd, for ops that recompute it inside their own backward; with `lora`, gate and up
    are taken with their LoRA terms added."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch(_forward, _rows(gate), _rows(up), lora, (out,), activation)
    return out


def activation_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, activation: str,
                        lora: Optional[LoraTerms] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients for gate and up of act(gate) * up, given the output's gradient (with `lora`, for gate and up
    with their LoRA terms added, which are also the gradients of those terms)."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    _launch(_backward, _rows(gate), _rows(up), lora, (grad.contiguous(), dgate, dup), activation,
            OUTPUT_INTO_GRAD=False)
    return dgate, dup


def activation_and_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, activation: str,
                            lora: Optional[LoraTerms] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(gate) * up and `activation_backward`'s gradients from one read of gate and up, for a backward that needs
    the output again too. The output is written over `grad` (contiguous), which is consumed."""
    if not grad.is_contiguous():
        raise ValueError("activation_and_backward: the gradient is overwritten with the output, so it must be "
                         "contiguous")
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    _launch(_backward, _rows(gate), _rows(up), lora, (grad, dgate, dup), activation, OUTPUT_INTO_GRAD=True)
    return grad, dgate, dup


class GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return activation_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return *activation_backward(*ctx.saved_tensors, grad, ctx.activation), None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, with act "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_activation: unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gated_activation: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    require_kernel_dtype("gated_activation", gate.dtype)
    return GatedActivationFunction.apply(gate, up, activation)


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Plain PyTorch in float32, cast back once."""
    g = gate.float()
    activated = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (activated * up.float()).to(gate.dtype)
