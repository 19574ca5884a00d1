"""Micro-batches replayed as CUDA graphs (ftcli/step_graph.py) against the same micro-batches run op by op: the same
losses and gradients over two steps of two micro-batches each (different tokens, ignored labels, gradients adding up
within a step, the adapters changed in place between steps), under plain and offloaded checkpointing, with the
kernels (on a GPU only: CUDA graphs need one); and the maskless causal attention a captured model attends through,
against its own SDPA attention, where it applies and where a sliding window rules it out."""

import pytest
import torch

from conftest import DEVICE, lora_model
from ftcli.step_graph import CAUSAL_ATTENTION, GraphedMicroBatch, causal_attention
from ftcli.train import summed_token_loss, target_tokens


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """Four batches of one shape (so one graph serves them), a fifth of labels ignored."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(4):
        input_ids = torch.randint(3, 300, (2, 16), generator=generator)
        labels = input_ids.clone()
        labels[torch.rand(labels.shape, generator=generator) < 0.2] = -100
        batches.append({"input_ids": input_ids.to(DEVICE), "labels": labels.to(DEVICE)})
    return batches


def train(model, run_micro_batch) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Two steps of two micro-batches; after each step the gradients are read, zeroed in place, and the adapters
    moved as an optimizer would."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches, losses, grads = micro_batches(), [], []
    for step in range(2):
        pair = batches[2 * step:2 * step + 2]
        targets = sum(target_tokens(batch) for batch in pair)
        for batch in pair:
            losses.append(float(run_micro_batch(batch, 1 / targets)))
        grads.append([p.grad.clone() for p in trainable])
        with torch.no_grad():
            for p in trainable:
                p.grad.zero_()
                p.add_(p.grad.new_full(p.shape, 0.01 * (step + 1)))
    return losses, grads


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [True, "offload"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_graph_replays_give_the_eager_losses_and_gradients(family, checkpointing, tiny_model_folder):
    def eager(model):
        def run(batch, scale):
            loss = summed_token_loss(model, batch, fused=True) * scale
            loss.backward()
            return loss
        return run

    model, _ = lora_model(tiny_model_folder(family), family, kernels=True, checkpointing=checkpointing, device=DEVICE)
    want_losses, want_grads = train(model, eager(model))

    model, _ = lora_model(tiny_model_folder(family), family, kernels=True, checkpointing=checkpointing, device=DEVICE)
    trainable = [p for p in model.parameters() if p.requires_grad]
    graphed = GraphedMicroBatch(model, lambda batch: summed_token_loss(model, batch, fused=True), trainable)
    losses, grads = train(model, graphed)

    assert len(graphed._graphs) == 1  # one shape, captured once, replayed four times
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert len(set(losses)) == 4  # each replay read its own batch
    for step_grads, step_want in zip(grads, want_grads):
        for grad, want in zip(step_grads, step_want):
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in grads[1])


@pytest.mark.parametrize("family, length, padded, used", [
    ("llama", 24, False, True), ("llama", 24, True, False), ("mistral", 24, False, False), ("mistral", 12, False, True)])
def test_causal_attention_gives_the_models_own_logits_where_it_applies(family, length, padded, used, tiny_model_folder):
    """Mistral's tiny model has a sliding window of 16 tokens (tests/tiny_models.py): over 24 tokens a maskless causal
    attention would be wrong, so the model keeps its own; over 12 the window changes nothing. A padded batch keeps
    its mask."""
    model, _ = lora_model(tiny_model_folder(family), family, kernels=False)
    model.config.get_text_config()._attn_implementation = "sdpa"
    input_ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids}
    if padded:
        batch["attention_mask"] = torch.ones_like(input_ids)
        batch["attention_mask"][1, length // 2:] = 0
    with torch.no_grad():
        want = model(**batch).logits
        with causal_attention(model, batch):
            implementation = model.config.get_text_config()._attn_implementation
            logits = model(**batch).logits
    assert (implementation == CAUSAL_ATTENTION) == used
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
