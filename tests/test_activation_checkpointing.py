"""Offloaded checkpointing computes what no checkpointing and plain recompute do, and saves only a copy of each
layer's input; on the CPU the same steps run with plain copies."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from conftest import randomise, run_cli, write_jsonl, write_recipe
from ftcli.architectures import ARCHITECTURES
from ftcli.activation_checkpointing import OffloadedCheckpoint, enable_checkpointing
from ftcli.data.templates import TokenizedExample
from ftcli.loader import add_lora
from ftcli.recipe import LoraSettings
from ftcli.train import collate, summed_token_loss, target_tokens
from tiny_models import FAMILIES

MODES = [False, True, "offload"]


def lora_model(folder, family: str, mode, dropout: float = 0.0, layers_on_gpu: int = 0):
    architecture = ARCHITECTURES[family]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation=architecture.attention).requires_grad_(False)
    enable_checkpointing(model, mode, layers_on_gpu)
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout), architecture, seed=3)
    randomise(model, "lora_B", 0.05, seed=2)
    return model.train()


def batch_of_two():
    generator = torch.Generator().manual_seed(4)
    examples = [TokenizedExample(ids, [-100] * 3 + ids[3:], False)
                for ids in (torch.randint(3, 300, (n,), generator=generator).tolist() for n in (9, 30))]
    return collate(examples, 0, torch.device("cpu"))


def loss_and_grads(model, batch, seed: int = 1):
    torch.manual_seed(seed)  # the dropout masks
    loss = summed_token_loss(model, batch) / target_tokens(batch)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def offloads(monkeypatch):
    """What every OffloadedCheckpoint saves, as (tensor, what it was packed into), and what it brings back."""
    record = SimpleNamespace(packed=[], unpacked=[])
    pack, unpack = OffloadedCheckpoint.pack, OffloadedCheckpoint.unpack

    def pack_spy(self, tensor):
        result = pack(self, tensor)
        if tensor.numel():
            record.packed.append((tensor, result))
        return result

    def unpack_spy(self, saved):  # (what was brought back, whether it was on the device already)
        if not isinstance(saved, torch.Tensor):
            record.unpacked.append((saved, saved.on_device is not None))
        return unpack(self, saved)

    monkeypatch.setattr(OffloadedCheckpoint, "pack", pack_spy)
    monkeypatch.setattr(OffloadedCheckpoint, "unpack", unpack_spy)
    return record


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_offload_gives_the_loss_and_gradients_of_no_and_plain_checkpointing(family, tiny_model_folder, offloads):
    """With LoRA dropout on, so the recompute must draw the forward's dropout masks again."""
    batch = batch_of_two()
    results = {mode: loss_and_grads(lora_model(tiny_model_folder(family), family, mode, dropout=0.2), batch)
               for mode in MODES}
    layers = AutoConfig.from_pretrained(tiny_model_folder(family)).num_hidden_layers
    assert len(offloads.packed) == layers  # offload really ran, once per layer

    loss, grads = results[False]
    assert grads and all(grad.abs().max() > 0 for grad in grads.values())
    for mode in (True, "offload"):
        mode_loss, mode_grads = results[mode]
        assert mode_loss == pytest.approx(loss, rel=1e-7), mode
        assert mode_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(mode_grads[name], grad, rtol=1e-6, atol=1e-8, msg=f"{mode} {name}")


def test_dropout_masks_change_the_gradients(tiny_model_folder):
    """The control that makes the dropout comparison above meaningful: other masks give other gradients."""
    batch = batch_of_two()
    _, first = loss_and_grads(lora_model(tiny_model_folder("llama"), "llama", False, dropout=0.2), batch, seed=1)
    _, second = loss_and_grads(lora_model(tiny_model_folder("llama"), "llama", False, dropout=0.2), batch, seed=2)
    assert max(float((first[name] - second[name]).abs().max()) for name in first) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_what_autograd_keeps_of_each_layer(mode, tiny_model_folder, offloads):
    """Offload keeps nothing inside a layer and no live layer input, only a CPU copy of each input.

    No checkpointing and plain recompute are the controls: the same inspection sees their activations, and
    the live layer inputs that plain recompute keeps.
    """
    model = lora_model(tiny_model_folder("gemma3_text"), "gemma3_text", mode)  # two kinds of rotary embedding
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    inputs, depth, saved = [], [0], []

    def enter(module, args):
        inputs.append(args[0])
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    for layer in layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)

    def keep(tensor):  # every tensor autograd saves that no inner hook (checkpoint's, offload's) takes
        saved.append((depth[0] > 0, tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = summed_token_loss(model, batch_of_two())
    inputs = inputs[:len(layers)]  # transformers versions that checkpoint __call__ run the hooks again in backward
    assert len(inputs) == len(layers) == 2
    live = {storage(tensor) for tensor in inputs}
    inside = [tensor for in_layer, tensor in saved if in_layer]
    kept_live = {storage(tensor) for _, tensor in saved} & live

    if mode is False:
        assert len(inside) > 20 * len(layers) and not offloads.packed
    elif mode is True:
        assert all(storage(tensor) in live for tensor in inside) and not offloads.packed
        assert kept_live == live
    else:
        assert inside == [] and kept_live == set()
        assert len(offloads.packed) == len(layers)  # the hidden state; mask, cos/sin and positions by reference
        for (tensor, packed), layer_input in zip(offloads.packed, inputs):
            assert tensor is layer_input or storage(tensor) == storage(layer_input)
            assert packed.host.device.type == "cpu" and storage(packed.host) != storage(layer_input)
            assert torch.equal(packed.host, layer_input)

    loss.backward()
    if mode == "offload":
        # Backward brings each input back once, last layer first; each one after the first was prefetched
        # while the layer after it recomputed
        assert [saved for saved, _ in offloads.unpacked] == [saved for _, saved in reversed(offloads.packed)]
        assert [prefetched for _, prefetched in offloads.unpacked] == [False] + [True] * (len(layers) - 1)


def test_a_recipe_with_offload_trains_as_without_checkpointing(tmp_path, tiny_model_folder, offloads):
    """Eager steps, so every step packs (graphs replayed with offload: tests/test_step_graph.py)."""
    rows = [{"messages": [{"role": "user", "content": f"Say the number {n}."},
                          {"role": "assistant", "content": f"The number is {n}."}]} for n in range(4)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    losses = {}
    for mode in (False, "offload"):
        out = tmp_path / f"out-{mode}"
        recipe = write_recipe(tmp_path / f"{mode}.yaml", tiny_model_folder("qwen3"), data, out,
                              lora={"dropout": 0.1}, train={"gradient_checkpointing": mode, "cuda_graphs": False})
        result = run_cli("train", recipe, "--json")
        assert result.exit_code == 0, result.output
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert f"gradient_checkpointing: {str(mode).lower()}" in (out / "recipe.yaml").read_text()
    assert len(offloads.packed) == 3 * 2  # 3 steps of one micro-batch, 2 layers
    assert losses["offload"] == pytest.approx(losses[False], rel=1e-6)


def test_a_forwards_first_offloaded_input_names_none_of_the_forward_before(tiny_model_folder, offloads):
    """Backward brings back the input saved before each one it unpacks. That chain must stop at a forward's first
    offloaded input even while the step before's inputs are still alive (the spy keeps them here), or backward
    copies one of them back for nothing, and inside a CUDA graph leaves that copy unjoined."""
    model = lora_model(tiny_model_folder("llama"), "llama", "offload", layers_on_gpu=1)
    for step in range(2):
        loss_and_grads(model, batch_of_two())
        model.zero_grad(set_to_none=True)
    offloaded = [packed for _, packed in offloads.packed if not isinstance(packed, torch.Tensor)]
    assert len(offloaded) == 2  # the top layer's input of each step; the bottom one's stays on the device
    assert [packed.previous for packed in offloaded] == [None, None]


def test_the_first_layers_inputs_can_stay_on_the_device(tiny_model_folder, offloads):
    """layers_on_gpu=1 of 2: in each of two steps the bottom layer's input is kept as it is and only the top one's
    goes to host memory, with the loss and gradients of offloading both."""
    batch = batch_of_two()
    both = lora_model(tiny_model_folder("llama"), "llama", "offload")
    split = lora_model(tiny_model_folder("llama"), "llama", "offload", layers_on_gpu=1)
    for step in range(2):
        del offloads.packed[:]
        loss, grads = loss_and_grads(both, batch)
        assert [type(packed).__name__ for _, packed in offloads.packed] == ["_Offloaded"] * 2
        del offloads.packed[:]
        split_loss, split_grads = loss_and_grads(split, batch)
        (bottom, bottom_packed), (_, top_packed) = offloads.packed
        assert bottom_packed is bottom and top_packed.host.device.type == "cpu", step
        assert split_loss == loss
        for name, grad in grads.items():
            assert torch.equal(split_grads[name], grad), name
        both.zero_grad(set_to_none=True)
        split.zero_grad(set_to_none=True)


def test_a_hosted_tensor_comes_back_laid_out_as_it_left():
    """An attention kernel's output is (batch, heads, tokens, head_dim) laid out as (batch, tokens, heads, head_dim).
    It waits in CPU memory in that order and comes back with its strides, which cuDNN's attention backward reads as
    they were (from a contiguous copy it gave wrong gradients on an H200); a tensor in its dimensions' order is
    copied as it is."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = OffloadedCheckpoint()
    output = torch.randn(2, 11, 4, 16, generator=torch.Generator().manual_seed(0)).to(device).transpose(1, 2)
    plain = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1)).to(device)
    hosted_output, hosted_plain = checkpoint.host(output), checkpoint.host(plain)
    assert hosted_output.host.shape == (2, 11, 4, 16) and hosted_plain.host.shape == plain.shape
    checkpoint._release_copied(checkpoint._in_flight)  # as the forward's next layer does: the copies are all there is
    for sent, hosted in ((output, hosted_output), (plain, hosted_plain)):
        assert hosted.on_device is None
        back = checkpoint.unpack(hosted)
        assert back.stride() == sent.stride() and torch.equal(back, sent)
