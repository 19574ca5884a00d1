"""DPO training speed and memory of ftcli against TRL's DPOTrainer and Unsloth's, on one GPU, in one run.

    python -m ftcli.bench --method dpo --shape llama3-8b --prompt-len 1024 --answer-len 1024 --pairs 2

Every side trains the same random-weight model (decoder linears in NF4 with double quantization, LoRA r=16 on
the seven projections, AdamW8bit at lr 2e-4, clipping at 1.0, the sigmoid loss with beta 0.1, the adapter-off
model as reference, computed in the step) on the same random pairs: ids drawn above the special tokens, each
answer ending with the end-of-sequence token, no padding or truncation. Each side runs in its own process and
the parent prints one table. Tokens/s counts the prompt once, pairs x (prompt + 2 x answer) per step, over the
median step after warm-up; peak is torch.cuda.max_memory_allocated from the first training step on, weights
included.

- **trl**: TRL's DPOTrainer on transformers + peft + bitsandbytes, the way its users run it (a bf16 model loaded
  in NF4, non-reentrant checkpointing, TRL's fused LM head).
- **unsloth**: Unsloth's FastLanguageModel and its patched DPOTrainer (TRL's, rewritten at import).
- **ftcli**: the path `ftcli train` takes: its setup, then PreferenceMethod.accumulate_gradients each step.
- **ftcli-cached**: the same with `preference.precompute_reference`: the reference log-probabilities of every pair
  come from one pass before training (its time is reported apart), so a step is the policy's forward and backward.

The peers run benchmarks/preference_peers.py (a source checkout, with trl and unsloth installed; ftcli never
imports them): they load the model from a folder the parent writes first, bf16 weights equal to those ftcli's
side draws in memory, and quantize on load, as their users do.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftcli.bench_common import (BENCH_LORA, CHECKPOINTING, END_ID, FIRST_PLAIN_ID, LORA_SEED, PAD_ID,
                                add_training_arguments, against_trl, device_and_dtype, ftcli_setup, random_model,
                                report, side_in_subprocess, synchronize, write_random_model)
from ftcli.data.templates import PreferenceExample
from ftcli.optim import build_optimizer
from ftcli.plan import CheckpointingChoice
from ftcli.preference import PreferenceMethod
from ftcli.recipe import Recipe
from ftcli.shapes import SHAPES

SIDES = ("trl", "unsloth", "ftcli", "ftcli-cached")
FTCLI_SIDES = ("ftcli", "ftcli-cached")
PEER_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "preference_peers.py"
PAIRS_FILE = "pairs.json"  # in the model folder: the pairs every peer trains on
BETA = 0.1
LEARNING_RATE = 2e-4


def random_pairs(shape: str, count: int, prompt_len: int, answer_len: int) -> list[tuple[list[int], ...]]:
    """`count` (prompt, chosen, rejected) id lists, seeded, each answer `answer_len` long with its end token."""
    generator = torch.Generator().manual_seed(1)
    draw = lambda length: torch.randint(FIRST_PLAIN_ID, SHAPES[shape]["vocab_size"], (length,),
                                        generator=generator).tolist()
    return [(draw(prompt_len), draw(answer_len - 1) + [END_ID], draw(answer_len - 1) + [END_ID])
            for _ in range(count)]


def write_model_folder(args, folder: Path) -> None:
    """The peers' model folder: ftcli's side's random weights in the compute dtype, the word tokenizer, the pairs."""
    write_random_model(args.shape, folder)
    pairs = random_pairs(args.shape, args.pairs * (args.warmup + args.steps), args.prompt_len, args.answer_len)
    (folder / PAIRS_FILE).write_text(json.dumps(pairs))


def bench_recipe(args, precompute_reference: bool) -> Recipe:
    """The recipe ftcli's side trains by: DPO with the settings every side shares."""
    return Recipe.model_validate({
        "model": {"name": f"random {args.shape}"},
        "data": {"path": "random pairs", "format": "preference"},
        "train": {"method": "dpo", "batch_size": args.pairs, "grad_accum": 1, "learning_rate": LEARNING_RATE,
                  "weight_decay": 0.0, "optimizer": "adamw_8bit", "max_grad_norm": 1.0,
                  "gradient_checkpointing": args.checkpointing},
        "preference": {"beta": BETA, "loss_type": "sigmoid", "precompute_reference": precompute_reference}})


def measure_ftcli(args, side: str) -> dict:
    """Build, set up and train one of ftcli's sides; returns its step times, losses and peak memory (and the time
    of the reference pass before training, for ftcli-cached)."""
    device, dtype = device_and_dtype()
    recipe = bench_recipe(args, precompute_reference=side == "ftcli-cached")
    model, _ = ftcli_setup(random_model(args.shape, "nf4", device, dtype), CheckpointingChoice(args.checkpointing),
                           args.lora_r)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe.train)
    method = PreferenceMethod(recipe, PAD_ID, device, fused=True)
    pairs = [PreferenceExample(prompt, chosen, list(chosen), rejected, list(rejected)) for prompt, chosen, rejected
             in random_pairs(args.shape, args.pairs * (args.warmup + args.steps), args.prompt_len, args.answer_len)]

    model.train()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-reference-") as out_dir:
        method.prepare(model, pairs, [], Path(out_dir))
    synchronize(device)
    reference_pass_s = time.perf_counter() - started
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        result = method.accumulate_gradients(model, [pairs[step * args.pairs:(step + 1) * args.pairs]])
        torch.nn.utils.clip_grad_norm_(trainable, recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
        losses.append(result.loss)
    return {"side": side, "step_s": times[args.warmup:], "losses": losses, "reference_pass_s": reference_pass_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def run_sides(args, argv: list[str]) -> list[dict]:
    """Each chosen side in its own process, in SIDES order; the peers after the folder they load is written."""
    forwarded = [a for a in argv if a != "--json"]
    peers = [side for side in SIDES if side in args.sides and side not in FTCLI_SIDES]
    results = {}
    if peers:
        with tempfile.TemporaryDirectory(prefix="ftcli-bench-dpo-") as folder:
            written = side_in_subprocess("folder", [sys.executable, "-m", "ftcli.bench", *forwarded,
                                                    "--write-model", folder])
            for side in peers:
                results[side] = written if "error" in written else side_in_subprocess(side, peer_command(side, args,
                                                                                                          folder))
    for side in FTCLI_SIDES:
        if side in args.sides:
            results[side] = side_in_subprocess(side, [sys.executable, "-m", "ftcli.bench", *forwarded, "--only", side,
                                                      "--json"])
    return [results[side] | {"side": side} for side in SIDES if side in results]


def peer_command(side: str, args, folder: str) -> list[str]:
    """The peer's command line, with every setting it shares with ftcli's side."""
    settings = {"pairs": args.pairs, "warmup": args.warmup, "steps": args.steps, "rank": args.lora_r,
                "alpha": args.lora_r, "targets": ",".join(BENCH_LORA.target_modules), "seed": LORA_SEED,
                "beta": BETA, "learning-rate": LEARNING_RATE}
    return [sys.executable, str(PEER_SCRIPT), side, folder, str(Path(folder) / PAIRS_FILE),
            *(f"--{name}={value}" for name, value in settings.items())]


def print_table(args, results: list[dict]) -> None:
    tokens = args.pairs * (args.prompt_len + 2 * args.answer_len)
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"\n{device}  {args.shape}  NF4  DPO, {args.pairs} pairs of prompt {args.prompt_len} + answers "
          f"{args.answer_len} + {args.answer_len} a step, {tokens:,} tokens (prompt once)  "
          f"(median of {args.steps} steps after {args.warmup} warm-up)")
    print(f"{'side':<13}{'tokens/s':>10}{'s/step':>9}{'peak GiB':>10}{'speed vs trl':>14}{'peak vs trl':>13}"
          f"{'first loss':>12}{'last loss':>11}")
    ratios = against_trl(results)
    for result in results:
        if "error" in result:
            print(f"{result['side']:<13}  failed: {result['error']}")
            continue
        step, peak = statistics.median(result["step_s"]), result["peak_gib"]
        speed_ratio, peak_ratio = ratios(result)
        print(f"{result['side']:<13}{tokens / step:>10,.0f}{step:>9.3f}{'-' if peak is None else f'{peak:.2f}':>10}"
              f"{speed_ratio:>14}{peak_ratio:>13}{result['losses'][0]:>12.4f}{result['losses'][-1]:>11.4f}")
        if result.get("same_ids") is False:
            print(f"{'':<13}  (its trainer tokenized the pairs to other ids than the other sides train on)")
        if result["side"] == "ftcli-cached":
            print(f"{'':<13}  (plus {result['reference_pass_s']:.2f} s for the reference pass over its "
                  f"{args.pairs * (args.warmup + args.steps)} pairs before training)")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftcli.bench --method dpo", description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens of each pair")
    parser.add_argument("--answer-len", type=int, default=1024, help="tokens of each answer, its end token included")
    parser.add_argument("--pairs", type=int, default=2, help="pairs a step (one micro-batch)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="the sides to run")
    parser.add_argument("--only", choices=FTCLI_SIDES, help="run one of ftcli's sides in this process")
    parser.add_argument("--write-model", metavar="FOLDER", help="write the peers' model folder and exit")
    args = parser.parse_args(argv)
    args.checkpointing = CHECKPOINTING[args.checkpointing]
    return args


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.write_model:
        write_model_folder(args, Path(args.write_model))
        print(json.dumps({"side": "folder", "written": args.write_model}))
        return
    if args.only:
        print(json.dumps(measure_ftcli(args, args.only)))
        return
    results = run_sides(args, argv)
    report(results, args.json, lambda: print_table(args, results))
