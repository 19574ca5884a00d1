"""SwiGLU / GeGLU kernel against its float32 PyTorch reference, forward and backward, float32 and bfloat16."""

import pytest
import torch

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.gated_activation import gated_activation, gated_activation_reference

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


def test_bad_inputs_fail_loudly():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        gated_activation(x, x, "relu")
    with pytest.raises(ValueError, match="must match"):
        gated_activation(x, x[:, :4], "silu")
    with pytest.raises(TypeError, match="unsupported dtype"):
        gated_activation(x.double(), x.double(), "silu")
