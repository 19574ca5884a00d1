"""Time each kernel against its PyTorch reference, forward + backward, at Llama-3-8B sizes on the GPU.

Usage: python -m kernels.benchmark   (prints one table; median of triton.testing.do_bench, random inputs)
"""

import torch
from triton.testing import do_bench

from kernels.gated_activation import gated_activation, gated_activation_reference
from kernels.rms_norm import rms_norm, rms_norm_reference

TOKENS, HIDDEN, INTERMEDIATE = 4096, 4096, 14336  # seq 2048 x batch 2 of Llama-3-8B


def forward_backward_ms(function, inputs: list[torch.Tensor], grad: torch.Tensor) -> float:
    def step():
        out = function(*inputs)
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)
    return do_bench(step, warmup=50, rep=300, return_mode="median")


def main() -> None:
    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    rows = []
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(HIDDEN, device=device, dtype=dtype) + 0.5
    dy = torch.randn_like(x)
    moved = 2 * x.numel() * 2 * 2  # forward reads x, writes y; backward reads x, dy, writes dx (bytes, bf16)
    for name, fn in [("rms_norm", rms_norm), ("rms_norm torch", rms_norm_reference)]:
        rows.append((name, forward_backward_ms(lambda a: fn(a, w, 1e-5), [x], dy), moved))
    gate = torch.randn(TOKENS, INTERMEDIATE, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    grad = torch.randn_like(gate)
    moved = gate.numel() * 2 * (3 + 5)  # forward reads 2, writes 1; backward reads 3, writes 2
    for name, fn in [("swiglu", gated_activation), ("swiglu torch", gated_activation_reference)]:
        rows.append((name, forward_backward_ms(lambda g, u: fn(g, u, "silu"), [gate, up], grad), moved))
    print(f"{torch.cuda.get_device_name()}  bf16, {TOKENS} tokens, hidden {HIDDEN}, intermediate {INTERMEDIATE}")
    print(f"{'op':<16}{'fwd+bwd ms':>12}{'GB/s (min bytes)':>18}")
    for name, ms, moved in rows:
        print(f"{name:<16}{ms:>12.3f}{moved / ms / 1e6:>18.0f}")


if __name__ == "__main__":
    main()
