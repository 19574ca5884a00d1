"""One AdamW8bit step over the LoRA matrices of Llama-3-8B (r=16 on all seven projections: 448 float32 tensors):
bitsandbytes' own AdamW8bit, one update and one device wait per tensor, against ftcli's, which updates them as one
flat tensor. Prints the median over 10 steps (after 3 warm-up steps) of the host's time to enqueue the step and of
its wall time, and the peak GPU memory of each.

    python benchmarks/optimizer_step.py
    python benchmarks/optimizer_step.py --layers 16 --hidden 2048 --kv 512 --intermediate 8192   # Llama-3.2-1B
"""

import argparse
import statistics
import time

import bitsandbytes
import torch

from ftcli.optim import build_optimizer
from ftcli.recipe import TrainSettings

CUDA = torch.cuda.is_available()


def lora_shapes(layers: int, hidden: int, kv: int, intermediate: int, rank: int) -> list[tuple[int, int]]:
    projections = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                   (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    pairs = [[(rank, inputs), (outputs, rank)] for inputs, outputs in projections]  # LoRA A and B of each
    return [shape for _ in range(layers) for pair in pairs for shape in pair]


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def measure(build, shapes: list[tuple[int, int]], warmup: int = 3, steps: int = 10) -> dict:
    parameters = [torch.nn.Parameter(torch.randn(shape, device="cuda" if CUDA else "cpu") * 0.01) for shape in shapes]
    optimizer = build(parameters)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    host, wall = [], []
    for _ in range(warmup + steps):
        for parameter in parameters:
            parameter.grad = torch.randn_like(parameter) * 1e-3
        synchronize()
        started = time.perf_counter()
        optimizer.step()
        enqueued = time.perf_counter()
        synchronize()
        host.append(enqueued - started)
        wall.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    return {"host_ms": 1e3 * statistics.median(host[warmup:]), "wall_ms": 1e3 * statistics.median(wall[warmup:]),
            "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--kv", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    shapes = lora_shapes(args.layers, args.hidden, args.kv, args.intermediate, args.rank)
    settings = TrainSettings(optimizer="adamw_8bit", learning_rate=2e-4, weight_decay=0.0)
    options = dict(lr=settings.learning_rate, weight_decay=settings.weight_decay)
    sides = {"bitsandbytes AdamW8bit": lambda parameters: bitsandbytes.optim.AdamW8bit(parameters, **options),
             "ftcli AdamW8bit (flat)": lambda parameters: build_optimizer(parameters, settings)}
    print(f"{len(shapes)} tensors, {sum(i * o for i, o in shapes) / 1e6:.1f} M parameters, {'cuda' if CUDA else 'cpu'}")
    for name, build in sides.items():
        result = measure(build, shapes)
        print(f"{name:24} host {result['host_ms']:7.2f} ms  wall {result['wall_ms']:7.2f} ms  "
              f"peak {result['peak_gib']:.3f} GiB")


if __name__ == "__main__":
    main()
