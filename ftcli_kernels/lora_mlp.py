"""A gated MLP with LoRA on every projection, `down(act(gate(x)) * up(x))`, as one autograd op.

Run as three LoRA projections and the activation, autograd would keep x, gate, up and the activated product h
(as wide as gate) for backward. Here backward keeps x, gate and up (as one `gate_up` tensor where the model
fuses the two projections) and the r-wide LoRA intermediates, recomputes h with the activation kernel, and
dequantizes NF4 base weights again instead of keeping them from forward. Gate and up are kept without their LoRA
terms: the activation kernels add them tile by tile, forward and backward, which spares a pass over each. Backward
goes through the rows a chunk at a time (the MLP treats each row alone), so of its gate-wide temporaries (h's
gradient, over which the activation's backward kernel writes h, and the gradients of gate and up) only a chunk's
exist at once: the DPO benchmark's step (6,144 tokens of Llama-3-8B) peaked at 7.07 GiB instead of 7.25, the SFT
one (4,096 tokens) at 6.58 instead of 6.68. Each chunk dequantizes the NF4 weights it multiplies by, so that one 16-bit
weight exists at a time; `dequantize_once` has backward dequantize the three once for all chunks instead and hold
them (0.33 GiB for Llama-3-8B: 0.22 more than one, for 3 x 41 us a weight saved at 8,192 tokens, in 4 chunks).

Long inputs go tile by tile (`tile_rows`): forward computes gate, up, the activation and down for one tile of rows
at a time and keeps only x, and backward computes each tile's gate and up again. No full-length gate-wide tensor
then exists, which at 131,072 tokens of Llama-3-8B is 3.5 GiB each.

The op is two autograd Functions. The first does all of backward and keeps what backward needs; the second computes
the output from what the first handed it and keeps nothing. Under gradient checkpointing, backward runs the layer's
forward again only to recompute the kept tensors, and torch stops that recompute as soon as the last one is
kept again (non-reentrant checkpoint's early stop): where the MLP is the layer's last op that keeps anything (Llama,
Mistral, Qwen, Phi; not Gemma, whose norm after the MLP keeps the output), the second Function is never run again.
That leaves out the down matmul of every recompute, and when tiled all three, which pays for computing gate and up
again in backward.
"""

from typing import Optional

import torch

from ftcli_kernels.gated_activation import (ACTIVATIONS, LoraTerms, activation_and_backward, activation_forward,
                                            gated_activation_reference)
from ftcli_kernels.limits import MLP_BACKWARD_CHUNK_BYTES, mlp_tile_rows
from ftcli_kernels.lora_linear import (adapter_grads, base_projection, cast_all, check_projection, dense_weight,
                                       input_grad, lora_linear_reference, project_backward, scaled, split_projections,
                                       xa_grad)


def _gate_and_up(inner: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (inner[0], inner[1]) if len(inner) == 2 else inner[0].chunk(2, dim=-1)


class LoraGatedMLPFunction(torch.autograd.Function):
    """The MLP's backward. Projections are (gate, up, down) or (gate_up, down); `adapters` holds A, B of each in
    that order. Returns a stand-in of the output (an expanded zero: no memory) through which the output's gradient
    comes back, and, when not tiled, the activated product and the down projection's LoRA term, from which
    LoraGatedMLPOutput makes the output."""

    @staticmethod
    def forward(ctx, x, activation, weights, biases, scalings, chunk_rows, tile_rows, dequantize_once, *adapters):
        ctx.adapter_dtype = adapters[0].dtype
        adapters = cast_all(adapters, x.dtype)  # cast once, kept cast for backward
        x2d = x.reshape(-1, x.shape[-1])
        out_width = adapters[-1].shape[0]
        stand_in = x.new_zeros(()).expand(*x.shape[:-1], out_width)
        ctx.activation, ctx.weights, ctx.biases, ctx.scalings = activation, weights, biases, scalings
        ctx.chunk_rows, ctx.tile_rows, ctx.dequantize_once = tile_rows or chunk_rows, tile_rows, dequantize_once
        if tile_rows:
            ctx.save_for_backward(x, *adapters)
            return (stand_in,)
        inner, inner_xa = _inner_projections(x2d, weights[:-1], biases[:-1], adapters[:-2])
        hidden = activation_forward(*_gate_and_up(inner), activation, _lora_terms(inner_xa, adapters, scalings))
        down_xa = hidden @ adapters[-2].t()
        lora_term = scaled(down_xa @ adapters[-1].t(), scalings[-1])
        ctx.save_for_backward(x, *inner, *inner_xa, down_xa, *adapters)
        ctx.mark_non_differentiable(hidden, lora_term)
        return stand_in, hidden, lora_term

    @staticmethod
    def backward(ctx, grad, *unused):
        x, *saved = ctx.saved_tensors
        count = len(ctx.weights) - 1
        x2d, grad2d = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        if ctx.tile_rows:
            inner, inner_xa, down_xa, adapters = None, None, None, saved
        else:
            inner, inner_xa, down_xa, adapters = saved[:count], saved[count:2 * count], saved[2 * count], saved[2 * count + 1:]
        weights = ctx.weights
        if ctx.tile_rows or ctx.dequantize_once and x2d.shape[0] > ctx.chunk_rows:
            # Every tile (and, when asked, every chunk) uses every weight: each is dequantized once for all of them
            weights = [dense_weight(w, x.dtype) for w in weights]
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.zeros_like(x2d) if need_x else None
        grad_adapters = None
        for start in range(0, x2d.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            if ctx.tile_rows:
                rows_inner, rows_inner_xa = _inner_projections(x2d[rows], weights[:-1], ctx.biases[:-1], adapters[:-2])
                rows_down_xa = None
            else:
                rows_inner_xa, rows_inner, rows_down_xa = [t[rows] for t in inner_xa], [t[rows] for t in inner], down_xa[rows]
            grads = _chunk_backward(ctx, weights, grad2d[rows], x2d[rows], rows_inner, rows_inner_xa, rows_down_xa,
                                    adapters, grad_x[rows] if need_x else None)
            if grad_adapters is None:  # summed over chunks in the adapters' own dtype (float32), not the compute dtype
                grad_adapters = cast_all(grads, ctx.adapter_dtype)
            else:
                grad_adapters = [total.add_(chunk) for total, chunk in zip(grad_adapters, grads)]
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, None, None, None, None, None, None, None, *grad_adapters


class LoraGatedMLPOutput(torch.autograd.Function):
    """The MLP's output: from the activated product and the LoRA term when LoraGatedMLPFunction ran whole, else tile
    by tile from x. It keeps nothing, and hands the output's gradient to the stand-in unchanged."""

    @staticmethod
    def forward(ctx, stand_in, x, activation, weights, biases, scalings, tile_rows, adapters, hidden=None,
                lora_term=None):
        x2d = x.reshape(-1, x.shape[-1])
        if tile_rows:
            out = _tiled_output(x2d, activation, weights, biases, scalings, cast_all(adapters, x.dtype), tile_rows)
        else:
            out = base_projection(hidden, weights[-1], biases[-1]).add_(lora_term)
        return out.view(stand_in.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None, None, None, None


def _tiled_output(x2d, activation, weights, biases, scalings, adapters, tile_rows) -> torch.Tensor:
    """The MLP's output, computed a tile of rows at a time."""
    dense = [dense_weight(w, x2d.dtype) for w in weights]
    down_A, down_B = adapters[-2:]
    out = x2d.new_empty(x2d.shape[0], dense[-1].shape[0])
    for start in range(0, x2d.shape[0], tile_rows):
        rows = slice(start, start + tile_rows)
        inner, inner_xa = _inner_projections(x2d[rows], dense[:-1], biases[:-1], adapters[:-2])
        hidden = activation_forward(*_gate_and_up(inner), activation, _lora_terms(inner_xa, adapters, scalings))
        del inner, inner_xa
        if biases[-1] is None:
            torch.mm(hidden, dense[-1].t(), out=out[rows])
        else:
            torch.addmm(biases[-1].to(x2d.dtype), hidden, dense[-1].t(), out=out[rows])
        out[rows].addmm_(hidden @ down_A.t(), down_B.t(), alpha=scalings[-1])
    return out


def _inner_projections(x2d, weights, biases, adapters) -> tuple[list, list]:
    """Gate and up (or gate_up) of the rows `x2d` without their LoRA terms, which the activation kernels add (see
    _lora_terms), and each one's x A^T; `adapters` holds A, B of each."""
    inner = [base_projection(x2d, weight, bias) for weight, bias in zip(weights, biases)]
    return inner, [x2d @ adapters[2 * index].t() for index in range(len(weights))]


def _lora_terms(inner_xa: list, adapters, scalings) -> LoraTerms:
    """Gate's and up's LoRA terms from their x A^T, for the activation kernels to add: added by a matmul of their own,
    each would be a pass over a gate-wide tensor (4,096 x 14,336 for Llama-3-8B's 4,096 tokens: about 150 us, four
    times a layer with the recompute). A fused gate_up has one x A^T, and the halves of its B are gate's and up's.
    `adapters` and `scalings` are the whole MLP's, down last."""
    if len(inner_xa) == 2:
        return LoraTerms(inner_xa[0], adapters[1], scalings[0], inner_xa[1], adapters[3], scalings[1])
    gate_B, up_B = adapters[1].chunk(2)
    return LoraTerms(inner_xa[0], gate_B, scalings[0], inner_xa[0], up_B, scalings[0])


def _chunk_backward(ctx, weights, grad, x2d, inner, inner_xa, down_xa: Optional[torch.Tensor], adapters,
                    grad_x: Optional[torch.Tensor]) -> list:
    """The gradients of A and B of every projection from a chunk of rows, its x gradient added into `grad_x`;
    `down_xa` is computed here when not given (tiles keep none)."""
    count = len(inner)
    gate, up = _gate_and_up(inner)
    (down_A, down_B), down_scaling = adapters[-2:], ctx.scalings[-1]
    # The activated product is needed only for down's adapter gradients: it comes out of the activation's backward
    # kernel, written over the gradient it came from, instead of from a read of gate and up of its own
    grad_down_xa = xa_grad(grad, down_B, down_scaling)
    grad_hidden = input_grad(grad, grad_down_xa, weights[-1], down_A)
    hidden, grad_gate, grad_up = activation_and_backward(gate, up, grad_hidden, ctx.activation,
                                                         _lora_terms(inner_xa, adapters, ctx.scalings))
    del grad_hidden, gate, up, inner
    if down_xa is None:
        down_xa = hidden @ down_A.t()
    grad_A, grad_B = adapter_grads(grad, grad_down_xa, hidden, down_xa, down_scaling)
    del hidden
    grad_inner = [grad_gate, grad_up] if count == 2 else [torch.cat((grad_gate, grad_up), dim=-1)]
    grads = []
    for index in range(count):
        _, *projection_grads = project_backward(grad_inner[index], x2d, inner_xa[index], weights[index],
                                                *adapters[2 * index:2 * index + 2], ctx.scalings[index],
                                                grad_x is not None, into=grad_x)
        grads += projection_grads
    return grads + [grad_A, grad_B]


def lora_gated_mlp(x: torch.Tensor, activation: str, projections: list[tuple],
                   backward_chunk_rows: Optional[int] = None, tile_rows: Optional[int] = None,
                   dequantize_once: bool = False) -> torch.Tensor:
    """The MLP over `projections`: (weight, bias, lora_A, lora_B, scaling) of gate, up, down or gate_up, down.

    `backward_chunk_rows` (default: as many rows as fit MLP_BACKWARD_CHUNK_BYTES of one gate-wide temporary)
    bounds the rows backward works on at once; with `dequantize_once`, backward in several chunks holds the NF4
    weights dequantized for all of them (module docstring). `tile_rows` (default: limits.mlp_tile_rows, which tiles
    only long inputs; 0 runs whole) makes forward and backward go tile by tile without keeping gate and up."""
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
    if tile_rows is None:
        tile_rows = mlp_tile_rows(x.numel() // x.shape[-1], inner_width, x.element_size())
    weights, biases, scalings, adapters = split_projections(projections)
    stand_in, *parts = LoraGatedMLPFunction.apply(x, activation, weights, biases, scalings, backward_chunk_rows,
                                                  tile_rows, dequantize_once, *adapters)
    return LoraGatedMLPOutput.apply(stand_in, x, activation, weights, biases, scalings, tile_rows, tuple(adapters),
                                    *parts)


def lora_gated_mlp_reference(x: torch.Tensor, activation: str, projections: list[tuple]) -> torch.Tensor:
    """Plain PyTorch over dense weights: projections in x's dtype, the activation in float32."""
    inner = [lora_linear_reference(x, *projection) for projection in projections[:-1]]
    hidden = gated_activation_reference(*_gate_and_up(inner), activation)
    return lora_linear_reference(hidden, *projections[-1])
