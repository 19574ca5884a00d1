"""The embedding-row gather from a table in (pinned) CPU memory, against torch's embedding, and the input embedding
module that uses it (ftcli/patch.host_input_embeddings)."""

import pytest
import torch

from conftest import DEVICE, lora_model
from ftcli.patch import HostEmbedding, host_input_embeddings
from ftcli_kernels.embedding_rows import embedding_rows, embedding_rows_reference


def host_table(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    table = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)).to(dtype)
    return table.pin_memory() if DEVICE.type == "cuda" else table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows, width, ids_shape", [(50, 64, (2, 7)), (300, 1500, (3, 5)), (7, 3, (11,))])
def test_rows_equal_torchs_embedding(rows, width, ids_shape, dtype):
    """Widths under, over and not a multiple of a program's 1,024 columns; ids repeated and in any order."""
    table = host_table(rows, width, dtype)
    ids = torch.randint(0, rows, ids_shape, generator=torch.Generator().manual_seed(width)).to(DEVICE)
    got = embedding_rows(ids, table, DEVICE)
    assert got.device.type == DEVICE.type and got.shape == (*ids_shape, width) and got.dtype == dtype
    assert torch.equal(got, embedding_rows_reference(ids, table))  # a copy: bit for bit


def test_ids_outside_the_table_give_zero_rows():
    table = host_table(10, 8, torch.float32)
    got = embedding_rows(torch.tensor([3, -1, 10, 9], device=DEVICE), table, DEVICE)
    assert torch.equal(got[[0, 3]], table[[3, 9]].to(DEVICE)) and torch.equal(got[1:3], torch.zeros(2, 8, device=DEVICE))


def test_bad_tables_fail_loudly():
    ids = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="one contiguous"):
        embedding_rows(ids, torch.randn(4, 6).t(), DEVICE)
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="only from pinned CPU memory"):
            embedding_rows(ids, torch.randn(4, 6), DEVICE)


def test_a_hosted_input_embedding_gives_the_models_logits(tiny_model_folder):
    """Llama's untied table goes to CPU memory and the logits stay the same; Qwen3's head shares its table, so it
    stays, as does Gemma's scaled embedding (not a plain nn.Embedding)."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=False, device=DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert host_input_embeddings(model)
        hosted = model.get_input_embeddings()
        assert isinstance(hosted, HostEmbedding) and hosted.weight.device.type == "cpu"
        assert hosted.weight.is_pinned() == (DEVICE.type == "cuda")
        assert torch.equal(model(input_ids=ids).logits, want)
    for family in ("qwen3", "gemma"):
        other, _ = lora_model(tiny_model_folder(family), family, kernels=False, device=DEVICE)
        assert not host_input_embeddings(other), family
        assert not isinstance(other.get_input_embeddings(), HostEmbedding)
