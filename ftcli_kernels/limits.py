"""What ftcli's kernels take and hold at once, importable without Triton: patch.py checks inputs against it before
calling a kernel, and plan.py estimates memory with it on machines that have no Triton."""

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGITS_CHUNK_BYTES = 256 * 2**20  # logits the fused head and cross-entropy hold at once
MLP_BACKWARD_CHUNK_BYTES = 64 * 2**20  # one gate-wide temporary of the LoRA MLP's backward, a chunk of rows of it


def require_kernel_dtype(op: str, dtype: torch.dtype) -> None:
    """Fail loudly on a dtype the kernels do not take (float64, integers), rather than compute in the wrong one."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {dtype}; the kernels take float32, bfloat16 and float16")
