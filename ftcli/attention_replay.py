"""Attention that the checkpoint's recompute takes from the forward instead of computing it again.

Under gradient checkpointing, backward runs each decoder layer's forward a second time to get back what the layer
saved, attention included, whose work grows with the square of the length: at 8,192 tokens of Llama-3-8B the
causal attention of one layer is 0.55 TFLOP, nearly as much as its q, k, v and o projections together. Attention's
backward needs q, k and v, which the recompute gets back from their projections anyway, and the output and the
log-sum-exp of each row's scores, which only the attention kernel gives. So a marked layer's forward keeps those two
(64 MiB and 1 MiB a layer at 8,192 tokens: an eighth of what a kept MLP holds) until its backward, and the
recompute takes them instead of running the kernel. Backward is the fused kernel's own, so the losses and gradients
are SDPA's: exactly where SDPA runs the same kernel on the same tensors (the CPU's flash kernel). Grouped key and
value heads go to the kernel as they are, as transformers has SDPA take them without a mask, where the kernel SDPA
picks for them is one of those here; else they are repeated to the query's heads first, and the kernel sums their
gradients in another order than SDPA.

Kept on the GPU, the outputs of all 32 layers cost 2 GiB at 8,192 tokens; hosted, each goes to CPU memory beside its
layer's input (OffloadedCheckpoint.host) and comes back while the layer above goes through backward, as the input
does: 64 MiB a layer on the bus each way, against 512 MiB for a hosted MLP (input, gate and up) that saves about
four times the time. The top layer keeps its output on the GPU, as its backward follows its forward at once.

It runs where the fused kernel SDPA picks returns those statistics (flash or cuDNN on a GPU, flash on the CPU), for
causal attention without a mask or dropout: the attention of CUDA-graphed micro-batches (step_graph's
CAUSAL_ATTENTION attends through `replayable_attention`). Elsewhere attention is transformers' SDPA, as unmarked.

    python -m ftcli.bench --shape llama3-8b --seq 8192 --bs 1 --only ftcli --replay-attention 8
    python -m ftcli.bench --shape llama3-8b --seq 8192 --bs 1 --only ftcli --replay-attention 32 --host-attention
"""

from typing import Callable, NamedTuple, Optional

import torch
from torch.nn.attention import SDPBackend
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from ftcli.activation_checkpointing import OffloadedCheckpoint, offloaded_layers

aten = torch.ops.aten


class _Kept(NamedTuple):
    """What one attention forward keeps for its backward besides q, k and v: its output, the row statistics the
    kernel's backward reads (log-sum-exp and the kernel's own bookkeeping), and the sequence lengths it ran at."""

    out: torch.Tensor
    stats: tuple[torch.Tensor, ...]
    lengths: tuple[int, int]


class _Kernel(NamedTuple):
    """A fused causal attention whose forward gives what its backward reads: forward(q, k, v, scale) -> _Kept,
    backward(grad, q, k, v, kept, scale) -> (grad_q, grad_k, grad_v)."""

    forward: Callable[..., _Kept]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _cpu_flash_forward(q, k, v, scale) -> _Kept:
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return _Kept(out, (lse,), (q.shape[2], k.shape[2]))


def _cpu_flash_backward(grad, q, k, v, kept: _Kept, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, kept.out, kept.stats[0], 0.0, True,
                                                                     scale=scale)


def _cuda_flash_forward(q, k, v, scale) -> _Kept:
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale)
    return _Kept(out, (lse, cum_q, cum_k, seed, offset), (max_q, max_k))


def _cuda_flash_backward(grad, q, k, v, kept: _Kept, scale):
    lse, cum_q, cum_k, seed, offset = kept.stats
    return aten._scaled_dot_product_flash_attention_backward(grad, q, k, v, kept.out, lse, cum_q, cum_k, *kept.lengths,
                                                             0.0, True, seed, offset, scale=scale)


def _cudnn_forward(q, k, v, scale) -> _Kept:
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    return _Kept(out, (lse, seed, offset, cum_q, cum_k), (max_q, max_k))


def _cudnn_backward(grad, q, k, v, kept: _Kept, scale):
    lse, seed, offset, cum_q, cum_k = kept.stats
    return aten._scaled_dot_product_cudnn_attention_backward(grad, q, k, v, kept.out, lse, seed, offset, None, cum_q,
                                                             cum_k, *kept.lengths, 0.0, True, scale=scale)


KERNELS = {("cpu", SDPBackend.FLASH_ATTENTION): _Kernel(_cpu_flash_forward, _cpu_flash_backward),
           ("cuda", SDPBackend.FLASH_ATTENTION): _Kernel(_cuda_flash_forward, _cuda_flash_backward),
           ("cuda", SDPBackend.CUDNN_ATTENTION): _Kernel(_cudnn_forward, _cudnn_backward)}


def kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> Optional[_Kernel]:
    """The fused kernel SDPA would run causal attention on these tensors with (fewer key and value heads than query
    heads taken as groups), where it is one of KERNELS."""
    grouped = k.shape[1] != q.shape[1]
    choice = SDPBackend(aten._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=grouped))
    return KERNELS.get((q.device.type, choice))


class ReplayedAttention(torch.autograd.Function):
    """Causal attention computed by `kernel` (what it keeps handed to `keep`, when given), or taken from `kept`, what
    an earlier forward of the same layer kept; either way its backward is the kernel's, from q, k, v and the kept
    output and statistics.

    Under non-reentrant checkpointing the backward that runs is the forward's node, and what it saved comes from the
    recompute: here the kept output and statistics themselves, with the recomputed q, k and v."""

    @staticmethod
    def forward(ctx, q, k, v, scale: Optional[float], kernel: _Kernel, kept: Optional[_Kept],
                keep: Optional[Callable[[_Kept], None]]):
        if kept is None:
            kept = kernel.forward(q, k, v, scale)
            if keep is not None:
                keep(kept)
        ctx.kernel, ctx.scale, ctx.lengths = kernel, scale, kept.lengths
        ctx.save_for_backward(q, k, v, kept.out, *kept.stats)
        return kept.out.detach()  # the node's output, sharing the kept tensor's memory

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, *stats = ctx.saved_tensors
        kept = _Kept(out, tuple(stats), ctx.lengths)
        if grad.stride() != out.stride():  # the kernels read the output's gradient laid out as the output
            grad = torch.empty_like(out).copy_(grad)
        grad_q, grad_k, grad_v = ctx.kernel.backward(grad, q, k, v, kept, ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None, None


class AttentionReplay:
    """A marked attention module's slot: its layer's checkpoint, and what its last checkpointed forward kept until the
    recompute takes it, the output on the GPU or, `hosted`, in CPU memory (module docstring)."""

    def __init__(self, checkpoint: OffloadedCheckpoint, hosted: bool = False):
        self.checkpoint = checkpoint
        self.hosted = hosted
        self.kept: Optional[_Kept] = None

    def attend(self, q, k, v, scale: Optional[float], kernel: _Kernel) -> torch.Tensor:
        """Attention of a checkpointed forward (computed; its output and statistics kept) or of the recompute in its
        backward (taken back, and let go of)."""
        if self.checkpoint.forward_under_way:
            return ReplayedAttention.apply(q, k, v, scale, kernel, None, self._keep)
        kept, self.kept = self.kept, None
        if kept is not None and self.hosted:
            kept = kept._replace(out=self.checkpoint.unpack(kept.out))
        return ReplayedAttention.apply(q, k, v, scale, kernel, kept, None)

    def _keep(self, kept: _Kept) -> None:
        self.kept = kept._replace(out=self.checkpoint.host(kept.out)) if self.hosted else kept


def replay_attention(model, layers: int, hosted: bool = False) -> int:
    """Mark the attention modules of the top `layers` decoder layers checkpointed through OffloadedCheckpoint, so that
    their recompute takes attention's output from the forward, which keeps it in CPU memory when `hosted`, except for
    the top layer (module docstring); returns how many were marked."""
    marked = [layer for layer in offloaded_layers(model) if hasattr(layer, "self_attn")][::-1][:layers]
    for index, layer in enumerate(marked):
        layer.self_attn.attention_replay = AttentionReplay(layer._gradient_checkpointing_func, hosted and index > 0)
    return len(marked)


def replayable_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' SDPA attention, except that the attention of a marked module in a checkpointed layer is
    replayed in its recompute (module docstring): in training, causal, without a mask, dropout, soft cap or position
    bias, on a kernel that gives row statistics. Grouped key and value heads go to it as they are where SDPA's kernel
    for them takes groups, else repeated to the query's heads first (module docstring)."""
    replay: Optional[AttentionReplay] = getattr(module, "attention_replay", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (replay is None or not module.training or not torch.is_grad_enabled() or attention_mask is not None
             or dropout or not causal or query.shape[2] != key.shape[2]
             or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None)
    if not plain:
        kernel = kernel_for(query, key, value, scaling)
        if kernel is None and key.shape[1] != query.shape[1]:
            groups = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
            kernel = kernel_for(query, key, value, scaling)
        if kernel is not None:
            out = replay.attend(query, key, value, scaling, kernel)
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
