"""Several processes training one model: which process this is, its share of each micro-batch, and the sums that
make the update equal to the one a single process would make.

torchrun (or `ftcli train --gpus N`, ftcli/launch.py) starts one process per GPU with RANK, WORLD_SIZE and
LOCAL_RANK in its environment. Each micro-batch of the seeded order holds batch_size x processes rows; every process
takes its share of the rows, divides its summed loss by the count of targets of all processes (`global_sums`), and
the adapter's gradients are summed across processes (`sum_gradients`), so that the step is the one-process step on
the whole micro-batch. Every function here is the identity in a single process, where no process group exists.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

# How long a process waits in a collective for the others before failing instead of hanging: the slowest part of a
# step that one process may do alone (a checkpoint written by process 0) must fit in it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run: `rank` counts from 0 over all nodes, `local_rank` on
    this machine (it picks the GPU)."""

    rank: int = 0
    count: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Process 0 alone logs, shows progress and writes the output folder."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.count > 1


def start_processes() -> Processes:
    """Join the run's process group when torchrun started several processes (NCCL with GPUs, gloo on the CPU);
    a plain `ftcli train` is a single process."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    if count == 1:
        return Processes()
    processes = Processes(int(os.environ["RANK"]), count, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(processes.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return processes


def stop_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _joined() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """NCCL reduces GPU tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share(rows: Sequence, processes: Processes) -> list:
    """This process's rows of a micro-batch: consecutive, as even as possible (counts differ by at most one), empty
    only when the micro-batch has fewer rows than there are processes."""
    start = processes.rank * len(rows) // processes.count
    end = (processes.rank + 1) * len(rows) // processes.count
    return list(rows[start:end])


def global_sums(*values: float) -> list[float]:
    """Each value summed over all processes, in float64 (token counts stay exact)."""
    if not _joined():
        return [float(value) for value in values]
    summed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(summed)
    return summed.tolist()


def global_totals(totals: dict[str, float]) -> dict[str, float]:
    """Named sums added up over all processes; a name that one process never met counts as 0 there (a process whose
    share of a step was empty has none)."""
    if not _joined():
        return dict(totals)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(totals))
    names = sorted(set().union(*gathered))
    return dict(zip(names, global_sums(*(totals.get(name, 0.0) for name in names))))


def global_max(value: float) -> float:
    """The largest value of any process: per-GPU peaks, and a stop that any process was asked for."""
    if not _joined():
        return float(value)
    largest = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Add up the trained parameters' gradients over all processes, in one flat buffer per dtype (one collective
    instead of one per LoRA matrix). A parameter that got no gradient on this process counts as zeros."""
    if not _joined():
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for parameter in parameters:
        by_dtype.setdefault(parameter.dtype, []).append(parameter)
    for group in by_dtype.values():
        for parameter in group:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        flat = torch.cat([parameter.grad.reshape(-1) for parameter in group])
        dist.all_reduce(flat)
        for parameter, summed in zip(group, flat.split([parameter.numel() for parameter in group])):
            parameter.grad.copy_(summed.view_as(parameter.grad))


def from_main(value: Any) -> Any:
    """Process 0's `value` on every process (any picklable object, tensors on the CPU)."""
    if not _joined():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def wait_for_all() -> None:
    if _joined():
        dist.barrier()

