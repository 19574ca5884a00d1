"""The training story of a recipe, top to bottom: load, prepare data, add LoRA, loop, save.

The loop is ours rather than a Trainer's so that every step is visible: gradient accumulation divides
the summed token losses of all micro-batches of a step by their total target tokens, which makes the
update independent of how the tokens were split into micro-batches. What a training method supplies is its
batches and its loss: `SupervisedMethod` here for SFT, `PreferenceMethod` (ftcli/preference.py) for DPO, ORPO
and SimPO, each an `accumulate_gradients` over a step's micro-batches and an `evaluate`, around the optimizer's
update (`GrpoMethod`, ftcli/grpo.py, generates the answers it learns from first); the rest of the loop (metrics,
evaluation, checkpoints, the stop check) is one small function each.
"""

import math
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ftcli.activation_checkpointing import enable_checkpointing, host_mlp_activations
from ftcli.attention_replay import replay_attention
from ftcli.architectures import Architecture
from ftcli.data import PreparedData, prepare_data
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample
from ftcli.distributed import Processes, from_main, global_max, global_sums, share, sum_gradients
from ftcli.errors import CheckpointError, Interrupted, OutOfMemory, RecipeError, TrainingDiverged, redact
from ftcli.loader import (TRAINED_ADAPTER, add_lora, check_lora_targets, compute_dtype, load_config, load_model,
                          load_reference_adapter, load_tokenizer, meta_model, pick_device)
from ftcli.grpo import GrpoMethod
from ftcli.metrics import MetricsLog, StepResult, plot_losses
from ftcli.optim import build_optimizer, set_learning_rate
from ftcli.patch import (KernelSwaps, apply_kernels, apply_lora_kernels, dequantize_mlp_weights_once,
                         kernels_can_run)
from ftcli.plan import (CheckpointingChoice, choose_strategy, local_host_memory, out_of_memory_advice,
                        settle_checkpointing)
from ftcli.preference import PreferenceMethod
from ftcli.progress import TrainingDisplay
from ftcli.rewards import Reward, load_rewards
from ftcli.recipe import PREFERENCE_METHODS, LoraSettings, Recipe, TrainSettings
from ftcli.sharding import one_process_at_a_time, pass_without_rows, shard_decoder_layers
from ftcli.signals import StopRequest
from ftcli.snapshots import (Snapshot, check_compatible, load_optimizer_state, newest_snapshot, random_states,
                             restore_random_states, restore_snapshot, save_snapshot)
from ftcli.staging import atomic_write_text
from ftcli.step_graph import GraphedMicroBatch, attention_replayable, graphed_width, settle_cuda_graphs
from ftcli.start_adapter import start_from_adapter
from ftcli.steps import count_steps, data_position, examples_in_run, micro_batch_of_all, step_groups


@dataclass
class TrainingSetup:
    """What the loop trains with, built once: the recipe and its data, the model and what updates it."""

    recipe: Recipe
    out_dir: Optional[Path]  # None in processes other than process 0, which write nothing
    data: PreparedData
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]  # float16 loss scaling; None in bfloat16 and float32
    device: torch.device
    dtype: torch.dtype
    kernels: KernelSwaps
    total_steps: int
    method: Union["SupervisedMethod", PreferenceMethod, GrpoMethod]
    processes: Processes
    schedule: TrainSettings  # the recipe's train section with the micro-batch of all processes: the data order
    cuda_graphs: bool = False  # micro-batches replayed as CUDA graphs, which add into gradients that stay in place


@dataclass
class RunState:
    """Where the run is: what checkpoints save, metrics rows report and the summary ends with."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds trained before this process, by the run a checkpoint came from
    last_loss: float = math.nan
    learning_rate: float = math.nan  # of the last step
    grad_norm: float = math.nan  # of the last step, before clipping
    eval_loss: Optional[float] = None
    method_metrics: dict[str, float] = field(default_factory=dict)  # of the last step, such as DPO's rewards
    started: float = field(default_factory=time.perf_counter)
    interval_start: float = field(default_factory=time.perf_counter)  # since the last metrics row
    interval_tokens: int = 0

    def advance(self, step: int, loss: float, learning_rate: float, grad_norm: float, tokens: int) -> None:
        """Count optimizer step `step` as done."""
        self.step, self.last_loss, self.learning_rate, self.grad_norm = step, loss, learning_rate, grad_norm
        self.tokens_seen += tokens
        self.interval_tokens += tokens

    def headline(self) -> tuple[str, float]:
        """What the progress bar shows of the last step: GRPO's reward (its loss hovers near 0 by construction),
        else the loss."""
        if "reward" in self.method_metrics:
            return "reward", self.method_metrics["reward"]
        return "loss", self.last_loss

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def tokens_per_second(self) -> float:
        """Throughput since the last call (or the start), which starts the next interval."""
        now = time.perf_counter()
        speed = self.interval_tokens / max(now - self.interval_start, 1e-9)
        self.interval_start, self.interval_tokens = now, 0
        return speed


def run(recipe: Recipe, out_dir: Optional[Path], display: TrainingDisplay, resume: bool = False,
        stop: Optional[StopRequest] = None, processes: Processes = Processes()) -> dict:
    """Train the recipe and save the adapter folder into `out_dir`; returns the run's summary.

    With `resume`, training continues from the newest checkpoint in `out_dir` (when there is one). `stop` is
    looked at after every optimizer step: once a signal has set it (in any process), a checkpoint is saved and the
    run ends with `Interrupted`. With several `processes`, process 0 alone reads and writes `out_dir` (None in the
    others).
    """
    config, architecture = load_config(recipe.model)
    recipe = start_from_adapter(recipe, config, architecture)
    snapshot = newest_snapshot(out_dir) if resume and processes.main else None
    if snapshot:
        check_compatible(snapshot, recipe, processes.count)
    rewards = load_rewards(recipe.grpo.rewards)  # before the model loads: a broken reward file fails in seconds
    seed_everything(recipe.train.seed)
    device = pick_device()  # with several processes, start_processes made this process's own GPU the current one
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.example_length_limit(), recipe.train.seed)
    schedule = micro_batch_of_all(recipe.train, processes.count)
    total_steps = count_steps(len(data.train), schedule)
    if snapshot and snapshot.step >= total_steps:
        raise CheckpointError(f"Checkpoint {snapshot.path} is at step {snapshot.step}, and the recipe trains for "
                              f"{total_steps} steps; raise train.max_steps (or epochs) to train further.")
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    cuda_graphs = settle_cuda_graphs(recipe.train.cuda_graphs, recipe.train.method, device,
                                     compute_dtype(recipe.model, device), processes.count, architecture)
    # what memory is planned for: the longest micro-batch's rows, which graphs pad up to their bucket
    graphed = graphed_width(recipe.train.batch_size, data.stats.longest, recipe.example_length_limit())
    longest = graphed if cuda_graphs and graphed else data.stats.longest
    strategy = choose_strategy(recipe, config, processes.count, gpu_bytes, longest)
    if strategy == "fsdp" and recipe.train.method == "grpo":
        raise RecipeError(f"train.distributed is {recipe.train.distributed} and resolves to fsdp, which GRPO does not "
                          "run: each process generates its own prompts' answers, a different number of decode steps "
                          "each, while sharded layers need every process in every forward. Use train.distributed: ddp "
                          "(each GPU holds the whole model: load_in_4bit: true makes it fit), or train with fewer "
                          "completion tokens (grpo.max_completion_length).")
    replayable = bool(graphed) and attention_replayable(config, cuda_graphs, recipe.data.packing,
                                                        recipe.train.batch_size, graphed)
    checkpointing = settle_checkpointing(recipe, config, gpu_bytes, local_host_memory(), longest, processes.count,
                                         strategy, replayable)
    try:
        setup = build_setup(recipe, out_dir, device, architecture, tokenizer, data, total_steps, rewards, processes,
                            schedule, strategy, checkpointing, cuda_graphs)
        display.header(recipe, architecture.family, setup.model, setup.trainable, device, setup.dtype, data.stats,
                       total_steps, setup.kernels, processes.count, strategy, checkpointing, cuda_graphs)
        state = resumed_state(setup, snapshot, display) if snapshot else RunState()
        if processes.several:
            state = state_of_main(setup, state)
        train_loop(setup, state, display, stop)
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_advice(recipe, config, gpu_bytes, longest, processes.count, strategy,
                                               checkpointing.mode)) from None
    return finish(setup, state, tokenizer, from_main(snapshot.step if snapshot else None))


def build_setup(recipe: Recipe, out_dir: Optional[Path], device: torch.device, architecture: Architecture, tokenizer,
                data: PreparedData, total_steps: int, rewards: list[Reward], processes: Processes = Processes(),
                schedule: Optional[TrainSettings] = None, strategy: str = "ddp",
                checkpointing: CheckpointingChoice = CheckpointingChoice(True),
                cuda_graphs: bool = False) -> TrainingSetup:
    schedule = schedule or recipe.train
    dtype = compute_dtype(recipe.model, device)
    model, kernels = trainable_model(recipe, architecture, device, dtype, processes if strategy == "fsdp" else None,
                                     checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if recipe.train.method == "grpo":
        method = GrpoMethod(recipe, tokenizer, device, kernels.fused_loss, rewards)
    else:
        method_class = PreferenceMethod if recipe.train.method in PREFERENCE_METHODS else SupervisedMethod
        method = method_class(recipe, tokenizer.pad_token_id, device, kernels.fused_loss)
        if cuda_graphs:  # settle_cuda_graphs allows them for sft alone
            method.replay_as_graphs(model, trainable, recipe.example_length_limit())
    method.prepare(model, examples_in_run(data.train, schedule, total_steps), data.eval, out_dir)
    return TrainingSetup(recipe, out_dir, data, model, trainable, build_optimizer(trainable, recipe.train),
                         torch.amp.GradScaler(device.type) if dtype == torch.float16 else None, device, dtype,
                         kernels, total_steps, method, processes, schedule, cuda_graphs)


def trainable_model(recipe: Recipe, architecture: Architecture, device: torch.device, dtype: torch.dtype,
                    sharded_over: Optional[Processes],
                    checkpointing: CheckpointingChoice) -> tuple[torch.nn.Module, KernelSwaps]:
    """The base model loaded and made trainable on `device`, its decoder layers checkpointed as `checkpointing`
    says (the recipe's, auto resolved by the plan); with `sharded_over`, sharded over those processes
    (ftcli/sharding.py)."""
    with one_process_at_a_time(sharded_over, recipe.model) if sharded_over else nullcontext():
        model = load_model(recipe.model, architecture, device, dtype, sharded=sharded_over is not None)
        model, kernels = prepare_for_training(model, architecture, recipe.lora,
                                              recipe.model.kernels and kernels_can_run(device),
                                              checkpointing, recipe.train.seed, recipe.model.adapter)
        compares_with_start = recipe.train.method == "dpo" or (recipe.train.method == "grpo" and recipe.grpo.beta)
        if recipe.model.adapter and compares_with_start:
            load_reference_adapter(model, recipe.model.adapter)  # the reference is the policy the run starts from
        if sharded_over:
            shard_decoder_layers(model, device, sharded_over)
    return model, kernels


def resumed_state(setup: TrainingSetup, snapshot: Snapshot, display: TrainingDisplay) -> RunState:
    """Restore the checkpoint (process 0); last before the loop, so the random states it restores are the ones the
    next step would have seen."""
    restore_snapshot(snapshot, setup.model, setup.optimizer, setup.scaler)
    display.resumed(snapshot.path, snapshot.step)
    return RunState(step=snapshot.step, tokens_seen=snapshot.state["tokens"], elapsed_before=snapshot.state["elapsed_s"])


def state_of_main(setup: TrainingSetup, state: RunState) -> RunState:
    """Give every process what process 0 started from (only it reads the output folder, so only it restored a
    checkpoint): the adapter weights, optimizer and scaler states, random states and the step reached."""
    main = from_main({"step": state.step, "tokens": state.tokens_seen, "elapsed_s": state.elapsed_before,
                      "adapter": [parameter.detach().cpu() for parameter in setup.trainable],
                      "optimizer": on_cpu(setup.optimizer.state_dict()),
                      "scaler": setup.scaler.state_dict() if setup.scaler else None, "rng": random_states()})
    if not setup.processes.main:
        with torch.no_grad():
            for parameter, value in zip(setup.trainable, main["adapter"]):
                parameter.copy_(value)
        load_optimizer_state(setup.optimizer, main["optimizer"])
        if setup.scaler:
            setup.scaler.load_state_dict(main["scaler"])
        restore_random_states(main["rng"])
    return RunState(step=main["step"], tokens_seen=main["tokens"], elapsed_before=main["elapsed_s"])


def on_cpu(value):
    """A state dict with its tensors copied to the CPU, to send to processes that hold them on other GPUs."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def train_loop(setup: TrainingSetup, state: RunState, display: TrainingDisplay, stop: Optional[StopRequest]) -> None:
    """The optimizer steps after `state.step`, each followed by its metrics row (and evaluation), its checkpoint
    when one is due, and a stop when a signal asked for one."""
    settings, total = setup.recipe.train, setup.total_steps
    setup.model.train()
    metrics_log = MetricsLog(setup.out_dir, setup.recipe.output.tensorboard, state.step) if setup.processes.main \
        else nullcontext()
    with metrics_log as metrics, display.running(total, state.step):
        for step, group in enumerate(step_groups(setup.data.train, setup.schedule, total), start=1):
            if step <= state.step:  # done before the checkpoint; the seeded order makes skipping exact
                continue
            train_step(setup, state, step, group)
            row = metrics_row(setup, state) if step % settings.logging_steps == 0 or step == total else None
            if evaluation_due(setup, step):
                state.eval_loss, eval_metrics = evaluate_or_stop(setup, step)
                evaluated = eval_metrics if state.eval_loss is None else {"loss": state.eval_loss} | eval_metrics
                row = (row or {"step": step}) | {f"eval_{name}": round(value, 6) for name, value in evaluated.items()}
            if row and metrics:
                metrics.write(row)
            display.step(step, state.headline(), state.learning_rate, row)
            signal_number = agreed_stop(stop, setup.processes) if step < total else 0
            if signal_number or checkpoint_due(settings, step, total):
                path = save_checkpoint(setup, state)
            if signal_number:
                raise Interrupted(f"{signal.Signals(signal_number).name} received: stopped after step {step} of "
                                  f"{total} and saved {path}. Run the same command with --resume to continue from "
                                  "there.", signal_number)


def agreed_stop(stop: Optional[StopRequest], processes: Processes) -> int:
    """The signal that asked any process to stop (0: none), so that all processes stop after the same step."""
    asked = stop.signal_number if stop is not None and stop.requested else 0
    return int(global_max(asked)) if processes.several else asked


def train_step(setup: TrainingSetup, state: RunState, step: int, group: list[list]) -> None:
    """One optimizer step over the micro-batches of `group`, each process on its share of every micro-batch; a loss
    or gradient norm that is not finite stops the run (every process alike) before the update."""
    shares = [share(batch, setup.processes) for batch in group]
    result = setup.method.accumulate_gradients(setup.model, shares, setup.scaler)
    sum_gradients(setup.trainable)
    examples = [example for batch in group for example in batch]
    check_finite("training loss", result.loss, step, examples, setup)
    grad_norm = clip_gradients(setup.trainable, setup.optimizer, setup.recipe.train.max_grad_norm, setup.scaler)
    if setup.scaler is None:  # with float16 loss scaling an overflow is normal: the scaler skips the step
        check_finite("gradient norm", grad_norm, step, examples, setup)
    rate = set_learning_rate(setup.optimizer, setup.recipe.train, setup.total_steps, step - 1)
    take_step(setup.optimizer, setup.scaler)
    setup.optimizer.zero_grad(set_to_none=not setup.cuda_graphs)
    state.advance(step, result.loss, rate, grad_norm, result.tokens)
    state.method_metrics = result.metrics


def metrics_row(setup: TrainingSetup, state: RunState) -> dict:
    return {"step": state.step, "loss": round(state.last_loss, 6), "lr": state.learning_rate,
            "grad_norm": round(state.grad_norm, 6), "tokens": state.tokens_seen,
            "tokens_per_s": round(state.tokens_per_second(), 1), "elapsed_s": round(state.elapsed(), 3),
            "peak_mem_gib": round(global_max(peak_memory_gib(setup.device)), 3)} | {
            name: round(value, 6) for name, value in state.method_metrics.items()}


def evaluation_due(setup: TrainingSetup, step: int) -> bool:
    """Every eval_steps steps and after the last one, when the recipe holds data out for evaluation."""
    eval_steps = setup.recipe.train.eval_steps
    return bool(setup.data.eval) and (step == setup.total_steps or (eval_steps > 0 and step % eval_steps == 0))


def evaluate_or_stop(setup: TrainingSetup, step: int) -> tuple[Optional[float], dict[str, float]]:
    """The evaluation loss (None for GRPO, which evaluates its rewards only) and the method's own evaluation
    metrics; a loss that is not finite stops the run like a training loss would."""
    loss, metrics, diverged = setup.method.evaluate(setup.model, setup.data.eval)
    if loss is not None:
        check_finite("evaluation loss", loss, step, diverged, setup)
    return loss, metrics


def checkpoint_due(settings: TrainSettings, step: int, total_steps: int) -> bool:
    """Every save_steps steps and after the last one, so that --resume continues a finished run from where it ended."""
    return settings.save_steps > 0 and (step % settings.save_steps == 0 or step == total_steps)


def save_checkpoint(setup: TrainingSetup, state: RunState) -> Path:
    """Process 0 writes the checkpoint (every process holds the same adapter and optimizer state); the others
    wait for it, so that a stop after it finds the checkpoint whole."""
    progress = {"tokens": state.tokens_seen, "elapsed_s": round(state.elapsed(), 3), "processes": setup.processes.count,
                **data_position(state.step, len(setup.data.train), setup.schedule)}
    path = None
    if setup.processes.main:
        path = save_snapshot(setup.out_dir, state.step, setup.model, setup.optimizer, setup.scaler, progress,
                             setup.recipe, setup.recipe.train.save_total_limit)
    return from_main(path)


def finish(setup: TrainingSetup, state: RunState, tokenizer, resumed_from_step: Optional[int]) -> dict:
    """Save the adapter, tokenizer, recipe and loss plot into the output folder; returns the run's summary."""
    recipe = setup.recipe
    peak = global_max(peak_memory_gib(setup.device))
    plot = None
    if setup.processes.main:
        setup.model.save_pretrained(setup.out_dir, selected_adapters=[TRAINED_ADAPTER])
        tokenizer.save_pretrained(setup.out_dir)
        atomic_write_text(setup.out_dir / "recipe.yaml", redact(recipe.to_yaml()))
        plot = plot_losses(setup.out_dir)
    runtime = state.elapsed()
    precision = "nf4" if recipe.model.load_in_4bit else str(setup.dtype).removeprefix("torch.")
    return {"status": "ok", "method": recipe.train.method, "steps": setup.total_steps, "precision": precision,
            "kernels": setup.kernels.module_counts, "fused_loss": setup.kernels.fused_loss, "final_loss": round(state.last_loss, 6),
            "eval_loss": None if state.eval_loss is None else round(state.eval_loss, 6), "tokens": state.tokens_seen,
            "train_runtime_s": round(runtime, 2), "tokens_per_s": round(state.tokens_seen / max(runtime, 1e-9), 1),
            "peak_mem_gib": round(peak, 3), "processes": setup.processes.count,
            "trainable_params": sum(p.numel() for p in setup.trainable), "resumed_from_step": resumed_from_step,
            "loss_plot": plot is not None} | (
            {"final_reward": round(state.method_metrics["reward"], 6)} if "reward" in state.method_metrics else {})


def check_finite(quantity: str, value: float, step: int, examples: list[TokenizedExample],
                 setup: TrainingSetup) -> None:
    """Stop the run with TrainingDiverged (exit code 3) when `value` is NaN or infinite."""
    if not math.isfinite(value):
        raise TrainingDiverged(divergence_message(quantity, value, step, examples, setup.recipe, setup.out_dir))


def divergence_message(quantity: str, value: float, step: int, examples: list[TokenizedExample], recipe: Recipe,
                       out_dir: Optional[Path]) -> str:
    origins = sorted({example.origin for example in examples if example.origin})
    rate = recipe.train.learning_rate
    latest = newest_snapshot(out_dir) if out_dir else None
    resume = (f" The last checkpoint, {latest.path.name}, is kept; after a fix, --resume continues from it."
              if latest else "")
    return (f"The {quantity} became {value} at step {step}, on the micro-batches of "
            f"{'; '.join(origins) or 'unknown rows of ' + recipe.data.path}; the run stopped without saving it. "
            f"Likely causes: a learning rate too high (train.learning_rate is {rate:g}; try {rate / 10:g}, or more "
            "warmup_steps), float16 overflow (use model.dtype: bfloat16 where the GPU has it, or float32), or bad "
            f"data in those rows (empty or garbled text, extreme lengths).{resume}")


def prepare_for_training(model, architecture: Architecture, lora: LoraSettings, kernels: bool,
                         checkpointing: CheckpointingChoice, seed: int,
                         adapter: Optional[str] = None) -> tuple[torch.nn.Module, KernelSwaps]:
    """Kernels, checkpointing (its mode; under offload, the first layers whose inputs stay on the GPU; the LoRA MLPs
    that keep their tensors for backward on the GPU or in CPU memory, not recomputed; the top layers whose recompute
    replays attention) and LoRA (new, or the `adapter` folder's) on a loaded base model, in the order they must go on,
    and the MLPs' weights dequantized once where `checkpointing` says; returns the trainable model and what the
    kernels took over (nothing without kernels).

    The norm and MLP kernels go in before peft wraps the projections, so the LoRA kernels find them."""
    swaps = apply_kernels(model, architecture) if kernels else KernelSwaps()
    enable_checkpointing(model, checkpointing.mode, checkpointing.layers_on_gpu, checkpointing.keeps_blocks)
    model = add_lora(model, lora, architecture, seed, adapter)
    if kernels:
        swaps.module_counts |= apply_lora_kernels(model)
    if kernels and checkpointing.skips_mlp_recompute:
        swaps.mlps_kept_on_gpu, swaps.mlps_hosted = host_mlp_activations(model, checkpointing.mlps_hosted_every,
                                                                         on_gpu=checkpointing.mlps_kept_on_gpu)
    if checkpointing.mode and checkpointing.attention_layers_replayed:
        swaps.attention_layers_replayed = replay_attention(model, checkpointing.attention_layers_replayed)
    if kernels and checkpointing.mlp_weights_dequantized_once:
        swaps.mlps_dequantized_once = dequantize_mlp_weights_once(model)
    return model, swaps


def dry_run(recipe: Recipe, processes: int = 1) -> dict:
    """Everything `run` checks before training, without reading weights: recipe, model config, the adapter it starts
    from, data, LoRA targets; the steps are those of `processes` processes, each taking batch_size rows."""
    config, architecture = load_config(recipe.model)
    recipe = start_from_adapter(recipe, config, architecture)
    load_rewards(recipe.grpo.rewards)
    tokenizer = load_tokenizer(recipe.model)
    data: PreparedData = prepare_data(recipe.data, tokenizer, recipe.example_length_limit(), recipe.train.seed)
    if recipe.lora.target_modules != "all-linear":
        check_lora_targets(meta_model(config), architecture.lora_targets(recipe.lora.target_modules))
    stats = data.stats
    return {"status": "ok", "dry_run": True, "method": recipe.train.method, "architecture": architecture.family,
            "rows": stats.rows,
            "train_examples": len(data.train), "eval_examples": len(data.eval), "truncated": stats.truncated,
            "dropped_no_target": stats.dropped_no_target, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
            "longest": stats.longest, "skipped_invalid": stats.skipped_invalid, "packed_rows": stats.packed_rows,
            "steps": count_steps(len(data.train), micro_batch_of_all(recipe.train, processes))}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class SupervisedMethod:
    """SFT: cross-entropy over the trained tokens, normalised by the step's number of them."""

    def __init__(self, recipe: Recipe, pad_id: int, device: torch.device, fused: bool):
        self.batch_size, self.pad_id, self.device, self.fused = recipe.train.batch_size, pad_id, device, fused
        self.graphs: Optional[GraphedMicroBatch] = None
        self.width_limit = 0

    def replay_as_graphs(self, model, trainable: list[torch.nn.Parameter], width_limit: int) -> None:
        """From now on each micro-batch runs as a CUDA graph of its shape, its rows padded to a bucket's width."""
        self.graphs = GraphedMicroBatch(model, lambda batch: summed_token_loss(model, batch, self.fused), trainable)
        self.width_limit = width_limit

    def prepare(self, model, train: list[TokenizedExample], evaluation: list[TokenizedExample],
                out_dir: Optional[Path]) -> None:
        """Nothing to compute before training (preference methods may precompute their reference)."""

    def accumulate_gradients(self, model, group: list[list[TokenizedExample]],
                             scaler: Optional[torch.amp.GradScaler] = None) -> StepResult:
        batches = [self.collate(examples) if examples else None for examples in group]
        loss, tokens = accumulate_gradients(model, batches, scaler, self.fused, self.graphs)
        return StepResult(loss, tokens)

    def collate(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        """The micro-batch on the device; for a graph, its rows padded to their bucket's width, and, unless packed,
        without an attention mask, so that the graph attends causally without one (step_graph.causal_attention,
        which a graph cannot decide by reading the mask): the padding is on the right, where causal attention never
        lets a real token see it, and its labels are ignored, so no gradient comes back from it either. The mask is
        kept as `padding_mask`, which the model is not given, to count the tokens (batch_tokens)."""
        longest = max(len(example.input_ids) for example in examples)
        width = graphed_width(len(examples), longest, self.width_limit) if self.graphs else None
        if width is None:
            return collate(examples, self.pad_id, self.device)
        batch = collate(examples, self.pad_id, self.device, width)
        if "position_ids" not in batch:
            batch["padding_mask"] = batch.pop("attention_mask")
        return batch

    def evaluate(self, model, examples: list[TokenizedExample]) -> tuple[float, dict, list[TokenizedExample]]:
        loss, diverged = evaluate(model, examples, self.batch_size, self.pad_id, self.device, self.fused)
        return loss, {}, diverged


def collate(examples: list[TokenizedExample], pad_id: int, device: torch.device,
            width: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch, to its longest row or to `width`; padding is masked out of attention and of the loss.

    Packed rows also get their position ids, which restart at each example (and once more for the padding)."""
    width = width or max(len(example.input_ids) for example in examples)
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
    """What the model is called with: the padding mask (none for a batch known to have no padding); or, for packed
    rows, the restarting position ids and no mask, from which transformers builds a block-diagonal causal mask for
    SDPA and eager attention. Flash-attention takes the example boundaries as cumulative lengths over the flattened
    batch instead."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
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
    from ftcli_kernels.cross_entropy import fused_linear_cross_entropy  # here, not at the top: it imports Triton

    hidden = model.get_decoder()(**(model_inputs(model, batch) | {"use_cache": False})).last_hidden_state
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings().weight,
                                      labels.reshape(-1), getattr(model.config, "final_logit_softcapping", None),
                                      IGNORE_INDEX)


def accumulate_gradients(model, batches: list[Optional[dict[str, torch.Tensor]]],
                         scaler: Optional[torch.amp.GradScaler] = None, fused: bool = False,
                         graphs: Optional[GraphedMicroBatch] = None) -> tuple[float, int]:
    """Backward over this process's micro-batches of one step (None where its share of one was empty), op by op or
    replayed as `graphs`; returns the step's mean token loss and its token count, both of all processes (the loss is
    divided by the target tokens of all processes)."""
    present = [batch for batch in batches if batch is not None]
    total_targets, = global_sums(sum(target_tokens(batch) for batch in present))
    step_loss = 0.0
    for batch in batches:
        if batch is None:
            pass_without_rows(model)
            continue
        if graphs is not None:
            loss = graphs(batch, 1 / total_targets)
        else:
            loss = summed_token_loss(model, batch, fused) / total_targets
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.item()
    step_loss, tokens = global_sums(step_loss, sum(batch_tokens(batch) for batch in present))
    return step_loss, int(tokens)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The batch's tokens that are not padding, by its attention mask or the padding mask of a graphed batch
    (SupervisedMethod.collate); all of them in a batch without either."""
    mask = batch.get("attention_mask", batch.get("padding_mask"))
    return batch["input_ids"].numel() if mask is None else int(mask.sum())


def clip_gradients(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   max_grad_norm: Optional[float], scaler: Optional[torch.amp.GradScaler]) -> float:
    """Clip the global gradient norm (when asked) and return the norm before clipping; with float16 loss scaling,
    of the gradients unscaled first."""
    if scaler:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(parameters, limit))


def take_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler]) -> None:
    """The optimizer's update; with float16 loss scaling the scaler skips it when a gradient overflowed, and
    adjusts its scale."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def evaluate(model, examples: list[TokenizedExample], batch_size: int, pad_id: int, device: torch.device,
             fused: bool = False) -> tuple[float, list[TokenizedExample]]:
    """Mean token loss over the held-out examples, and the examples of the micro-batches whose loss is not finite
    (for the message that names them)."""
    model.eval()
    loss_sum, targets, diverged = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch_examples = examples[start:start + batch_size]
        batch = collate(batch_examples, pad_id, device)
        batch_loss = float(summed_token_loss(model, batch, fused))
        if not math.isfinite(batch_loss):
            diverged += batch_examples
        loss_sum += batch_loss
        targets += target_tokens(batch)
    model.train()
    return loss_sum / max(targets, 1), diverged


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
