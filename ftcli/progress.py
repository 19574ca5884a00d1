"""What a person sees while training: a header about the run, then one live progress bar.

With --json the display is silent, so that the single summary line is all a CI job reads.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ftcli.errors import redact
from ftcli.patch import KernelSwaps
from ftcli.plan import CheckpointingChoice
from ftcli.recipe import DEFAULT_BETA, PREFERENCE_METHODS
from ftcli.step_graph import BUCKET_TOKENS, GRAPHED_TOKENS


# how several processes share the model, as the header says it
SPREAD = {"ddp": "the whole model on each, adapter gradients summed",
          "fsdp": "the decoder layers' weights sharded over them (FSDP2), adapter gradients summed"}
# what each gradient-checkpointing policy keeps, as the header says it
KEPT = {False: "every layer's activations kept, nothing recomputed",
        True: "each layer's input kept, the layer recomputed in backward",
        "offload": "each layer's input kept in CPU memory, the layer recomputed in backward"}


class TrainingDisplay:
    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.tokens_per_s = 0.0

    def header(self, recipe, family: str, model, trainable, device: torch.device, dtype: torch.dtype,
               stats, total_steps: int, kernels: KernelSwaps, processes: int = 1, strategy: str = "ddp",
               checkpointing: CheckpointingChoice = CheckpointingChoice(True), cuda_graphs: bool = False) -> None:
        if not self.enabled:
            return
        # bitsandbytes packs two 4-bit weights into each stored byte, so a Params4bit's numel is half its weights
        total = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())
        trained = sum(p.numel() for p in trainable)
        dtype_name = str(dtype).removeprefix("torch.")
        precision = f"NF4 4-bit base, {dtype_name} compute" if recipe.model.load_in_4bit else f"{dtype_name} base"
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        unit = {"grpo": "prompts"}.get(recipe.train.method, "pairs" if recipe.train.method in PREFERENCE_METHODS
                                       else "examples")
        table = Table.grid(padding=(0, 2))
        for name, value in [
            ("model", f"{recipe.model.name} ({family})"),
            ("parameters", f"{total / 1e6:,.1f} M, trainable {trained / 1e6:,.2f} M ({100 * trained / total:.2f}%)"),
            ("device", where),
            ("precision", f"{precision}, LoRA r={recipe.lora.r} alpha={recipe.lora.alpha:g}"),
            ("kernels", kernels_line(kernels)),
            ("method", method_line(recipe)),
            ("data", f"{stats.examples} {unit}, {stats.tokens:,} tokens"
                     + ("" if unit == "prompts" else f" ({stats.target_tokens:,} trained), {stats.truncated} truncated")
                     + (f", {stats.skipped_invalid} invalid rows skipped" if stats.skipped_invalid else "")
                     + (f", packed into {stats.packed_rows} rows" if stats.packed_rows else "")),
            ("schedule", f"{total_steps} steps x {recipe.train.batch_size} x {recipe.train.grad_accum} "
                         f"{unit if unit != 'examples' else 'sequences'}"
                         + (f" x {processes} processes" if processes > 1 else "")
                         + f", lr {recipe.train.learning_rate:g} {recipe.train.lr_scheduler}"),
            ("checkpointing", checkpointing_line(recipe, checkpointing.mode, checkpointing.layers_on_gpu, kernels)),
        ] + ([("cuda graphs", f"micro-batches of up to {GRAPHED_TOKENS:,} tokens replayed, rows padded to multiples "
                              f"of {BUCKET_TOKENS} tokens")]
             if cuda_graphs else []) + ([("processes", f"{processes}, {strategy}: " + SPREAD[strategy])] if processes > 1 else []):
            table.add_row(f"[bold]{name}[/]", redact(value))
        self.console.print(table)

    def resumed(self, checkpoint, step: int) -> None:
        if self.enabled:
            self.console.print(f"Resuming from {checkpoint} (step {step}).")

    @contextmanager
    def running(self, total_steps: int, completed: int = 0) -> Iterator[None]:
        """The live bar for the duration of the loop; stopped on errors too, so messages print cleanly."""
        if not self.enabled:
            yield
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[measure]} [cyan]{task.fields[value]}[/] lr {task.fields[lr]} {task.fields[speed]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("train", total=total_steps, completed=completed, measure="loss", value="-",
                                           lr="-", speed="-")
        with self.progress:
            yield

    def step(self, step: int, headline: tuple[str, float], lr: float, row) -> None:
        """Show step `step` done; `headline` is what to show of it, ("loss", 1.23) or GRPO's ("reward", 0.5)."""
        if not self.enabled:
            return
        if row and "tokens_per_s" in row:
            self.tokens_per_s = row["tokens_per_s"]
        measure, value = headline
        self.progress.update(self.task, completed=step, measure=measure, value=f"{value:.4f}", lr=f"{lr:.2e}",
                             speed=f"{self.tokens_per_s:,.0f}")
        evaluated = "eval_loss" if row and "eval_loss" in row else "eval_reward" if row and "eval_reward" in row else None
        if evaluated:
            self.progress.console.print(f"step {step}: {evaluated.replace('_', ' ')} {row[evaluated]:.4f}")


def method_line(recipe) -> str:
    method = recipe.train.method
    if method == "grpo":
        grpo = recipe.grpo
        return (f"grpo ({grpo.loss_type}), {grpo.num_generations} completions per prompt of at most "
                f"{grpo.max_completion_length} tokens, temperature {grpo.temperature:g}, beta {grpo.beta:g}, "
                f"rewards: {', '.join(f'{r.metric_name()} x{r.weight:g}' for r in grpo.rewards)}")
    return method + (f", beta {recipe.beta():g}" if method in DEFAULT_BETA else "")


def checkpointing_line(recipe, checkpointing, layers_on_gpu: int, kernels: KernelSwaps) -> str:
    """The gradient checkpointing the run uses (auto resolved), where the offloaded layer inputs wait, how many MLPs
    and attention layers are not recomputed, and whether the MLPs dequantize once."""
    auto = " (auto)" if recipe.train.gradient_checkpointing == "auto" else ""
    split = f"; the first {layers_on_gpu} layers' inputs on the GPU, as the host has no room" if layers_on_gpu else ""
    if kernels.mlps_kept_on_gpu:
        split += f"; with the room left, {kernels.mlps_kept_on_gpu} layers' MLPs keep their tensors, not recomputed"
    if kernels.mlps_hosted:
        split += f"; {kernels.mlps_hosted} layers' MLPs keep theirs in CPU memory, as the PCIe bus has time for"
    if kernels.attention_layers_replayed:
        split += (f"; the top {kernels.attention_layers_replayed} layers keep attention's output, not recomputed in "
                  "graphed micro-batches")
    if kernels.mlps_dequantized_once:
        split += "; the MLPs' backward dequantizes their weights once for all its chunks of rows"
    return f"{str(checkpointing).lower()}{auto}: {KEPT[checkpointing]}{split}"


def kernels_line(kernels: KernelSwaps) -> str:
    parts = [f"{name} x{count}" for name, count in kernels.module_counts.items()]
    if kernels.fused_loss:
        parts.append("fused LM head and cross-entropy")
    return ", ".join(parts) or "off (PyTorch modules)"
