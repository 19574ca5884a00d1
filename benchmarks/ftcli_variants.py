"""ftcli's side of the bench under several sets of flags, one process each, in one device call: a line each.

    python3 benchmarks/ftcli_variants.py --base="--shape llama3-8b --seq 8192 --bs 1" -- \
        "--host-mlp 2 --keep-mlp 2" "--host-mlp 2 --dequantize-once" "--host-mlp 2 --replay-attention 32 --host-attention"

(`--` before the variants, as they start with dashes.)
Each variant runs `python -m ftcli.bench BASE VARIANT --only ftcli --json` (with --steps 5 --warmup 2 unless BASE
sets them) and prints its median tokens/s, the spread of its steps, its peak memory, its first-step loss (equal
across variants that change no numerics) and the settings the bench ran. The variants run in the order given, so
repeat the first at the end to see the machine's drift. Run from the repository root with .devsite carried (on the
device machine, PYTHONPATH as in benchmarks/peer_cases.sh); a variant that fails prints its last error line.
"""

import argparse
import shlex
import statistics
import sys

from ftcli.bench_common import side_in_subprocess


def run_variant(base: list[str], variant: list[str]) -> str:
    """One bench process; its line of the table."""
    side = side_in_subprocess("ftcli", [sys.executable, "-m", "ftcli.bench", *base, *variant, "--only", "ftcli",
                                        "--json"])
    if "error" in side:
        return f"failed: {side['error']}"
    tokens = tokens_of(base + variant)
    times = side["step_s"]
    spread = 100 * (max(times) / min(times) - 1)
    peak = f"{side['peak_gib']:.2f}" if side.get("peak_gib") is not None else "-"
    return (f"{tokens / statistics.median(times):>9,.0f} {spread:>6.1f}% {peak:>8} {side['losses'][0]:>10.4f}  "
            f"{side.get('settings', '')}")


def tokens_of(arguments: list[str]) -> int:
    """Tokens of one step: --seq times --bs (the bench's defaults where not given)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=2)
    known, _ = parser.parse_known_args(arguments)
    return known.seq * known.bs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="", help="flags every variant shares, as one string")
    parser.add_argument("variants", nargs="+", help="after --, each variant's flags as one string ('' for none)")
    args = parser.parse_args(argv)
    base = shlex.split(args.base)
    if "--steps" not in base:
        base += ["--steps", "5", "--warmup", "2"]
    print(f"ftcli, {' '.join(base)}")
    print(f"{'variant':<60}{'tokens/s':>10} {'spread':>7} {'peak GiB':>8} {'first loss':>10}  settings")
    for variant in args.variants:
        print(f"{variant or '(none)':<60}{run_variant(base, shlex.split(variant))}", flush=True)


if __name__ == "__main__":
    main()
