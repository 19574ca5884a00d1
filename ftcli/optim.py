"""The optimizer over the LoRA weights and the learning-rate schedule with warmup.

The rate of each step is computed from the recipe and put into the optimizer before the step, rather than kept in
a scheduler's state, so a run resumed with a changed schedule (rate, warmup, length) follows the changed one.
"""

import math

import torch

from ftcli.errors import CheckpointError
from ftcli.recipe import TrainSettings

# bitsandbytes 0.50's 8-bit update scales each moment by the largest value of its block of this many elements, on
# every backend: BLOCKSIZE_2STATE in csrc/ops.cu, `blocksize = 256` in backends/cpu/ops.py and in
# Optimizer2State.init_state, which sizes the absmax vectors
STATE_BLOCK = 256
# its CUDA kernel counts elements in 32-bit ints (`const int n`, and n rounded up to whole blocks)
LARGEST_FLAT = 2**31 - STATE_BLOCK
# where state_dict() keeps the moments of the matrices stepped as one flat tensor
FLAT_STATE = "flat_8bit"


def build_optimizer(parameters: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """adamw_8bit keeps both moments in 8 bits through bitsandbytes; adamw is PyTorch's own."""
    options = dict(lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if settings.optimizer == "adamw_8bit":
        return flat_adamw_8bit()(parameters, **options)
    return torch.optim.AdamW(parameters, **options)


def flat_adamw_8bit() -> type:
    """bitsandbytes' AdamW8bit, with the large LoRA matrices stepped together as one flat tensor.

    bitsandbytes steps each parameter on its own: a Python call, a kernel launch and a device wait for each of the
    448 matrices of a LoRA on seven projections of 32 layers, the GPU idle in between. Its 8-bit update is
    elementwise and scales each moment by the largest value of its block of STATE_BLOCK elements, counted from the
    tensor's start; so a matrix of whole blocks (and of at least min_8bit_size elements, below which the moments
    stay in 32 bits) gets the same bits stepped alone or as a block-aligned slice of a longer tensor. Those matrices
    are gathered into one flat tensor at each step (so weights changed between steps, by a resume or a broadcast,
    are the ones stepped), updated in one call and copied back; the flat copies of weights and gradients exist only
    inside step() (twice the matrices' size, while the activations of backward are gone), so forward and backward
    hold no memory for them. The other parameters are stepped one by one, as bitsandbytes does, minus its device
    waits (they exist for paged states, which this optimizer refuses).

    A subclass rather than a wrapper, so that param_groups lists the trained parameters themselves: the float16
    GradScaler unscales and checks the gradients it finds there, and set_learning_rate writes the rate there. One
    parameter group: a recipe has one rate, weight decay and betas.
    """
    import bitsandbytes  # here, not at the top: only adamw_8bit needs it, and importing it loads its native library

    class FlatAdamW8bit(bitsandbytes.optim.AdamW8bit):
        def __init__(self, parameters: list[torch.nn.Parameter], **options):
            super().__init__(parameters, is_paged=False, **options)
            everything = self.param_groups[0]["params"]
            self.flat_indices = flat_member_indices(everything, self.args.min_8bit_size)
            self.separate_indices = sorted(set(range(len(everything))) - set(self.flat_indices))
            self.members = [everything[index] for index in self.flat_indices]
            quantiles = self.name2qmap["dynamic"], self.name2qmap["udynamic"]
            self.flat_state = flat_moments(self.members, *quantiles) if self.members else {}

        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("ftcli's AdamW8bit takes no closure")
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            group = self.param_groups[0]
            if self.members:
                self.step_members(group)
            for index in self.separate_indices:
                parameter = group["params"][index]
                if parameter.grad is None:
                    continue
                if len(self.state[parameter]) == 0:
                    self.init_state(group, parameter, 0, index)
                self.update_step(group, parameter, 0, index)

        def step_members(self, group: dict) -> None:
            """All members in one update when each has a gradient and all have taken as many steps (always, in
            ftcli); otherwise each member that has a gradient on its own slice of the moments, with its own step
            count, as bitsandbytes steps a parameter and skips one without a gradient."""
            gradients = [parameter.grad for parameter in self.members]
            steps = self.flat_state["steps"]
            if all(gradient is not None for gradient in gradients) and len(set(steps)) == 1:
                flat = torch._utils._flatten_dense_tensors(self.members)  # one torch.cat, its loop in C++
                self.update(group, flat, torch._utils._flatten_dense_tensors(gradients), 0, steps[0] + 1)
                torch._foreach_copy_(self.members, torch._utils._unflatten_dense_tensors(flat, self.members))
                self.flat_state["steps"] = [step + 1 for step in steps]
                return
            steps = [step + (gradient is not None) for step, gradient in zip(steps, gradients)]
            start = 0
            for parameter, gradient, step in zip(self.members, gradients, steps):
                if gradient is not None:
                    self.update(group, parameter.view(-1), gradient.reshape(-1), start, step)
                start += parameter.numel()
            self.flat_state["steps"] = steps

        def update(self, group: dict, parameter: torch.Tensor, gradient: torch.Tensor, start: int, step: int) -> None:
            """bitsandbytes' 8-bit AdamW update of the 1-d `parameter`, whose moments are the flat ones from element
            `start` (the arguments its Optimizer2State.update_step passes for a parameter of one group)."""
            end = start + parameter.numel()
            blocks = slice(start // STATE_BLOCK, end // STATE_BLOCK)
            moments = self.flat_state
            beta1, beta2 = group["betas"]
            bitsandbytes.functional.optimizer_update_8bit_blockwise(
                self.optimizer_name, gradient, parameter, moments["state1"][start:end], moments["state2"][start:end],
                beta1, beta2, 0.0, 0.0, group["eps"], step, group["lr"], moments["qmap1"], moments["qmap2"],
                moments["absmax1"][blocks], moments["absmax2"][blocks], group["weight_decay"],
                gnorm_scale=1.0, skip_zeros=self.args.skip_zeros)

        def state_dict(self) -> dict:
            return super().state_dict() | {FLAT_STATE: {"members": self.flat_indices, **self.flat_state}}

        def load_state_dict(self, state_dict: dict) -> None:
            """Refuses, as a CheckpointError, a state whose flat members are not this optimizer's: one written by
            the earlier ftcli, which stepped every matrix apart, or for another LoRA setup."""
            saved = state_dict.get(FLAT_STATE)
            if saved is None and self.members:
                raise CheckpointError(
                    "The optimizer state was written by an earlier ftcli, whose 8-bit AdamW kept the moments of each "
                    "LoRA matrix apart; this ftcli steps the large matrices as one flat tensor and cannot continue "
                    "that state. Delete the checkpoints to start the run again, or finish this run with the ftcli "
                    "version that wrote them.")
            if saved is not None and saved["members"] != self.flat_indices:
                raise CheckpointError(
                    f"The optimizer state holds the 8-bit moments of {len(saved['members'])} LoRA matrices stepped as "
                    f"one tensor, where this run steps {len(self.flat_indices)} so; it was saved for another LoRA "
                    "setup. Delete the checkpoints to start the run again.")
            super().load_state_dict({key: value for key, value in state_dict.items() if key != FLAT_STATE})
            if self.members:
                device = self.members[0].device
                self.flat_state = {key: value.to(device, copy=True) if isinstance(value, torch.Tensor) else value
                                   for key, value in saved.items() if key != "members"}

    return FlatAdamW8bit


def flat_member_indices(parameters: list[torch.nn.Parameter], min_8bit_size: int) -> list[int]:
    """Which parameters step as one flat tensor: those of whole STATE_BLOCKs and at least min_8bit_size elements,
    contiguous, of the first such one's dtype and device, as many as the CUDA kernel can count."""
    chosen, size = [], 0
    for index, parameter in enumerate(parameters):
        first = parameters[chosen[0]] if chosen else parameter
        if (parameter.numel() % STATE_BLOCK == 0 and parameter.numel() >= min_8bit_size and parameter.is_contiguous()
                and (parameter.dtype, parameter.device) == (first.dtype, first.device)
                and size + parameter.numel() <= LARGEST_FLAT):
            chosen.append(index)
            size += parameter.numel()
    return chosen


def flat_moments(members: list[torch.nn.Parameter], signed: torch.Tensor, unsigned: torch.Tensor) -> dict:
    """What bitsandbytes' init_state gives one parameter (zero 8-bit moments and block scales, and the quantile maps
    of the signed first and the unsigned second moment), for all members at once, and each member's step count
    (bitsandbytes counts a parameter's steps, skipping those without a gradient)."""
    size, device = sum(member.numel() for member in members), members[0].device
    return {"steps": [0] * len(members), "qmap1": signed.to(device), "qmap2": unsigned.to(device),
            "state1": torch.zeros(size, dtype=torch.uint8, device=device),
            "state2": torch.zeros(size, dtype=torch.uint8, device=device),
            "absmax1": torch.zeros(size // STATE_BLOCK, dtype=torch.float32, device=device),
            "absmax2": torch.zeros(size // STATE_BLOCK, dtype=torch.float32, device=device)}


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
