"""What the peers' benchmark scripts share: waiting for the GPU before a host clock is read, and a TrainerCallback
that times each optimizer step of a Hugging Face trainer. transformers is imported inside `step_timer`, since
Unsloth must be imported before it to patch it."""

import time

import torch

CUDA = torch.cuda.is_available()


def synchronize() -> None:
    """Wait for the work queued on the GPU, so that a host clock read next counts it."""
    if CUDA:
        torch.cuda.synchronize()


def step_timer(times: list, reset_peak_at_start: bool = False):
    """A TrainerCallback that appends each optimizer step's seconds to `times`; with `reset_peak_at_start`, the
    GPU's peak memory counts from the start of training on."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            if reset_peak_at_start and CUDA:
                synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *_, **__):
            synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            synchronize()
            times.append(time.perf_counter() - self.started)

    return StepTimer()
