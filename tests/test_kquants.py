"""The torch k-quants: the same bytes as llama.cpp's reference loops, read back by gguf's own dequantizer, and
against llama.cpp's own C quantizer (tests/test_llama_cpp.py compares whole files of the fixture)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import kquant_reference
from ftcli.export.kquants import quantize_k

REFERENCE_BLOCK = {Q.Q4_K: kquant_reference.q4_k_block, Q.Q5_K: kquant_reference.q5_k_block,
                   Q.Q6_K: kquant_reference.q6_k_block}


def random_blocks(count: int) -> torch.Tensor:
    """Gaussian and heavy-tailed (Student's t) super-blocks, from a fixed seed."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gaussian = torch.randn(count // 2, 256) * 0.02
        heavy = torch.distributions.StudentT(2.0).sample((count - count // 2, 256)) * 0.01
    return torch.cat([gaussian, heavy])


def edge_blocks() -> torch.Tensor:
    """Blocks the search treats apart: all positive, all negative, constant, zero."""
    positive = torch.rand(1, 256, generator=torch.Generator().manual_seed(0)) * 0.1
    return torch.cat([positive, -positive, torch.full((1, 256), 0.5), torch.zeros(1, 256)])


def block_error(packed: np.ndarray, block: torch.Tensor, qtype) -> float:
    return float(np.sqrt(np.mean((quants.dequantize(packed[None], qtype)[0] - block.numpy()) ** 2)))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_blocks_follow_the_reference_loops(qtype):
    """Against a line-by-line Python transcription of llama.cpp's quantize_row_qN_K_ref (float32 throughout): edge
    blocks are the same bytes; of 64 random blocks at least 90% are, and the others are near-ties in the scale
    search that sums rounded in another order resolved the other way: their error is within 2% of the
    reference's (measured 0.992 to 1.009 over 80 heavy-tailed blocks)."""
    def reference(block: torch.Tensor) -> np.ndarray:
        return np.frombuffer(REFERENCE_BLOCK[qtype]([np.float32(v) for v in block.tolist()]), dtype=np.uint8)

    edges = edge_blocks()
    for index, packed in enumerate(quantize_k(edges, qtype)):
        assert packed.tobytes() == reference(edges[index]).tobytes(), f"edge block {index}"
    blocks = random_blocks(64)
    identical = 0
    for block, packed in zip(blocks, quantize_k(blocks, qtype)):
        expected = reference(block)
        identical += packed.tobytes() == expected.tobytes()
        ratio = block_error(packed, block, qtype) / block_error(expected, block, qtype)
        assert 0.98 <= ratio <= 1.02, ratio
    assert identical >= 0.9 * len(blocks), identical


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


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_blocks_match_llama_cpps_own_quantizer(qtype):
    """Against ggml's quantizer itself (the C code llama-quantize runs, built by llama-cpp-python) on Gaussian and
    heavy-tailed weights: most super-blocks are the same bytes, and where a near-tie in the scale search went the
    other way (the C loops round their sums in another order) the error is the same."""
    from llama_cpp_run import ggml_quantize

    for weights in random_blocks(8192).chunk(2):  # 4,096 Gaussian blocks, then 4,096 heavy-tailed ones
        ours, theirs = quantize_k(weights, qtype), ggml_quantize(weights.numpy(), qtype)
        identical = (ours == theirs).all(1).mean()  # a row is one super-block here
        errors = [np.sqrt(np.mean((quants.dequantize(packed, qtype) - weights.numpy()) ** 2)) for packed in (ours, theirs)]
        print(qtype.name, identical, errors)
        assert identical >= 0.95 and errors[0] <= errors[1] * 1.001
