"""The rows of an embedding table for a batch of token ids, read by the GPU from a table in pinned CPU memory.

An input embedding is read one row per token, once a step: 4,096 tokens of Llama-3-8B read 32 MiB of its 1 GiB
table. Pinned CPU memory is mapped into the GPU's address space, so a kernel can read those rows over the bus
(about 0.6 ms at 54 GB/s) and the table need not take GPU memory at all. The ids stay on the GPU, so this works
inside a CUDA graph, where a copy of the ids to the host could not. Without autograd: the table is frozen.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns a program copies


@triton.jit
def _gather(table_ptr, ids_ptr, out_ptr, table_rows, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(ids_ptr + row).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < width
    # An id outside the table (which tokenizing never gives) reads nothing: its row comes out zero
    tokens = tl.full((BLOCK,), 0, tl.int64) + token  # as a block, so the mask is one
    in_table = (tokens >= 0) & (tokens < table_rows)
    values = tl.load(table_ptr + tokens * width + cols, mask=in_row & in_table, other=0.0)
    tl.store(out_ptr + row * width + cols, values, mask=in_row)


def embedding_rows(ids: torch.Tensor, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """table[ids] on `device`, shaped ids.shape + (width,): `table` (rows, width) contiguous, in pinned CPU memory
    when `device` is a GPU (or on the CPU itself, where Triton's interpreter runs), `ids` on `device`."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"embedding_rows: the table must be one contiguous (rows, width) matrix, got "
                         f"{tuple(table.shape)} with strides {table.stride()}")
    if device.type == "cuda" and not table.is_pinned():
        raise ValueError("embedding_rows: a GPU reads the table over the bus only from pinned CPU memory: pass "
                         "table.pin_memory()")
    ids = ids.to(device).contiguous()
    out = torch.empty(*ids.shape, table.shape[1], dtype=table.dtype, device=device)
    grid = (ids.numel(), triton.cdiv(table.shape[1], BLOCK))
    _gather[grid](table, ids, out, table.shape[0], table.shape[1], BLOCK=BLOCK)
    return out


def embedding_rows_reference(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: every id within the table."""
    return torch.nn.functional.embedding(ids.cpu(), table).to(ids.device)
