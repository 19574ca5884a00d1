"""A LoRA projection `x W^T + b + s (x A^T) B^T` over a frozen base weight, plain or NF4, as one autograd op.

peft runs the base layer and the adapter as separate modules: bitsandbytes keeps nothing weight-sized for
backward, but the adapter path upcasts x to float32 and autograd saves that copy. Here the LoRA matmuls run in
x's dtype with the float32 adapters cast down, backward needs only x (the very tensor the caller passed, so q, k
and v reading one hidden state share it) and the r-wide x A^T, and the NF4 weight is dequantized again in
backward rather than kept alive from forward.
"""

import torch

from ftcli_kernels.limits import require_kernel_dtype


def dense_weight(weight: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The base weight as a dense (out, in) matrix in `dtype`, written into `out` when given; a bitsandbytes
    4-bit weight is dequantized (NF4 by one launch of ftcli_kernels/nf4_dequantize, other 4-bit types by bitsandbytes)."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and quant_state.quant_type == "nf4":
        from ftcli_kernels.nf4_dequantize import nf4_dequantize

        return nf4_dequantize(weight, quant_state, dtype, out)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        weight = dequantize_4bit(weight, quant_state)
    return weight.to(dtype) if out is None else out.copy_(weight)


def cast_all(tensors, dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of `tensors` in `dtype` made by one multi-tensor launch: a layer's adapters are many small
    tensors, and on a host-bound step each separate cast costs a launch."""
    if all(tensor.dtype == dtype for tensor in tensors):
        return list(tensors)
    copies = [torch.empty_like(tensor, dtype=dtype) for tensor in tensors]
    torch._foreach_copy_(copies, list(tensors))
    return copies


def base_projection(x2d, weight, bias) -> torch.Tensor:
    """x W^T + b in x's dtype; the dense weight dies on return."""
    base = dense_weight(weight, x2d.dtype).t()
    return x2d @ base if bias is None else torch.addmm(bias.to(x2d.dtype), x2d, base)


def project(x2d, weight, bias, lora_A, lora_B, scaling):
    """(x W^T + b + s (x A^T) B^T, x A^T), both in x's dtype, with A and B already in it; the dense weight dies
    on return."""
    out = base_projection(x2d, weight, bias)
    xa = x2d @ lora_A.t()
    out.addmm_(xa, lora_B.t(), alpha=scaling)
    return out, xa


def project_backward(grad, x2d, xa, weight, lora_A, lora_B, scaling, need_x: bool, into=None):
    """Gradients of `project` for x (added into `into` when given), A and B (in the compute dtype, as given)."""
    grad_xa = xa_grad(grad, lora_B, scaling)
    grad_A, grad_B = adapter_grads(grad, grad_xa, x2d, xa, scaling)
    return input_grad(grad, grad_xa, weight, lora_A, into) if need_x else into, grad_A, grad_B


def xa_grad(grad, lora_B, scaling) -> torch.Tensor:
    """The gradient of x A^T, from the output's."""
    return scaled(grad @ lora_B, scaling)


def adapter_grads(grad, grad_xa, x2d, xa, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of A and B, from the output's and x A^T's."""
    return grad_xa.t() @ x2d, scaled(grad.t() @ xa, scaling)


def input_grad(grad, grad_xa, weight, lora_A, into=None) -> torch.Tensor:
    """The gradient of x (added into `into` when given), from the output's and x A^T's; the dense weight dies on
    return."""
    base = dense_weight(weight, grad.dtype)
    grad_x = grad @ base if into is None else into.addmm_(grad, base)
    del base
    return grad_x.addmm_(grad_xa, lora_A)


def scaled(tensor: torch.Tensor, scaling: float) -> torch.Tensor:
    """`tensor` times the LoRA scaling, in place; no launch for the common alpha == r."""
    return tensor if scaling == 1.0 else tensor.mul_(scaling)


def check_projection(name: str, dtype: torch.dtype, width: int, weight, bias, lora_A, lora_B) -> int:
    """The projection's output width, or a loud error on what the ops do not support."""
    require_kernel_dtype(name, dtype)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"{name}: LoRA A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} are not (r, in) and (out, r)")
    quant_state = getattr(weight, "quant_state", None)
    out_features, in_features = tuple(quant_state.shape) if quant_state is not None else tuple(weight.shape)
    if (in_features, out_features) != (lora_A.shape[1], lora_B.shape[0]) or width != in_features:
        raise ValueError(f"{name}: input width {width}, base weight ({out_features}, {in_features}) and LoRA "
                         f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit together")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} does not match {out_features} outputs")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(f"{name}: the base weight and bias must be frozen; only LoRA A and B are trained")
    return out_features


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weight, bias, scaling):
        # The adapters are cast once here and kept cast for backward: a (r x in) copy is cheap, a launch is not
        lora_A_cast, lora_B_cast = cast_all((lora_A, lora_B), x.dtype)
        out, xa = project(x.reshape(-1, x.shape[-1]), weight, bias, lora_A_cast, lora_B_cast, scaling)
        ctx.save_for_backward(x, xa, lora_A_cast, lora_B_cast)
        ctx.weight, ctx.scaling, ctx.adapter_dtype = weight, scaling, lora_A.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, xa, lora_A, lora_B = ctx.saved_tensors
        grad_x, grad_A, grad_B = project_backward(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]), xa,
                                                  ctx.weight, lora_A, lora_B, ctx.scaling, ctx.needs_input_grad[0])
        grad_A, grad_B = cast_all((grad_A, grad_B), ctx.adapter_dtype)
        return None if grad_x is None else grad_x.view(x.shape), grad_A, grad_B, None, None, None


def split_projections(projections: list[tuple]) -> tuple[tuple, tuple, tuple[float, ...], list[torch.Tensor]]:
    """(weight, bias, lora_A, lora_B, scaling) per projection, regrouped as the fused autograd Functions take them:
    the weights, biases and scalings as tuples, and the adapters as one flat list (A, B, A, B, ...) so that
    autograd sees each as an input of its own."""
    weights, biases, scalings, adapters = [], [], [], []
    for weight, bias, lora_A, lora_B, scaling in projections:
        weights.append(weight)
        biases.append(bias)
        scalings.append(float(scaling))
        adapters += [lora_A, lora_B]
    return tuple(weights), tuple(biases), tuple(scalings), adapters


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T in x's dtype, with W frozen: a dense tensor or a bitsandbytes Params4bit."""
    check_projection("lora_linear", x.dtype, x.shape[-1], weight, bias, lora_A, lora_B)
    return LoraLinearFunction.apply(x, lora_A, lora_B, weight, bias, float(scaling))


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """Plain PyTorch in x's dtype over a dense weight, every operand cast to it."""
    out = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return out + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A.to(x.dtype)),
                                                      lora_B.to(x.dtype))
