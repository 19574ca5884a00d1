"""The optimizer over the LoRA weights and the learning-rate schedule with warmup.

The rate of each step is computed from the recipe and put into the optimizer before the step, rather than kept in
a scheduler's state, so a run resumed with a changed schedule (rate, warmup, length) follows the changed one.
"""

import math

import torch

from ftcli.recipe import TrainSettings


def build_optimizer(parameters: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """adamw_8bit keeps both moments in 8 bits through bitsandbytes; adamw is PyTorch's own."""
    options = dict(lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if settings.optimizer == "adamw_8bit":
        return unsynchronized_adamw_8bit()(parameters, **options)
    return torch.optim.AdamW(parameters, **options)


def unsynchronized_adamw_8bit() -> type:
    """bitsandbytes' AdamW8bit, minus the device synchronisation it makes after every parameter.

    Those waits exist for paged optimizer states; ftcli's are never paged (the constructor below refuses
    it). With a LoRA on seven projections of 32 layers that is 448 waits a step, each leaving the GPU idle
    while Python prepares the next tiny update. The update kernels themselves are bitsandbytes'.
    """
    import bitsandbytes  # here, not at the top: only adamw_8bit needs it, and importing it loads its native library

    class AdamW8bit(bitsandbytes.optim.AdamW8bit):
        def __init__(self, parameters, **options):
            super().__init__(parameters, is_paged=False, **options)

        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("ftcli's AdamW8bit takes no closure")
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for group_index, group in enumerate(self.param_groups):
                for param_index, parameter in enumerate(group["params"]):
                    if parameter.grad is None:
                        continue
                    if len(self.state[parameter]) == 0:
                        self.init_state(group, parameter, group_index, param_index)
                    self.update_step(group, parameter, group_index, param_index)

    return AdamW8bit


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


def set_learning_rate(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int, step: int) -> float:
    """Put the rate of optimizer step `step` (0-based) into every parameter group; returns it."""
    rate = settings.learning_rate * learning_rate_factor(step, settings.warmup_steps, total_steps, settings.lr_scheduler)
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate
