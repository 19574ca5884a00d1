"""Chunked token log-probabilities through the head against full-logit PyTorch in float64: values, and the hidden
states' gradient under an arbitrary incoming gradient per token (as a preference loss gives), over chunk
boundaries, with and without soft-capping, float32 and bfloat16.

On a CPU this runs under TRITON_INTERPRET=1 (conftest.py sets it); on a GPU, natively.
"""

import pytest
import torch

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.token_logprobs import token_logprobs, token_logprobs_reference

# (log-probabilities, gradient) max error relative to the reference's largest magnitude; bfloat16 rounds the
# logits and the per-token gradient to 8 bits of mantissa, which the float64 reference does not.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2)}


def inputs(rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, hidden_size, generator=generator) + 0.2).to(DEVICE, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 4 / hidden_size**0.5).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    upstream = torch.randn(rows, generator=generator, dtype=torch.float64).to(DEVICE)  # differs per token
    return hidden.requires_grad_(), weight, targets, upstream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("rows,hidden_size,vocab,chunk_rows", [
    (13, 32, 100, None),   # one chunk, vocabulary not a power of two
    (37, 48, 257, 8),      # several chunks, the last one partial
    (9, 16, 1000, 1),      # a chunk per row
])
def test_token_logprobs_match_reference(rows, hidden_size, vocab, chunk_rows, softcap, dtype):
    hidden, weight, targets, upstream = inputs(rows, hidden_size, vocab, dtype, seed=rows + vocab)
    logprobs = token_logprobs(hidden, weight, targets, softcap, chunk_rows)
    (grad,) = torch.autograd.grad((logprobs.double() * upstream).sum(), hidden)
    hidden_ref = hidden.detach().double().requires_grad_()
    reference = token_logprobs_reference(hidden_ref, weight.double(), targets, softcap)
    (grad_ref,) = torch.autograd.grad((reference * upstream).sum(), hidden_ref)

    value_tol, grad_tol = TOLERANCE[dtype]
    assert logprobs.dtype == torch.float32 and logprobs.shape == (rows,)
    assert (logprobs <= 0).all()
    assert relative_error(logprobs, reference) < value_tol
    assert grad.dtype == dtype
    assert relative_error(grad, grad_ref) < grad_tol


def test_no_grad_mode_keeps_no_gradient():
    hidden, weight, targets, _ = inputs(6, 16, 40, torch.float32, seed=3)
    with torch.no_grad():
        logprobs = token_logprobs(hidden, weight, targets)
    assert not logprobs.requires_grad
    assert relative_error(logprobs, token_logprobs_reference(hidden.detach(), weight, targets)) < 1e-5


def test_unsupported_inputs_fail_loudly():
    hidden, weight, targets, _ = inputs(4, 16, 40, torch.float32, seed=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(hidden, weight, torch.tensor([1, 40, 2, 3], device=DEVICE))
    with pytest.raises(ValueError, match="requires a gradient"):
        token_logprobs(hidden, weight.clone().requires_grad_(), targets)
    with pytest.raises(ValueError, match="must be \\(N, H\\) and \\(V, H\\)"):
        token_logprobs(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="weight dtype"):
        token_logprobs(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match="targets must be integers"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="unsupported dtype"):
        token_logprobs(hidden.double(), weight.double(), targets)
