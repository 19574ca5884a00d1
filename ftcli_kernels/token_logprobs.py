"""Log-probabilities of given tokens through the language-model head, chunked, so the logits never exist whole.

Preference losses need each answer's summed log-probability, and the loss is a non-linear function of those
sums, so unlike the fused cross-entropy the gradient reaching each token is not known in forward. It is known up
to a factor, though: d log p(token) / d hidden = -(softmax - one_hot) @ W, which the cross-entropy kernel already
writes chunk by chunk. Forward keeps that per-token gradient (tokens x hidden, the size of the hidden states) and
backward scales each row by the incoming gradient of its token's log-probability: no logits recomputed. The head
weight must be frozen, as it is under LoRA; its gradient would need the logits again.
"""

from typing import Optional

import torch
import triton

from ftcli_kernels.cross_entropy import MAX_BLOCK, loss_and_logit_grad, warps_for_block
from ftcli_kernels.limits import LOGITS_CHUNK_BYTES, require_kernel_dtype

NOTHING_IGNORED = -1  # no token's id: every row's log-probability counts


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: Optional[float],
                chunk_rows: int, grad_enabled: bool):
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        vocab = weight.shape[0]
        block = min(triton.next_power_of_2(vocab), MAX_BLOCK)
        negative_logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_negative = torch.empty_like(hidden) if want_grad else None  # d (-log p) / d hidden, row by row
        for start in range(0, hidden.shape[0], chunk_rows):
            hidden_chunk = hidden[start:start + chunk_rows]
            logits = hidden_chunk @ weight.T
            loss_and_logit_grad[(hidden_chunk.shape[0],)](
                logits, targets[start:start + chunk_rows], negative_logprobs[start:], logits.stride(0), vocab,
                1.0 if softcap is None else float(softcap), NOTHING_IGNORED, SOFTCAP=softcap is not None,
                WRITE_GRAD=want_grad, BLOCK=block, num_warps=warps_for_block(block))
            if want_grad:
                torch.matmul(logits, weight, out=grad_negative[start:start + chunk_rows])
        ctx.save_for_backward(grad_negative)
        return -negative_logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor):
        (grad_negative,) = ctx.saved_tensors
        grad_hidden = grad_negative * -grad_logprobs.unsqueeze(1).to(grad_negative.dtype)
        return grad_hidden, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                   softcap: Optional[float] = None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """log softmax(hidden @ lm_head_weight.T)[row, targets[row]] for every row, in float32, differentiable in
    `hidden` (soft-capped logits when `softcap` is set, as Gemma 2's head does).

    hidden is (N, H) and lm_head_weight (V, H), both float32, bfloat16 or float16; targets is (N,), every entry a
    token id. `chunk_rows` (default: as many rows as fit LOGITS_CHUNK_BYTES of logits) bounds the logits held at once.
    """
    require_kernel_dtype("token_logprobs", hidden.dtype)
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(lm_head_weight.shape)} "
                         "must be (N, H) and (V, H)")
    if lm_head_weight.dtype != hidden.dtype:
        raise ValueError(f"token_logprobs: weight dtype {lm_head_weight.dtype} differs from hidden dtype {hidden.dtype}")
    if lm_head_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("token_logprobs: the head weight requires a gradient; the kernel keeps only the hidden "
                         "states' gradient, so freeze the head (as LoRA does) or compute the logits in PyTorch")
    vocab = lm_head_weight.shape[0]
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be integers of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"token_logprobs: a target is outside the vocabulary [0, {vocab})")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"token_logprobs: softcap must be positive, got {softcap}")
    if chunk_rows is None:
        chunk_rows = max(1, LOGITS_CHUNK_BYTES // (vocab * hidden.element_size()))
    if chunk_rows < 1:
        raise ValueError(f"token_logprobs: chunk_rows must be at least 1, got {chunk_rows}")
    return TokenLogprobsFunction.apply(hidden, lm_head_weight, targets.long(), softcap, chunk_rows,
                                       torch.is_grad_enabled())


def token_logprobs_reference(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                             softcap: Optional[float] = None) -> torch.Tensor:
    """Plain PyTorch: full logits in float32 (or the inputs' wider dtype), soft-capped, log-softmax, gathered."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(compute) @ lm_head_weight.to(compute).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
