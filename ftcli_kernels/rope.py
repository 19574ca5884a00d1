"""Rotary position embedding of queries and keys in one Triton launch, forward and backward.

Transformers' `apply_rotary_pos_emb` builds `rotate_half(x)` with a slice and a concatenation, multiplies and
adds in four more kernels, and does it all twice (queries, then keys). Here one program per (batch, position)
reads that position's cos and sin once and rotates every query and key head with them, straight from the
strided views the attention module hands over, so nothing is copied to make it contiguous first.

The math is Hugging Face's "rotate_half" convention: with the first `rotary_dim` features split into halves
x1 and x2, the result is (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), and features past `rotary_dim` pass through
unchanged (Phi-3's partial rotary). cos and sin are whatever the model's rotary embedding module returned, so
every rope scaling type works; the two halves of cos and sin are not assumed equal. Backward applies the
transpose, (dy1 cos1 + dy2 sin2, dy2 cos2 - dy1 sin1), which is the rotation by -angle when the halves are equal.
"""

import torch
import triton
import triton.language as tl

from ftcli_kernels.limits import KERNEL_DTYPES

SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)  # float64 is computed in float64
TILE = 2048  # heads x half-width values one loop step rotates: two such tiles in and out stay in registers


@triton.jit
def _rotate_heads(x_ptr, y_ptr, n_heads, x_head_stride, y_head_stride, cos1, cos2, sin1, sin2,
                  HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    """Rotate the `n_heads` heads of one position; x_ptr and y_ptr point at that position's first head."""
    half = tl.arange(0, BLOCK_HALF)
    tail = tl.arange(0, BLOCK_PASS)
    heads = tl.arange(0, BLOCK_H)
    for first in range(0, n_heads, BLOCK_H):
        head = first + heads
        mask = (head < n_heads)[:, None] & (half < HALF)[None, :]
        x_at = x_ptr + head[:, None] * x_head_stride + half[None, :]
        y_at = y_ptr + head[:, None] * y_head_stride + half[None, :]
        x1 = tl.load(x_at, mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(COMPUTE)
        if BACKWARD:
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        tl.store(y_at, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_at + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)
        if PASS > 0:
            tail_mask = (head < n_heads)[:, None] & (tail < PASS)[None, :]
            passed = tl.load(x_ptr + head[:, None] * x_head_stride + 2 * HALF + tail[None, :], mask=tail_mask)
            tl.store(y_ptr + head[:, None] * y_head_stride + 2 * HALF + tail[None, :],
                     passed.to(y_ptr.dtype.element_ty), mask=tail_mask)


@triton.jit
def _rope(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len, q_heads, kv_heads,
          q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss,
          cos_sb, cos_ss, sin_sb, sin_ss,
          HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
          BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0)
    b = (row // seq_len).to(tl.int64)
    s = (row % seq_len).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    in_half = half < HALF
    cos_at = cos_ptr + b * cos_sb + s * cos_ss + half
    sin_at = sin_ptr + b * sin_sb + s * sin_ss + half
    cos1 = tl.load(cos_at, mask=in_half, other=0.0).to(COMPUTE)[None, :]
    cos2 = tl.load(cos_at + HALF, mask=in_half, other=0.0).to(COMPUTE)[None, :]
    sin1 = tl.load(sin_at, mask=in_half, other=0.0).to(COMPUTE)[None, :]
    sin2 = tl.load(sin_at + HALF, mask=in_half, other=0.0).to(COMPUTE)[None, :]
    _rotate_heads(q_ptr + b * q_sb + s * q_ss, q_out_ptr + b * qo_sb + s * qo_ss, q_heads, q_sh, qo_sh,
                  cos1, cos2, sin1, sin2, HALF, PASS, BLOCK_H, BLOCK_HALF, BLOCK_PASS, BACKWARD, COMPUTE)
    _rotate_heads(k_ptr + b * k_sb + s * k_ss, k_out_ptr + b * ko_sb + s * ko_ss, kv_heads, k_sh, ko_sh,
                  cos1, cos2, sin1, sin2, HALF, PASS, BLOCK_H, BLOCK_HALF, BLOCK_PASS, BACKWARD, COMPUTE)


def _launch(q, k, cos, sin, out_dtype: torch.dtype, backward: bool):
    """Rotated (or, for backward, transposed-rotated) copies of q and k, laid out as q and k are."""
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads, rotary_dim = k.shape[1], cos.shape[-1]
    q_out = torch.empty_like(q, dtype=out_dtype)
    k_out = torch.empty_like(k, dtype=out_dtype)
    half, passed = rotary_dim // 2, head_dim - rotary_dim
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(q_heads, kv_heads)), max(1, TILE // block_half))
    compute = tl.float64 if torch.float64 in (q.dtype, cos.dtype, sin.dtype) else tl.float32

    def batch_stride(t):  # cos and sin of batch 1 serve every sequence of the batch
        return t.stride(0) if t.shape[0] > 1 else 0

    _rope[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin, seq_len, q_heads, kv_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        batch_stride(cos), cos.stride(1), batch_stride(sin), sin.stride(1),
        HALF=half, PASS=passed, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(max(passed, 1)), BACKWARD=backward, COMPUTE=compute)
    return q_out, k_out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # the result type of transformers' `q * cos + rotate_half(q) * sin`, e.g. float32 for bfloat16 q under autocast
        out_dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = q.dtype
        return _launch(q, k, cos, sin, out_dtype, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _launch(dq, dk, cos, sin, ctx.in_dtype, backward=True)
        return dq_in, dk_in, None, None


def unsupported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str:
    """Why the kernel cannot take these inputs, or "" when it can; callers may fall back to transformers' code."""
    tensors = {"q": q, "k": k, "cos": cos, "sin": sin}
    for name, tensor in tensors.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"{name} has unsupported dtype {tensor.dtype}"
    if q.dtype != k.dtype:
        return f"q and k differ in dtype ({q.dtype} and {k.dtype})"
    if len({tensor.device for tensor in tensors.values()}) > 1:
        return "q, k, cos and sin are not all on one device"
    if q.dim() != 4 or k.dim() != 4:
        return f"q and k must be (batch, heads, seq, head_dim), got shapes {tuple(q.shape)} and {tuple(k.shape)}"
    if cos.dim() != 3 or cos.shape != sin.shape:
        return f"cos and sin must share one (batch, seq, rotary_dim) shape: {tuple(cos.shape)}, {tuple(sin.shape)}"
    batch, _, seq_len, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim"
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
        return f"cos and sin {tuple(cos.shape)} do not fit q's batch {batch} and seq {seq_len}"
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        return f"rotary_dim {rotary_dim} must be even and within head_dim {head_dim}"
    if cos.requires_grad or sin.requires_grad:
        return "cos and sin require gradients, which the kernel does not compute"
    return ""


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (batch, q_heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim) by cos and sin
    (batch or 1, seq, rotary_dim), as transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`."""
    problem = unsupported(q, k, cos, sin)
    if problem:
        raise ValueError(f"rope: {problem}")
    return RopeFunction.apply(q, k, cos, sin)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Plain PyTorch in the inputs' dtype, written as transformers writes it (Phi-3's version, with the tail)."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x1, x2 = x_rot[..., :rotary_dim // 2], x_rot[..., rotary_dim // 2:]
        return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)
