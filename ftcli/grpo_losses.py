"""GRPO's arithmetic: group-relative advantages from rewards, and the clipped-ratio loss of each completion.

The formulas are those of the DeepSeekMath paper (GRPO) and of Dr. GRPO, in the form TRL's GRPOTrainer computes
them, so the two can be compared number for number. Completions come in groups of G, one group per prompt; a
completion's advantage is its reward less its group's mean, divided by the group's standard deviation when
rewards are scaled. Every token of a completion shares its advantage. Per token, with r = pi / pi_old:

    loss = -min(r * A, clip(r, 1 - epsilon, 1 + epsilon) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)

The policy that sampled the completions is the one being trained, one optimizer step per generation, so pi_old is
pi detached (as in TRL with one iteration per generation): r is 1 in value, the clip never binds, and the gradient
is A times that of log pi. Tokens are flat here (every completion's tokens one after another, `sequence` naming each one's
completion), so the log-probabilities can come from the chunked kernel without padding.
"""

from dataclasses import dataclass
from typing import Optional

import torch

STD_FLOOR = 1e-4  # added to a group's standard deviation, so a group of equal rewards gets advantages of 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """(completions,) advantages from (completions,) rewards in consecutive groups of `group_size`.

    A NaN reward (no reward function had an opinion on that completion) is left out of its group's mean and
    standard deviation (unbiased, as torch.std) and gets an advantage of 0."""
    grouped = rewards.view(-1, group_size)
    known = ~grouped.isnan()
    count = known.sum(1, keepdim=True)
    mean = grouped.nansum(1, keepdim=True) / count.clamp(min=1)
    squares = torch.where(known, (grouped - mean) ** 2, torch.zeros_like(grouped)).sum(1, keepdim=True)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std + STD_FLOOR)
    return torch.nan_to_num(advantages, nan=0.0).view(-1)


@dataclass
class CompletionLosses:
    """Per completion: its loss (before dividing by the step's completion count) and sums for the metrics."""

    loss: torch.Tensor  # (completions,)
    kl_sum: torch.Tensor  # (completions,) summed per-token KL estimate to the reference; zeros when beta is 0
    tokens: torch.Tensor  # (completions,) completion tokens


def completion_losses(logprobs: torch.Tensor, sequence: torch.Tensor, advantages: torch.Tensor,
                      reference_logprobs: Optional[torch.Tensor], beta: float, epsilon: float, loss_type: str,
                      max_completion_length: int) -> CompletionLosses:
    """Each completion's GRPO loss from its tokens' log-probabilities.

    logprobs (tokens,) float32 with gradient; sequence (tokens,) the completion index of each token; advantages
    (completions,); reference_logprobs (tokens,) when beta > 0. loss_type "grpo" averages a completion's token losses
    over its length, "dr_grpo" divides their sum by max_completion_length; either way the step's loss is the sum of
    these over its completions divided by their number."""
    completions = advantages.shape[0]
    ratio = torch.exp(logprobs - logprobs.detach())
    token_advantages = advantages[sequence]
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    token_loss = -torch.min(ratio * token_advantages, clipped * token_advantages)
    kl = torch.zeros_like(token_loss)
    if beta:
        difference = reference_logprobs - logprobs
        kl = torch.exp(difference) - difference - 1
        token_loss = token_loss + beta * kl
    per_completion = lambda values: torch.zeros(completions, dtype=torch.float32, device=values.device).index_add(
        0, sequence, values.float())
    tokens = per_completion(torch.ones_like(token_loss))
    summed = per_completion(token_loss)
    loss = summed / tokens.clamp(min=1) if loss_type == "grpo" else summed / max_completion_length
    return CompletionLosses(loss, per_completion(kl.detach()), tokens)
