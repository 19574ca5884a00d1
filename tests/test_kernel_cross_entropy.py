"""Fused linear cross-entropy against its PyTorch reference: loss and the gradients of hidden states and weight,
float32 and bfloat16, with and without soft-capping, with ignored rows, over several chunk boundaries and over
vocabularies of several kernel blocks (Llama 3's 128,256 included).

On a CPU this runs under TRITON_INTERPRET=1 (conftest.py sets it); on a GPU, natively.
"""

import pytest
import torch

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.cross_entropy import MAX_BLOCK, cross_entropy_reference, fused_linear_cross_entropy

# (loss, gradients) max error relative to the reference's largest magnitude. bfloat16 rounds the logits and
# d loss / d logits to 8 bits of mantissa before the gradient matmuls, which the reference (float64) does not.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-3, 2e-2)}
# Over a vocabulary of 65k to 128k, the hidden states' gradient is a sum of that many float32 products, which
# PyTorch's float32 matmul (a matrix-vector product for a one-row chunk) accumulates to 1e-5 to 5e-5
WIDE_VOCABULARY_TOLERANCE = (1e-5, 1e-4)


def inputs(rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, seed: int, ignored: float = 0.3):
    """Hidden states and a head whose logits spread over about +-10, and labels with a share of ignored rows."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, hidden_size, generator=generator) + 0.2).to(DEVICE, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 4 / hidden_size**0.5).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < ignored] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("rows,hidden_size,vocab,chunk_rows", [
    (13, 32, 100, None),    # one chunk, vocabulary not a power of two
    (37, 48, 257, 8),       # several chunks, the last one partial
    (40, 64, 1000, 1),      # a chunk per row
])
def test_fused_cross_entropy_matches_reference(rows, hidden_size, vocab, chunk_rows, softcap, dtype):
    assert_matches_reference(rows, hidden_size, vocab, chunk_rows, softcap, dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("vocab", [2 * MAX_BLOCK + 123, 128256], ids=["three-blocks", "llama3"])
def test_fused_cross_entropy_over_several_vocabulary_blocks(vocab, softcap):
    """A row wider than one block: the running max and sum carried across blocks, then the gradient written
    block by block, the last one ragged. Few rows, so the interpreter stays fast."""
    assert vocab > MAX_BLOCK and vocab % MAX_BLOCK
    assert_matches_reference(4, 16, vocab, 3, softcap, torch.float32, WIDE_VOCABULARY_TOLERANCE)


def assert_matches_reference(rows, hidden_size, vocab, chunk_rows, softcap, dtype, tolerance):
    hidden, weight, labels = inputs(rows, hidden_size, vocab, dtype, seed=rows * 1000 + vocab + (softcap is not None))
    grad_scale = torch.tensor(0.37, device=DEVICE)  # the training loop divides by the step's token count

    loss = fused_linear_cross_entropy(hidden, weight, labels, softcap, chunk_rows=chunk_rows)
    grad_hidden, grad_weight = torch.autograd.grad(loss * grad_scale, (hidden, weight))
    hidden_ref, weight_ref = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss_ref = cross_entropy_reference(hidden_ref, weight_ref, labels, softcap)
    grad_hidden_ref, grad_weight_ref = torch.autograd.grad(loss_ref * grad_scale.double(), (hidden_ref, weight_ref))

    loss_tol, grad_tol = tolerance
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < loss_tol
    assert grad_hidden.dtype == grad_weight.dtype == dtype
    assert relative_error(grad_hidden, grad_hidden_ref) < grad_tol
    assert relative_error(grad_weight, grad_weight_ref) < grad_tol
    assert (grad_hidden[labels == -100] == 0).all()


def test_softcap_changes_the_loss():
    """The control for the soft-capped cases above: capping at 5 must matter for these logits."""
    hidden, weight, labels = inputs(16, 32, 100, torch.float32, seed=5)
    with torch.no_grad():
        plain, capped = (fused_linear_cross_entropy(hidden, weight, labels, cap) for cap in (None, 5.0))
    assert abs(float(plain) - float(capped)) > 0.05 * float(plain)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    hidden, weight, _ = inputs(6, 32, 50, torch.float32, seed=6)
    loss = fused_linear_cross_entropy(hidden, weight, torch.full((6,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_skips_gradients():
    hidden, weight, labels = inputs(9, 32, 50, torch.float32, seed=7)
    weight = weight.detach()
    fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=4).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(cross_entropy_reference(hidden, weight, labels)), rel=1e-5)


def test_unsupported_inputs_fail_loudly():
    hidden, weight, labels = inputs(4, 32, 50, torch.float32, seed=8, ignored=0.0)
    with pytest.raises(ValueError, match="label 50 is outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([1, 50, 2, -100], device=DEVICE))
    with pytest.raises(ValueError, match="label -3 is outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([1, -3, 2, 3], device=DEVICE))
    with pytest.raises(ValueError, match="must be \\(N, H\\) and \\(V, H\\)"):
        fused_linear_cross_entropy(hidden, weight[:, :16], labels)
    with pytest.raises(ValueError, match="weight dtype"):
        fused_linear_cross_entropy(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="labels must be integers"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(TypeError, match="unsupported dtype"):
        fused_linear_cross_entropy(hidden.double(), weight.double(), labels)


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_every_row_path_of_graph_capture_zeroes_ignored_rows(monkeypatch, softcap):
    """While a CUDA graph is captured no row count can be read back, so every row goes through the kernel and the
    ignored ones must come out with loss and gradient zero: the same results as dropping them."""
    import ftcli_kernels.cross_entropy as cross_entropy

    monkeypatch.setattr(cross_entropy, "capturing", lambda tensor: True)
    assert_matches_reference(37, 48, 257, 8, softcap, torch.float32, TOLERANCE[torch.float32])
