"""A gated MLP with LoRA on every projection, `down(act(gate(x)) * up(x))`, as one autograd op.

Run as three LoRA projections and the activation, autograd would keep x, gate, up and the activated product h
(as wide as gate) for backward. Here backward keeps x, gate and up (as one `gate_up` tensor where the model
fuses the two projections) and the r-wide LoRA intermediates, recomputes h with the activation kernel, and
dequantizes NF4 base weights again instead of keeping them from forward. Backward goes through the rows a
chunk at a time (the MLP treats each row alone), so of its four gate-wide temporaries (h, its gradient, and the
gradients of gate and up) only a chunk's exist at once: the DPO benchmark's step (6,144 tokens of Llama-3-8B)
peaked at 7.07 GiB instead of 7.25, the SFT one (4,096 tokens) at 6.58 instead of 6.68.
"""

from typing import Optional

import torch

from ftcli_kernels.gated_activation import ACTIVATIONS, activation_backward, activation_forward, gated_activation_reference
from ftcli_kernels.limits import MLP_BACKWARD_CHUNK_BYTES
from ftcli_kernels.lora_linear import (cast_all, check_projection, lora_linear_reference, project, project_backward,
                                       split_projections)


def _gate_and_up(inner: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (inner[0], inner[1]) if len(inner) == 2 else inner[0].chunk(2, dim=-1)


class LoraGatedMLPFunction(torch.autograd.Function):
    """Projections are (gate, up, down) or (gate_up, down); `adapters` holds A, B of each in that order."""

    @staticmethod
    def forward(ctx, x, activation, weights, biases, scalings, chunk_rows, *adapters):
        ctx.adapter_dtype = adapters[0].dtype
        adapters = cast_all(adapters, x.dtype)  # cast once, kept cast for backward
        x2d = x.reshape(-1, x.shape[-1])
        inner, inner_xa = [], []
        for index in range(len(weights) - 1):
            out, xa = project(x2d, weights[index], biases[index], *adapters[2 * index:2 * index + 2], scalings[index])
            inner.append(out)
            inner_xa.append(xa)
        hidden = activation_forward(*_gate_and_up(inner), activation)
        out, down_xa = project(hidden, weights[-1], biases[-1], *adapters[-2:], scalings[-1])
        ctx.save_for_backward(x, *inner, *inner_xa, down_xa, *adapters)
        ctx.activation, ctx.weights, ctx.scalings, ctx.chunk_rows = activation, weights, scalings, chunk_rows
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, *saved = ctx.saved_tensors
        count = len(ctx.weights) - 1
        inner, inner_xa, down_xa, adapters = saved[:count], saved[count:2 * count], saved[2 * count], saved[2 * count + 1:]
        x2d, grad2d = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.zeros_like(x2d) if need_x else None
        grad_adapters = None
        for start in range(0, x2d.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grads = _chunk_backward(ctx, grad2d[rows], x2d[rows], [t[rows] for t in inner],
                                    [t[rows] for t in inner_xa], down_xa[rows], adapters,
                                    grad_x[rows] if need_x else None)
            if grad_adapters is None:  # summed over chunks in the adapters' own dtype (float32), not the compute dtype
                grad_adapters = cast_all(grads, ctx.adapter_dtype)
            else:
                grad_adapters = [total.add_(chunk) for total, chunk in zip(grad_adapters, grads)]
        return None if grad_x is None else grad_x.view(x.shape), None, None, None, None, None, *grad_adapters


def _chunk_backward(ctx, grad, x2d, inner, inner_xa, down_xa, adapters, grad_x: Optional[torch.Tensor]) -> list:
    """The gradients of A and B of every projection from a chunk of rows, its x gradient added into `grad_x`."""
    count = len(inner)
    gate, up = _gate_and_up(inner)
    hidden = activation_forward(gate, up, ctx.activation)
    grad_hidden, grad_A, grad_B = project_backward(grad, hidden, down_xa, ctx.weights[-1], *adapters[-2:],
                                                   ctx.scalings[-1], True)
    del hidden
    grad_gate, grad_up = activation_backward(gate, up, grad_hidden, ctx.activation)
    del grad_hidden
    grad_inner = [grad_gate, grad_up] if count == 2 else [torch.cat((grad_gate, grad_up), dim=-1)]
    grads = []
    for index in range(count):
        _, *projection_grads = project_backward(grad_inner[index], x2d, inner_xa[index], ctx.weights[index],
                                                *adapters[2 * index:2 * index + 2], ctx.scalings[index],
                                                grad_x is not None, into=grad_x)
        grads += projection_grads
    return grads + [grad_A, grad_B]


def lora_gated_mlp(x: torch.Tensor, activation: str, projections: list[tuple],
                   backward_chunk_rows: Optional[int] = None) -> torch.Tensor:
    """The MLP over `projections`: (weight, bias, lora_A, lora_B, scaling) of gate, up, down or gate_up, down.

    `backward_chunk_rows` (default: as many rows as fit MLP_BACKWARD_CHUNK_BYTES of one gate-wide temporary)
    bounds the rows backward works on at once."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"lora_gated_mlp: unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if len(projections) not in (2, 3):
        raise ValueError(f"lora_gated_mlp: expected gate, up, down or gate_up, down projections, got {len(projections)}")
    widths = [check_projection("lora_gated_mlp", x.dtype, x.shape[-1], *projection[:4])
              for projection in projections[:-1]]
    if len(widths) == 1 and widths[0] % 2 or len(set(widths)) != 1:
        raise ValueError(f"lora_gated_mlp: gate and up widths {widths} differ")
    inner_width = widths[0] // 2 if len(widths) == 1 else widths[0]
    check_projection("lora_gated_mlp", x.dtype, inner_width, *projections[-1][:4])
    if backward_chunk_rows is None:
        backward_chunk_rows = max(1, MLP_BACKWARD_CHUNK_BYTES // (inner_width * x.element_size()))
    weights, biases, scalings, adapters = split_projections(projections)
    return LoraGatedMLPFunction.apply(x, activation, weights, biases, scalings, backward_chunk_rows, *adapters)


def lora_gated_mlp_reference(x: torch.Tensor, activation: str, projections: list[tuple]) -> torch.Tensor:
    """Plain PyTorch over dense weights: projections in x's dtype, the activation in float32."""
    inner = [lora_linear_reference(x, *projection) for projection in projections[:-1]]
    hidden = gated_activation_reference(*_gate_and_up(inner), activation)
    return lora_linear_reference(hidden, *projections[-1])
