"""RMSNorm kernel against its float32 PyTorch reference, forward and backward, float32 and bfloat16.

On a CPU this runs under TRITON_INTERPRET=1 (conftest.py sets it); on a GPU, natively.
"""

import pytest
import torch

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.rms_norm import MAX_FUSED_WIDTH, rms_norm, rms_norm_reference

# (forward, backward) max error relative to the reference's largest magnitude
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
# 19 rows: on a CPU backward runs 8 programs of 3 rows, the seventh with 1 (ragged) and the last with none; 1000 columns
# leave 24 masked lanes of the 1024-wide block
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (1, 7, 576), (19, 1000)])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_matches_reference(shape, dtype, offset):
    generator = torch.Generator().manual_seed(hash((shape, offset)) % 2**31)
    x = (torch.randn(shape, generator=generator) * 3 + 0.5).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(shape[-1], generator=generator) * 0.2 + 1).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(DEVICE, dtype)

    y = rms_norm(x, weight, 1e-6, offset)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    x_ref, w_ref = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y_ref = rms_norm_reference(x_ref, w_ref, 1e-6, offset)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_ref, w_ref), dy.double())

    forward_tol, backward_tol = TOLERANCE[dtype]
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < forward_tol
    assert relative_error(dx, dx_ref) < backward_tol
    assert relative_error(dw, dw_ref) < backward_tol


def test_frozen_weight_gets_no_gradient():
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    weight = torch.rand(64, device=DEVICE) + 0.5
    rms_norm(x, weight, 1e-6).sum().backward()
    assert x.grad is not None and weight.grad is None


def test_unsupported_inputs_fail_loudly():
    with pytest.raises(ValueError, match="does not match hidden size"):
        rms_norm(torch.randn(2, 64, device=DEVICE), torch.ones(32, device=DEVICE), 1e-6)
    with pytest.raises(TypeError, match="unsupported dtype"):
        rms_norm(torch.randn(2, 64, device=DEVICE).double(), torch.ones(64, device=DEVICE).double(), 1e-6)
    wide = MAX_FUSED_WIDTH + 1
    with pytest.raises(ValueError, match=f"hidden size {wide} is over the fused kernel's limit {MAX_FUSED_WIDTH}"):
        rms_norm(torch.randn(1, wide, device=DEVICE), torch.ones(wide, device=DEVICE), 1e-6)
