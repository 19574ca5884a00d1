"""`ftcli train --gpus N`: N training processes on this machine, started as torchrun starts them, watched so that
one failure or one Ctrl-C never leaves the others hanging.

Each worker is `python -m ftcli train RECIPE ...` with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) added to this process's environment; the workers join their process
group themselves (ftcli/distributed.py). Their output goes straight to this terminal. The launcher forwards SIGINT
and SIGTERM to every worker (they finish the step and process 0 saves a checkpoint); a second Ctrl-C kills them at
once. When a worker fails, the others are usually waiting for it in a collective: they get `grace` seconds to
stop by themselves, then are killed.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ftcli.errors import InputError

# Seconds the other workers get to exit by themselves after one failed: a worker that noticed the failure stops
# within a step's collective, one still blocked in it never will
GRACE_AFTER_FAILURE = 5.0
POLL_INTERVAL = 0.05  # seconds between looks at the workers
MASTER_ADDR = "127.0.0.1"  # every worker is on this machine
# what the launcher sends on to the workers: a closed terminal (SIGHUP) stops them as a preemption does, with a
# checkpoint, instead of leaving them running without a launcher
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}


@dataclass(frozen=True)
class Worker:
    command: list[str]
    environment: dict[str, str]


def check_process_count(count: int) -> str:
    """Where `count` processes can train on this machine: "cuda" (one GPU each) or "cpu" (gloo, where there is no
    CUDA GPU). Raises InputError for a count that cannot run."""
    if count < 1:
        raise InputError(f"--gpus {count}: the number of training processes must be 1 or more. Leave --gpus out "
                         "to train in one process.")
    if count > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(f"--gpus {count} was given to a process that torchrun (or `ftcli train --gpus`) already "
                         f"started as one of {os.environ['WORLD_SIZE']}: leave --gpus out of the torchrun command, "
                         "whose --nproc-per-node says how many processes to start.")
    if not torch.cuda.is_available():
        return "cpu"
    if count > torch.cuda.device_count():
        raise InputError(f"--gpus {count}: this machine has {torch.cuda.device_count()} CUDA GPU(s) visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Give --gpus at "
                         "most that many; for more GPUs on other machines, run torchrun on each of them (README, "
                         "Several GPUs).")
    return "cuda"


def train_workers(arguments: Sequence[str], count: int) -> list[Worker]:
    """`count` workers running `ftcli train` with `arguments` (the command line without --gpus), each with
    torchrun's variables for its rank, and one free port for all to meet on."""
    port = str(_free_port())
    threads = str(max(1, len(os.sched_getaffinity(0)) // count))
    command = [sys.executable, "-m", "ftcli", "train", *arguments]
    workers = []
    for rank in range(count):
        environment = dict(os.environ)
        # as torchrun does, processes do not each start a thread per core; unlike it, they share the cores out
        environment.setdefault("OMP_NUM_THREADS", threads)
        environment.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count),
                           LOCAL_WORLD_SIZE=str(count), MASTER_ADDR=MASTER_ADDR, MASTER_PORT=port)
        workers.append(Worker(command, environment))
    return workers


def _free_port() -> int:
    """A TCP port nobody listens on now; process 0 listens on it once it starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((MASTER_ADDR, 0))
        return probe.getsockname()[1]


def run_workers(workers: Sequence[Worker], grace: float = GRACE_AFTER_FAILURE) -> int:
    """Start the workers and wait for all of them; the exit code is the first failing worker's (0 when all
    succeed), or 130 after a second Ctrl-C."""
    launch = _Launch(grace)
    previous = {number: signal.signal(number, launch.forward) for number in FORWARDED}
    try:
        for worker in workers:
            # a session (and process group) of its own: a Ctrl-C in the terminal reaches the launcher alone, which
            # forwards it once
            launch.processes.append(subprocess.Popen(worker.command, env=worker.environment, start_new_session=True))
        return launch.wait()
    finally:
        launch.kill_running()  # none is left behind, also when starting one of them failed
        for process in launch.processes:
            process.wait()
        for number, handler in previous.items():
            signal.signal(number, handler)


class _Launch:
    """The started workers, and the signals the launcher received while they ran."""

    def __init__(self, grace: float):
        self.grace = grace
        self.processes: list[subprocess.Popen] = []
        self.stopping = False  # a stop was forwarded: the workers exit 130 or 143 once they agree on it
        self.killed = False  # a second Ctrl-C killed them

    def forward(self, number: int, frame) -> None:
        """The signal handler. It only sends signals: the main loop, which it interrupts, reaps the workers."""
        if number == signal.SIGINT and self.stopping:
            sys.stderr.write("\nSecond Ctrl-C: stopping every process now; the last saved checkpoint is kept.\n")
            sys.stderr.flush()
            self.killed = True
            self.kill_running()
            return
        self.stopping = True
        for process in self._running():
            process.send_signal(FORWARDED[number])

    def wait(self) -> int:
        """Wait for every worker, killing those still running `grace` seconds after one failed (unless a stop was
        forwarded: process 0 may be saving a checkpoint while the others have already exited)."""
        failure, deadline = None, None
        while True:
            if failure is None and (failure := self._failure()) is not None and not self.stopping:
                deadline = time.monotonic() + self.grace
            running = self._running()
            if not running:
                break
            if deadline is not None and time.monotonic() > deadline:
                ranks = ", ".join(str(self.processes.index(process)) for process in running)
                sys.stderr.write(f"Stopping process(es) {ranks}: still running {self.grace:g} s after another "
                                 "failed.\n")
                sys.stderr.flush()
                self.kill_running()
                deadline = None
            time.sleep(POLL_INTERVAL)
        return 128 + signal.SIGINT if self.killed else failure or 0

    def _failure(self) -> Optional[int]:
        """The exit code of a worker that has failed (the lowest rank among several), as a shell reports it."""
        for rank, process in enumerate(self.processes):
            code = process.poll()
            if code and code < 0 and not self.killed:  # a signal killed it: nothing in the worker could say so
                sys.stderr.write(f"error: process {rank} was killed by {signal.Signals(-code).name}.\n")
                sys.stderr.flush()
            if code:
                return 128 - code if code < 0 else code
        return None

    def _running(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.poll() is None]

    def kill_running(self) -> None:
        """SIGKILL each running worker's process group: the worker and what it started (compile workers), which
        would outlive it otherwise."""
        for process in self._running():
            with contextlib.suppress(ProcessLookupError):  # it exited since the look
                os.killpg(process.pid, signal.SIGKILL)
