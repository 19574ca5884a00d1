"""TRL's DPO and GRPO losses as outside references: what TRL's own DPOTrainer and GRPOTrainer compute.

ftcli writes its preference and GRPO losses itself; tests hold them to TRL (pinned in pyproject's test extra),
whose trainers are what most people train DPO and GRPO with. Nothing here is imported by ftcli.
"""

import copy
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.trainer.utils import pad, use_adapter

from tiny_models import build_tiny_tokenizer

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo")


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
    - Precision: float32 (bf16 autocast off, TF32 off: see _require_float32_matmuls), the model's own device.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: the reference covers {LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"TRL's {loss_type!r} loss ignores label_smoothing; pass 0.0")
    trainer = _trainer(model, beta, "aot" if label_smoothing else loss_type, label_smoothing, output_dir)
    _require_float32_matmuls()
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


def _require_float32_matmuls() -> None:
    """On a GPU the comparisons hold TRL to float32's tolerances, which need cuBLAS to multiply float32 as float32.
    TF32 keeps 10 bits of each input's mantissa (about 1e-3 relative); torch leaves it off by default, and
    transformers' and TRL's trainers leave it so unless their config's tf32 asks. Checked once the trainer is
    built, so that neither the suite nor the trainer has turned it on."""
    if torch.backends.cuda.matmul.fp32_precision == "tf32":
        raise RuntimeError("TF32 is on for float32 matmuls (torch.backends.cuda.matmul.fp32_precision): the TRL "
                           "comparisons need float32 products; turn it off")


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


def trl_grpo_loss(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], advantages: torch.Tensor,
                  beta: float, epsilon: float, loss_type: str, max_completion_length: int, pad_id: int,
                  temperature: float = 1.0, output_dir: str = "/tmp/trl-grpo-reference") -> torch.Tensor:
    """TRL 1.15's GRPO loss of the completions (completion_ids[i] sampled from prompt_ids[i]) under `model`, with
    the given advantages, differentiable in `model`'s LoRA parameters: backward fills their gradients.

    `model` is a peft LoRA model; its forward and weights are left as they are (TRL patches the forward of what it
    trains, so it gets a copy, whose LoRA layers use `model`'s own parameters). TRL's conventions, as this drives
    them:
    - Inputs: the dict GRPOTrainer builds after generating, with TRL's own padding: prompts left-padded with
      `pad_id` and their mask, completions right-padded and their mask (every given completion token is scored,
      as TRL scores its completions truncated at the stop token), the advantages, and no old log-probs: one
      iteration per generation, so the ratio's denominator is the policy's own detached log-probs (ratio 1 in
      value, its gradient that of the log-probs).
    - Log-probs: through TRL's chunked fused LM head of logits divided by `temperature` (TRL's sampling
      temperature; 1 gives plain log-softmax), each completion token predicted from everything before it.
    - Reference (beta > 0): the same model with its adapter disabled, no grad, computed before the loss as TRL
      does for an adapter it created; the KL estimate per token is exp(ref - logp) - (ref - logp) - 1, as
      published (DeepSeekMath). TRL's default also multiplies it by the ratio (use_bias_correction_kl, from
      DeepSeek-V3.2), which leaves the loss's value alone and changes its gradient; that is turned off here.
    - Loss: "grpo" averages each completion's token losses over its length, then over completions; "dr_grpo"
      sums them all and divides by completions x max_completion_length. Evaluation mode, so no division by
      gradient accumulation steps; float32 (TF32 off: see _require_float32_matmuls), the model's own device.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: the reference covers {GRPO_LOSS_TYPES}")
    trainer = _grpo_trainer(model, len(prompt_ids), beta, epsilon, loss_type, max_completion_length, temperature,
                            output_dir)
    _require_float32_matmuls()
    trainer.model.eval()
    device = model.device
    inputs = {"prompt_ids": _padded(prompt_ids, pad_id, "left", device),
              "prompt_mask": _padded([[1] * len(ids) for ids in prompt_ids], 0, "left", device),
              "completion_ids": _padded(completion_ids, pad_id, "right", device),
              "completion_mask": _padded([[1] * len(ids) for ids in completion_ids], 0, "right", device),
              "advantages": advantages.to(device=device, dtype=torch.float32)}
    if beta:
        inputs["ref_per_token_logps"] = _reference_logps(trainer, inputs)
    return trainer.compute_loss(trainer.model, inputs)


def _padded(rows: list[list[int]], value: int, side: str, device: torch.device) -> torch.Tensor:
    return pad([torch.tensor(row) for row in rows], padding_value=value, padding_side=side).to(device)


def _reference_logps(trainer: GRPOTrainer, inputs: dict) -> torch.Tensor:
    """The completions' log-probs with the adapter off, as GRPOTrainer computes them while scoring completions."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad(), use_adapter(trainer.model, adapter_name=None):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                  inputs["completion_ids"].size(1))
    return logps


def _grpo_trainer(model, completions: int, beta: float, epsilon: float, loss_type: str, max_completion_length: int,
                  temperature: float, output_dir: str) -> GRPOTrainer:
    """A GRPOTrainer around a copy of `model`'s base with a new adapter of its config, whose LoRA parameters are
    then replaced by `model`'s own. TRL needs a tokenizer, a prompt dataset and a reward function to be built;
    none of them meets the completions, which reach its loss as token ids."""
    adapter = model.peft_config[model.active_adapter]
    base = copy.deepcopy(model).unload()
    config = GRPOConfig(output_dir=output_dir, beta=beta, epsilon=epsilon, loss_type=loss_type,
                        max_completion_length=max_completion_length, temperature=temperature,
                        use_bias_correction_kl=False, num_generations=completions,
                        per_device_train_batch_size=completions,
                        gradient_checkpointing=False, bf16=False, report_to=[], use_cpu=model.device.type == "cpu")
    dataset = Dataset.from_list([{"prompt": "What is one plus two?"}])
    trainer = GRPOTrainer(model=base, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                          train_dataset=dataset, processing_class=build_tiny_tokenizer(),
                          peft_config=copy.deepcopy(adapter))
    _share_lora_parameters(trainer.model, model)
    return trainer


def _share_lora_parameters(copy_model, model) -> None:
    """Make `copy_model`'s LoRA layers hold `model`'s LoRA parameters themselves, so gradients reach `model`."""
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            owner, _, attribute = name.rpartition(".")
            setattr(copy_model.get_submodule(owner), attribute, parameter)
