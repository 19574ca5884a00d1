"""GGUF dequantizing in torch: bit-identical to the gguf package's numpy dequantizer for every type ftcli's export
writes, on DEVICE (a GPU where there is one), from bytes ftcli's own encoders wrote."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import DEVICE
from ftcli.errors import FtcliError
from ftcli.export.check import WEIGHT_ERROR
from ftcli.export.dequantize import dequantize, tensor_bytes
from ftcli.export.gguf_file import encode

FLOAT_TYPES = [Q.F32, Q.F16, Q.BF16]
BLOCK_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1]  # 32-value blocks
K_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # 256-value blocks
SHAPES_256 = [(6, 256), (3, 768)]
SHAPES_32 = [(5, 96), (4, 160)]  # rows of 32-value blocks, not of 256
CASES = ([(qtype, shape) for qtype in FLOAT_TYPES for shape in SHAPES_256 + SHAPES_32 + [(64,)]]
         + [(qtype, shape) for qtype in BLOCK_TYPES for shape in SHAPES_256 + SHAPES_32]
         + [(qtype, shape) for qtype in K_TYPES for shape in SHAPES_256])


def weights(shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian values, heavy-tailed ones (Student's t with 2 degrees of freedom: a normal over the root of a
    chi-squared's mean) in the second row, a zero row and a constant last row (blocks the quantizers treat apart),
    all from one fixed seed."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * 0.02
    if len(shape) == 2:
        normal, chi_squared = torch.randn(shape[1], generator=generator), torch.randn(2, shape[1], generator=generator)
        values[1] = normal / (chi_squared.square().mean(0)).sqrt() * 0.01
        values[-2] = 0
        values[-1] = 0.5
    return values


@pytest.mark.parametrize("qtype, shape", CASES, ids=[f"{qtype.name}-{'x'.join(map(str, shape))}"
                                                     for qtype, shape in CASES])
def test_dequantize_is_bit_identical_to_ggufs(qtype, shape):
    weight = weights(shape)
    packed = np.ascontiguousarray(encode(weight, qtype))
    expected = torch.from_numpy(np.array(gguf.quants.dequantize(packed, qtype), dtype=np.float32)).reshape(shape)
    raw = torch.from_numpy(packed.reshape(-1).view(np.uint8)).to(DEVICE)
    values = dequantize(raw, qtype, shape)
    assert values.dtype == torch.float32 and values.shape == shape and values.device.type == DEVICE.type
    assert torch.equal(values.cpu(), expected)
    # real quantized data: finite scales, values near the weights within the type's rounding
    error = torch.linalg.vector_norm(values.cpu() - weight) / torch.linalg.vector_norm(weight)
    assert torch.isfinite(values).all() and error < WEIGHT_ERROR[qtype], error


def test_a_type_ftcli_does_not_write_is_named():
    with pytest.raises(FtcliError, match="type Q2_K, which the export check cannot read: it reads F32, F16"):
        dequantize(torch.zeros(84, dtype=torch.uint8, device=DEVICE), Q.Q2_K, (256,))


def test_short_bytes_and_partial_blocks_are_a_damaged_file():
    raw = torch.zeros(tensor_bytes(Q.Q8_0, (2, 64)), dtype=torch.uint8, device=DEVICE)
    with pytest.raises(FtcliError, match=r"A Q8_0 tensor of shape \[2, 64\] takes 136 bytes, but 135"):
        dequantize(raw[:-1], Q.Q8_0, (2, 64))
    with pytest.raises(FtcliError, match=r"Q4_K tensor of shape \[2, 96\], whose rows are not made of whole 256-value"):
        tensor_bytes(Q.Q4_K, (2, 96))
