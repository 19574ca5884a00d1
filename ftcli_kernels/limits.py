"""What ftcli's kernels take and hold at once, importable without Triton: patch.py checks inputs against it before
calling a kernel, and plan.py estimates memory with it on machines that have no Triton."""

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGITS_CHUNK_BYTES = 256 * 2**20  # logits the fused head and cross-entropy hold at once
MLP_BACKWARD_CHUNK_BYTES = 64 * 2**20  # one gate-wide temporary of the LoRA MLP's backward, a chunk of rows of it
MLP_TILE_THRESHOLD_BYTES = 2**30  # a gate-wide tensor of the whole input above this: the LoRA MLP goes tile by tile
MLP_TILE_BYTES = 256 * 2**20  # one gate-wide temporary of a tile


def mlp_tile_rows(rows: int, inner: int, element_size: int) -> int:
    """Rows of one tile of the LoRA MLP over `rows` rows of an `inner`-wide gate, or 0 when it runs whole: tiles
    keep long sequences from holding full-length gate and up tensors, at the cost of recomputing them in backward."""
    if rows * inner * element_size <= MLP_TILE_THRESHOLD_BYTES:
        return 0
    return max(1, MLP_TILE_BYTES // (inner * element_size))


def require_kernel_dtype(op: str, dtype: torch.dtype) -> None:
    """Fail loudly on a dtype the kernels do not take (float64, integers), rather than compute in the wrong one."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {dtype}; the kernels take float32, bfloat16 and float16")
