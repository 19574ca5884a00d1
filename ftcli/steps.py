"""Which examples each optimizer step trains on, and how many steps a run has.

The data is reshuffled with a seed at every epoch, so the order is a function of the recipe alone: a resumed run
skips the steps before its checkpoint and meets exactly the batches an uninterrupted run would have.
"""

import math
import random
from typing import Iterator

from ftcli.data.templates import TokenizedExample
from ftcli.recipe import TrainSettings


def micro_batch_of_all(settings: TrainSettings, processes: int) -> TrainSettings:
    """The train settings as the data order sees a run of `processes` processes: each micro-batch holds batch_size
    rows of every process, the rows one process with batch_size x processes would take."""
    return settings.model_copy(update={"batch_size": settings.batch_size * processes})


def steps_per_epoch(examples: int, settings: TrainSettings) -> int:
    """Optimizer steps in one pass over the data: micro-batches of batch_size, grad_accum of them a step (the last
    micro-batch and the last step of an epoch are short when the numbers do not divide)."""
    return math.ceil(math.ceil(examples / settings.batch_size) / settings.grad_accum)


def count_steps(examples: int, settings: TrainSettings) -> int:
    """Optimizer steps: max_steps, or the epochs' worth of steps, whichever ends first when both are set."""
    limits = [settings.max_steps] if settings.max_steps else []
    if settings.epochs:
        limits.append(max(1, math.ceil(settings.epochs * steps_per_epoch(examples, settings))))
    return min(limits)


def data_position(step: int, examples: int, settings: TrainSettings) -> dict:
    """Where in the seeded data order the next step starts: its epoch and the index of its first micro-batch."""
    per_epoch = steps_per_epoch(examples, settings)
    return {"epoch": step // per_epoch, "batch_index": (step % per_epoch) * settings.grad_accum}


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


def examples_in_run(examples: list, settings: TrainSettings, total_steps: int) -> list:
    """The examples the run's steps train on, each once, in the order the steps first meet them: fewer than all
    when max_steps stops the run before an epoch ends."""
    met = {}
    for group in step_groups(examples, settings, total_steps):
        for batch in group:
            for example in batch:
                met.setdefault(id(example), example)
    return list(met.values())
