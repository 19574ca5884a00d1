"""The preference losses, each a published formula over the answers' summed log-probabilities.

Everything here works on per-pair tensors: the policy's summed log-probability of each pair's chosen and rejected
answer, their token counts, and (for DPO) the reference policy's sums. A loss returns one value per pair, so the
loop can average over all pairs of an optimizer step whatever its micro-batches, and the rewards the metrics report.

- DPO (Rafailov et al. 2023), h = (policy - reference) log-ratio of chosen over rejected:
  sigmoid -log sigma(beta h), with label smoothing e: -(1 - e) log sigma(beta h) - e log sigma(-beta h)
  (conservative DPO); ipo (Azar et al. 2023): (h - 1 / (2 beta))^2 on summed log-probabilities, as the paper
  writes it (TRL averages them per token instead); hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
  Rewards: beta (policy - reference) of each answer.
- ORPO (Hong et al. 2024), with a = the answer's mean token log-probability: the chosen answer's negative
  log-likelihood -a_chosen plus lambda times -log sigma(log odds(chosen) - log odds(rejected)), where
  log odds = a - log(1 - exp(a)). Rewards: lambda a, as TRL reports them.
- SimPO (Meng et al. 2024): -log sigma(beta a_chosen - beta a_rejected - gamma), with label smoothing as DPO's.
  Rewards: beta a.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class PairLogprobs:
    """Per-pair sums of answer-token log-probabilities, and the answers' trained token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class PairLosses:
    """One loss and one reward per answer for each pair, and the method's own extra terms (ORPO's) per pair."""

    loss: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    extra: dict[str, torch.Tensor]


def dpo_loss(policy: PairLogprobs, reference: PairLogprobs, beta: float, loss_type: str,
             label_smoothing: float) -> PairLosses:
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = smoothed_sigmoid_loss(beta * margin, label_smoothing)
    elif loss_type == "ipo":
        loss = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * margin)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return PairLosses(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), {})


def orpo_loss(policy: PairLogprobs, orpo_lambda: float) -> PairLosses:
    chosen_mean, rejected_mean = mean_logprobs(policy)
    log_odds = log_odds_of(chosen_mean) - log_odds_of(rejected_mean)
    odds_ratio_loss = -F.logsigmoid(log_odds)
    nll = -chosen_mean
    return PairLosses(nll + orpo_lambda * odds_ratio_loss, orpo_lambda * chosen_mean.detach(),
                      orpo_lambda * rejected_mean.detach(), {"nll_loss": nll.detach(), "log_odds_ratio": log_odds.detach()})


def simpo_loss(policy: PairLogprobs, beta: float, gamma: float, label_smoothing: float) -> PairLosses:
    chosen_mean, rejected_mean = mean_logprobs(policy)
    loss = smoothed_sigmoid_loss(beta * (chosen_mean - rejected_mean) - gamma, label_smoothing)
    return PairLosses(loss, beta * chosen_mean.detach(), beta * rejected_mean.detach(), {})


def preference_loss(method: str, policy: PairLogprobs, reference: Optional[PairLogprobs], beta: float,
                    settings) -> PairLosses:
    """The recipe's loss: `settings` is its preference section, `beta` the resolved one."""
    if method == "dpo":
        return dpo_loss(policy, reference, beta, settings.loss_type, settings.label_smoothing)
    if method == "orpo":
        return orpo_loss(policy, settings.orpo_lambda)
    if method == "simpo":
        return simpo_loss(policy, beta, settings.gamma, settings.label_smoothing)
    raise ValueError(f"{method!r} is not a preference method")


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def mean_logprobs(policy: PairLogprobs) -> tuple[torch.Tensor, torch.Tensor]:
    return policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens


def log_odds_of(mean_logprob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logprob) < 1, without forming 1 - p where p is near 1."""
    return mean_logprob - torch.log(-torch.expm1(mean_logprob))
