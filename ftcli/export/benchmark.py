"""Time the k-quant quantizers on a Llama-3-8B-sized weight: `python -m ftcli.export.benchmark [--device cuda]`.

Prints one row per type: seconds for one 4096 x 14336 matrix and the implied minutes for the 224 matrices
of that size class in Llama-3-8B (a rough whole-model figure).
"""

import argparse
import time

import torch
from gguf import GGMLQuantizationType as Q

from ftcli.export.kquants import quantize_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=14336)
    args = parser.parse_args()
    weight = torch.randn(args.rows, args.columns, device=args.device) * 0.02
    print("| type | device | shape | seconds | Mweights/s |\n|---|---|---|---|---|")
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        quantize_k(weight[:256], qtype)  # warm up kernels and allocator
        if weight.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        quantize_k(weight, qtype)
        seconds = time.perf_counter() - start
        print(f"| {qtype.name} | {args.device} | {args.rows}x{args.columns} | {seconds:.3f} | "
              f"{weight.numel() / seconds / 1e6:,.1f} |")


if __name__ == "__main__":
    main()
