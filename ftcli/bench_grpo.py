"""GRPO training speed and memory of ftcli against TRL's GRPOTrainer, on one GPU, in one run.

    python -m ftcli.bench --method grpo --shape llama3-8b --prompt-len 256 --completion-len 1024 --generations 8

Every side trains the same random-weight model (decoder linears in NF4 with double quantization, or 16-bit with
--precision bf16; LoRA r=16 on the seven projections; AdamW8bit at lr 1e-6, so that a random model's completions
stay random; clipping at 1.0) on the same random prompts, one prompt a step, each answered by G completions sampled
at temperature 1.0 and top_p 1.0, then scored and trained on with the GRPO loss (loss_type grpo, beta 0: no
reference pass; TRL's default is dapo, the same work). Each side runs in its own process and the parent prints
one table.

Every completion is exactly --completion-len tokens on both sides, so that both do the same work: ftcli's sampler
gets no stop ids, and TRL's generate gets min_new_tokens equal to max_completion_length, which masks the
end-of-sequence logit until then (the word tokenizer's only stop token).

- **trl**: TRL's GRPOTrainer with transformers' generate (no vLLM), the way its users run it: a bf16 model loaded
  in NF4 through bitsandbytes, peft LoRA from the trainer, non-reentrant gradient checkpointing, TRL's fused LM
  head, its defaults otherwise; its reward is a function applying REWARD_PATTERN.
- **ftcli**: the path `ftcli train` takes: its setup, then GrpoMethod.accumulate_gradients each step, generating
  with its batched sampler (ftcli/generation.py) on the weights being trained; its reward is the built-in
  regex_format with REWARD_PATTERN.

Reported per side: step time (median after warm-up), generation tokens/s (G x completion tokens over the seconds
spent generating; TRL's generate is timed by the peer script), training tokens/s (G x (prompt + completion) over
the step time), and peak memory (torch.cuda.max_memory_allocated from the first step on, weights included).

    python -m ftcli.bench --method grpo --find-longest

With --find-longest it finds instead, for each side, the longest completion that fits on the GPU at G completions:
one step at 1,024 tokens, then 2,048, 4,096... up to --longest-limit, each try in its own process, until one fails.

TRL's side runs benchmarks/grpo_peers.py (a source checkout, with trl installed; ftcli never imports it): it loads
the model from a folder the parent writes first, bf16 weights equal to those ftcli's side draws in memory.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from ftcli.bench_common import (BENCH_LORA, CHECKPOINTING, FIRST_PLAIN_ID, LORA_SEED, PAD_ID, add_training_arguments,
                                against_trl, device_and_dtype, ftcli_setup, random_model, report, side_in_subprocess,
                                synchronize, word_tokenizer, write_random_model)
from ftcli.data.templates import PromptExample
from ftcli.generation import BatchedSampler
from ftcli.grpo import GrpoMethod
from ftcli.optim import build_optimizer
from ftcli.plan import CheckpointingChoice
from ftcli.recipe import Recipe
from ftcli.rewards import load_rewards
from ftcli.shapes import SHAPES

SIDES = ("trl", "ftcli")
PEER_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "grpo_peers.py"
PROMPTS_FILE = "prompts.json"  # in the model folder: the prompts every side trains on
LEARNING_RATE = 1e-6
# The reward both sides score: 1 when a completion's first word (token) has an even id, else 0. It is as cheap as a
# reward gets, and it differs between completions, so advantages are not all 0 and the weights do move.
REWARD_PATTERN = r"^t\d*[02468]\b"
FIRST_LONGEST_TRY = 1024  # --find-longest doubles the completion length from here


def random_prompts(shape: str, count: int, prompt_len: int) -> list[list[int]]:
    """`count` seeded prompts of `prompt_len` ids, never a special token."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(FIRST_PLAIN_ID, SHAPES[shape]["vocab_size"], (count, prompt_len), generator=generator).tolist()


def write_model_folder(args, folder: Path) -> None:
    """TRL's model folder: ftcli's side's random weights in the compute dtype, the word tokenizer, the prompts."""
    write_random_model(args.shape, folder)
    (folder / PROMPTS_FILE).write_text(json.dumps(random_prompts(args.shape, args.warmup + args.steps,
                                                                 args.prompt_len)))


def bench_recipe(args) -> Recipe:
    """The recipe ftcli's side trains by: GRPO with the settings every side shares."""
    return Recipe.model_validate({
        "model": {"name": f"random {args.shape}", "max_seq_length": args.prompt_len + args.completion_len},
        "data": {"path": "random prompts", "format": "prompts"},
        "train": {"method": "grpo", "batch_size": 1, "grad_accum": 1, "learning_rate": LEARNING_RATE,
                  "weight_decay": 0.0, "optimizer": "adamw_8bit", "max_grad_norm": 1.0,
                  "gradient_checkpointing": CHECKPOINTING[args.checkpointing]},
        "grpo": {"num_generations": args.generations, "max_prompt_length": args.prompt_len,
                 "max_completion_length": args.completion_len, "temperature": 1.0, "top_p": 1.0, "beta": 0.0,
                 "loss_type": "grpo", "rewards": [{"builtin": "regex_format", "pattern": REWARD_PATTERN}]}})


def measure_ftcli(args) -> dict:
    """Build, set up and train ftcli's side; returns its step and generation times, losses and peak memory."""
    device, dtype = device_and_dtype()
    recipe = bench_recipe(args)
    tokenizer = word_tokenizer(SHAPES[args.shape]["vocab_size"])
    model, kernels = ftcli_setup(random_model(args.shape, args.precision, device, dtype),
                                CheckpointingChoice(CHECKPOINTING[args.checkpointing]), args.lora_r)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe.train)
    method = GrpoMethod(recipe, tokenizer, device, kernels.fused_loss, load_rewards(recipe.grpo.rewards))
    method.engine = BatchedSampler(model, stop_ids=set(), pad_id=PAD_ID, max_prompt_length=args.prompt_len)
    prompts = [PromptExample(ids, tokenizer.decode(ids), {}, f"random prompt {index}")
               for index, ids in enumerate(random_prompts(args.shape, args.warmup + args.steps, args.prompt_len))]

    model.train()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, generation, losses, lengths = [], [], [], []
    for prompt in prompts:
        started = time.perf_counter()
        result = method.accumulate_gradients(model, [[prompt]])
        torch.nn.utils.clip_grad_norm_(trainable, recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
        generation.append(result.metrics["generation_s"])
        losses.append(result.loss)
        lengths.append(result.metrics["completion_length"])
    return {"side": "ftcli", "step_s": times[args.warmup:], "generation_s": generation[args.warmup:],
            "losses": losses, "completion_lengths": lengths,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def run_sides(args) -> list[dict]:
    """Each chosen side in its own process, in the order given; TRL's after the folder it loads is written."""
    with model_folder(args) as folder:
        return [measure_side(side, args, folder) | {"side": side} for side in args.sides]


def find_longest(args) -> list[dict]:
    """For each side, one step at each completion length from FIRST_LONGEST_TRY, doubling, until one fails or
    the limit is passed; returns per side the longest that fitted, its peak, and why the next did not."""
    found = []
    with model_folder(args) as folder:
        for side in args.sides:
            longest = {"side": side, "longest": None, "peak_gib": None, "failed_at": None, "error": None}
            length = FIRST_LONGEST_TRY
            while length <= args.longest_limit:
                one_step = argparse.Namespace(**vars(args) | {"completion_len": length, "steps": 1, "warmup": 0})
                result = measure_side(side, one_step, folder)
                if "error" in result:
                    longest |= {"failed_at": length, "error": result["error"]}
                    break
                longest |= {"longest": length, "peak_gib": result["peak_gib"], "device": result["device"]}
                length *= 2
            found.append(longest)
    return found


@contextmanager
def model_folder(args) -> Iterator[Optional[str]]:
    """A temporary folder holding TRL's model, written by its own process; None when TRL's side does not run."""
    if "trl" not in args.sides:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-grpo-") as folder:
        written = side_in_subprocess("folder", [*bench_command(args), f"--write-model={folder}"])
        if "error" in written:
            raise SystemExit(f"writing TRL's model folder failed: {written['error']}\n{written['stderr']}")
        yield folder


def measure_side(side: str, args, folder: Optional[str]) -> dict:
    if side == "ftcli":
        return side_in_subprocess(side, [*bench_command(args), "--only=ftcli", "--json"])
    return side_in_subprocess(side, peer_command(args, folder))


def bench_command(args) -> list[str]:
    """This benchmark's command line with the case's settings, for a process of its own."""
    settings = {"shape": args.shape, "checkpointing": args.checkpointing, "steps": args.steps,
                "warmup": args.warmup, "prompt-len": args.prompt_len, "completion-len": args.completion_len,
                "generations": args.generations, "precision": args.precision}
    return [sys.executable, "-m", "ftcli.bench", "--method=grpo",
            *(f"--{name}={value}" for name, value in settings.items())]


def peer_command(args, folder: str) -> list[str]:
    """TRL's command line, with every setting it shares with ftcli's side."""
    settings = {"generations": args.generations, "completion-len": args.completion_len, "warmup": args.warmup,
                "steps": args.steps, "rank": args.lora_r, "alpha": args.lora_r,
                "targets": ",".join(BENCH_LORA.target_modules), "seed": LORA_SEED, "learning-rate": LEARNING_RATE,
                "precision": args.precision, "reward-pattern": REWARD_PATTERN}
    return [sys.executable, str(PEER_SCRIPT), folder, str(Path(folder) / PROMPTS_FILE),
            *(f"--{name}={value}" for name, value in settings.items())]


def print_table(args, results: list[dict]) -> None:
    generated = args.generations * args.completion_len
    trained = args.generations * (args.prompt_len + args.completion_len)
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"\n{device}  {args.shape}  {args.precision.upper()}  GRPO, one prompt of {args.prompt_len} tokens a step, "
          f"G={args.generations} completions of {args.completion_len}  (median of {args.steps} steps after "
          f"{args.warmup} warm-up)")
    print(f"{'side':<7}{'s/step':>9}{'generate s':>12}{'gen tokens/s':>14}{'train tokens/s':>16}{'peak GiB':>10}"
          f"{'speed vs trl':>14}{'peak vs trl':>13}{'completion':>12}")
    ratios = against_trl(results)
    for result in results:
        if "error" in result:
            print(f"{result['side']:<7}  failed: {result['error']}")
            continue
        step, generate, peak = statistics.median(result["step_s"]), statistics.median(result["generation_s"]), \
            result["peak_gib"]
        speed_ratio, peak_ratio = ratios(result)
        print(f"{result['side']:<7}{step:>9.2f}{generate:>12.2f}{generated / generate:>14,.0f}{trained / step:>16,.0f}"
              f"{'-' if peak is None else f'{peak:.2f}':>10}{speed_ratio:>14}{peak_ratio:>13}"
              f"{statistics.mean(result['completion_lengths']):>12.0f}")


def print_longest(args, found: list[dict]) -> None:
    device = next((r["device"] for r in found if "device" in r), "?")
    print(f"\n{device}  {args.shape}  {args.precision.upper()}  GRPO, prompt {args.prompt_len}, G={args.generations}: "
          f"the longest completion that fits (tried {FIRST_LONGEST_TRY:,} doubling up to {args.longest_limit:,})")
    print(f"{'side':<7}{'longest':>9}{'peak GiB':>10}  next")
    for result in found:
        longest = "-" if result["longest"] is None else f"{result['longest']:,}"
        peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"
        after = f"{result['failed_at']:,} failed: {result['error']}" if result["failed_at"] else "not tried (limit)"
        print(f"{result['side']:<7}{longest:>9}{peak:>10}  {after}")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftcli.bench --method grpo", description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens of each prompt")
    parser.add_argument("--completion-len", type=int, default=1024, help="tokens of each completion, all generated")
    parser.add_argument("--generations", type=int, default=8, help="completions of each prompt (G)")
    parser.add_argument("--precision", choices=["nf4", "bf16"], default="nf4",
                        help="the base weights: NF4, or 16-bit (float32 on the CPU)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="the sides to run")
    parser.add_argument("--only", choices=["ftcli"], help="run ftcli's side in this process")
    parser.add_argument("--write-model", metavar="FOLDER", help="write TRL's model folder and exit")
    parser.add_argument("--find-longest", action="store_true",
                        help="find the longest completion that fits for each side instead")
    parser.add_argument("--longest-limit", type=int, default=32768, help="with --find-longest: the longest to try")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.write_model:
        write_model_folder(args, Path(args.write_model))
        print(json.dumps({"side": "folder", "written": args.write_model}))
        return
    if args.only:
        print(json.dumps(measure_ftcli(args)))
        return
    if args.find_longest:
        found = find_longest(args)
        if args.json:
            print(json.dumps(found))
        else:
            print_longest(args, found)
        return
    results = run_sides(args)
    report(results, args.json, lambda: print_table(args, results))
