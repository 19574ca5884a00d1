"""GRPO as the training loop sees it: each micro-batch's prompts answered G times by the model being trained,
the answers scored by the reward functions, and the GRPO loss's backward over them.

Generation uses the very weights being trained (the adapter active, no second copy) through a generation engine
(ftcli/generation.py); its cache is gone before the loss's forward starts. The loss needs each completion token's
log-probability, computed like the preference methods' (only the positions that predict a completion token go
through the head, in chunks with kernels), so the batch x length x vocabulary logits never exist. With beta > 0
the reference is the same model with the adapter switched off (or the adapter the run started from). The step's loss is the mean of its completions'
losses however they are split into micro-batches (ftcli/grpo_losses.py has the formulas).

Sampling draws its seed from torch's global generator, which checkpoints save and restore, so a resumed run
samples what the uninterrupted one would have.
"""

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ftcli.answer_logprobs import scored_logprobs
from ftcli.data.templates import PromptExample, end_of_turn_ids
from ftcli.decoding import Sampling
from ftcli.distributed import global_sums, global_totals
from ftcli.generation import BatchedSampler, Completions, GenerationEngine
from ftcli.grpo_losses import completion_losses, group_advantages
from ftcli.loader import reference_policy
from ftcli.metrics import StepResult
from ftcli.recipe import Recipe
from ftcli.rewards import Reward, RewardScores, score_completions


@dataclass
class Rollouts:
    """A micro-batch's completions, one per (prompt, generation), prompt-major, with what they earned."""

    examples: list[PromptExample]  # the prompt of each completion: every prompt G times in a row
    completions: Completions
    scores: RewardScores
    generation_s: float


@dataclass
class CompletionBatch:
    """Prompt + completion rows as the decoder takes them, and which hidden state predicts which completion token."""

    inputs: dict[str, torch.Tensor]  # input_ids and attention_mask, rows right-padded
    source: torch.Tensor  # for each completion token, the flat index (row * width + position) of the state predicting it
    targets: torch.Tensor  # the completion tokens
    sequence: torch.Tensor  # for each completion token, its row
    tokens: int  # prompt and completion tokens of every row


class GrpoMethod:
    def __init__(self, recipe: Recipe, tokenizer, device: torch.device, fused: bool, rewards: list[Reward]):
        self.settings, self.rewards = recipe.grpo, rewards
        self.batch_size = recipe.train.batch_size
        self.tokenizer, self.device, self.fused = tokenizer, device, fused
        self.sampling = Sampling(recipe.grpo.max_completion_length, recipe.grpo.temperature, recipe.grpo.top_p)
        self.engine: Optional[GenerationEngine] = None

    def prepare(self, model, train: list[PromptExample], evaluation: list[PromptExample], out_dir: Optional[Path]) -> None:
        """The generation engine on the model being trained."""
        stop_ids = end_of_turn_ids(self.tokenizer, getattr(model, "generation_config", None))
        self.engine = BatchedSampler(model, stop_ids, self.tokenizer.pad_token_id, self.settings.max_prompt_length)

    def accumulate_gradients(self, model, group: list[list[PromptExample]],
                             scaler: Optional[torch.amp.GradScaler] = None) -> StepResult:
        """Generate, score and backward each micro-batch in turn (the loop then clips and steps)."""
        generations = self.settings.num_generations
        completions_in_step, = global_sums(sum(len(examples) for examples in group) * generations)
        totals, step_loss, tokens = defaultdict(float), 0.0, 0
        for examples in (examples for examples in group if examples):
            rollouts = self.roll_out(model, examples, self.sampling, generations)
            advantages = group_advantages(rollouts.scores.total, generations, self.settings.scale_rewards)
            batch = collate_completions(rollouts, self.tokenizer.pad_token_id, self.device)
            losses = self.losses(model, batch, advantages.to(self.device))
            loss = losses.loss.sum() / completions_in_step
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
            tokens += batch.tokens
            add_rollout_metrics(totals, rollouts, self.rewards, generations)
            totals["kl_sum"] += float(losses.kl_sum.sum())
            totals["completion_tokens"] += float(losses.tokens.sum())
        step_loss, tokens = global_sums(step_loss, tokens)
        # each process generated at the same time as the others: the step's generation time is this process's own
        totals = defaultdict(float, global_totals(totals) | {"generation_s": totals["generation_s"]})
        return StepResult(step_loss, int(tokens), step_metrics(totals, self.rewards, self.settings.beta > 0))

    @torch.no_grad()
    def evaluate(self, model, examples: list[PromptExample]) -> tuple[None, dict, list]:
        """Greedy answers to the held-out prompts, one each, and their mean rewards; GRPO has no loss to evaluate."""
        greedy = Sampling(self.settings.max_completion_length, temperature=0.0)
        totals = defaultdict(float)
        step = self.batch_size * self.settings.num_generations  # as many rows as a training micro-batch generates
        for start in range(0, len(examples), step):
            add_rollout_metrics(totals, self.roll_out(model, examples[start:start + step], greedy, 1), self.rewards, 1)
        return None, step_metrics(totals, self.rewards, with_kl=False, with_timing=False), []

    def roll_out(self, model, examples: list[PromptExample], sampling: Sampling, generations: int) -> Rollouts:
        """`generations` completions of each prompt, sampled with a seed drawn from torch's global generator, scored."""
        repeated = [example for example in examples for _ in range(generations)]
        generator = torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,))))
        started = time.perf_counter()
        completions = self.engine.generate([example.prompt_ids for example in repeated], sampling, generator)
        generation_s = time.perf_counter() - started
        texts = self.tokenizer.batch_decode(completions.ids, skip_special_tokens=True)
        scores = score_completions(self.rewards, texts, [len(ids) for ids in completions.ids], repeated)
        return Rollouts(repeated, completions, scores, generation_s)

    def losses(self, model, batch: CompletionBatch, advantages: torch.Tensor):
        """Each completion's GRPO loss under the policy, with the reference's log-probabilities when beta > 0."""
        reference = None
        if self.settings.beta:
            with torch.no_grad(), reference_policy(model):
                reference = completion_logprobs(model, batch, self.fused)
        logprobs = completion_logprobs(model, batch, self.fused)
        return completion_losses(logprobs, batch.sequence, advantages, reference, self.settings.beta,
                                 self.settings.epsilon, self.settings.loss_type, self.settings.max_completion_length)


def collate_completions(rollouts: Rollouts, pad_id: int, device: torch.device) -> CompletionBatch:
    """One right-padded row per completion: its prompt, then the completion."""
    rows = [example.prompt_ids + ids for example, ids in zip(rollouts.examples, rollouts.completions.ids)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    source, targets, sequence = [], [], []
    for index, (example, completion, row) in enumerate(zip(rollouts.examples, rollouts.completions.ids, rows)):
        input_ids[index, :len(row)] = torch.tensor(row)
        attention_mask[index, :len(row)] = 1
        start = index * width + len(example.prompt_ids) - 1  # the prompt's last position predicts the first token
        source += range(start, start + len(completion))
        targets += completion
        sequence += [index] * len(completion)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    return CompletionBatch(inputs, as_tensor(source), as_tensor(targets), as_tensor(sequence), sum(map(len, rows)))


def completion_logprobs(model, batch: CompletionBatch, fused: bool) -> torch.Tensor:
    """(completion tokens,) float32 log-probabilities, differentiable when gradients are on."""
    hidden = model.get_decoder()(**batch.inputs, use_cache=False).last_hidden_state
    return scored_logprobs(model, hidden, batch.source, batch.targets, fused)


def add_rollout_metrics(totals: dict, rollouts: Rollouts, rewards: list[Reward], generations: int) -> None:
    """Add a micro-batch's sums of what metrics rows report (divided by their counts in `step_metrics`)."""
    total, per_reward = rollouts.scores.total, rollouts.scores.per_reward
    scored = ~per_reward.isnan().all(1)  # completions some reward had an opinion on
    totals["reward_sum"] += float(total[scored].sum())
    totals["scored"] += float(scored.sum())
    if generations > 1:
        grouped = torch.where(scored, total, torch.nan).view(-1, generations)
        deviations = [values[~values.isnan()].std() for values in grouped if (~values.isnan()).sum() > 1]
        totals["reward_std_sum"] += float(sum(deviations, torch.tensor(0.0)))
        totals["groups"] += len(deviations)
    for index, reward in enumerate(rewards):
        values = per_reward[:, index]
        totals[f"{reward.name}_sum"] += float(values.nansum())
        totals[f"{reward.name}_count"] += float((~values.isnan()).sum())
    lengths = [len(ids) for ids in rollouts.completions.ids]
    totals["completion_length_sum"] += sum(lengths)
    totals["completions"] += len(lengths)
    totals["cut"] += sum(not finished for finished in rollouts.completions.finished)
    totals["generation_s"] += rollouts.generation_s


def step_metrics(totals: dict, rewards: list[Reward], with_kl: bool, with_timing: bool = True) -> dict[str, float]:
    """The metrics of a step (or an evaluation) from the sums `add_rollout_metrics` gathered."""
    mean = lambda name, count: totals[name] / totals[count] if totals[count] else math.nan
    metrics = {"reward": mean("reward_sum", "scored")}
    if totals["groups"]:
        metrics["reward_std"] = totals["reward_std_sum"] / totals["groups"]
    metrics |= {f"reward/{r.name}": mean(f"{r.name}_sum", f"{r.name}_count") for r in rewards}
    metrics["completion_length"] = mean("completion_length_sum", "completions")
    metrics["clipped_ratio"] = mean("cut", "completions")
    if with_kl:
        metrics["kl"] = mean("kl_sum", "completion_tokens")
    if with_timing:
        metrics["generation_s"] = totals["generation_s"]
    return metrics
