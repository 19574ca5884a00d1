"""The optimizer over the LoRA weights and the learning-rate schedule with warmup."""

import math

import torch

from ftcli.recipe import TrainSettings


def build_optimizer(parameters: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """adamw_8bit keeps both moments in 8 bits through bitsandbytes; adamw is PyTorch's own."""
    options = dict(lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if settings.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **options)
    return torch.optim.AdamW(parameters, **options)


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak rate for the optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, settings.warmup_steps, total_steps, settings.lr_scheduler))
