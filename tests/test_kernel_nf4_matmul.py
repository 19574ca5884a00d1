"""The fused NF4 matmul against its reference (dequantize, then matmul), with and without double quantization,
over the few rows of a decode step and shapes whose tails do not fill a tile."""

import pytest
import torch
from bitsandbytes.functional import quantize_4bit

from conftest import DEVICE
from ftcli_kernels.accuracy import relative_error
from ftcli_kernels.nf4_matmul import (BLOCK_K, BLOCK_N, PROGRAMS_TO_FILL_GPU, k_split, nf4_matmul,
                                      nf4_matmul_reference, takes_layout)

# relative to the reference's largest magnitude: float32 sums in another order, rounded once to the dtype; for
# bfloat16 also weights up to a unit in the last place apart, as Triton's interpreter truncates float32 to
# bfloat16 where the reference (and a GPU) rounds to nearest
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2**-10}


def quantized(out_features: int, in_features: int, nested: bool, seed: int) -> tuple:
    """(packed weight, quant_state, dense float32 weight) as bitsandbytes quantizes it for QLoRA."""
    weight = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
              / in_features**0.5).to(DEVICE)
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    assert state.nested == nested
    return packed, state, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain"])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("shape", [(64, 128), (80, 192), (130, 320), (128, 256)],
                         ids=["one-tile", "tails", "k-split-n-tail", "two-scale-groups"])
def test_nf4_matmul_matches_reference(shape, rows, nested, dtype):
    """K of 192 and 320 are not multiples of BLOCK_K, N of 80 and 130 not of BLOCK_N; (128, 256) holds 512
    quantization blocks, two groups of double-quantized scales."""
    out_features, in_features = shape
    packed, state, weight = quantized(out_features, in_features, nested, seed=out_features + in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(DEVICE, dtype)

    got = nf4_matmul(x, packed, state)
    want = nf4_matmul_reference(x, packed, state)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    assert relative_error(got, want) < TOLERANCE[dtype]
    assert relative_error(got, x.float() @ weight.t()) < 0.2  # really x W^T, within NF4's rounding


def test_shapes_split_k_across_programs():
    """The tests' shapes cover a split K (partial sums added) whose last split is short; Llama-3-8B's down
    projection (64 tiles of BLOCK_N outputs) splits K in 5 to fill the GPU."""
    assert k_split(64, 128) == (1, BLOCK_K)
    assert k_split(130, 320) == (3, BLOCK_K)  # the last split holds 64 of its 128 columns
    assert k_split(4096, 14336) == (5, 23 * BLOCK_K)
    assert 4096 // BLOCK_N * 5 >= PROGRAMS_TO_FILL_GPU


def test_nf4_matmul_in_float16_and_into_a_column_block():
    packed, state, _ = quantized(64, 128, True, seed=5)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.float16)
    out = torch.full((5, 96), float("nan"), dtype=torch.float16, device=DEVICE)

    nf4_matmul(x, packed, state, out=out[:, 16:80])
    assert relative_error(out[:, 16:80], nf4_matmul_reference(x, packed, state)) < TOLERANCE[torch.float16]
    assert out[:, :16].isnan().all() and out[:, 80:].isnan().all()  # nothing written outside the block


def test_nf4_matmul_refuses_what_it_cannot_compute():
    packed, state, _ = quantized(64, 128, True, seed=7)
    x = torch.randn(2, 128, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \(2, 64\) does not fit a \(64, 128\) weight"):
        nf4_matmul(x[:, :64], packed, state)
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        nf4_matmul(x.double(), packed, state)
    with pytest.raises(ValueError, match=r"out must be a \(2, 64\) torch.float32 tensor"):
        nf4_matmul(x, packed, state, out=torch.empty(2, 64, dtype=torch.bfloat16, device=DEVICE))
    for shape, blocksize in (((64, 96), 64), ((64, 256), 256)):  # blocks straddle rows; blocks wider than a tile
        odd, odd_state = quantize_4bit(torch.randn(shape).to(DEVICE), blocksize=blocksize, quant_type="nf4")
        assert not takes_layout(odd_state)
        with pytest.raises(ValueError, match=f"in blocks of {blocksize} is not taken"):
            nf4_matmul(torch.randn(2, shape[1], device=DEVICE), odd, odd_state)
    fp4, fp4_state = quantize_4bit(torch.randn(64, 128).to(DEVICE), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4_matmul: expects NF4"):
        nf4_matmul(x, fp4, fp4_state)
