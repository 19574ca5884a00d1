"""Several LoRA projections of one input, such as an attention layer's q, k and v, as one autograd op.

Computed one by one, each projection dequantizes its own weight, runs its own matmuls and keeps its own copy
of the input's bookkeeping for backward. Here the base weights are dequantized into one stacked (sum of outs,
in) matrix for a single matmul, the LoRA A matrices are stacked so that x A^T is one matmul too, and backward
keeps x once, the stacked r-wide x A^T and the adapters. The outputs are column blocks of one result.
"""

import torch

from ftcli_kernels.lora_linear import (cast_all, check_projection, dense_weight, lora_linear_reference, scaled,
                                       split_projections)


def _stacked_weight(weights, widths: list[int], dtype: torch.dtype) -> torch.Tensor:
    first = weights[0]
    in_features = first.quant_state.shape[1] if getattr(first, "quant_state", None) is not None else first.shape[1]
    stacked = torch.empty(sum(widths), in_features, dtype=dtype, device=first.device)
    for weight, rows in zip(weights, stacked.split(widths)):
        dense_weight(weight, dtype, out=rows)
    return stacked


class LoraProjectionsFunction(torch.autograd.Function):
    """`adapters` holds A, B of each projection in order; returns one output per projection."""

    @staticmethod
    def forward(ctx, x, weights, biases, scalings, widths, *adapters):
        ctx.adapter_dtype = adapters[0].dtype
        adapters = cast_all(adapters, x.dtype)  # cast once, kept cast for backward
        lora_As, lora_Bs = adapters[0::2], adapters[1::2]
        x2d = x.reshape(-1, x.shape[-1])
        stacked = _stacked_weight(weights, widths, x.dtype)
        if all(bias is None for bias in biases):
            out = x2d @ stacked.t()
        else:
            bias = torch.cat([torch.zeros(w, dtype=x.dtype, device=x.device) if b is None else b.to(x.dtype)
                              for b, w in zip(biases, widths)])
            out = torch.addmm(bias, x2d, stacked.t())
        del stacked
        stacked_A = torch.cat(lora_As)
        xa = x2d @ stacked_A.t()
        ranks = [a.shape[0] for a in lora_As]
        for block, xa_block, lora_B, scaling in zip(out.split(widths, dim=1), xa.split(ranks, dim=1), lora_Bs, scalings):
            block.addmm_(xa_block, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, stacked_A, *lora_Bs)
        ctx.weights, ctx.scalings, ctx.widths, ctx.ranks = weights, scalings, widths, ranks
        return tuple(block.view(*x.shape[:-1], width) for block, width in zip(out.split(widths, dim=1), widths))

    @staticmethod
    def backward(ctx, *grads):
        x, xa, stacked_A, *lora_Bs = ctx.saved_tensors
        grad = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads], dim=1)
        x2d = x.reshape(-1, x.shape[-1])
        grad_blocks = grad.split(ctx.widths, dim=1)
        grad_xa = torch.cat([scaled(g @ lora_B, scaling) for g, lora_B, scaling in zip(grad_blocks, lora_Bs, ctx.scalings)],
                            dim=1)
        grad_As = (grad_xa.t() @ x2d).split(ctx.ranks)
        grad_Bs = [scaled(g.t() @ xa_block, scaling)
                   for g, xa_block, scaling in zip(grad_blocks, xa.split(ctx.ranks, dim=1), ctx.scalings)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            stacked = _stacked_weight(ctx.weights, ctx.widths, grad.dtype)
            grad_x = grad @ stacked
            del stacked
            grad_x.addmm_(grad_xa, stacked_A)
            grad_x = grad_x.view(x.shape)
        grad_adapters = cast_all([g for pair in zip(grad_As, grad_Bs) for g in pair], ctx.adapter_dtype)
        return grad_x, None, None, None, None, *grad_adapters


def lora_projections(x: torch.Tensor, projections: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Each projection of x, from (weight, bias, lora_A, lora_B, scaling) per projection, W frozen (dense or a
    bitsandbytes Params4bit); outputs in x's dtype."""
    if not projections:
        raise ValueError("lora_projections: no projections given")
    widths = [check_projection("lora_projections", x.dtype, x.shape[-1], *projection[:4]) for projection in projections]
    weights, biases, scalings, adapters = split_projections(projections)
    if len({adapter.dtype for adapter in adapters}) != 1:
        raise TypeError("lora_projections: the adapters must share one dtype")
    return LoraProjectionsFunction.apply(x, weights, biases, scalings, tuple(widths), *adapters)


def lora_projections_reference(x: torch.Tensor, projections: list[tuple]) -> tuple[torch.Tensor, ...]:
    return tuple(lora_linear_reference(x, *projection) for projection in projections)
