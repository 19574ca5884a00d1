"""ftcli against its peers for supervised fine-tuning, side by side: every side in a fresh process, call after call,
interleaved, and one table of the calls' medians, spreads and ratios (`python -m ftcli.bench --peer P --calls N`).

ftcli and hf are built in memory by ftcli/bench.py (`--only SIDE`). trl and unsloth run benchmarks/sft_peers.py,
which loads a model folder written once for all calls: the bf16 weights ftcli's side draws in memory (random_model
draws the same numbers whatever the precision; quantization draws none), and the batches file holds the token ids
of ftcli's side, so every side starts from the same model and data and the first-step losses show it.

Calls are interleaved (ftcli, peer 1, peer 2, ftcli, peer 1, ...), so that a slow spell of the machine falls on every
side alike. A call's figure is its median step; a side's is the median over its calls, and its spread, 100 x
(1 - slowest / fastest call), says how steady it is (the issue's goal: within 5%).
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ftcli.bench_common import BENCH_LORA, LORA_SEED, random_batches, side_in_subprocess

PEERS = ("hf", "trl", "unsloth")
FOLDER_PEERS = ("trl", "unsloth")  # trained by PEER_SCRIPT on the model folder
PEER_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sft_peers.py"
BATCHES_FILE = "batches.json"
LEARNING_RATE = 2e-4


def peer_names(text: str) -> list[str]:
    """One --peer value: a peer's name, or several separated by commas."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(PEERS)} (repeat --peer or separate names by commas)")
    return names


def call_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of calls: give a whole number, 1 or more")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peer", type=peer_names, action="append", metavar="NAME[,NAME]",
                        help=f"a peer to compare with: {', '.join(PEERS)} (repeatable; hf when none is given)")
    parser.add_argument("--calls", type=call_count, default=1,
                        help="run the whole comparison this many times, interleaved, and report medians and spread")
    parser.add_argument("--keep-model", metavar="DIR",
                        help="keep trl's and unsloth's model folder as DIR/SHAPE, written once and reused by later "
                        "runs of the shape (an 8B folder is 16 GB)")
    parser.add_argument("--write-model", metavar="FOLDER", help="write the peers' model folder and exit")


def chosen_peers(args) -> list[str]:
    """The --peer names in the order given, each once; hf when none is given."""
    return list(dict.fromkeys(name for names in (args.peer or [["hf"]]) for name in names))


def call_order(peers: list[str], calls: int) -> list[tuple[int, str]]:
    """(call, side) in the order they run: ftcli, then the peers as given, the order turned by one side each call
    so that no side is always the first process on a fresh machine (on the H200, a first call ran 13% slower)."""
    sides = ["ftcli", *peers]
    return [(call, sides[(call - 1 + index) % len(sides)]) for call in range(1, calls + 1) for index in range(len(sides))]


def run_calls(args, argv: list[str]) -> list[dict]:
    """Every side of every call, each in its own process; one result per call and side, in the order they ran."""
    peers = chosen_peers(args)
    with peer_inputs(args, peers) as inputs:
        return [measure_side(side, argv, args, inputs) | {"side": side, "call": call}
                for call, side in call_order(peers, args.calls)]


@contextmanager
def peer_inputs(args, peers: list[str]) -> Iterator[dict]:
    """What trl and unsloth load, for all calls: {"folder", "batches"} paths, or the failed writing's result;
    {} when neither runs."""
    if not any(peer in FOLDER_PEERS for peer in peers):
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-sft-") as scratch:
        batches = Path(scratch) / BATCHES_FILE
        batches.write_text(json.dumps(random_batches(args.shape, args.seq, args.bs)))
        # absolute: a relative local path can read as a hub repository's name to a peer's loader
        folder = (Path(args.keep_model) / args.shape if args.keep_model else Path(scratch) / "model").resolve()
        written = {} if folder.is_dir() else write_model_folder(args.shape, folder)
        yield written if "error" in written else {"folder": str(folder), "batches": str(batches)}


def write_model_folder(shape: str, folder: Path) -> dict:
    """The peers' model folder, written by a process of its own (the weights are drawn on the GPU, as ftcli's side
    draws them) into FOLDER.partial, then renamed, so that a kept folder is never half written."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    written = side_in_subprocess("folder", [sys.executable, "-m", "ftcli.bench", f"--shape={shape}",
                                            f"--write-model={partial}"])
    if "error" in written:
        return written | {"error": f"writing the peers' model folder failed: {written['error']}"}
    partial.rename(folder)
    return written


def measure_side(side: str, argv: list[str], args, inputs: dict) -> dict:
    if side not in FOLDER_PEERS:
        forwarded = [a for a in argv if a != "--json"]
        return side_in_subprocess(side, [sys.executable, "-m", "ftcli.bench", *forwarded, "--only", side, "--json"])
    if "error" in inputs:
        return inputs
    return side_in_subprocess(side, peer_command(side, args, inputs))


def peer_command(side: str, args, inputs: dict) -> list[str]:
    """The peer's command line, with every setting it shares with ftcli's side."""
    settings = {"precision": args.precision, "warmup": args.warmup, "steps": args.steps, "rank": args.lora_r,
                "alpha": args.lora_r, "targets": ",".join(BENCH_LORA.target_modules), "seed": LORA_SEED,
                "learning-rate": LEARNING_RATE}
    return [sys.executable, str(PEER_SCRIPT), side, inputs["folder"], inputs["batches"],
            *(f"--{name}={value}" for name, value in settings.items())]


def summarize(results: list[dict], tokens: int) -> list[dict]:
    """Per side, in the order the sides ran: each call's tokens/s, their median and spread, the largest peak, the
    first-step loss, the failed calls, and ftcli's median speed and largest peak over the side's."""
    sides = list(dict.fromkeys(result["side"] for result in results))
    summaries = [side_summary(side, [r for r in results if r["side"] == side], tokens) for side in sides]
    ftcli = next((s for s in summaries if s["side"] == "ftcli"), {})
    for summary in summaries:
        summary["ftcli_speed_ratio"] = quotient(ftcli.get("tokens_per_s"), summary["tokens_per_s"])
        summary["ftcli_peak_ratio"] = quotient(ftcli.get("peak_gib"), summary["peak_gib"])
    return summaries


def side_summary(side: str, calls: list[dict], tokens: int) -> dict:
    ran = [call for call in calls if "error" not in call]
    speeds = [tokens / statistics.median(call["step_s"]) for call in ran]
    peaks = [call["peak_gib"] for call in ran if call["peak_gib"] is not None]
    return {"side": side, "call_tokens_per_s": speeds,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "spread_percent": 100 * (1 - min(speeds) / max(speeds)) if speeds else None,
            "peak_gib": max(peaks) if peaks else None,
            "first_loss": ran[0]["losses"][0] if ran else None,
            "failures": [{"call": call["call"], "error": call["error"]} for call in calls if "error" in call],
            "versions": ran[0].get("versions") if ran else None,
            "same_batches": all(call.get("same_batches", True) for call in ran)}


def quotient(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    return None if value is None or not reference else value / reference


def print_table(args, summaries: list[dict], device: str) -> None:
    calls = f"{args.calls} calls, interleaved; each" if args.calls > 1 else "one call:"
    print(f"\n{device}  {args.shape}  {args.precision}  seq {args.seq} x batch {args.bs}  ({calls} the median of "
          f"{args.steps} steps after {args.warmup} warm-up)")
    print(f"{'side':<9}{'tokens/s':>10}{'spread':>8}{'peak GiB':>10}{'first loss':>12}{'ftcli speed':>13}"
          f"{'ftcli peak':>12}  tokens/s of each call")
    for summary in summaries:
        failed = failure_lines(summary["failures"])
        if summary["tokens_per_s"] is None:
            print(f"{summary['side']:<9}  {failed[0]}")
            continue
        print(f"{summary['side']:<9}{summary['tokens_per_s']:>10,.0f}{summary['spread_percent']:>7.1f}%"
              f"{number(summary['peak_gib'], '.2f'):>10}{summary['first_loss']:>12.4f}"
              f"{number(summary['ftcli_speed_ratio'], '.2f', 'x'):>13}"
              f"{number(summary['ftcli_peak_ratio'], '.2f', 'x'):>12}"
              f"  {' / '.join(f'{speed:,.0f}' for speed in summary['call_tokens_per_s'])}")
        for line in failed:
            print(f"{'':<9}  {line}")
        if not summary["same_batches"]:
            print(f"{'':<9}  (its trainer did not train on exactly the batches the other sides train on)")
    print("spread: how much slower the slowest call was than the fastest; ftcli speed, ftcli peak: ftcli's median "
          "tokens/s and largest peak over the side's")
    for summary in summaries:
        if summary["versions"]:
            print(f"versions of {summary['side']}: " + ", ".join(f"{name} {version}" for name, version
                                                                 in summary["versions"].items()))


def failure_lines(failures: list[dict]) -> list[str]:
    """'failed in calls 1, 3: reason', one line for each different reason."""
    reasons = {}
    for failure in failures:
        reasons.setdefault(failure["error"], []).append(str(failure["call"]))
    return [f"failed in call{'s' if len(calls) > 1 else ''} {', '.join(calls)}: {reason}"
            for reason, calls in reasons.items()]


def number(value: Optional[float], spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def report(args, results: list[dict]) -> int:
    """The calls' summary and every call's result as one JSON line, or the failed sides' stderr, each profile and
    the table; returns the exit code: 1 when a call of ftcli's side failed, else 0."""
    summaries = summarize(results, args.seq * args.bs)
    if args.json:
        print(json.dumps({"sides": summaries, "calls": results}))
    else:
        shown = set()
        for result in results:
            if "stderr" in result and result["side"] not in shown and "\n" in result["stderr"].strip():
                shown.add(result["side"])  # one side's failures are alike: its first one's stderr is enough
                print(f"--- {result['side']} stderr, call {result['call']} (tail) ---\n{result['stderr']}")
            if "profile" in result:
                print(f"--- {result['side']} profile, call {result['call']} ---\n{result['profile']}")
        print_table(args, summaries, next((r["device"] for r in results if "device" in r), "?"))
        for line in dict.fromkeys(f"{r['side']}: {r['settings']}" for r in results if "settings" in r):
            print(line)
    return 1 if any(result["side"] == "ftcli" and "error" in result for result in results) else 0
