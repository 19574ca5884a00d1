"""The language-model head and its cross-entropy fused, so the (tokens x vocabulary) logits never exist whole.

With a 128k vocabulary, float32 logits for 8k tokens take 4 GiB, and PyTorch keeps them, their softmax and
their gradient alive at once. Here the target rows go through the head a chunk at a time: one matmul in the
input dtype, one Triton pass that turns the chunk's logits into its losses and overwrites them with
d loss / d logits, and two more matmuls for the gradients of the hidden states and (when trained) the weight.
The loss is the graph's last scalar, so gradients are computed in forward and backward only scales them by
its incoming gradient, as Liger-Kernel does. Ignored rows (prompt, padding) are dropped before the matmul
rather than computed and zeroed: their gradient is zero, and they are often half of a batch's tokens. Only while
a CUDA graph is captured (ftcli/step_graph.py), where no count may be read back from the GPU, do all rows go
through, ignored ones zeroed by the kernel.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ftcli_kernels.limits import LOGITS_CHUNK_BYTES, require_kernel_dtype

MAX_BLOCK = 32768


@triton.jit
def _capped(x, softcap, SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap), Gemma 2's final logit soft-capping; x itself without it."""
    if SOFTCAP:
        scaled = x / softcap
        decay = tl.exp(-2.0 * tl.abs(scaled))
        magnitude = (1.0 - decay) / (1.0 + decay)  # tanh(|scaled|) without cancellation near zero
        x = softcap * tl.where(scaled < 0, -magnitude, magnitude)
    return x


@triton.jit
def loss_and_logit_grad(logits_ptr, labels_ptr, loss_ptr, stride, n_cols, softcap, ignore_index,
                        SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row: logsumexp by a running max and sum in float32, then softmax - one_hot written over the logits;
    a row labelled ignore_index gets loss and gradient zero."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    counted = label != ignore_index
    label = tl.where(counted, label, 0)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = _capped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    logsumexp = running_max + tl.log(running_sum)
    target = _capped(tl.load(row_ptr + label).to(tl.float32), softcap, SOFTCAP)
    tl.store(loss_ptr + row, tl.where(counted, logsumexp - target, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = _capped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
            grad = tl.exp(z - logsumexp) - tl.where(cols == label, 1.0, 0.0)
            if SOFTCAP:
                capped_fraction = z / softcap
                grad = grad * (1.0 - capped_fraction * capped_fraction)  # d tanh = 1 - tanh^2
            grad = tl.where(counted, grad, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: Optional[float],
                ignore_index: int, chunk_rows: int, grad_enabled: bool):
        want_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        want_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        rows = None if capturing(hidden) else (labels != ignore_index).nonzero().squeeze(1)
        count = hidden.shape[0] if rows is None else rows.numel()
        vocab = weight.shape[0]
        block = min(triton.next_power_of_2(vocab), MAX_BLOCK)
        losses = torch.zeros(count, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight) if want_weight_grad else None
        for start in range(0, count, chunk_rows):
            if rows is None:
                chunk = slice(start, start + chunk_rows)
                hidden_chunk, labels_chunk = hidden[chunk], labels[chunk]
            else:
                chunk = rows[start:start + chunk_rows]
                hidden_chunk, labels_chunk = hidden.index_select(0, chunk), labels.index_select(0, chunk)
            logits = hidden_chunk @ weight.T
            loss_and_logit_grad[(logits.shape[0],)](
                logits, labels_chunk, losses[start:], logits.stride(0), vocab,
                1.0 if softcap is None else float(softcap), ignore_index, SOFTCAP=softcap is not None,
                WRITE_GRAD=want_hidden_grad or want_weight_grad, BLOCK=block, num_warps=warps_for_block(block))
            if want_hidden_grad:
                if rows is None:
                    torch.mm(logits, weight, out=grad_hidden[chunk])
                else:
                    grad_hidden.index_copy_(0, chunk, logits @ weight)
            if want_weight_grad:
                grad_weight.addmm_(logits.T, hidden_chunk)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                               softcap: Optional[float] = None, ignore_index: int = -100,
                               chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ lm_head_weight.T` (soft-capped when `softcap` is set) against `labels`,
    summed over the rows whose label is not `ignore_index`, as a float32 scalar.

    hidden is (N, H) and lm_head_weight (V, H), both float32, bfloat16 or float16; labels is (N,).
    `chunk_rows` (default: as many rows as fit LOGITS_CHUNK_BYTES of logits) bounds the logits held at once.
    A weight in bfloat16 or float16 accumulates its gradient over chunks in its own dtype.
    """
    require_kernel_dtype("fused_linear_cross_entropy", hidden.dtype)
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(lm_head_weight.shape)} must be (N, H) and (V, H)")
    if lm_head_weight.dtype != hidden.dtype:
        raise ValueError(f"fused_linear_cross_entropy: weight dtype {lm_head_weight.dtype} differs from hidden "
                         f"dtype {hidden.dtype}")
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_linear_cross_entropy: labels must be integers of shape ({hidden.shape[0]},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fused_linear_cross_entropy: softcap must be positive, got {softcap}")
    vocab = lm_head_weight.shape[0]
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if not capturing(hidden) and out_of_range.any():
        raise ValueError(f"fused_linear_cross_entropy: label {int(labels[out_of_range][0])} is outside the "
                         f"vocabulary [0, {vocab}) and is not ignore_index {ignore_index}")
    if chunk_rows is None:
        chunk_rows = max(1, LOGITS_CHUNK_BYTES // (vocab * hidden.element_size()))
    if chunk_rows < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_rows must be at least 1, got {chunk_rows}")
    return FusedLinearCrossEntropyFunction.apply(hidden, lm_head_weight, labels.long(), softcap, ignore_index,
                                                 chunk_rows, torch.is_grad_enabled())


def cross_entropy_reference(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                            softcap: Optional[float] = None, ignore_index: int = -100) -> torch.Tensor:
    """Plain PyTorch: full logits in float32 (or the inputs' wider dtype), soft-capped, summed cross-entropy."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(compute) @ lm_head_weight.to(compute).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `tensor`'s device: then nothing may be read
    back from the GPU."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def warps_for_block(block: int) -> int:
    """About 32 values of a row per thread, up to 32 warps for the widest blocks."""
    return max(1, min(32, block // (32 * 32)))
