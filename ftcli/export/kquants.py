"""llama.cpp's k-quants (Q4_K, Q5_K, Q6_K) in torch, packed into ggml's block bytes.

The `gguf` package reads these types but only writes the legacy ones, so the quantizers are ours. They follow
llama.cpp's reference quantizers (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, no importance matrix): the
same search for each sub-block's scale and minimum, the same 6- or 8-bit scale rounding, the same packing.
All sub-blocks are searched at once as tensors (the search's steps in order), which is fast on a GPU and
acceptable on a CPU; only the order of float additions differs from the C loops, so near-ties in the search
resolve the other way in 1-3% of super-blocks, with the same error (tests/test_llama_cpp.py compares whole files
with llama-quantize's).
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType

QK_K = 256  # weights per super-block
GROUP_MAX_EPS = 1e-15
BLOCKS_PER_CHUNK = 16384  # super-blocks quantized together (4M weights): a few hundred MiB of temporaries


def quantize_k(weights: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D weight (rows of a multiple of 256 values) into a uint8 array of shape (rows, row bytes)."""
    rows, columns = weights.shape
    if columns % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} values, got {columns}")
    quantize_blocks = {GGMLQuantizationType.Q4_K: _q4_k_blocks, GGMLQuantizationType.Q5_K: _q5_k_blocks,
                       GGMLQuantizationType.Q6_K: _q6_k_blocks}[qtype]
    blocks = weights.reshape(-1, QK_K).float()
    packed = [quantize_blocks(blocks[start:start + BLOCKS_PER_CHUNK]).cpu()
              for start in range(0, blocks.shape[0], BLOCKS_PER_CHUNK)]
    return torch.cat(packed).numpy().reshape(rows, -1)


def _round(values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even, like torch.round."""
    return torch.round(values)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _scale_min_search(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's make_qkx2_quants over many 32-value sub-blocks at once: rows of `x` are sub-blocks.

    Returns (scale, minimum, levels) with x ~ scale * levels - minimum; the minimum is >= 0. The first guess is the
    plain min-max grid; then `nstep + 1` stretched grids are refit by weighted least squares, each kept when its
    weighted squared error is strictly smaller. As in the C loop, every trial grid starts from the minimum of the
    best fit so far, so the steps run in order, each over all sub-blocks at once.
    """
    low = x.min(dim=-1).values.clamp(max=0)
    high = x.max(dim=-1).values
    flat = high == low
    sum_w = weights.sum(-1)
    sum_x = (weights * x).sum(-1)

    iscale = nmax / torch.where(flat, torch.ones_like(high), high - low)
    scale = 1 / iscale
    levels = _round(iscale[:, None] * (x - low[:, None])).clamp(0, nmax)
    best_error = (weights * (scale[:, None] * levels + low[:, None] - x) ** 2).sum(-1)
    stretch = torch.tensor(rdelta, dtype=torch.float32)
    for step in range(nstep + 1):
        span = high - low
        iscale = (rmin + stretch * step + nmax) / torch.where(span > 0, span, torch.ones_like(span))
        trial = _round(iscale[:, None] * (x - low[:, None])).clamp(0, nmax)
        sum_l = (weights * trial).sum(-1)
        sum_l2 = (weights * trial * trial).sum(-1)
        sum_xl = (weights * trial * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        fit_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        fit_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = fit_min > 0
        fit_scale = torch.where(positive, sum_xl / sum_l2, fit_scale)
        fit_min = torch.where(positive, torch.zeros_like(fit_min), fit_min)
        error = (weights * (fit_scale[:, None] * trial + fit_min[:, None] - x) ** 2).sum(-1)
        better = (det > 0) & (span > 0) & (error < best_error)
        levels = torch.where(better[:, None], trial, levels)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, fit_scale, scale)
        low = torch.where(better, fit_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat[:, None], torch.zeros_like(levels), levels)
    return scale, -low, levels


def _scale_min_blocks(blocks: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared first half of Q4_K and Q5_K: per sub-block scales and mins, rounded to 6 bits per super-block.

    Returns (levels, d, dmin, scale codes, min codes), levels in 0..nmax for each of the 256 values.
    """
    count = blocks.shape[0]
    sub = blocks.reshape(count * 8, 32)
    # the reference weights each value by the sub-block's RMS plus its magnitude
    rms = (sub * sub).sum(-1).div(32).sqrt()
    weights = rms[:, None] + sub.abs()
    scales, mins, search_levels = _scale_min_search(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(count, 8), mins.reshape(count, 8)

    # the C keeps a running maximum from +0, so a block with no positive value gets +0 (never -0)
    max_scale = scales.max(dim=-1).values
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = mins.max(dim=-1).values
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    scale_codes = _round(inv_scale[:, None] * scales).clamp(0, 63)
    min_codes = _round(inv_min[:, None] * mins).clamp(0, 63)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)

    # the final levels use the rounded, fp16 scales, as the dequantizer will
    sub_d = d.float()[:, None] * scale_codes
    sub_m = dmin.float()[:, None] * min_codes
    x = blocks.reshape(count, 8, 32)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = _round((x + sub_m[..., None]) / safe_d[..., None]).clamp(0, nmax)
    levels = torch.where(sub_d[..., None] == 0, search_levels.reshape(count, 8, 32), levels)
    return levels.to(torch.uint8).reshape(count, QK_K), d, dmin, scale_codes.to(torch.uint8), min_codes.to(torch.uint8)


def _pack_scale_codes(scale_codes: torch.Tensor, min_codes: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins in 12 bytes: low sub-blocks whole, high ones split in nibbles."""
    low_s, high_s = scale_codes[:, :4], scale_codes[:, 4:]
    low_m, high_m = min_codes[:, :4], min_codes[:, 4:]
    return torch.cat([low_s | ((high_s >> 4) << 6), low_m | ((high_m >> 4) << 6),
                      (high_s & 0xF) | ((high_m & 0xF) << 4)], dim=-1)


def _q4_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K: d, dmin (fp16), 12 bytes of scales, then 128 bytes of 4-bit levels (values j and j+32 share a byte)."""
    levels, d, dmin, scale_codes, min_codes = _scale_min_blocks(blocks, 15, -1.0, 0.1, 20)
    pairs = levels.reshape(-1, 4, 2, 32)
    quants = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_codes(scale_codes, min_codes), quants], dim=-1)


def _q5_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K: as Q4_K plus 32 bytes holding each value's fifth bit (bit 2c for the first half of chunk c)."""
    levels, d, dmin, scale_codes, min_codes = _scale_min_blocks(blocks, 31, -0.5, 0.1, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    quants = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    fifth_bits = (pairs >> 4).to(torch.int32)  # (blocks, chunk, half, 32)
    shifts = (2 * torch.arange(4, device=blocks.device)[:, None] + torch.arange(2, device=blocks.device)[None, :])
    high = (fifth_bits << shifts[None, :, :, None]).sum(dim=(1, 2)).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_codes(scale_codes, min_codes), high, quants],
                     dim=-1)


def _symmetric_scale_search(x: torch.Tensor, nmax: int):
    """llama.cpp's make_qx_quants with rmse_type 1 over many 16-value sub-blocks: weights x^2, 19 grids tried.

    Returns (scale, levels) with levels in 0..2*nmax-1 (offset by nmax), x ~ scale * (levels - nmax).
    """
    amax_index = x.abs().argmax(dim=-1, keepdim=True)
    signed_max = x.gather(-1, amax_index)[:, 0]
    tiny = signed_max.abs() < GROUP_MAX_EPS
    safe_max = torch.where(tiny, torch.ones_like(signed_max), signed_max)
    weights = x * x
    # the plain grid first, then -0.9 .. +0.9 around it, skipping the plain one: the C loop's order
    offsets = torch.tensor([0.0] + [0.1 * step for step in range(-9, 10) if step != 0], device=x.device)
    iscales = -(nmax + offsets)[:, None] / safe_max[None, :]
    levels = _round(iscales[..., None] * x[None]).clamp(-nmax, nmax - 1)
    sum_lx = (weights * x * levels).sum(-1)
    sum_l2 = (weights * levels * levels).sum(-1)
    merit = torch.where(sum_l2 > 0, sum_lx * sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                        torch.full_like(sum_l2, -float("inf")))
    # the plain grid always counts, even when it fits nothing (scale 0)
    merit[0] = torch.where(sum_l2[0] > 0, merit[0], torch.zeros_like(merit[0]))
    best = merit.argmax(dim=0)
    chosen_lx = sum_lx.gather(0, best[None])[0]
    chosen_l2 = sum_l2.gather(0, best[None])[0]
    scale = torch.where(chosen_l2 > 0, chosen_lx / torch.where(chosen_l2 > 0, chosen_l2, torch.ones_like(chosen_l2)),
                        torch.zeros_like(chosen_l2))
    chosen = levels.gather(0, best[None, :, None].expand(1, -1, x.shape[-1]))[0] + nmax
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    chosen = torch.where(tiny[:, None], torch.zeros_like(chosen), chosen)
    return scale, chosen


def _q6_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, then d (fp16)."""
    count = blocks.shape[0]
    scales, search_levels = _symmetric_scale_search(blocks.reshape(count * 16, 16), 32)
    scales = scales.reshape(count, 16)
    abs_index = scales.abs().argmax(dim=-1, keepdim=True)
    max_scale = scales.gather(-1, abs_index)[:, 0]
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = (1 / iscale).to(torch.float16)
    scale_codes = _round(iscale[:, None] * scales).clamp(max=127)

    sub_d = d.float()[:, None] * scale_codes
    x = blocks.reshape(count, 16, 16)
    safe_d = torch.where(sub_d == 0, torch.ones_like(sub_d), sub_d)
    levels = (_round(x / safe_d[..., None]).clamp(-32, 31) + 32)
    levels = torch.where(sub_d[..., None] == 0, search_levels.reshape(count, 16, 16), levels)
    levels = levels.to(torch.uint8).reshape(count, 2, 4, 32)  # (blocks, half of 128, quarter, 32)

    low = levels & 0xF
    low_bytes = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    high = (levels >> 4).to(torch.int32)
    shifts = 2 * torch.arange(4, device=blocks.device)
    high_bytes = (high << shifts[None, None, :, None]).sum(dim=2).to(torch.uint8)
    packed = torch.cat([low_bytes.reshape(count, 128), high_bytes.reshape(count, 64),
                        scale_codes.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], dim=-1)
    packed[empty] = 0
    return packed
