"""llama.cpp's reference k-quant loops (quantize_row_q{4,5,6}_K_ref) transcribed line by line into Python with
float32 scalars, one block at a time: slow, but a second reading of the C to hold the tensor version against."""

import numpy as np

f32 = np.float32


def nearest_int(value) -> int:
    return int(np.rint(f32(value)))  # round half to even, like the C's float trick


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    n = len(x)
    low, high = x[0], x[0]
    sum_w, sum_x = weights[0], weights[0] * x[0]
    for i in range(1, n):
        low, high = min(low, x[i]), max(high, x[i])
        sum_w = f32(sum_w + weights[i])
        sum_x = f32(sum_x + weights[i] * x[i])
    low = min(low, f32(0))
    levels = [0] * n
    if high == low:
        return f32(0), -low, levels
    iscale = f32(nmax / (high - low))
    scale = f32(1 / iscale)
    best_error = f32(0)
    for i in range(n):
        levels[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - low))))
        diff = f32(scale * levels[i] + low - x[i])
        best_error = f32(best_error + weights[i] * diff * diff)
    for step in range(nstep + 1):
        iscale = f32(f32(rmin + f32(rdelta * step) + nmax) / (high - low))
        sum_l = sum_l2 = sum_xl = f32(0)
        trial = [0] * n
        for i in range(n):
            level = max(0, min(nmax, nearest_int(iscale * (x[i] - low))))
            trial[i] = level
            sum_l = f32(sum_l + weights[i] * level)
            sum_l2 = f32(sum_l2 + weights[i] * level * level)
            sum_xl = f32(sum_xl + weights[i] * level * x[i])
        det = f32(sum_w * sum_l2 - sum_l * sum_l)
        if det > 0:
            this_scale = f32((sum_w * sum_xl - sum_x * sum_l) / det)
            this_min = f32((sum_l2 * sum_x - sum_l * sum_xl) / det)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(sum_xl / sum_l2)
            error = f32(0)
            for i in range(n):
                diff = f32(this_scale * trial[i] + this_min - x[i])
                error = f32(error + weights[i] * diff * diff)
            if error < best_error:
                levels, best_error, scale, low = trial, error, this_scale, this_min
    return scale, -low, levels


def _scale_min_block(x, nmax, rmin, rdelta, nstep):
    scales, mins, levels = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        sum_x2 = f32(0)
        for value in sub:
            sum_x2 = f32(sum_x2 + value * value)
        rms = f32(np.sqrt(f32(sum_x2 / 32)))
        weights = [f32(rms + abs(value)) for value in sub]
        scale, minimum, sub_levels = make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
        scales.append(scale)
        mins.append(minimum)
        levels += sub_levels
    max_scale, max_min = max([f32(0)] + scales), max([f32(0)] + mins)
    inv_scale = f32(63 / max_scale) if max_scale > 0 else f32(0)
    inv_min = f32(63 / max_min) if max_min > 0 else f32(0)
    scale_codes = [min(63, nearest_int(inv_scale * s)) for s in scales]
    min_codes = [min(63, nearest_int(inv_min * m)) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = scale_codes[j], min_codes[j]
        else:
            packed[j + 4] = (scale_codes[j] & 0xF) | ((min_codes[j] & 0xF) << 4)
            packed[j - 4] |= (scale_codes[j] >> 4) << 6
            packed[j] |= (min_codes[j] >> 4) << 6
    d, dmin = np.float16(max_scale / 63), np.float16(max_min / 63)
    for j in range(8):
        sub_d = f32(f32(d) * scale_codes[j])
        if not sub_d:
            continue
        sub_m = f32(f32(dmin) * min_codes[j])
        for i in range(32):
            levels[32 * j + i] = max(0, min(nmax, nearest_int(f32(x[32 * j + i] + sub_m) / sub_d)))
    header = np.array([d, dmin], dtype=np.float16).view(np.uint8).tolist()
    return header + packed, levels


def q4_k_block(x) -> bytes:
    header, levels = _scale_min_block(x, 15, f32(-1.0), f32(0.1), 20)
    quants = []
    for chunk in range(0, 256, 64):
        quants += [levels[chunk + i] | (levels[chunk + i + 32] << 4) for i in range(32)]
    return bytes(header + quants)


def q5_k_block(x) -> bytes:
    header, levels = _scale_min_block(x, 31, f32(-0.5), f32(0.1), 15)
    high, quants = [0] * 32, []
    for chunk_index, chunk in enumerate(range(0, 256, 64)):
        for i in range(32):
            first, second = levels[chunk + i], levels[chunk + i + 32]
            if first > 15:
                first -= 16
                high[i] |= 1 << (2 * chunk_index)
            if second > 15:
                second -= 16
                high[i] |= 1 << (2 * chunk_index + 1)
            quants.append(first | (second << 4))
    return bytes(header + high + quants)


def make_qx_quants(x, nmax):
    """rmse_type 1 (weights x^2), as Q6_K calls it."""
    n = len(x)
    amax, signed_max = f32(0), f32(0)
    for value in x:
        if abs(value) > amax:
            amax, signed_max = abs(value), value
    if amax < 1e-15:
        return f32(0), [0] * n
    iscale = f32(-nmax / signed_max)
    sum_lx = sum_l2 = f32(0)
    levels = [0] * n
    for i in range(n):
        level = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        levels[i] = level + nmax
        weight = f32(x[i] * x[i])
        sum_lx = f32(sum_lx + weight * x[i] * level)
        sum_l2 = f32(sum_l2 + weight * level * level)
    scale = f32(sum_lx / sum_l2) if sum_l2 else f32(0)
    best = f32(scale * sum_lx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = f32(-(nmax + f32(0.1) * step) / signed_max)
        sum_lx = sum_l2 = f32(0)
        for i in range(n):
            level = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            weight = f32(x[i] * x[i])
            sum_lx = f32(sum_lx + weight * x[i] * level)
            sum_l2 = f32(sum_l2 + weight * level * level)
        if sum_l2 > 0 and sum_lx * sum_lx > best * sum_l2:
            levels = [nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * value))) for value in x]
            scale = f32(sum_lx / sum_l2)
            best = f32(scale * sum_lx)
    return scale, levels


def q6_k_block(x) -> bytes:
    scales, levels = [], []
    for j in range(16):
        scale, sub_levels = make_qx_quants(x[16 * j:16 * j + 16], 32)
        scales.append(scale)
        levels += sub_levels
    max_scale, max_abs = f32(0), f32(0)
    for scale in scales:
        if abs(scale) > max_abs:
            max_abs, max_scale = abs(scale), scale
    if max_abs < 1e-15:
        return bytes(210)
    iscale = f32(-128 / max_scale)
    d = np.float16(1 / iscale)
    codes = [min(127, nearest_int(iscale * scale)) for scale in scales]
    for j in range(16):
        sub_d = f32(f32(d) * codes[j])
        if not sub_d:
            continue
        for i in range(16):
            levels[16 * j + i] = max(-32, min(31, nearest_int(x[16 * j + i] / sub_d))) + 32
    low, high = [0] * 128, [0] * 64
    for half in range(2):
        base = 128 * half
        for i in range(32):
            a, b, c, e = (levels[base + i + 32 * k] for k in range(4))
            low[64 * half + i] = (a & 0xF) | ((c & 0xF) << 4)
            low[64 * half + i + 32] = (b & 0xF) | ((e & 0xF) << 4)
            high[32 * half + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return bytes(low + high + np.array(codes, dtype=np.int8).view(np.uint8).tolist()
                 + np.array([d], dtype=np.float16).view(np.uint8).tolist())
