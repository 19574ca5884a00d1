"""SwiGLU / GeGLU kernel against its float32 PyTorch reference, forward and backward, float32 and bfloat16."""

import pytest
import torch

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.gated_activation import (LoraTerms, activation_and_backward, activation_backward, activation_forward,
                                            gated_activation, gated_activation_reference)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max error relative to the reference's largest magnitude


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 128), (2, 7, 1536), (5, 1000)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_matches_reference(shape, dtype, activation):
    generator = torch.Generator().manual_seed(sum(shape) + len(activation))
    gate = (torch.randn(shape, generator=generator) * 3).to(DEVICE, dtype).requires_grad_()
    up = torch.randn(shape, generator=generator).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(DEVICE, dtype)

    out = gated_activation(gate, up, activation)
    dgate, dup = torch.autograd.grad(out, (gate, up), grad)
    gate_ref, up_ref = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    out_ref = gated_activation_reference(gate_ref, up_ref, activation)
    dgate_ref, dup_ref = torch.autograd.grad(out_ref, (gate_ref, up_ref), grad.double())

    assert out.dtype == dtype and out.shape == shape
    for got, want in [(out, out_ref), (dgate, dgate_ref), (dup, dup_ref)]:
        assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ranks,fused", [((8, 8), False), ((24, 16), False), ((16, 16), True)],
                         ids=["r8", "r24-r16", "fused-gate-up"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_terms_are_added_tile_by_tile(ranks, fused, dtype, activation):
    """With LoraTerms, gate and up come without their LoRA terms s (x A^T) B^T and the kernels add them: the
    output and the gradients for the whole gate and up equal the reference's on the summed tensors. Ranks under
    16 and not a power of two pad the kernel's product; a fused gate_up gives strided halves sharing one x A^T."""
    generator = torch.Generator().manual_seed(sum(ranks) + fused + len(activation))
    rows, width = 37, 300

    def random(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)

    if fused:
        gate, up = random(rows, 2 * width, scale=3).chunk(2, dim=-1)
        xa = random(rows, ranks[0])
        gate_B, up_B = random(2 * width, ranks[0], scale=0.3).chunk(2)
        lora = LoraTerms(xa, gate_B, 2.0, xa, up_B, 2.0)
    else:
        gate, up = random(rows, width, scale=3), random(rows, width)
        lora = LoraTerms(random(rows, ranks[0]), random(width, ranks[0], scale=0.3), 0.5,
                         random(rows, ranks[1]), random(width, ranks[1], scale=0.3), 2.0)
    grad = random(rows, width)

    def summed(base, xa, B, scaling):
        return (base.double() + scaling * xa.double() @ B.double().t()).requires_grad_()

    gate_ref = summed(gate, lora.gate_xa, lora.gate_B, lora.gate_scaling)
    up_ref = summed(up, lora.up_xa, lora.up_B, lora.up_scaling)
    out_ref = gated_activation_reference(gate_ref, up_ref, activation)
    dgate_ref, dup_ref = torch.autograd.grad(out_ref, (gate_ref, up_ref), grad.double())
    out = activation_forward(gate, up, activation, lora)
    dgate, dup = activation_backward(gate, up, grad, activation, lora)
    assert out.shape == dgate.shape == dup.shape == (rows, width)
    for got, want in [(out, out_ref), (dgate, dgate_ref), (dup, dup_ref)]:
        assert relative_error(got, want) < TOLERANCE[dtype]
    without = activation_forward(gate, up, activation)  # control: the terms are not negligible here
    assert relative_error(without, out_ref) > 10 * TOLERANCE[dtype]
    consumed = grad.clone()  # the one-pass kernel: the same output (over the gradient) and gradients, bit for bit
    output, dgate_too, dup_too = activation_and_backward(gate, up, consumed, activation, lora)
    assert output.data_ptr() == consumed.data_ptr()
    assert torch.equal(output, out) and torch.equal(dgate_too, dgate) and torch.equal(dup_too, dup)


def test_bad_inputs_fail_loudly():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        gated_activation(x, x, "relu")
    with pytest.raises(ValueError, match="must match"):
        gated_activation(x, x[:, :4], "silu")
    with pytest.raises(TypeError, match="unsupported dtype"):
        gated_activation(x.double(), x.double(), "silu")
