"""Patched models compute what unpatched ones do: same loss and LoRA gradients, for every family."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import COMPUTE_DTYPES, DEVICE, assert_matches_unpatched, randomise
from ftcli.architectures import ARCHITECTURES
from ftcli.loader import add_lora
from ftcli.patch import KernelGatedMLP, KernelRMSNorm, RotaryDispatch, apply_kernels, apply_lora_kernels
from ftcli.recipe import LoraSettings
from ftcli.train import collate, summed_token_loss, target_tokens
from ftcli.data.templates import TokenizedExample
from ftcli_kernels import cross_entropy as cross_entropy_kernel
from ftcli_kernels import lora_linear as lora_linear_kernel
from ftcli_kernels import lora_mlp as lora_mlp_kernel
from ftcli_kernels import lora_qkv as lora_qkv_kernel
from ftcli_kernels import rope as rope_kernel
from tiny_models import FAMILIES


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap `module.name` for the test's duration; the returned list grows by one per call."""
    calls, function = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def loss_and_grads(model, batch, fused: bool = False):
    loss = summed_token_loss(model, batch, fused) / target_tokens(batch)
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_unpatched(family, dtype, tiny_model_folder, monkeypatch):
    architecture = ARCHITECTURES[family]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder(family), dtype=torch.float32,
                                                attn_implementation=architecture.attention)
    randomise(base, "norm", 0.3, seed=1)  # Gemma's norms start at zero, which would hide a wrong (1 + w) offset
    base.to(DEVICE, dtype)
    reference = copy.deepcopy(base).float()  # unpatched in float32 on the same (rounded) weights
    patched = copy.deepcopy(base)
    swaps = apply_kernels(patched, architecture)
    counts, layers = swaps.module_counts, base.config.num_hidden_layers
    assert counts["gated_mlp"] == layers and counts["rms_norm"] >= 2 * layers + 1
    assert counts["rope"] == layers and swaps.fused_loss
    assert sum(isinstance(m, KernelRMSNorm) for m in patched.modules()) == counts["rms_norm"]
    assert sum(isinstance(m, KernelGatedMLP) for m in patched.modules()) == layers

    models = [add_lora(m, LoraSettings(r=4, alpha=8), architecture, seed=3) for m in (base, patched, reference)]
    attention_projections = (2 if family == "phi3" else 4) * layers  # phi3 fuses q, k, v into qkv_proj
    stacked = 0 if family == "phi3" else layers
    assert apply_lora_kernels(models[1]) == {"lora_mlp": layers, "lora_qkv": stacked,
                                             "lora_linear": attention_projections - 3 * stacked}
    for model in models:
        randomise(model, "lora_B", 0.05, seed=2)  # LoRA B starts at zero, which would leave A's gradients zero
    generator = torch.Generator().manual_seed(4)
    examples = [TokenizedExample(ids, [-100] * 3 + ids[3:], False)
                for ids in (torch.randint(3, 300, (n,), generator=generator).tolist() for n in (9, 14))]
    batch = collate(examples, 0, DEVICE)

    rope_calls = count_calls(monkeypatch, rope_kernel, "apply_rope")
    fused_calls = count_calls(monkeypatch, cross_entropy_kernel, "fused_linear_cross_entropy")
    lora_calls = count_calls(monkeypatch, lora_linear_kernel, "lora_linear")
    lora_mlp_calls = count_calls(monkeypatch, lora_mlp_kernel, "lora_gated_mlp")
    lora_qkv_calls = count_calls(monkeypatch, lora_qkv_kernel, "lora_projections")
    head_calls = []
    models[1].get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    patched_step = loss_and_grads(models[1], batch, fused=True)
    assert len(rope_calls) == layers  # the RoPE kernel really ran, once per attention layer
    assert len(fused_calls) == 1 and not head_calls  # the loss came from the fused kernel, not the head's logits
    assert len(lora_calls) == attention_projections - 3 * stacked and len(lora_qkv_calls) == stacked
    assert len(lora_mlp_calls) == layers
    unpatched_step = loss_and_grads(models[0], batch)
    assert len(rope_calls) == layers  # the unpatched model, run after it, ran transformers' own RoPE
    reference_step = unpatched_step if dtype == torch.float32 else loss_and_grads(models[2], batch)
    assert_matches_unpatched(dtype, patched_step, unpatched_step, reference_step)


def test_rope_dispatch_is_installed_once_and_falls_back(tiny_model_folder, monkeypatch):
    """However often models are patched, one dispatch wraps transformers' function; inside a patched attention
    module, cos and sin that need gradients (which the kernel does not give) go to transformers' code."""
    from transformers.models.llama import modeling_llama

    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama"), dtype=torch.float32).to(DEVICE)
    patched = copy.deepcopy(base)
    for model in (patched, copy.deepcopy(base)):
        apply_kernels(model, ARCHITECTURES["llama"])
    dispatch = modeling_llama.apply_rotary_pos_emb
    assert isinstance(dispatch, RotaryDispatch) and not isinstance(dispatch.original, RotaryDispatch)

    rope_calls = count_calls(monkeypatch, rope_kernel, "apply_rope")
    hidden = torch.randn(2, 5, base.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cos, sin = base.model.rotary_emb(hidden, torch.arange(5, device=DEVICE)[None])
    attention, patched_attention = base.model.layers[0].self_attn, patched.model.layers[0].self_attn
    want = attention(hidden, (cos, sin), None)[0]
    assert not rope_calls
    torch.testing.assert_close(patched_attention(hidden, (cos, sin), None)[0], want)
    assert len(rope_calls) == 1
    learned = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    torch.testing.assert_close(patched_attention(hidden, learned, None)[0], want)
    assert len(rope_calls) == 1
