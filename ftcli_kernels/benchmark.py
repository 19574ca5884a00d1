"""Every kernel at Llama-3-8B sizes on the GPU: its error against the plain-PyTorch reference, forward and
backward, and its time against that reference.

Usage: python -m ftcli_kernels.benchmark   (prints one table; exits 1 when an op is outside its tolerance)

Inputs are random bf16 tensors (never zeros). Errors are the largest absolute difference divided by the
largest magnitude of a float32 reference (the reference run on float32 copies of the same inputs), for the
output and for each input's gradient; the tolerance is the one the CPU tests use for bf16. Times are the
median of triton.testing.do_bench over forward + backward, with the bf16 reference beside them.
"""

import sys

import torch
from triton.testing import do_bench

from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.cross_entropy import cross_entropy_reference, fused_linear_cross_entropy
from ftcli_kernels.gated_activation import gated_activation, gated_activation_reference
from ftcli_kernels.lora_mlp import lora_gated_mlp, lora_gated_mlp_reference
from ftcli_kernels.lora_qkv import lora_projections, lora_projections_reference
from ftcli_kernels.rms_norm import rms_norm, rms_norm_reference
from ftcli_kernels.rope import apply_rope, rope_reference

BATCH, SEQ, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB, RANK = 2, 2048, 4096, 14336, 32, 8, 128, 128256, 16
TOKENS = BATCH * SEQ
TOLERANCE = 3e-2  # bf16, forward and backward, relative to the reference's largest magnitude


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    copy = tensor.detach().float()
    return copy.requires_grad_() if tensor.requires_grad else copy


def outputs_of(result) -> torch.Tensor:
    """One tensor out of an op's result, so one random gradient drives every output's backward."""
    return torch.cat([t.flatten().float() for t in result]) if isinstance(result, tuple) else result.flatten().float()


def check(name: str, op, reference, inputs: list, reference_inputs: list | None = None) -> tuple:
    """(name, forward error, worst gradient error, op ms, reference ms): `inputs` are the op's arguments, and those
    that require grad are differentiated."""
    reference_inputs = reference_inputs or [as_float32(t) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                            else t for t in inputs]
    differentiable = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    reference_differentiable = [t for t in reference_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = outputs_of(op(*inputs))
    want = outputs_of(reference(*reference_inputs))
    forward_error = relative_error(out, want)
    grad = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1))
    grads = torch.autograd.grad(out, differentiable, grad)
    want_grads = torch.autograd.grad(want, reference_differentiable, grad)
    backward_error = max(relative_error(g, w) for g, w in zip(grads, want_grads))
    del out, want, grads, want_grads

    def timed(function):
        def step():
            torch.autograd.grad(outputs_of(function(*inputs)), differentiable, grad, allow_unused=True)
        return do_bench(step, warmup=25, rep=200, return_mode="median")

    return name, forward_error, backward_error, timed(op), timed(reference)


def random(*shape, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16).requires_grad_(grad)


def nf4_projection(out_features: int, in_features: int) -> tuple:
    """(NF4 weight, bias, A, B, scaling) as peft holds them (float32 adapters, B non-zero), and the same with the
    dequantized weight for the reference."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Params4bit

    dense = torch.randn(out_features, in_features, device="cuda") / in_features**0.5
    weight = Params4bit(dense.to(torch.bfloat16).cpu(), requires_grad=False, quant_type="nf4",
                        compress_statistics=True).cuda()
    lora_A = (torch.randn(RANK, in_features, device="cuda") / in_features**0.5).requires_grad_()
    lora_B = (torch.randn(out_features, RANK, device="cuda") * 0.05).requires_grad_()
    reference = (dequantize_4bit(weight, weight.quant_state).float(), None, as_float32(lora_A), as_float32(lora_B), 1.0)
    return (weight, None, lora_A, lora_B, 1.0), reference


def main() -> int:
    torch.manual_seed(0)
    rows = []
    x = random(TOKENS, HIDDEN)
    weight = (torch.rand(HIDDEN, device="cuda") + 0.5).to(torch.bfloat16)
    rows.append(check("rms_norm", lambda a: rms_norm(a, weight, 1e-5), lambda a: rms_norm_reference(a, weight, 1e-5), [x]))

    gate, up = random(TOKENS, INTERMEDIATE), random(TOKENS, INTERMEDIATE)
    rows.append(check("swiglu", lambda g, u: gated_activation(g, u, "silu"),
                      lambda g, u: gated_activation_reference(g, u, "silu"), [gate, up]))

    q, k = random(BATCH, HEADS, SEQ, HEAD_DIM), random(BATCH, KV_HEADS, SEQ, HEAD_DIM)
    angles = torch.arange(SEQ, device="cuda")[:, None] / 500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    angles = torch.cat([angles, angles], dim=-1).expand(BATCH, SEQ, HEAD_DIM)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    rows.append(check("rope", lambda a, b: apply_rope(a, b, cos, sin), lambda a, b: rope_reference(a, b, cos.float(), sin.float()),
                      [q, k]))

    hidden, head = random(TOKENS, HIDDEN), random(VOCAB, HIDDEN, scale=0.02)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    labels[::7] = -100
    rows.append(check("cross_entropy", lambda h, w: fused_linear_cross_entropy(h, w, labels),
                      lambda h, w: cross_entropy_reference(h, w, labels), [hidden, head]))
    del hidden, head

    qkv = [nf4_projection(width, HIDDEN) for width in (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)]
    x = random(TOKENS, HIDDEN)
    parts, reference_parts = [p for p, _ in qkv], [r for _, r in qkv]
    adapters = [t for p in parts for t in p[2:4]]
    reference_adapters = [t for r in reference_parts for t in r[2:4]]
    rows.append(check("lora_qkv (nf4)", lambda a, *_: lora_projections(a, parts),
                      lambda a, *_: lora_projections_reference(a, reference_parts), [x, *adapters],
                      [as_float32(x), *reference_adapters]))

    mlp = [nf4_projection(INTERMEDIATE, HIDDEN), nf4_projection(INTERMEDIATE, HIDDEN), nf4_projection(HIDDEN, INTERMEDIATE)]
    parts, reference_parts = [p for p, _ in mlp], [r for _, r in mlp]
    adapters = [t for p in parts for t in p[2:4]]
    reference_adapters = [t for r in reference_parts for t in r[2:4]]
    rows.append(check("lora_mlp (nf4)", lambda a, *_: lora_gated_mlp(a, "silu", parts),
                      lambda a, *_: lora_gated_mlp_reference(a, "silu", reference_parts), [x, *adapters],
                      [as_float32(x), *reference_adapters]))

    print(f"{torch.cuda.get_device_name()}  bf16  batch {BATCH} x seq {SEQ}, hidden {HIDDEN}, intermediate "
          f"{INTERMEDIATE}, vocab {VOCAB}, LoRA r {RANK}")
    print(f"{'op':<16}{'fwd err':>10}{'bwd err':>10}{'ms':>9}{'torch ms':>10}{'speed-up':>10}  within {TOLERANCE:g}")
    failed = False
    for name, forward_error, backward_error, ms, reference_ms in rows:
        ok = forward_error < TOLERANCE and backward_error < TOLERANCE
        failed |= not ok
        print(f"{name:<16}{forward_error:>10.2e}{backward_error:>10.2e}{ms:>9.3f}{reference_ms:>10.3f}"
              f"{reference_ms / ms:>9.1f}x  {'yes' if ok else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
