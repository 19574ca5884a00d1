"""TRL's DPO loss as an outside reference: the per-pair losses and rewards TRL's own DPOTrainer computes.

ftcli writes its preference losses itself; tests hold them to TRL (pinned in pyproject's test extra), whose
DPOTrainer is what most people train DPO with. Nothing here is imported by ftcli.
"""

import copy
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from trl import DPOConfig, DPOTrainer

from tiny_models import build_tiny_tokenizer

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class TrlDpoResult:
    """One entry per pair, in the order given."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def trl_dpo_reference(model, pairs: list[tuple[list[int], list[int], list[int]]], beta: float,
                      loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                      output_dir: str = "/tmp/trl-reference") -> TrlDpoResult:
    """TRL 1.15's DPO loss and rewards of each `(prompt_ids, chosen_ids, rejected_ids)` pair under `model`.

    `model` is a peft LoRA model; it is left untouched (TRL patches the forward of what it trains, so it gets a
    copy). TRL's conventions, as this drives them:
    - Reference: the same model with its adapter disabled. A PeftModel handed to DPOTrainer would instead get a
      frozen copy of its adapter as reference, so TRL is given the base model and the adapter's config (its
      documented path for LoRA without a ref_model), and the caller's adapter weights are loaded afterwards.
    - Reference log-probs are computed in the same step (precompute_ref_log_probs=False), adapter off, no grad.
    - Log-probs: the sum over the answer's tokens of log softmax, each predicted from the tokens before it, through
      TRL's chunked fused LM head (no full logits); the prompt's tokens are not scored.
    - Sequences: prompt + answer as given, no BOS or EOS added (TRL adds EOS to text answers only while
      tokenizing, which these ids skip: they go straight to its collator), no truncation (max_length=None).
      One pair per collator batch, so no padding and each step's mean loss is that pair's loss.
    - "ipo" divides each answer's log-ratio by its token count before the squared loss (TRL's length-averaged
      IPO); "sigmoid" and "hinge" use the sums.
    - label_smoothing: TRL's "sigmoid" ignores it. Conservative DPO, -(1-e) logsig(b d) - e logsig(-b d), is
      TRL's "aot" loss on one pair (its sort over the batch is then the identity), so that is what runs for
      "sigmoid" with label_smoothing > 0. TRL applies it to neither "ipo" nor "hinge": asking is a ValueError.
    - Rewards: beta * (policy - reference) summed log-probs of each answer, as TRL logs them.
    - Precision: float32 (bf16 autocast off), the model's own device.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: the reference covers {LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"TRL's {loss_type!r} loss ignores label_smoothing; pass 0.0")
    trainer = _trainer(model, beta, "aot" if label_smoothing else loss_type, label_smoothing, output_dir)
    trainer.model.eval()
    metrics = trainer._metrics["eval"]
    losses, chosen, rejected = [], [], []
    for prompt_ids, chosen_ids, rejected_ids in pairs:
        batch = trainer.data_collator([{"prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
                                        "rejected_ids": rejected_ids}])
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).float().cpu())
        chosen.append(metrics["rewards/chosen"][-1])
        rejected.append(metrics["rewards/rejected"][-1])
    return TrlDpoResult(torch.stack(losses), torch.tensor(chosen), torch.tensor(rejected))


def _trainer(model, beta: float, loss_type: str, label_smoothing: float, output_dir: str) -> DPOTrainer:
    """A DPOTrainer around a copy of `model`'s base with a copy of its adapter. TRL needs a tokenizer and a text
    dataset to be built; neither meets the pairs, which reach its collator as token ids."""
    adapter = model.peft_config[model.active_adapter]
    base = copy.deepcopy(model).unload()
    tokenizer = build_tiny_tokenizer()
    config = DPOConfig(output_dir=output_dir, beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                       max_length=None, precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False,
                       report_to=[], use_cpu=model.device.type == "cpu")
    dataset = Dataset.from_list([{"prompt": "What is one plus two?", "chosen": " Three.", "rejected": " Seven."}])
    trainer = DPOTrainer(model=base, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=copy.deepcopy(adapter))
    set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(model))
    return trainer
