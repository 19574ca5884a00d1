"""The gated MLP activation `act(gate) * up` in one Triton pass: SwiGLU (SiLU, Llama, Mistral, Qwen, Phi-3)
and GeGLU (tanh-approximated GELU, Gemma).

PyTorch runs the activation and the product as separate kernels and keeps act(gate) for backward; here the
forward reads gate and up once, and backward recomputes the activation from gate instead of storing it.
"""

import torch
import triton
import triton.language as tl

from ftcli_kernels.limits import require_kernel_dtype

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
BLOCK = 1024
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


@triton.jit
def _forward(gate_ptr, up_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    activated, _ = _activation_and_slope(g, KIND)
    tl.store(out_ptr + offsets, (activated * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward(gate_ptr, up_ptr, grad_ptr, dgate_ptr, dup_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    activated, slope = _activation_and_slope(g, KIND)
    tl.store(dgate_ptr + offsets, (d * u * slope).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (d * activated).to(dup_ptr.dtype.element_ty), mask=mask)


def activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up without autograd, for ops that recompute it inside their own backward."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _forward[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), KIND=ACTIVATIONS[activation], BLOCK=BLOCK)
    return out


def activation_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor,
                        activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients for gate and up of act(gate) * up, given the output's gradient."""
    gate, up = gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    _backward[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, grad.contiguous(), dgate, dup, gate.numel(),
                                                  KIND=ACTIVATIONS[activation], BLOCK=BLOCK)
    return dgate, dup


class GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str):
        gate, up = gate.contiguous(), up.contiguous()
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
