"""The NF4 dequantization kernel against its PyTorch reference and bitsandbytes, with and without double quantization."""

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from conftest import DEVICE
from ftcli_kernels.nf4_dequantize import nf4_dequantize, nf4_dequantize_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain"])
@pytest.mark.parametrize("shape, blocksize", [
    ((64, 64), 64), ((96, 160), 64), ((2304, 64), 64),  # the last spans several scale blocks and programs
    ((96, 160), 128)])
def test_nf4_dequantize_matches_bitsandbytes(shape, blocksize, nested, dtype):
    generator = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    weight = (torch.randn(shape, generator=generator) * 0.05 + 0.01).to(DEVICE)
    packed, state = quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    assert state.nested == nested

    got = nf4_dequantize(packed, state, dtype)
    want = nf4_dequantize_reference(packed, state, dtype)
    assert got.shape == shape and got.dtype == dtype
    # the same float32 products, rounded once to dtype: at most one unit in the last place apart
    torch.testing.assert_close(got, want, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-3, atol=0)
    assert (got.float() - weight).abs().max() < 0.5 * weight.abs().max()  # really the weight, not noise


def test_nf4_dequantize_agrees_with_bitsandbytes():
    # bitsandbytes' CPU path mis-reads rows whose width is not a multiple of 128, so the check uses 128 columns
    weight = (torch.randn(192, 128, generator=torch.Generator().manual_seed(3)) * 0.05).to(DEVICE)
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    torch.testing.assert_close(nf4_dequantize(packed, state, torch.float32), dequantize_4bit(packed, state))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_nf4_dequantize_reads_weights_stored_in_a_wider_dtype_as_bytes(storage):
    """bitsandbytes' quant_storage, which FSDP needs: the same bytes, whatever dtype holds them."""
    weight = (torch.randn(96, 160, generator=torch.Generator().manual_seed(5)) * 0.05).to(DEVICE)
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    stored, stored_state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4",
                                         quant_storage=storage)
    assert stored.dtype == storage and torch.equal(stored.view(torch.uint8).view(-1), packed.view(-1))
    want = nf4_dequantize(packed, state, torch.float32)
    assert torch.equal(nf4_dequantize(stored, stored_state, torch.float32), want)
    assert torch.equal(nf4_dequantize_reference(stored, stored_state, torch.float32),
                       nf4_dequantize_reference(packed, state, torch.float32))


def test_nf4_dequantize_refuses_other_layouts():
    packed, state = quantize_4bit(torch.randn(64, 64).to(DEVICE), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="expects NF4"):
        nf4_dequantize(packed, state, torch.float32)


def test_nf4_dequantize_refuses_a_block_size_other_than_a_power_of_two():
    """A program takes whole blocks as rows of a power-of-two width; bitsandbytes makes no other, but a state
    from elsewhere is refused by name rather than read wrong."""
    packed, state = quantize_4bit(torch.randn(64, 64).to(DEVICE), blocksize=64, quant_type="nf4")
    state.blocksize = 48
    with pytest.raises(ValueError, match="a block of 48 weights is not a power of two"):
        nf4_dequantize(packed, state, torch.float32)
