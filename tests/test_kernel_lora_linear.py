"""LoRA projection, stacked LoRA projections (q, k, v) and LoRA gated MLP ops against plain PyTorch references, forward and backward, over plain and
NF4 base weights, and what they keep for backward.

The NF4 references use the dequantized weight, so they check the op's math, not the quantization. On a CPU the
activation kernel runs under TRITON_INTERPRET=1 (conftest.py sets it); on a GPU, natively.
"""

import gc
import weakref

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Params4bit

import ftcli_kernels.limits
import ftcli_kernels.lora_linear
from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.lora_linear import lora_linear, lora_linear_reference
from ftcli_kernels.lora_mlp import lora_gated_mlp, lora_gated_mlp_reference
from ftcli_kernels.lora_qkv import lora_projections, lora_projections_reference

# (forward, backward) max error relative to the reference's largest magnitude
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2)}
RANK = 8


def projection(generator, out_features: int, in_features: int, dtype, base: str, bias: bool) -> tuple:
    """(weight, bias, lora_A, lora_B, scaling) with float32 adapters, B non-zero so that A gets gradients."""
    dense = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
    weight = dense.to(DEVICE)
    if base == "nf4":
        weight = Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True).to(DEVICE)
    return (weight,
            (torch.randn(out_features, generator=generator) * 0.1).to(DEVICE, dtype) if bias else None,
            (torch.randn(RANK, in_features, generator=generator) / in_features**0.5).to(DEVICE).requires_grad_(),
            (torch.randn(out_features, RANK, generator=generator) * 0.5).to(DEVICE).requires_grad_(),
            2.0)


def as_reference(part: tuple) -> tuple:
    """The projection in float64 over its dense (dequantized) weight, with fresh leaves for A and B."""
    weight, bias, lora_A, lora_B, scaling = part
    dense = dequantize_4bit(weight, weight.quant_state) if hasattr(weight, "quant_state") else weight
    return (dense.double(), None if bias is None else bias.double(), lora_A.detach().double().requires_grad_(),
            lora_B.detach().double().requires_grad_(), scaling)


def assert_matches(outputs, inputs, reference_outputs, reference_inputs, dtype) -> None:
    grad = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, outputs.dtype)
    grads = torch.autograd.grad(outputs, inputs, grad)
    reference_grads = torch.autograd.grad(reference_outputs, reference_inputs, grad.double())
    forward_tol, backward_tol = TOLERANCE[dtype]
    assert outputs.dtype == dtype and torch.isfinite(outputs).all()
    assert relative_error(outputs, reference_outputs) < forward_tol
    for index, (got, want) in enumerate(zip(grads, reference_grads)):
        assert got.dtype == inputs[index].dtype
        assert relative_error(got, want) < backward_tol, f"gradient of input {index}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("base", ["plain", "nf4"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("shape", [(5, 64, 128), (2, 7, 128, 64)], ids=["2d", "3d"])
def test_lora_linear_matches_reference(shape, bias, base, dtype):
    *rows, in_features, out_features = shape
    generator = torch.Generator().manual_seed(hash((shape, bias, base)) % 2**31)
    x = torch.randn(*rows, in_features, generator=generator).to(DEVICE, dtype).requires_grad_()
    part = projection(generator, out_features, in_features, dtype, base, bias)
    reference = as_reference(part)
    x_ref = x.detach().double().requires_grad_()

    y = lora_linear(x, *part)
    assert y.shape == (*rows, out_features)
    assert_matches(y, (x, part[2], part[3]), lora_linear_reference(x_ref, *reference), (x_ref, *reference[2:4]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("base", ["plain", "nf4"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("layout", ["split", "fused"])
@pytest.mark.parametrize("chunk_rows, tile_rows, dequantize_once", [(None, 0, False), (3, 0, False), (3, 0, True),
                                                                    (None, 4, False)],
                         ids=["one-chunk", "rows-in-chunks", "chunks-dequantized-once", "tiles"])
def test_lora_gated_mlp_matches_reference(layout, activation, base, dtype, chunk_rows, tile_rows, dequantize_once):
    """Backward one chunk of rows at a time (3 of the 10 rows, the last chunk short; the weights dequantized per
    chunk or once for all), or forward and backward in tiles of 4 rows with gate and up computed again, gives the
    same output and gradients."""
    hidden, inner = 64, 128
    generator = torch.Generator().manual_seed(hash((layout, activation, base)) % 2**31)
    x = torch.randn(2, 5, hidden, generator=generator).to(DEVICE, dtype).requires_grad_()
    widths = [inner, inner] if layout == "split" else [2 * inner]
    parts = [projection(generator, width, hidden, dtype, base, False) for width in widths]
    parts.append(projection(generator, hidden, inner, dtype, base, False))
    references = [as_reference(part) for part in parts]
    x_ref = x.detach().double().requires_grad_()

    y = lora_gated_mlp(x, activation, parts, chunk_rows, tile_rows, dequantize_once)
    assert y.shape == x.shape
    inputs = (x, *(t for part in parts for t in part[2:4]))
    reference_inputs = (x_ref, *(t for part in references for t in part[2:4]))
    assert_matches(y, inputs, lora_gated_mlp_reference(x_ref, activation, references), reference_inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("base", ["plain", "nf4"])
@pytest.mark.parametrize("bias", ["none", "some", "all"])
def test_lora_projections_match_reference(bias, base, dtype):
    """q, k, v of different widths and LoRA scalings, some with biases, as one op."""
    hidden = 128
    generator = torch.Generator().manual_seed(hash((bias, base)) % 2**31)
    x = torch.randn(2, 5, hidden, generator=generator).to(DEVICE, dtype).requires_grad_()
    with_bias = {"none": [False] * 3, "some": [True, False, True], "all": [True] * 3}[bias]
    parts = [projection(generator, width, hidden, dtype, base, b) for width, b in zip((128, 64, 64), with_bias)]
    parts = [part[:4] + (scaling,) for part, scaling in zip(parts, (2.0, 0.5, 1.0))]
    references = [as_reference(part) for part in parts]
    x_ref = x.detach().double().requires_grad_()

    q, k, v = lora_projections(x, parts)
    assert [t.shape for t in (q, k, v)] == [(2, 5, 128), (2, 5, 64), (2, 5, 64)]
    q_ref, k_ref, v_ref = lora_projections_reference(x_ref, references)
    inputs = (x, *(t for part in parts for t in part[2:4]))
    reference_inputs = (x_ref, *(t for part in references for t in part[2:4]))
    assert_matches(torch.cat([q, k, v], dim=-1), inputs, torch.cat([q_ref, k_ref, v_ref], dim=-1), reference_inputs,
                   dtype)


def saved_shapes(run) -> list[tuple[tuple, int]]:
    """(shape, data_ptr) of every tensor autograd saves while `run` builds its graph."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


@pytest.mark.parametrize("base", ["plain", "nf4"])
def test_backward_keeps_activations_and_adapters_only(base):
    """No weight-sized tensor is saved: x, gate and up, the r-wide LoRA intermediates and the adapters."""
    generator = torch.Generator().manual_seed(0)
    tokens, hidden, inner = 4, 128, 256
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE).requires_grad_()
    q, k = (projection(generator, hidden, hidden, torch.float32, base, True) for _ in range(2))
    mlp = [projection(generator, inner, hidden, torch.float32, base, False) for _ in range(2)]
    mlp.append(projection(generator, hidden, inner, torch.float32, base, False))

    attention_saved = saved_shapes(lambda: (lora_linear(x, *q), lora_linear(x, *k)))
    x_saved = [pointer for shape, pointer in attention_saved if shape == tuple(x.shape)]
    assert x_saved == [x.data_ptr()] * 2  # q and k keep the very same x, not a copy each
    assert sorted(shape for shape, _ in attention_saved) == sorted(
        [(tokens, hidden), (tokens, RANK), (RANK, hidden), (hidden, RANK)] * 2)

    stacked_saved = saved_shapes(lambda: lora_projections(x, [q, k]))
    assert [pointer for shape, pointer in stacked_saved if shape == tuple(x.shape)] == [x.data_ptr()]
    assert sorted(shape for shape, _ in stacked_saved) == sorted(
        [(tokens, hidden), (tokens, 2 * RANK), (2 * RANK, hidden), (hidden, RANK), (hidden, RANK)])

    mlp_saved = [shape for shape, _ in saved_shapes(lambda: lora_gated_mlp(x, "silu", mlp))]
    assert sorted(mlp_saved) == sorted([(tokens, hidden), (tokens, inner), (tokens, inner)] + [(tokens, RANK)] * 3
                                       + [(RANK, hidden), (inner, RANK)] * 2 + [(RANK, inner), (hidden, RANK)])
    assert max(torch.Size(shape).numel() for shape in mlp_saved) < hidden * inner

    tiled_saved = [shape for shape, _ in saved_shapes(lambda: lora_gated_mlp(x, "silu", mlp, tile_rows=3))]
    assert sorted(tiled_saved) == sorted([(tokens, hidden)] + [(RANK, hidden), (inner, RANK)] * 2
                                         + [(RANK, inner), (hidden, RANK)])


def test_long_inputs_go_through_the_mlp_in_tiles(monkeypatch):
    """Above the threshold (lowered here to 10 rows of the gate) the MLP keeps x but neither gate nor up."""
    monkeypatch.setattr(ftcli_kernels.limits, "MLP_TILE_THRESHOLD_BYTES", 10 * 128 * 4)
    monkeypatch.setattr(ftcli_kernels.limits, "MLP_TILE_BYTES", 4 * 128 * 4)
    assert ftcli_kernels.limits.mlp_tile_rows(10, 128, 4) == 0 and ftcli_kernels.limits.mlp_tile_rows(11, 128, 4) == 4
    generator = torch.Generator().manual_seed(3)
    mlp = [projection(generator, 128, 64, torch.float32, "plain", False) for _ in range(2)]
    mlp.append(projection(generator, 64, 128, torch.float32, "plain", False))
    for rows, gate_kept in ((10, True), (11, False)):
        x = torch.randn(rows, 64, generator=generator).to(DEVICE).requires_grad_()
        saved = [shape for shape, _ in saved_shapes(lambda: lora_gated_mlp(x, "silu", mlp))]
        assert ((rows, 128) in saved) == gate_kept


@pytest.mark.parametrize("base", ["plain", "nf4"])
def test_dense_weights_do_not_outlive_forward(base, monkeypatch):
    """The dense weights forward builds (bfloat16 weights for float32 inputs, so plain ones are copies too) are
    freed before backward, which builds its own."""
    made = []

    def recorded(weight, dtype):
        dense = dense_weight(weight, dtype)
        made.append(weakref.ref(dense))
        return dense

    dense_weight = ftcli_kernels.lora_linear.dense_weight
    monkeypatch.setattr(ftcli_kernels.lora_linear, "dense_weight", recorded)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=generator).to(DEVICE).requires_grad_()
    mlp = [projection(generator, 128, 64, torch.bfloat16, base, False) for _ in range(2)]
    mlp.append(projection(generator, 64, 128, torch.bfloat16, base, False))
    outputs = lora_gated_mlp(lora_linear(x, *projection(generator, 64, 64, torch.bfloat16, base, True)), "silu", mlp)
    gc.collect()
    assert len(made) == 4 and all(ref() is None for ref in made)
    outputs.sum().backward()
    assert len(made) == 8 and all(ref() is None for ref in made)


@pytest.mark.parametrize("dequantize_once, dequantized", [(False, 3 + 4 * 3), (True, 3 + 3)], ids=["per-chunk", "once"])
def test_backward_in_chunks_dequantizes_per_chunk_or_once(dequantize_once, dequantized, monkeypatch):
    """Forward dequantizes gate, up and down once each; backward in 4 chunks of rows dequantizes the three in every
    chunk, or with `dequantize_once` once for all chunks, giving the same gradients bit for bit."""
    import ftcli_kernels.nf4_dequantize

    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return nf4_dequantize(*args)

    nf4_dequantize = ftcli_kernels.nf4_dequantize.nf4_dequantize
    monkeypatch.setattr(ftcli_kernels.nf4_dequantize, "nf4_dequantize", counted)
    results = []
    for once in (False, dequantize_once):
        generator = torch.Generator().manual_seed(6)
        x = torch.randn(10, 64, generator=generator).to(DEVICE, torch.bfloat16).requires_grad_()
        mlp = [projection(generator, 128, 64, torch.bfloat16, "nf4", False) for _ in range(2)]
        mlp.append(projection(generator, 64, 128, torch.bfloat16, "nf4", False))
        calls.clear()
        lora_gated_mlp(x, "silu", mlp, backward_chunk_rows=3, dequantize_once=once).float().square().sum().backward()
        results.append([x.grad, *(t.grad for part in mlp for t in part[2:4])])
    assert len(calls) == dequantized
    for grad, want in zip(*results):
        assert torch.equal(grad, want)


def test_unsupported_inputs_fail_loudly():
    generator = torch.Generator().manual_seed(2)
    weight, bias, lora_A, lora_B, scaling = projection(generator, 64, 64, torch.float32, "plain", False)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(TypeError, match="unsupported dtype"):
        lora_linear(x.double(), weight, bias, lora_A, lora_B, scaling)
    with pytest.raises(ValueError, match="do not fit together"):
        lora_linear(torch.randn(2, 32, device=DEVICE), weight, bias, lora_A, lora_B, scaling)
    with pytest.raises(ValueError, match="must be frozen"):
        lora_linear(x, weight.clone().requires_grad_(), bias, lora_A, lora_B, scaling)
    with pytest.raises(ValueError, match="unknown activation"):
        lora_gated_mlp(x, "relu", [(weight, bias, lora_A, lora_B, scaling)] * 3)
