"""Time the k-quant quantizers on a Llama-3-8B-sized weight: `python -m ftcli.export.benchmark [--device cuda]`.

Prints one row per type: seconds for one 4096 x 14336 matrix (Llama-3-8B's MLP size) and the share of its first
256 rows' super-blocks that are the same bytes when quantized on the CPU (float rounding on a GPU may resolve a
near-tie in the scale search the other way).
"""

import argparse
import time

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ftcli.export.kquants import quantize_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=14336)
    args = parser.parse_args()
    weight = torch.randn(args.rows, args.columns, device=args.device) * 0.02
    print("| type | device | shape | seconds | Mweights/s | same bytes as on the CPU |\n|---|---|---|---|---|---|")
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        quantize_k(weight[:256], qtype)  # warm up kernels and allocator
        if weight.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        packed = quantize_k(weight, qtype)
        seconds = time.perf_counter() - start
        on_cpu = quantize_k(weight[:256].cpu(), qtype)
        block_bytes = GGML_QUANT_SIZES[qtype][1]
        same = (packed[:256].reshape(-1, block_bytes) == on_cpu.reshape(-1, block_bytes)).all(1).mean()
        print(f"| {qtype.name} | {args.device} | {args.rows}x{args.columns} | {seconds:.3f} | "
              f"{weight.numel() / seconds / 1e6:,.1f} | {same:.2%} |")


if __name__ == "__main__":
    main()
