"""LoRA kernels inside models: NF4 bases, checkpointing, saved adapters, and the states left to peft.

tests/test_patch.py checks every family over 16- and 32-bit bases; here are the cases that need a 4-bit base or
peft's own machinery (saving, loading, disabling adapters). All run on conftest.DEVICE.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import COMPUTE_DTYPES, DEVICE, assert_matches_unpatched, lora_model
from ftcli.patch import KernelLoraLinear, KernelLoraGatedMLP, _lora_parts, dequantize_mlp_weights_once
from ftcli_kernels import lora_linear as lora_linear_kernel
from ftcli_kernels import lora_qkv as lora_qkv_kernel


def batch() -> torch.Tensor:
    return torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)


def loss_and_grads(model, input_ids):
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_training(model, unpatched, reference=None, dtype: torch.dtype = torch.float32) -> None:
    """`model` takes the step `unpatched` takes (conftest.assert_matches_unpatched); in bfloat16 both are measured
    against `reference`, the unpatched model computing in float32."""
    step, unpatched_step = loss_and_grads(model, batch()), loss_and_grads(unpatched, batch())
    reference_step = unpatched_step if reference is None else loss_and_grads(reference, batch())
    assert_matches_unpatched(dtype, step, unpatched_step, reference_step)


@pytest.fixture(scope="module")
def nf4_folder(tiny_model_folder, tmp_path_factory):
    """Each family's tiny model with its weights rounded to bfloat16 (kept in float32), so that NF4 quantizes the
    same numbers whether it loads them to compute in bfloat16 or float32: the float32 reference of a bfloat16 model
    then holds its exact 4-bit weights."""
    built = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"{family}-bfloat16-valued")
            model = AutoModelForCausalLM.from_pretrained(tiny_model_folder(family), dtype=torch.bfloat16)
            model.float().save_pretrained(built[family])
        return built[family]

    return folder


def nf4_models(folder: Path, family: str, dtype: torch.dtype, **options) -> tuple:
    """The NF4 model computing in `dtype` with the LoRA kernels (and what they swapped), plain peft over it, and
    plain peft computing in float32 as the reference (None in float32, where plain peft is its own reference)."""
    def model(kernels: bool, compute_dtype: torch.dtype):
        return lora_model(folder, family, kernels, load_in_4bit=True, dtype=compute_dtype, device=DEVICE, **options)

    (kernel_model, swapped), (unpatched, _) = model(True, dtype), model(False, dtype)
    return kernel_model, swapped, unpatched, None if dtype == torch.float32 else model(False, torch.float32)[0]


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])  # plain, q/k/v biases, fused qkv and gate_up
def test_nf4_model_with_lora_kernels_matches_peft(family, dtype, nf4_folder):
    model, swapped, unpatched, reference = nf4_models(nf4_folder(family), family, dtype)
    layers = model.config.num_hidden_layers
    stacked = 0 if family == "phi3" else layers  # phi3 has one qkv_proj already
    assert swapped == {"lora_mlp": layers, "lora_qkv": stacked, "lora_linear": (2 if family == "phi3" else 1) * layers}
    assert_same_training(model, unpatched, reference, dtype)


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("checkpointing", [True, "offload"])
def test_checkpointed_nf4_model_matches_peft(checkpointing, dtype, nf4_folder, monkeypatch):
    """Recompute runs the LoRA ops' forward again (under saved-tensor hooks when offloading), to the same grads."""
    model, swapped, unpatched, reference = nf4_models(nf4_folder("llama"), "llama", dtype, checkpointing=checkpointing)
    calls, original = [], lora_linear_kernel.lora_linear
    monkeypatch.setattr(lora_linear_kernel, "lora_linear", lambda *args: calls.append(1) or original(*args))
    stacked_calls, stacked_original = [], lora_qkv_kernel.lora_projections
    monkeypatch.setattr(lora_qkv_kernel, "lora_projections",
                        lambda *args: stacked_calls.append(1) or stacked_original(*args))
    assert_same_training(model, unpatched, reference, dtype)
    assert len(calls) == 2 * swapped["lora_linear"] and len(stacked_calls) == 2 * swapped["lora_qkv"]


def test_nf4_mlps_dequantizing_once_in_chunked_backward_match_peft(nf4_folder, monkeypatch):
    """patch.dequantize_mlp_weights_once: every LoRA MLP's backward, in chunks of 3 rows here (8 chunks of the 22),
    dequantizes its three NF4 weights once for all chunks instead of in each, to peft's losses and gradients."""
    import ftcli_kernels.lora_mlp
    import ftcli_kernels.nf4_dequantize

    calls, nf4_dequantize = [], ftcli_kernels.nf4_dequantize.nf4_dequantize
    monkeypatch.setattr(ftcli_kernels.nf4_dequantize, "nf4_dequantize", lambda *args: calls.append(1) or
                        nf4_dequantize(*args))
    model, swapped, unpatched, reference = nf4_models(nf4_folder("llama"), "llama", torch.float32)
    monkeypatch.setattr(ftcli_kernels.lora_mlp, "MLP_BACKWARD_CHUNK_BYTES", 3 * model.config.intermediate_size * 4)
    loss_and_grads(model, batch())
    model.zero_grad(set_to_none=True)
    per_chunk, calls[:] = len(calls), []
    assert dequantize_mlp_weights_once(model) == swapped["lora_mlp"] == model.config.num_hidden_layers
    assert_same_training(model, unpatched, reference, torch.float32)
    assert per_chunk - len(calls) == model.config.num_hidden_layers * 3 * (8 - 1)


def test_stacked_qkv_never_hands_out_another_inputs_output(tiny_model_folder):
    """q, k and v of one input leave nothing behind; k and v called with another input than q get their own."""
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=True, device=DEVICE)
    attention = model.base_model.model.model.layers[0].self_attn
    stacked = attention.q_proj._stacked_projections
    generator = torch.Generator().manual_seed(5)
    first, second = torch.randn(2, 3, 5, model.config.hidden_size, generator=generator).to(DEVICE)
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            torch.testing.assert_close(projection(first), KernelLoraLinear.forward(projection, first),
                                       rtol=1e-5, atol=1e-6)
        assert not stacked.pending and stacked.input is None
        q, k, v = attention.q_proj(first), attention.k_proj(second), attention.v_proj(second)
        with model.disable_adapter():
            assert not torch.allclose(k, attention.k_proj(second))  # the adapter counts in k
        torch.testing.assert_close(q, KernelLoraLinear.forward(attention.q_proj, first), rtol=1e-5, atol=1e-6)
        for projection, output in ((attention.k_proj, k), (attention.v_proj, v)):
            torch.testing.assert_close(output, KernelLoraLinear.forward(projection, second), rtol=1e-5, atol=1e-6)


def test_adapter_saved_from_kernel_model_is_peft_s(tiny_model_folder, tmp_path):
    """Same file as without kernels, and PeftModel.from_pretrained gives back the kernel model's outputs."""
    folder = tiny_model_folder("llama")
    model, _ = lora_model(folder, "llama", kernels=True, device=DEVICE)
    plain, _ = lora_model(folder, "llama", kernels=False, device=DEVICE)
    model.save_pretrained(tmp_path / "kernels")
    plain.save_pretrained(tmp_path / "plain")
    saved, want = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("kernels", "plain"))
    assert saved.keys() == want.keys() and saved
    for name, tensor in want.items():
        assert torch.equal(saved[name], tensor), name

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, tmp_path / "kernels")(batch()).logits
        torch.testing.assert_close(model(batch()).logits, loaded, rtol=1e-5, atol=1e-5)


def test_disabled_adapter_runs_the_kernels_with_zero_scaling(tiny_model_folder):
    """The base model through the kernels' own arithmetic: exactly the adapted model with B zeroed, as DPO's first
    step needs (its reference, the adapter off, must equal a fresh policy bit for bit)."""
    model, _ = lora_model(tiny_model_folder("llama"), "llama", kernels=True, device=DEVICE)
    projection = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), model.disable_adapter():
        assert _lora_parts(projection)[4] == 0.0
        disabled = model(batch()).logits
    assert _lora_parts(projection)[4] == projection.scaling["default"] != 0
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.zero_()
        assert torch.equal(model(batch()).logits, disabled)


def test_peft_states_the_kernels_do_not_compute_fall_back(tiny_model_folder):
    folder = tiny_model_folder("llama")
    model, _ = lora_model(folder, "llama", kernels=True, device=DEVICE)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(batch()).logits, base(batch()).logits, rtol=1e-5, atol=1e-5)

    dropped, swapped = lora_model(folder, "llama", kernels=True, device=DEVICE, dropout=0.1)
    assert swapped == {"lora_mlp": 0, "lora_qkv": 0, "lora_linear": 0}
    assert not any(isinstance(m, (KernelLoraLinear, KernelLoraGatedMLP)) for m in dropped.modules())
