"""The training story of a recipe, top to bottom: load, prepare data, add LoRA, loop, save.

The loop is ours rather than a Trainer's so that every step is visible: gradient accumulation divides
the summed token losses of all micro-batches of a step by their total target tokens, which makes the
update independent of how the tokens were split into micro-batches.
"""

import math
import random
import resource
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F

from ftcli.architectures import Architecture
from ftcli.activation_checkpointing import enable_checkpointing
from ftcli.data import PreparedData, prepare_data
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample
from ftcli.errors import Interrupted, OutOfMemory, RecipeError, TrainingDiverged, redact
from ftcli.loader import (add_lora, check_lora_targets, compute_dtype, load_config, load_model, load_tokenizer,
                          meta_model, pick_device)
from ftcli.metrics import MetricsLog, plot_losses
from ftcli.optim import build_optimizer, build_scheduler
from ftcli.staging import atomic_write_text
from ftcli.patch import apply_kernels, apply_lora_kernels, kernels_can_run
from ftcli.progress import TrainingDisplay
from ftcli.recipe import LoraSettings, Recipe, TrainSettings
from ftcli.signals import StopRequest
from ftcli.snapshots import Snapshot, check_compatible, newest_snapshot, restore_snapshot, save_snapshot


def run(recipe: Recipe, out_dir: Path, display: TrainingDisplay, resume: bool = False,
        stop: Optional[StopRequest] = None) -> dict:
    """Train the recipe and save the adapter folder into `out_dir`; returns the run's summary.

    With `resume`, training continues from the newest checkpoint in `out_dir` (when there is one). `stop` is
    looked at after every optimizer step: once a signal has set it, a checkpoint is saved and the run ends
    with `Interrupted`.
    """
    snapshot = newest_snapshot(out_dir) if resume else None
    if snapshot:
        check_compatible(snapshot, recipe)
    seed_everything(recipe.train.seed)
    device = pick_device()
    dtype = compute_dtype(recipe.model, device)
    config, architecture = load_config(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.model.max_seq_length, recipe.train.seed)
    total_steps = count_steps(len(data.train), recipe.train)
    if snapshot and snapshot.step >= total_steps:
        raise RecipeError(f"Checkpoint {snapshot.path} is at step {snapshot.step}, and the recipe trains for "
                          f"{total_steps} steps; raise train.max_steps (or epochs) to train further.")
    try:
        return _train(recipe, out_dir, display, stop, snapshot, device, dtype, architecture, tokenizer, data,
                      total_steps)
    except torch.cuda.OutOfMemoryError:
        from ftcli.plan import out_of_memory_advice

        gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        raise OutOfMemory(out_of_memory_advice(recipe, config, gpu_bytes, data.stats.longest)) from None


def _train(recipe: Recipe, out_dir: Path, display: TrainingDisplay, stop: Optional[StopRequest],
           snapshot: Optional[Snapshot], device, dtype, architecture, tokenizer, data: PreparedData,
           total_steps: int) -> dict:
    model = load_model(recipe.model, architecture, device, dtype)
    model, swapped = prepare_for_training(model, architecture, recipe.lora, recipe.model.kernels and kernels_can_run(device),
                                          recipe.train.gradient_checkpointing, recipe.train.seed)
    fused = bool(swapped.get("cross_entropy"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    display.header(recipe, architecture.family, model, trainable, device, dtype, data.stats, total_steps, swapped)

    optimizer = build_optimizer(trainable, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    pad_id = tokenizer.pad_token_id
    first_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if snapshot:  # last, so the random states it restores are the ones the next step would have seen
        restore_snapshot(snapshot, model, optimizer, scheduler, scaler)
        first_step, tokens_seen, elapsed_before = snapshot.step, snapshot.state["tokens"], snapshot.state["elapsed_s"]
        display.resumed(snapshot.path, first_step)
    started = time.perf_counter() - elapsed_before
    last_loss, eval_loss = float("nan"), None
    interval_start, interval_tokens = time.perf_counter(), 0

    def save(step: int) -> Path:
        progress = {"tokens": tokens_seen, "elapsed_s": round(time.perf_counter() - started, 3),
                    **data_position(step, len(data.train), recipe.train)}
        return save_snapshot(out_dir, step, model, optimizer, scheduler, scaler, progress, recipe,
                             recipe.train.save_total_limit)

    model.train()
    with MetricsLog(out_dir, recipe.output.tensorboard, first_step) as metrics, display.running(total_steps, first_step):
        for step, group in enumerate(step_groups(data.train, recipe.train, total_steps), start=1):
            if step <= first_step:  # done before the checkpoint; the seeded order makes skipping exact
                continue
            batches = [collate(examples, pad_id, device) for examples in group]
            last_loss, step_tokens = accumulate_gradients(model, batches, scaler, fused)
            if not math.isfinite(last_loss):
                raise TrainingDiverged(divergence_message(step, last_loss, group, recipe, out_dir))
            grad_norm = clip_and_step(trainable, optimizer, recipe.train.max_grad_norm, scaler)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += step_tokens
            interval_tokens += step_tokens

            row = None
            if step % recipe.train.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                row = {"step": step, "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                       "tokens": tokens_seen, "tokens_per_s": round(interval_tokens / max(now - interval_start, 1e-9), 1),
                       "elapsed_s": round(now - started, 3), "peak_mem_gib": round(peak_memory_gib(device), 3)}
                interval_start, interval_tokens = now, 0
            if data.eval and (step == total_steps or (recipe.train.eval_steps and step % recipe.train.eval_steps == 0)):
                eval_loss = evaluate(model, data.eval, recipe.train.batch_size, pad_id, device, fused)
                row = (row or {"step": step}) | {"eval_loss": round(eval_loss, 6)}
            if row:
                metrics.write(row)
            if recipe.train.save_steps and step % recipe.train.save_steps == 0 and step < total_steps:
                save(step)
            display.step(step, last_loss, lr, row)
            if stop and stop.requested and step < total_steps:
                path = save(step)
                raise Interrupted(f"{stop.signal_name} received: stopped after step {step} of {total_steps} and saved "
                                  f"{path}. Run the same command with --resume to continue from there.",
                                  stop.signal_number)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    atomic_write_text(out_dir / "recipe.yaml", redact(recipe.to_yaml()))
    plot = plot_losses(out_dir)
    runtime = time.perf_counter() - started
    precision = "nf4" if recipe.model.load_in_4bit else str(dtype).removeprefix("torch.")
    return {"status": "ok", "steps": total_steps, "precision": precision, "kernels": swapped, "final_loss": round(last_loss, 6),
            "eval_loss": None if eval_loss is None else round(eval_loss, 6), "tokens": tokens_seen,
            "train_runtime_s": round(runtime, 2), "tokens_per_s": round(tokens_seen / max(runtime, 1e-9), 1),
            "peak_mem_gib": round(peak_memory_gib(device), 3), "trainable_params": sum(p.numel() for p in trainable),
            "resumed_from_step": snapshot.step if snapshot else None, "loss_plot": plot is not None}


def data_position(step: int, examples: int, settings: TrainSettings) -> dict:
    """Where in the seeded data order the next step starts: its epoch and the index of its first micro-batch."""
    per_epoch = math.ceil(math.ceil(examples / settings.batch_size) / settings.grad_accum)
    return {"epoch": step // per_epoch, "batch_index": (step % per_epoch) * settings.grad_accum}


def divergence_message(step: int, loss: float, group: list[list[TokenizedExample]], recipe: Recipe,
                       out_dir: Path) -> str:
    origins = sorted({example.origin for batch in group for example in batch if example.origin})
    rate = recipe.train.learning_rate
    latest = newest_snapshot(out_dir)
    resume = (f" The last checkpoint, {latest.path.name}, is kept; after a fix, --resume continues from it."
              if latest else "")
    return (f"The training loss became {loss} at step {step}, on the micro-batches of "
            f"{'; '.join(origins) or 'unknown rows of ' + recipe.data.path}; the run stopped without saving it. "
            f"Likely causes: a learning rate too high (train.learning_rate is {rate:g}; try {rate / 10:g}, or more "
            "warmup_steps), float16 overflow (use model.dtype: bfloat16 where the GPU has it, or float32), or bad "
            f"data in those rows (empty or garbled text, extreme lengths).{resume}")


def prepare_for_training(model, architecture: Architecture, lora: LoraSettings, kernels: bool,
                         gradient_checkpointing: Union[bool, str], seed: int):
    """Kernels, checkpointing and LoRA on a loaded base model, in the order they must go on; returns the
    trainable model and how many modules each kernel replaced (empty without kernels).

    The norm and MLP kernels go in before peft wraps the projections, so the LoRA kernels find them."""
    swapped = apply_kernels(model, architecture) if kernels else {}
    enable_checkpointing(model, gradient_checkpointing)
    model = add_lora(model, lora, architecture, seed)
    if kernels:
        swapped |= apply_lora_kernels(model)
    return model, swapped


def dry_run(recipe: Recipe) -> dict:
    """Everything `run` checks before training, without reading weights: recipe, model config, data, LoRA targets."""
    config, architecture = load_config(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    data: PreparedData = prepare_data(recipe.data, tokenizer, recipe.model.max_seq_length, recipe.train.seed)
    if recipe.lora.target_modules != "all-linear":
        check_lora_targets(meta_model(config), architecture.lora_targets(recipe.lora.target_modules))
    stats = data.stats
    return {"status": "ok", "dry_run": True, "architecture": architecture.family, "rows": stats.rows,
            "train_examples": len(data.train), "eval_examples": len(data.eval), "truncated": stats.truncated,
            "dropped_no_target": stats.dropped_no_target, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
            "longest": stats.longest, "skipped_invalid": stats.skipped_invalid, "packed_rows": stats.packed_rows,
            "steps": count_steps(len(data.train), recipe.train)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_steps(examples: int, settings: TrainSettings) -> int:
    """Optimizer steps: max_steps, or the epochs' worth of steps, whichever ends first when both are set."""
    steps_per_epoch = math.ceil(math.ceil(examples / settings.batch_size) / settings.grad_accum)
    limits = [settings.max_steps] if settings.max_steps else []
    if settings.epochs:
        limits.append(max(1, math.ceil(settings.epochs * steps_per_epoch)))
    return min(limits)


def step_groups(examples: list[TokenizedExample], settings: TrainSettings,
                total_steps: int) -> Iterator[list[list[TokenizedExample]]]:
    """For each optimizer step, its micro-batches; the data is reshuffled (seeded) at every epoch."""
    steps, epoch = 0, 0
    while True:
        order = list(range(len(examples)))
        random.Random(settings.seed + epoch).shuffle(order)
        batches = [[examples[i] for i in order[start:start + settings.batch_size]]
                   for start in range(0, len(order), settings.batch_size)]
        for start in range(0, len(batches), settings.grad_accum):
            yield batches[start:start + settings.grad_accum]
            steps += 1
            if steps == total_steps:
                return
        epoch += 1


def collate(examples: list[TokenizedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and of the loss.

    Packed rows also get their position ids, which restart at each example (and once more for the padding)."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
        if example.position_ids is not None:
            position_ids[row, :length] = torch.tensor(example.position_ids)
            position_ids[row, length:] = torch.arange(width - length)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(example.position_ids is not None for example in examples):
        batch["position_ids"] = position_ids
    return {name: tensor.to(device) for name, tensor in batch.items()}


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict:
    """What the model is called with: the padding mask; or, for packed rows, the restarting position ids and no
    mask, from which transformers builds a block-diagonal causal mask for SDPA and eager attention. Flash-attention
    takes the example boundaries as cumulative lengths over the flattened batch instead."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "flash" in (model.config._attn_implementation or ""):
        inputs |= example_boundaries(batch["position_ids"])
    return inputs


def example_boundaries(position_ids: torch.Tensor) -> dict:
    """flash-attention's varlen arguments: where each example (a run of positions from 0) starts in the flattened
    batch, and the longest one."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cumulative = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cumulative.diff().max())
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on: each label predicted from the position before it."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_token_loss(model, batch: dict[str, torch.Tensor], fused: bool = False) -> torch.Tensor:
    """Cross-entropy summed (not averaged) over the batch's target tokens, in float32.

    `fused` takes the decoder's last hidden states through the fused head and cross-entropy kernel instead,
    so the (tokens x vocabulary) logits never exist whole.
    """
    if fused:
        return fused_token_loss(model, batch)
    logits = model(**model_inputs(model, batch)).logits
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def fused_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM's own head and final soft-capping (Gemma 2), applied by the kernel to the decoder's output;
    labels move left by one instead of the hidden states right, so the hidden states are used as they are."""
    from ftcli_kernels.cross_entropy import fused_linear_cross_entropy

    hidden = model.get_decoder()(**(model_inputs(model, batch) | {"use_cache": False})).last_hidden_state
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings().weight,
                                      labels.reshape(-1), getattr(model.config, "final_logit_softcapping", None),
                                      IGNORE_INDEX)


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]],
                         scaler: Optional[torch.amp.GradScaler] = None, fused: bool = False) -> tuple[float, int]:
    """Backward over all micro-batches of one step; returns the step's mean token loss and its token count."""
    total_targets = sum(target_tokens(batch) for batch in batches)
    step_loss = 0.0
    for batch in batches:
        loss = summed_token_loss(model, batch, fused) / total_targets
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.item()
    return step_loss, sum(int(batch["attention_mask"].sum()) for batch in batches)


def clip_and_step(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  max_grad_norm: Optional[float], scaler: Optional[torch.amp.GradScaler]) -> float:
    """Clip the global gradient norm (when asked), take the optimizer step, and return the norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parameters, limit)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(norm)


@torch.no_grad()
def evaluate(model, examples: list[TokenizedExample], batch_size: int, pad_id: int, device: torch.device,
             fused: bool = False) -> float:
    """Mean token loss over the held-out examples."""
    model.eval()
    loss_sum, targets = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id, device)
        loss_sum += float(summed_token_loss(model, batch, fused))
        targets += target_tokens(batch)
    model.train()
    return loss_sum / max(targets, 1)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
