"""Under checkpointing, backward runs a layer's forward again only as far as the tensors it keeps: the LoRA MLP's
output (ftcli_kernels/lora_mlp.LoraGatedMLPOutput) is then not computed again where nothing after the MLP keeps a
tensor (Llama), and is where something does (Gemma's norm after the MLP); the gradients are peft's either way."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, lora_model
from ftcli.activation_checkpointing import OffloadedCheckpoint, host_mlp_activations
from ftcli_kernels import lora_mlp


def loss_and_grads(model, input_ids):
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tile_rows", [0, 5], ids=["whole", "tiles"])
@pytest.mark.parametrize("checkpointing", [True, "offload"])
@pytest.mark.parametrize("family, computed_again", [("llama", False), ("gemma3_text", True)])
def test_recompute_leaves_out_the_mlp_output_where_nothing_keeps_it(family, computed_again, checkpointing, tile_rows,
                                                                    tiny_model_folder, monkeypatch):
    monkeypatch.setattr(lora_mlp, "mlp_tile_rows", lambda rows, inner, element_size: tile_rows)
    outputs, forward = [], lora_mlp.LoraGatedMLPOutput.forward

    def counted(ctx, *args):
        outputs.append(args[6])  # tile_rows, so the count is of the path under test
        return forward(ctx, *args)

    monkeypatch.setattr(lora_mlp.LoraGatedMLPOutput, "forward", staticmethod(counted))
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(3, 300, (2, 11), generator=generator).to(DEVICE)  # 22 rows: tiles of 5, 2
    model, _ = lora_model(tiny_model_folder(family), family, kernels=True, checkpointing=checkpointing, device=DEVICE)
    loss, grads = loss_and_grads(model, input_ids)
    layers = model.config.num_hidden_layers
    assert outputs == [tile_rows] * (2 * layers if computed_again else layers)

    reference, _ = lora_model(tiny_model_folder(family), family, kernels=False, checkpointing=checkpointing,
                              device=DEVICE)
    want_loss, want_grads = loss_and_grads(reference, input_ids)
    assert loss == pytest.approx(want_loss, rel=1e-5)  # float32: kernels against peft, rounding only
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("where, checkpointing", [("cpu", "offload"), ("cpu", True), ("gpu", "offload"), ("gpu", True)])
@pytest.mark.parametrize("family, hosted", [("llama", 1), ("qwen3", 1), ("gemma3_text", 0)])
def test_hosted_mlps_are_not_computed_again(family, hosted, where, checkpointing, tiny_model_folder, monkeypatch):
    """host_mlp_activations on the 2-layer model: the lower layer's MLP keeps its saved tensors outside the
    checkpoint, in CPU memory (every=1) or where they are (on_gpu=1), under offload or plain recompute (through
    OffloadedCheckpoint with every input on the device), and backward uses them instead of running the MLP again;
    the loss and gradients are those without it, exactly (the same arithmetic, its tensors from the forward instead
    of a recompute). Gemma's norm after the MLP keeps the MLP's output, so its recompute goes through the MLP anyway:
    no layer is chosen there."""
    monkeypatch.setattr(lora_mlp, "mlp_tile_rows", lambda rows, inner, element_size: 0)
    runs, forward = [], lora_mlp.LoraGatedMLPFunction.forward

    def counted(ctx, *args):
        runs.append(torch.is_grad_enabled())
        return forward(ctx, *args)

    monkeypatch.setattr(lora_mlp.LoraGatedMLPFunction, "forward", staticmethod(counted))
    input_ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    folder = tiny_model_folder(family)
    plain, _ = lora_model(folder, family, kernels=True, checkpointing=checkpointing, device=DEVICE)
    want_loss, want_grads = loss_and_grads(plain, input_ids)
    assert len(runs) == 2 * 2  # forward and recompute of each layer
    runs.clear()

    model, _ = lora_model(folder, family, kernels=True, checkpointing=checkpointing, keeps_blocks=True, device=DEVICE)
    chosen = host_mlp_activations(model, every=1, on_gpu=0) if where == "cpu" else \
        host_mlp_activations(model, every=0, on_gpu=1)
    assert chosen == ((0, hosted) if where == "cpu" else (hosted, 0))
    copies = []
    copy_to_host = OffloadedCheckpoint._copy_to_host
    monkeypatch.setattr(OffloadedCheckpoint, "_copy_to_host",
                        lambda self, saved, tensor, in_flight: copies.append(tuple(tensor.shape)) or
                        copy_to_host(self, saved, tensor, in_flight))
    loss, grads = loss_and_grads(model, input_ids)
    assert len(runs) == 2 * 2 - hosted  # each layer's forward, and the recompute where not chosen
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    mlp_saves = [(2, 11, hidden), (22, inner), (22, inner)]  # x, gate, up: what the MLP keeps whole (not tiled)
    in_host_memory = hosted if where == "cpu" else 0
    offloaded = [(2, 11, hidden)] * 2 if checkpointing == "offload" else []
    assert sorted(copies) == sorted(offloaded + mlp_saves * in_host_memory)  # the layer inputs, the MLPs'
    assert loss == want_loss
    for name, grad in want_grads.items():
        assert torch.equal(grads[name], grad), name
