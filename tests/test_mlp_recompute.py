"""Under checkpointing, backward runs a layer's forward again only as far as the tensors it keeps: the LoRA MLP's
output (ftcli_kernels/lora_mlp.LoraGatedMLPOutput) is then not computed again where nothing after the MLP keeps a
tensor (Llama), and is where something does (Gemma's norm after the MLP); the gradients are peft's either way."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, lora_model
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
