"""Preference training (DPO, ORPO, SimPO) as the training loop sees it: a step's loss and backward over pairs.

The loop is the SFT loop; this supplies what differs. A step's loss is the mean of its pairs' losses, however
they are split into micro-batches. DPO measures the policy against a reference policy: the same weights with
the adapter switched off, or the starting adapter when the run started from one (`model.adapter`, loaded a
second time, frozen, as the adapter named "reference"), so no second copy of the model exists. Its
log-probabilities are computed before the policy's forward in each micro-batch (so the two never hold
activations at once), or once for all pairs before training with `preference.precompute_reference`, cached in
OUT where a resumed run finds them.
"""

import hashlib
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from ftcli.answer_logprobs import PairBatch, answer_token_counts, collate_pairs, pair_logprobs, shared_prompt_fits
from ftcli.data.templates import PreferenceExample
from ftcli.distributed import from_main, global_sums, global_totals
from ftcli.loader import reference_policy
from ftcli.metrics import StepResult
from ftcli.preference_losses import PairLogprobs, PairLosses, preference_loss
from ftcli.recipe import Recipe
from ftcli.sharding import pass_without_rows
from ftcli.staging import staged_file

REFERENCE_CACHE = "reference-logprobs.pt"


class PreferenceMethod:
    def __init__(self, recipe: Recipe, pad_id: int, device: torch.device, fused: bool):
        self.method, self.settings, self.beta = recipe.train.method, recipe.preference, recipe.beta()
        self.batch_size = recipe.train.batch_size
        self.pad_id, self.device, self.fused = pad_id, device, fused
        self.needs_reference = self.method == "dpo"
        self.cached_reference: dict[int, tuple[float, float]] = {}  # id(example) -> (chosen, rejected)

    def accumulate_gradients(self, model, group: list[list[PreferenceExample]],
                             scaler: Optional[torch.amp.GradScaler] = None) -> StepResult:
        """Backward over this process's micro-batches of one optimizer step (the loop then sums the gradients of all
        processes, clips and steps); the loss is divided by the pairs of all processes."""
        pairs, = global_sums(sum(len(examples) for examples in group))
        totals, step_loss, tokens = defaultdict(float), 0.0, 0
        for examples in group:
            if not examples:
                pass_without_rows(model)
                continue
            batch = self.collate(model, examples)
            losses = self.pair_losses(model, examples, batch)
            loss = losses.loss.sum() / pairs
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
            tokens += batch.tokens
            add_pair_metrics(totals, losses)
        step_loss, tokens = global_sums(step_loss, tokens)
        return StepResult(step_loss, int(tokens), {name: total / pairs for name, total in global_totals(totals).items()})

    @torch.no_grad()
    def evaluate(self, model, examples: list[PreferenceExample]) -> tuple[float, dict, list[PreferenceExample]]:
        """Mean pair loss over held-out pairs, their mean rewards, and the pairs of micro-batches whose loss is not
        finite."""
        model.eval()
        totals, loss_sum, diverged = defaultdict(float), 0.0, []
        for start in range(0, len(examples), self.batch_size):
            batch_examples = examples[start:start + self.batch_size]
            losses = self.pair_losses(model, batch_examples, self.collate(model, batch_examples))
            batch_loss = float(losses.loss.sum())
            if not math.isfinite(batch_loss):
                diverged += batch_examples
            loss_sum += batch_loss
            add_pair_metrics(totals, losses)
        model.train()
        return loss_sum / len(examples), {name: total / len(examples) for name, total in totals.items()}, diverged

    def prepare(self, model, train: list[PreferenceExample], evaluation: list[PreferenceExample],
                out_dir: Optional[Path]) -> None:
        """With precompute_reference, fill the reference cache for the pairs the run trains on (`train`) and
        evaluates on: from OUT, or by one pass. `out_dir` is None in the processes other than process 0, which get
        process 0's cache, or make the same pass (a sharded model needs every process in each forward)."""
        if not (self.needs_reference and self.settings.precompute_reference):
            return
        examples = train + evaluation
        fingerprint = pairs_fingerprint(examples)
        path = out_dir / REFERENCE_CACHE if out_dir else None
        saved = torch.load(path, weights_only=True) if path and path.is_file() else None
        values = from_main(saved["logprobs"].tolist() if saved is not None and saved["fingerprint"] == fingerprint
                           else None)
        if values is None:
            values = []
            with torch.no_grad():
                for start in range(0, len(examples), self.batch_size):
                    batch_examples = examples[start:start + self.batch_size]
                    reference = self.reference_logprobs(model, self.collate(model, batch_examples))
                    values += torch.stack([reference.chosen, reference.rejected], 1).tolist()
            if path:
                with staged_file(path) as temporary:
                    torch.save({"fingerprint": fingerprint, "logprobs": torch.tensor(values)}, temporary)
        self.cached_reference = {id(example): tuple(pair) for example, pair in zip(examples, values)}

    def collate(self, model, examples: list[PreferenceExample]) -> PairBatch:
        longest = max(example.row_length() for example in examples)
        dtype = model.get_input_embeddings().weight.dtype
        return collate_pairs(examples, self.pad_id, self.device, shared_prompt_fits(model.config, longest), dtype)

    def pair_losses(self, model, examples: list[PreferenceExample], batch: PairBatch) -> PairLosses:
        reference = self.reference_for(model, examples, batch) if self.needs_reference else None
        policy = pair_logprobs(model, batch, self.fused)
        return preference_loss(self.method, policy, reference, self.beta, self.settings)

    def reference_for(self, model, examples: list[PreferenceExample], batch: PairBatch) -> PairLogprobs:
        if all(id(example) in self.cached_reference for example in examples):
            values = torch.tensor([self.cached_reference[id(example)] for example in examples], device=self.device)
            return PairLogprobs(values[:, 0], values[:, 1], *answer_token_counts(batch))
        with torch.no_grad():
            return self.reference_logprobs(model, batch)

    def reference_logprobs(self, model, batch: PairBatch) -> PairLogprobs:
        with reference_policy(model):
            return pair_logprobs(model, batch, self.fused)


def add_pair_metrics(totals: dict, losses: PairLosses) -> None:
    """Add a micro-batch's per-pair sums of what metrics rows report (divided by the pair count at the end)."""
    chosen, rejected = losses.rewards_chosen.float(), losses.rewards_rejected.float()
    totals["rewards_chosen"] += float(chosen.sum())
    totals["rewards_rejected"] += float(rejected.sum())
    totals["reward_margin"] += float((chosen - rejected).sum())
    totals["reward_accuracy"] += float((chosen > rejected).float().sum())
    for name, values in losses.extra.items():
        totals[name] += float(values.sum())


def pairs_fingerprint(examples: list[PreferenceExample]) -> str:
    """What the cached reference log-probabilities were computed for: every pair's tokens and labels, in order."""
    digest = hashlib.sha256()
    for e in examples:
        for ids in (e.prompt_ids, e.chosen_ids, e.chosen_labels, e.rejected_ids, e.rejected_labels):
            digest.update(repr(ids).encode())
    return digest.hexdigest()
