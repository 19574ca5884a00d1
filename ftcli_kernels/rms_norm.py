"""RMSNorm as one Triton pass forward and one backward, for Llama's `w * x_hat` and Gemma's `(1 + w) * x_hat`.

PyTorch's version reads the input several times and keeps float32 copies alive for backward; here each row
is read once, normalised in float32 registers, and only the per-row inverse RMS (one float) is saved.
"""

import torch
import triton
import triton.language as tl

from ftcli_kernels.limits import require_kernel_dtype

MAX_FUSED_WIDTH = 65536


@triton.jit
def _forward(x_ptr, w_ptr, y_ptr, rstd_ptr, stride, n_cols, eps, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * stride + cols, (x * rstd * (w + offset)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, stride, n_rows, n_cols, offset,
              rows_per_program, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        dy_w = dy * w
        dx = rstd * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / n_cols))
        tl.store(dx_ptr + row * stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_partial_ptr + program * n_cols + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2d.shape
        if n_cols > MAX_FUSED_WIDTH:
            raise ValueError(f"rms_norm: hidden size {n_cols} is over the fused kernel's limit {MAX_FUSED_WIDTH}")
        block = triton.next_power_of_2(n_cols)
        # In x's shape (rows as contiguous as x2d's) and returned as it is: FSDP warns of a view leaving a sharded model
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _forward[(n_rows,)](x2d, weight, y, rstd, x2d.stride(0), n_cols, eps, offset, BLOCK=block,
                            num_warps=_warps(block))
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.block = offset, block
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        dy2d = dy.reshape(-1, n_cols).contiguous()
        programs = min(n_rows, _program_count(x2d.device))
        rows_per_program = triton.cdiv(n_rows, programs)
        dx = torch.empty_like(x2d)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2d.device)
        _backward[(programs,)](dy2d, x2d, weight, rstd, dx, dw_partial, x2d.stride(0), n_rows, n_cols, ctx.offset,
                               rows_per_program, BLOCK=ctx.block, num_warps=_warps(ctx.block))
        dw = dw_partial.sum(0).to(weight.dtype) if weight.requires_grad else None
        return dx.reshape(dy.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Normalise the last dimension by its RMS and scale by `offset + weight` (offset 1 for Gemma)."""
    require_kernel_dtype("rms_norm", x.dtype)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    return RMSNormFunction.apply(x, weight, eps, offset)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch, all in float32, cast back to the input dtype once at the end."""
    x32 = x.float()
    normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normalised * (weight.float() + offset)).to(x.dtype)


def _warps(block: int) -> int:
    """Enough warps that each thread holds at most 16 values of a row: wide rows stay in registers and in flight."""
    return max(1, min(16, block // (32 * 16)))


def _program_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 8
