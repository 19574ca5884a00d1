"""Training speed and per-GPU memory on several GPUs against one, measured in one run.

    python -m ftcli.bench --gpus 2 --shape llama3-8b --precision nf4 --seq 2048 --bs 2
    python -m ftcli.bench --gpus 2 --distributed fsdp --shape llama3-70b --precision bf16 --seq 2048 --bs 1

One process trains on one GPU, then N processes under torchrun, one per GPU, each on its own bs rows of seq random
tokens, set up and stepped as `ftcli train` does: kernels, checkpointing and LoRA r=16 on all seven projections,
each process's summed loss divided by the target tokens of all processes, the adapter's gradients summed across
processes, clipping and 8-bit AdamW; with fsdp the decoder layers' weights are sharded (ftcli/sharding.py). Tokens/s
counts the tokens of all GPUs over the median step; "weights" is the memory a GPU holds once the model is set up,
"peak" the most it held while training. A side that the plan says cannot fit one GPU is not run.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from peft.tuners.lora import LoraLayer

from ftcli.bench_common import (BENCH_LORA, CHECKPOINTING, LORA_SEED, device_and_dtype, draw_random_weight, ftcli_setup,
                                random_model, report, side_in_subprocess, synchronize)
from ftcli.distributed import Processes, global_max, start_processes, stop_processes, sum_gradients
from ftcli.loader import TRAINED_ADAPTER
from ftcli.optim import build_optimizer
from ftcli.plan import CheckpointingChoice
from ftcli.recipe import TrainSettings
from ftcli.shapes import SHAPES, shape_config
from ftcli.sharding import shard_decoder_layers
from ftcli.train import accumulate_gradients

GIB = 2**30


def build(args, processes: Processes, device: torch.device, dtype: torch.dtype):
    """The set-up model of one process: whole (ddp, one GPU), or with its decoder layers sharded (fsdp)."""
    if args.distributed == "fsdp" and args.precision == "bf16":
        return sharded_from_meta(args, processes, device, dtype)
    packed_in = dtype if args.distributed == "fsdp" else torch.uint8  # FSDP2 shards floating-point tensors only
    model, kernels = ftcli_setup(random_model(args.shape, args.precision, device, dtype, packed_in),
                                 CheckpointingChoice(args.checkpointing))
    if args.distributed == "fsdp":
        shard_decoder_layers(model, device, processes)
    return model, kernels


def sharded_from_meta(args, processes: Processes, device: torch.device, dtype: torch.dtype):
    """A 16-bit model larger than one GPU: set up on the meta device, sharded, and only then given memory (each
    process its shards) and random weights, as FSDP2 intends for models built without a checkpoint."""
    from transformers import AutoModelForCausalLM

    config = shape_config(args.shape, max_position_embeddings=131072, attn_implementation="sdpa")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    model, kernels = ftcli_setup(model, CheckpointingChoice(args.checkpointing))
    shard_decoder_layers(model, device, processes)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(processes.rank)  # each process draws its own shards
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:  # the base weights; a DTensor's own shard of them
            draw_random_weight(parameter.to_local() if hasattr(parameter, "to_local") else parameter, name, generator)
    for module in model.modules():
        if isinstance(module, LoraLayer):  # to_empty left the adapter's memory as it found it: peft's own start
            module.reset_lora_parameters(TRAINED_ADAPTER, init_lora_weights=True)
    with torch.device(device):  # the computed buffers were never built on the meta device
        model.get_decoder().rotary_emb = type(model.get_decoder().rotary_emb)(config)
    return model, kernels


def train_side(args) -> dict:
    """One process's measurement (process 0's, with the figures of all, under torchrun)."""
    processes = start_processes()
    device, dtype = device_and_dtype()  # the CPU in float32 only to test the benchmark itself
    torch.manual_seed(LORA_SEED)
    model, kernels = build(args, processes, device, dtype)
    synchronize(device)
    weights_gib = global_max(allocated_gib(device))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = build_optimizer(trainable, TrainSettings(optimizer="adamw_8bit", learning_rate=2e-4, weight_decay=0.0))
    generator = torch.Generator().manual_seed(1 + processes.rank)  # each process its own rows
    vocab = SHAPES[args.shape]["vocab_size"]
    batches = []
    for _ in range(2):  # two batches alternated, so that no step replays the previous one's data
        ids = torch.randint(0, vocab, (args.bs, args.seq), generator=generator).to(device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss, _ = accumulate_gradients(model, [batches[step % 2]], None, kernels.fused_loss)
        sum_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
        losses.append(loss)
    peak_gib = global_max(torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else 0.0)
    stop_processes()
    side = f"{processes.count} GPU" + ("s " + args.distributed if processes.several else "")
    return {"side": side, "gpus": processes.count, "step_s": times[args.warmup:], "losses": losses,
            "weights_gib": weights_gib, "peak_gib": peak_gib,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def allocated_gib(device: torch.device) -> float:
    """What the GPU holds now; 0 on the CPU, where the figure would mean nothing."""
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else 0.0


def fits_one_gpu(args) -> bool:
    """Whether the plan puts one process's peak inside this GPU's memory (a 70B model in bf16 does not fit)."""
    from ftcli.plan import ModelShape, Setup, estimate_memory

    if not torch.cuda.is_available():
        return True
    shape = ModelShape.from_config(shape_config(args.shape))
    setup = Setup(batch_size=args.bs, seq=args.seq, load_in_4bit=args.precision == "nf4", lora_r=BENCH_LORA.r,
                  checkpointing=args.checkpointing)
    return estimate_memory(shape, setup).needed < torch.cuda.get_device_properties(0).total_memory


def print_table(args, results: list[dict]) -> None:
    tokens = args.seq * args.bs
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"\n{device}  {args.shape}  {args.precision}  seq {args.seq} x batch {args.bs} per GPU  "
          f"(median of {args.steps} steps after {args.warmup} warm-up)")
    print(f"{'side':<14}{'tokens/s':>10}{'step s':>9}{'weights GiB':>13}{'peak GiB':>10}{'first loss':>12}"
          f"{'scaling':>9}")
    single = None
    for result in results:
        if "error" in result or "skipped" in result:
            print(f"{result['side']:<14}  {result.get('error') or result['skipped']}")
            continue
        step = statistics.median(result["step_s"])
        speed = tokens * result["gpus"] / step
        single = single or (speed if result["gpus"] == 1 else None)
        scaling = f"{speed / single:.2f}x" if single and result["gpus"] > 1 else "-"
        print(f"{result['side']:<14}{speed:>10,.0f}{step:>9.3f}{result['weights_gib']:>13.2f}"
              f"{result['peak_gib']:>10.2f}{result['losses'][0]:>12.4f}{scaling:>9}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m ftcli.bench --gpus N", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--precision", choices=["nf4", "bf16"], default="nf4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=2, help="rows per GPU")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", choices=sorted(CHECKPOINTING), default="offload")
    parser.add_argument("--side", action="store_true", help="be one side's process (what the parent starts)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.checkpointing = CHECKPOINTING[args.checkpointing]
    if args.side:
        result = train_side(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    forwarded = [a for a in argv if a != "--json"]
    one_gpu = [sys.executable, "-m", "ftcli.bench_distributed", *forwarded, "--side", "--gpus", "1"]
    several = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus), "-m",
               "ftcli.bench_distributed", *forwarded, "--side"]
    results = [side_in_subprocess("1 GPU", one_gpu) if fits_one_gpu(args) else
               {"side": "1 GPU", "skipped": "does not fit one GPU (ftcli plan); not run"},
               side_in_subprocess(f"{args.gpus} GPUs {args.distributed}", several)]
    report(results, args.json, lambda: print_table(args, results))


if __name__ == "__main__":
    main()
