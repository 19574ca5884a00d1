"""Patched models compute what unpatched ones do: same loss and LoRA gradients, for every family."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftcli.architectures import ARCHITECTURES
from ftcli.loader import add_lora
from ftcli.patch import KernelGatedMLP, KernelRMSNorm, apply_kernels
from ftcli.recipe import LoraSettings
from ftcli.train import collate, summed_token_loss, target_tokens
from ftcli.data.templates import TokenizedExample
from tiny_models import FAMILIES


def randomise(model, pattern: str, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if pattern in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def loss_and_grads(model, batch):
    loss = summed_token_loss(model, batch) / target_tokens(batch)
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_unpatched(family, tiny_model_folder):
    architecture = ARCHITECTURES[family]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder(family), dtype=torch.float32,
                                                attn_implementation=architecture.attention)
    randomise(base, "norm", 0.3, seed=1)  # Gemma's norms start at zero, which would hide a wrong (1 + w) offset
    patched = copy.deepcopy(base)
    swapped = apply_kernels(patched, architecture)
    layers = base.config.num_hidden_layers
    assert swapped["gated_mlp"] == layers and swapped["rms_norm"] >= 2 * layers + 1
    assert sum(isinstance(m, KernelRMSNorm) for m in patched.modules()) == swapped["rms_norm"]
    assert sum(isinstance(m, KernelGatedMLP) for m in patched.modules()) == layers

    models = [add_lora(m, LoraSettings(r=4, alpha=8), architecture, seed=3) for m in (base, patched)]
    for model in models:
        randomise(model, "lora_B", 0.05, seed=2)  # LoRA B starts at zero, which would leave A's gradients zero
    generator = torch.Generator().manual_seed(4)
    examples = [TokenizedExample(ids, [-100] * 3 + ids[3:], False)
                for ids in (torch.randint(3, 300, (n,), generator=generator).tolist() for n in (9, 14))]
    batch = collate(examples, 0, torch.device("cpu"))

    (loss, grads), (patched_loss, patched_grads) = (loss_and_grads(m, batch) for m in models)
    assert patched_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == patched_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
