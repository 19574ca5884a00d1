"""The torch k-quants: the same bytes as llama.cpp's reference loops, read back by gguf's own dequantizer, and
errors on real weights in line with llama.cpp's quantizers at the same bit budget."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import kquant_reference
from ftcli.export.kquants import quantize_k

REFERENCE_BLOCK = {Q.Q4_K: kquant_reference.q4_k_block, Q.Q5_K: kquant_reference.q5_k_block,
                   Q.Q6_K: kquant_reference.q6_k_block}


def awkward_blocks() -> torch.Tensor:
    """Gaussian and heavy-tailed weights, an all-positive and an all-negative block, a constant and a zero block."""
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(3, 256, generator=generator) * 0.02
    heavy = torch.distributions.StudentT(2.0).sample((2, 256)) * 0.01
    positive = torch.rand(1, 256, generator=generator) * 0.1
    return torch.cat([gaussian, heavy, positive, -positive, torch.full((1, 256), 0.5), torch.zeros(1, 256)])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_bytes_equal_the_reference_loops(qtype):
    blocks = awkward_blocks()
    ours = quantize_k(blocks, qtype)
    for index, block in enumerate(blocks):
        expected = REFERENCE_BLOCK[qtype]([np.float32(v) for v in block.tolist()])
        assert ours[index].tobytes() == expected, f"block {index}"


@pytest.mark.parametrize("qtype, bits", [(Q.Q4_K, 4.5), (Q.Q5_K, 5.5), (Q.Q6_K, 6.5625)])
def test_gguf_dequantizes_our_blocks(qtype, bits):
    weights = torch.randn(32, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    packed = quantize_k(weights, qtype)
    assert packed.shape == (32, 512 * bits // 8)
    restored = torch.from_numpy(quants.dequantize(packed, qtype))
    relative_rms = ((restored - weights).pow(2).mean().sqrt() / weights.pow(2).mean().sqrt()).item()
    # a uniform grid of 2^bits levels over about +-3 sigma has an RMS error near 6 / 2^bits / sqrt(12) sigma
    assert relative_rms < 1.2 * 6 / 2 ** int(bits) / 12 ** 0.5
    constant = quants.dequantize(quantize_k(torch.full((1, 256), 0.5), qtype), qtype)
    np.testing.assert_allclose(constant, 0.5, rtol=2e-3)


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(2, 576), Q.Q4_K)


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)))


@pytest.mark.slow
def test_errors_on_fixture_weights_match_llama_cpp_at_the_same_bits():
    """On SmolLM2's token embedding (stored as Q8_0: 256 levels per block, practically continuous for 4 to 6 bits),
    each k-quant's RMS error lies below llama.cpp's legacy quantizer of about the same size (gguf's ports of
    them): Q4_K (4.5 bits) below Q4_0 (4.5) and Q4_1 (5.0), Q5_K below Q5_0 and Q5_1, Q6_K below Q5_K. (The
    fixture has no Q4_K tensors to compare with: it is Q4_1 with a Q8_0 embedding.) The Q4_1 matrices are
    compared with their own stored rounding error instead (half a step, uniform): re-quantizing a tensor
    that sits on a 4-bit grid with a 4-bit grid is an easy case, so Q4_K must come within it."""
    import gguf

    from ftcli.fixture import fixture_gguf

    reader = gguf.GGUFReader(fixture_gguf())
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embedding = quants.dequantize(tensors["token_embd.weight"].data, Q.Q8_0).reshape(-1, 256)[:32768]
    weights = torch.from_numpy(embedding.copy())
    error = {qtype: rms(quants.dequantize(quantize_k(weights, qtype), qtype), embedding)
             for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K)}
    legacy = {qtype: rms(quants.dequantize(quants.quantize(embedding, qtype), qtype), embedding)
              for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)}
    print({q.name: f"{e:.3e}" for q, e in (error | legacy).items()})
    assert error[Q.Q4_K] < legacy[Q.Q4_1] < legacy[Q.Q4_0]
    assert error[Q.Q5_K] < legacy[Q.Q5_1] < legacy[Q.Q5_0]
    assert error[Q.Q6_K] < 0.6 * error[Q.Q5_K]

    down = tensors["blk.10.ffn_down.weight"]
    assert down.tensor_type == Q.Q4_1
    values = quants.dequantize(down.data, Q.Q4_1)
    steps = np.frombuffer(np.ascontiguousarray(down.data).reshape(-1, 20)[:, :2].tobytes(), dtype=np.float16)
    own_error = float(np.sqrt(np.mean(steps.astype(np.float64) ** 2) / 12))
    ours = rms(quants.dequantize(quantize_k(torch.from_numpy(values.copy()), Q.Q4_K), Q.Q4_K), values)
    print(f"ffn_down: Q4_1 own rounding error {own_error:.3e}, our Q4_K {ours:.3e}")
    assert ours < own_error
