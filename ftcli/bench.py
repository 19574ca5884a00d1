"""Training speed and memory of ftcli against its peers for supervised fine-tuning, on one GPU, in one run.

    python -m ftcli.bench --shape llama3-8b --seq 2048 --bs 2 --peer unsloth --peer trl --calls 3

Every side trains the same random-weight model (the decoder's linear layers in NF4 with double quantization, or
16-bit with --precision bf16) on the same two batches of random token ids, alternated, no padding, with LoRA r=16
(--lora-r) on all seven projections, bitsandbytes' AdamW8bit at lr 2e-4 and clipping at 1.0. Each side runs in its
own process, so none inherits another's allocations or compiled kernels. A call's tokens/s is over its median step
after warm-up; peak is torch.cuda.max_memory_allocated from the first training step on, weights included.

The peers (--peer, repeatable or comma-separated; hf when none is given):

- **hf**: the classic recipe, transformers + peft + bitsandbytes with prepare_model_for_kbit_training, SDPA,
  non-reentrant gradient checkpointing and the model's own loss, built in memory as ftcli's side is.
- **trl**: TRL's SFTTrainer as its users run it today: the model loaded in bf16 (NF4 through a BitsAndBytesConfig),
  the adapter from a peft LoraConfig, checkpointing, TRL's fused LM head.
- **unsloth**: Unsloth's FastLanguageModel, its 4-bit load and `use_gradient_checkpointing="unsloth"`.

trl and unsloth run benchmarks/sft_peers.py with whatever is importable (ftcli never imports them; on the GPU machine
put .peersite on PYTHONPATH) and load a model folder written first: the bf16 weights ftcli's side draws in memory,
quantized on load as their users do. --keep-model DIR keeps that folder as DIR/SHAPE for later runs of the shape.

With --calls N the whole comparison runs N times, interleaved (each call starts one side later), each side a fresh
process every call, and one table gives per side the median tokens/s over the calls, the spread (how much slower
the slowest call is than the fastest, in percent), the largest peak, the first-step loss, and ftcli's speed and
peak over the side's. A side that fails (not importable, out of memory) fails its row with the reason and the rest
of the table prints; the exit code is 1 only when ftcli's own side failed.

ftcli's side is the path `ftcli train` takes, set up by the same function.

    python -m ftcli.bench --decode --shape llama3-8b --precision bf16 --prompt-len 128 --new-tokens 256

With --decode it measures answering instead: greedy decode tokens/s of plain `model.generate` (its default
dynamic cache, eager) against ftcli's decoder (ftcli/decoding.py, the one `ftcli chat` uses), on the same
model in one process. Decode speed excludes the prompt: (new tokens - 1) / (time for all - time for the first).

    python -m ftcli.bench --method dpo

With --method dpo it compares DPO training with TRL's and Unsloth's DPOTrainer (ftcli/bench_preference.py).

    python -m ftcli.bench --method grpo

With --method grpo it compares GRPO training, generation included, with TRL's GRPOTrainer (ftcli/bench_grpo.py).
"""

import argparse
import cProfile
import importlib.metadata
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ftcli import bench_distributed, bench_grpo, bench_peers, bench_preference
from ftcli.attention_replay import replay_attention
from ftcli.bench_common import (BENCH_LORA, CHECKPOINTING, LORA_SEED, add_training_arguments, ftcli_setup, method_of,
                                random_batches, random_model, write_random_model)
from ftcli.decoding import Decoder, Sampling
from ftcli.optim import build_optimizer
from ftcli.errors import InputError
from ftcli.patch import dequantize_mlp_weights_once, host_input_embeddings
from ftcli.plan import CheckpointingChoice, ModelShape, Setup, ordinal, parse_size, settled_setup
from ftcli.recipe import TrainSettings
from ftcli.shapes import SHAPES, shape_config
from ftcli.step_graph import GraphedMicroBatch
from ftcli.train import summed_token_loss, target_tokens

SIDES = ("hf", "ftcli")  # the sides this module builds in memory and trains (--only)
VERSIONS_OF = ("torch", "triton", "transformers", "peft", "bitsandbytes")  # what each side reports it ran


def hf_training(model, precision: str, lora_r: int):
    """The plain Hugging Face QLoRA setup; returns the model and a function of a batch giving its mean loss."""
    if precision == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(LORA_SEED)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0,
                                             target_modules=BENCH_LORA.target_modules, task_type="CAUSAL_LM"))
    return model, lambda batch: model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def ftcli_training(model, checkpointing: CheckpointingChoice, lora_r: int, host_embeddings: bool = False,
                   replayed_attention: int = 0, host_attention: bool = False, dequantize_once: bool = False):
    """The path `ftcli train` takes after loading: kernels, checkpointing (with MLP tensors kept on the GPU or hosted
    as `checkpointing` says), LoRA, and its own loss, summed over the batch's target tokens; with the input embedding
    table hosted, the attention of the top `replayed_attention` layers replayed in their recompute (its outputs in
    CPU memory with `host_attention`), and the MLPs' backward dequantizing their weights once, when asked."""
    model, kernels = ftcli_setup(model, checkpointing, lora_r)
    if host_embeddings and not host_input_embeddings(model):
        raise SystemExit("--host-embeddings: this shape's input embedding cannot wait in CPU memory (its output "
                         "head shares the table, or it is not a plain frozen nn.Embedding); leave the flag out")
    if replayed_attention and not replay_attention(model, replayed_attention, host_attention):
        raise SystemExit("--replay-attention replays attention in the recompute of offloaded checkpointing: add "
                         "--checkpointing offload, or with --checkpointing true also --keep-mlp or --host-mlp")
    if dequantize_once and not dequantize_mlp_weights_once(model):
        raise SystemExit("--dequantize-once changes the LoRA MLP kernel's backward, and this model has none: leave "
                         "the flag out")
    return model, lambda batch: summed_token_loss(model, batch, kernels.fused_loss)


def ftcli_checkpointing(args) -> CheckpointingChoice:
    """ftcli's checkpointing: --checkpointing's with the MLPs --keep-mlp and --host-mlp say, or with --gpu-memory
    what `ftcli train` resolves its default (auto) to on a GPU of that size (ftcli/plan.py), MLPs kept and hosted,
    attention replayed (in graphed steps, whose batches have no mask) and MLP weights dequantized once included."""
    if not args.gpu_memory:
        return CheckpointingChoice(args.checkpointing, 0, args.keep_mlp, args.host_mlp)
    setup = Setup(batch_size=args.bs, seq=args.seq, load_in_4bit=args.precision == "nf4", lora_r=args.lora_r)
    return CheckpointingChoice.of(settled_setup(ModelShape.from_config(shape_config(args.shape)), setup, "auto",
                                                parse_size(args.gpu_memory), None, replayable=args.cuda_graph))


def checkpointing_words(choice: CheckpointingChoice, gpu_memory: Optional[str]) -> str:
    """The checkpointing ftcli's side ran, for the table's footnote."""
    planned = f" (ftcli train's auto on a GPU of {gpu_memory})" if gpu_memory else ""
    kept = f", {choice.mlps_kept_on_gpu} MLPs kept on the GPU" if choice.mlps_kept_on_gpu else ""
    if choice.mlps_hosted_every:
        kept += f", every {ordinal(choice.mlps_hosted_every)} MLP below hosted in CPU memory"
    if choice.attention_layers_replayed:
        kept += f", attention of {choice.attention_layers_replayed} layers replayed"
    if choice.mlp_weights_dequantized_once:
        kept += ", MLP weights dequantized once per backward"
    return f"checkpointing {str(choice.mode).lower()}{kept}{planned}"


def eager_micro_batch(mean_loss):
    """Forward and backward of a batch, op by op; returns the loss."""
    def train_micro_batch(batch):
        loss = mean_loss(batch)
        loss.backward()
        return loss
    return train_micro_batch


def graphed_micro_batch(model, summed_loss, trainable):
    """Forward and backward of a batch replayed as a CUDA graph (ftcli/step_graph.py); returns the loss. The batches
    have no padding, so they go without a mask, which a graph could not skip by looking at it."""
    graphed = GraphedMicroBatch(model, summed_loss, trainable)
    return lambda batch: graphed({name: batch[name] for name in ("input_ids", "labels")}, 1 / target_tokens(batch))


def measure(side: str, args) -> dict:
    """Build, set up and train one side; returns its step times, losses and peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.shape, args.precision, device, dtype)
    settings = {}
    if side == "hf":
        model, mean_loss = hf_training(model, args.precision, args.lora_r)
    else:
        checkpointing = ftcli_checkpointing(args)
        extras = f", attention of {args.replay_attention} layers replayed" if args.replay_attention else ""
        if args.host_attention:
            extras += ", their outputs below the top layer's hosted in CPU memory"
        if args.dequantize_once:
            extras += ", MLP weights dequantized once per backward"
        settings = {"settings": checkpointing_words(checkpointing, args.gpu_memory) + extras}
        model, summed_loss = ftcli_training(model, checkpointing, args.lora_r, args.host_embeddings,
                                            args.replay_attention, args.host_attention, args.dequantize_once)
        mean_loss = lambda batch: summed_loss(batch) / target_tokens(batch)  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    graphed = side == "ftcli" and args.cuda_graph and device.type == "cuda"
    if side == "ftcli" and args.replay_attention and not graphed:
        raise SystemExit("--replay-attention replays attention in CUDA-graphed steps, whose attention it takes over, "
                         "and this run is not graphed (it has no CUDA GPU, or --no-cuda-graph): run it on a GPU with "
                         "graphs (the default), or leave the flag out")
    train_micro_batch = graphed_micro_batch(model, summed_loss, trainable) if graphed else eager_micro_batch(mean_loss)
    learning_rate = bench_peers.LEARNING_RATE
    if side == "hf":
        optimizer = bnb.optim.AdamW8bit(trainable, lr=learning_rate, weight_decay=0.0)
    else:
        optimizer = build_optimizer(trainable, TrainSettings(optimizer="adamw_8bit", learning_rate=learning_rate,
                                                             weight_decay=0.0))
    batches = []
    for rows in random_batches(args.shape, args.seq, args.bs):
        ids = torch.tensor(rows, device=device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss = train_micro_batch(batches[step % 2])
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphed)
        losses.append(float(loss.detach()))  # synchronizes with the device
        times.append(time.perf_counter() - started)
    result = {"side": side, "step_s": times[args.warmup:], "losses": losses, **settings,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "versions": versions()}
    if args.profile and side == "ftcli" and device.type == "cuda":
        result["profile"] = profile_step(train_micro_batch, batches[0], optimizer, trainable, args.trace)
        result["profile"] += "\n" + profile_host(train_micro_batch, batches[0], optimizer, trainable)
    return result


def profile_step(train_micro_batch, batch, optimizer, trainable, trace_path) -> str:
    """The GPU kernels of one training step, grouped by name, longest total first, how long the host took to enqueue
    the step against the step's wall time (equal means the GPU waited on Python), and the kernels by kind with the
    time the GPU computed nothing."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        started = time.perf_counter()
        train_micro_batch(batch)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
        finished = time.perf_counter()
    if trace_path:
        profiler.export_chrome_trace(trace_path)
    table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    kernels = [(event.name, event.time_range.start, event.time_range.elapsed_us())
               for event in profiler.events() if event.device_type == DeviceType.CUDA]
    return (table + f"\nhost enqueued the step in {1e3 * (enqueued - started):.0f} ms of "
            f"{1e3 * (finished - started):.0f} ms\n\n" + kernels_by_kind(kernels))


HOST_COPY = "copy between host and GPU"  # on side streams, beside the kernels: not the GPU computing
KERNEL_KINDS = [  # (kind, whether a kernel's name says it is of that kind), the first that matches
    ("matmul", lambda name: name.startswith("nvjet") or any(part in name for part in ("gemm", "cutlass", "splitKreduce"))),
    ("attention", lambda name: any(part in name for part in ("sdpa", "fmha", "flash", "cudnn"))),
    (HOST_COPY, lambda name: name.startswith("Memcpy")),
    ("fill, memset", lambda name: "Fill" in name or name.startswith("Memset")),
    ("elementwise, cast, concatenation", lambda name: any(part in name for part in (
        "elementwise", "multi_tensor", "CatArray", "reduce_kernel", "copy_kernel", "gather"))),
]
LARGE_MATMUL_US = 100  # a matmul this long is a base projection's or the head's; shorter ones are LoRA products


def kernels_by_kind(kernels: list[tuple[str, float, float]]) -> str:
    """A step's GPU kernels, (name, start us, duration us), summed by kind (matmuls split at LARGE_MATMUL_US, other
    kernels by name: ftcli's Triton kernels), and how long the GPU computed nothing within the step: the gaps between
    kernels, the copies between host and GPU (side streams, overlapped) left out."""
    kinds = [next((kind for kind, matches in KERNEL_KINDS if matches(name)), name[:40]) for name, _, _ in kernels]
    totals: dict[str, list] = {}
    for kind, (_, _, duration) in zip(kinds, kernels):
        if kind == "matmul":
            kind += f", {'at least' if duration >= LARGE_MATMUL_US else 'under'} {LARGE_MATMUL_US} us each"
        total = totals.setdefault(kind, [0.0, 0])
        total[0] += duration
        total[1] += 1
    computing = sorted((start, start + duration) for kind, (_, start, duration) in zip(kinds, kernels)
                       if kind != HOST_COPY)
    first = end = computing[0][0] if computing else 0.0
    idle, gaps = 0.0, 0
    for start, stop in computing:
        if start > end:
            idle += start - end
            gaps += 1
        end = max(end, stop)
    span = end - first
    lines = [f"{'kind':<50}{'ms':>9}{'kernels':>9}"]
    lines += [f"{kind:<50}{total / 1e3:>9.2f}{count:>9}"
              for kind, (total, count) in sorted(totals.items(), key=lambda item: -item[1][0])]
    lines.append(f"the GPU computed {(span - idle) / 1e3:.1f} ms of the kernels' {span / 1e3:.1f} ms span, idle "
                 f"{idle / 1e3:.1f} ms in {gaps} gaps")
    return "\n".join(lines)


def profile_host(train_micro_batch, batch, optimizer, trainable) -> str:
    """The Python functions the host spends one training step in, by own time: what to cut when the GPU waits."""
    profiler = cProfile.Profile()
    profiler.enable()
    train_micro_batch(batch)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    profiler.disable()
    torch.cuda.synchronize()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(35)
    return report.getvalue()


def measure_decode(args) -> list[dict]:
    """Greedy decode speed of each decode side on one random-weight model; warm-up runs (compilation, CUDA graph
    capture) happen before any timing."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.shape, args.precision, device, dtype).eval()
    model.config.use_cache = True
    model.generation_config.eos_token_id = None  # random weights: every run decodes exactly the asked tokens
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(1)).to(device)
    decoder = Decoder(model, model.config.max_position_embeddings, compile=not args.no_compile)

    def generate(new_tokens: int, **options) -> list[int]:
        with torch.no_grad():
            output = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, **options)
        return output[0, args.prompt_len:].tolist()

    sides = {"generate": generate,
             "ftcli": lambda new_tokens: list(decoder.generate(prompt[0].tolist(), Sampling(new_tokens, 0.0)))}
    if args.hf_static:
        sides["generate static"] = lambda new_tokens: generate(new_tokens, cache_implementation="static")
    results, reference = [], None
    for side, run in sides.items():
        tokens = run(args.new_tokens)  # warm-up
        run(1)
        reference = reference or tokens
        full, first = [], []
        for _ in range(args.steps):
            first.append(_timed(run, 1, device))
            full.append(_timed(run, args.new_tokens, device))
        results.append({"side": side, "full_s": full, "first_s": first, "tokens": tokens,
                        "same_tokens": _common_prefix(tokens, reference),
                        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    return results


def _timed(run, new_tokens: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _common_prefix(tokens: list[int], reference: list[int]) -> int:
    same = 0
    while same < min(len(tokens), len(reference)) and tokens[same] == reference[same]:
        same += 1
    return same


def decode_speed(result: dict, new_tokens: int) -> float:
    """Tokens/s after the first token: the prompt's prefill is the same work on both sides."""
    return (new_tokens - 1) / max(statistics.median(result["full_s"]) - statistics.median(result["first_s"]), 1e-9)


def print_decode_table(args, results: list[dict]) -> None:
    print(f"\n{results[0]['device']}  {args.shape}  {args.precision}  prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, greedy  (median of {args.steps} runs after a warm-up)")
    print(f"{'side':<16}{'decode tokens/s':>16}{'ms/token':>10}{'first token ms':>16}{'same tokens':>13}")
    for result in results:
        speed = decode_speed(result, args.new_tokens)
        print(f"{result['side']:<16}{speed:>16,.1f}{1e3 / speed:>10.2f}{1e3 * statistics.median(result['first_s']):>16.1f}"
              f"{result['same_tokens']:>9} of {len(result['tokens'])}")
    speeds = {result["side"]: decode_speed(result, args.new_tokens) for result in results}
    print(f"ftcli / generate decode speed: {speeds['ftcli'] / speeds['generate']:.2f}x")
    print("same tokens: greedy picks equal to plain generate's from the start. Random weights leave the top logits "
          "nearly tied, so in bf16 any static cache (generate's own too) soon flips a pick against the dynamic one; "
          "token-for-token equality is tested in float32 (tests/test_decoding.py).")


def versions() -> dict[str, str]:
    found = {}
    for package in VERSIONS_OF:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton compiles for GPUs only; its interpreter runs ftcli's kernels instead, in every side's process. Triton
        # reads the setting when first imported, which bitsandbytes has done by now: the bench starts again with it
        print("No GPU here: ftcli's kernels run in Triton's CPU interpreter, slowly, so the figures show that the sides "
              "run and agree, not how fast they are.", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "ftcli.bench", *argv])
    method = method_of(argv)
    if "--gpus" in argv:
        bench_distributed.main(argv)
        return
    if method in ("dpo", "grpo"):
        (bench_preference if method == "dpo" else bench_grpo).main(argv)
        return
    parser = argparse.ArgumentParser(prog="python -m ftcli.bench", description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--precision", choices=["nf4", "bf16"], default="nf4")
    bench_peers.add_arguments(parser)
    parser.add_argument("--only", choices=SIDES, help="run one side in this process")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="ftcli's side replays each micro-batch as a CUDA graph (ftcli/step_graph.py) on a GPU, "
                             "as `ftcli train` does by default (train.cuda_graphs: auto); --no-cuda-graph runs it "
                             "op by op")
    parser.add_argument("--profile", action="store_true",
                        help="also print ftcli's per-kernel GPU time, its kernels by kind with the time the GPU sat "
                             "idle, and the host's Python time of one step")
    parser.add_argument("--trace", help="with --profile: write the step's Chrome trace (JSON) to this path")
    parser.add_argument("--host-mlp", type=int, default=0, metavar="N",
                        help="with --checkpointing offload or true: the MLP of every N-th layer keeps what it saves "
                             "for backward in CPU memory instead of recomputing it "
                             "(ftcli/activation_checkpointing.host_mlp_activations); 0, the default, none")
    parser.add_argument("--keep-mlp", type=int, default=0, metavar="K",
                        help="with --checkpointing offload or true: the MLPs of the K layers below the top one keep "
                             "what they save for backward on the GPU instead of recomputing it; --host-mlp counts "
                             "below them")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="ftcli's checkpointing as `ftcli train` resolves its default, auto, on a GPU of this size "
                             "(ftcli/plan.py: recompute or not, and with the room left MLP weights dequantized once, "
                             "attention replayed, MLPs kept whole and hosted), instead of --checkpointing")
    parser.add_argument("--host-embeddings", action="store_true",
                        help="ftcli's input embedding table waits in pinned CPU memory, read a row per token by the "
                             "GPU (ftcli/patch.host_input_embeddings; untied heads only)")
    parser.add_argument("--replay-attention", type=int, default=0, metavar="K",
                        help="the top K layers keep attention's output and row statistics from the forward, so that "
                             "their recompute runs no attention kernel (ftcli/attention_replay.py; graphed steps)")
    parser.add_argument("--host-attention", action="store_true",
                        help="with --replay-attention: the replayed outputs below the top layer's wait in pinned CPU "
                             "memory, copied beside the layer inputs")
    parser.add_argument("--dequantize-once", action="store_true",
                        help="the LoRA MLPs' backward, when it goes in several chunks of rows, dequantizes the NF4 "
                             "weights once for all of them, holding the three at once (ftcli_kernels/lora_mlp.py)")
    parser.add_argument("--decode", action="store_true", help="measure answering (decode tokens/s) instead of training")
    parser.add_argument("--prompt-len", type=int, default=128, help="with --decode: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="with --decode: tokens to generate")
    parser.add_argument("--no-compile", action="store_true", help="with --decode: ftcli's decoder without CUDA graphs")
    parser.add_argument("--hf-static", action="store_true",
                        help="with --decode: also time generate with cache_implementation=static (its own compile)")
    args = parser.parse_args(argv)
    if args.decode:
        results = measure_decode(args)
        print(json.dumps(results) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            print_decode_table(args, results)
        return
    args.checkpointing = CHECKPOINTING[args.checkpointing]
    if (args.host_mlp or args.keep_mlp) and not args.checkpointing:
        parser.error("--host-mlp and --keep-mlp keep MLP tensors outside checkpointing's recompute, and "
                     "--checkpointing false recomputes nothing: use --checkpointing offload (the default) or true, or "
                     "leave them out")
    if args.host_attention and not args.replay_attention:
        parser.error("--host-attention hosts the outputs that --replay-attention K keeps: add --replay-attention "
                     "with the number of layers, e.g. --replay-attention 32 --host-attention, or leave it out")
    if args.gpu_memory and (args.host_mlp or args.keep_mlp or args.host_embeddings or args.replay_attention
                            or args.dequantize_once):
        parser.error("--gpu-memory runs what ftcli train would, which keeps and hosts MLPs, replays attention and "
                     "dequantizes once by its own plan, and does not host the embedding table: leave out --host-mlp, "
                     "--keep-mlp, --host-embeddings, --replay-attention and --dequantize-once")
    if args.gpu_memory:
        try:
            parse_size(args.gpu_memory)  # a bad size fails here, not in a side's process
        except InputError as error:
            parser.error(str(error))
    if args.write_model:
        write_random_model(args.shape, Path(args.write_model))
        print(json.dumps({"side": "folder", "written": args.write_model}))
        return
    if args.only:
        result = measure(args.only, args)
        if args.json:
            print(json.dumps(result))
            return
        results = [result | {"call": 1}]
    else:
        results = bench_peers.run_calls(args, argv)
    sys.exit(bench_peers.report(args, results))


if __name__ == "__main__":
    main()
