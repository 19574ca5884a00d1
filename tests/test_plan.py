"""`ftcli plan`: the memory estimate's parts against counts from the real model classes, its peaks against
measurements on the GPU, fits / does not fit, and the CLI's output."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_clean_failure, run_cli, write_jsonl, write_recipe
from ftcli.errors import InputError
from ftcli.plan import GIB, ModelShape, Setup, estimate_memory, parse_size
from ftcli.recipe import DEFAULT_TARGET_MODULES
from ftcli.shapes import shape_config

# Peak allocated memory measured with `python -m ftcli.bench --only ftcli` on an H100 (Llama-3-8B shape,
# LoRA r=16 on all seven projections, NF4, kernels, AdamW8bit): (seq, batch, checkpointing) -> GiB
MEASURED_H100 = {(2048, 2, "offload"): 6.68, (2048, 2, True): 7.44, (8192, 1, "offload"): 7.53}
# The same for the Llama-3.2-1B shape (tied head), measured on an H200 (docs/benchmarks.md)
MEASURED_1B_H200 = {(2048, 2, "offload"): 1.70, (2048, 2, True): 1.92, (8192, 1, "offload"): 2.09}


def shape_of(name):
    return ModelShape.from_config(shape_config(name))


@pytest.mark.parametrize("name", ["llama3-8b", "llama3.2-1b"])
def test_weights_and_lora_sizes_match_the_model_classes(name):
    """Counted from transformers' and peft's own modules on the meta device, so no memory is used."""
    from peft import LoraConfig, get_peft_model

    config = shape_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    # embeddings, LM head (counted once when tied) and norms
    sixteen_bit = sum(p.numel() for n, p in model.named_parameters() if "layers." not in n or "norm" in n)
    model = get_peft_model(model, LoraConfig(r=16, target_modules=DEFAULT_TARGET_MODULES))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    parts = estimate_memory(shape_of(name), Setup(batch_size=1, seq=512, checkpointing="offload")).parts
    nf4_bytes_per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, 8-bit absmax per 64, float32 per 256 absmax
    assert parts["weights"] == pytest.approx(linear * nf4_bytes_per_weight + sixteen_bit * 2, rel=1e-9)
    assert parts["lora adapters"] == lora * 4 and parts["lora gradients"] == lora * 4
    assert parts["optimizer states"] == pytest.approx(lora * 2, rel=0.02)  # two 8-bit moments and their scales


@pytest.mark.parametrize("key,measured", MEASURED_H100.items())
def test_peak_within_5_percent_of_the_h100_measurements(key, measured):
    seq, batch, checkpointing = key
    estimate = estimate_memory(shape_of("llama3-8b"), Setup(batch_size=batch, seq=seq, checkpointing=checkpointing))
    assert estimate.peak / GIB == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("key,measured", MEASURED_1B_H200.items())
def test_peak_within_15_percent_of_the_1b_measurements(key, measured):
    """A shape the estimate was not written against: the issue's 15% bound."""
    seq, batch, checkpointing = key
    estimate = estimate_memory(shape_of("llama3.2-1b"), Setup(batch_size=batch, seq=seq, checkpointing=checkpointing))
    assert estimate.peak / GIB == pytest.approx(measured, rel=0.15)


def test_activation_checkpointing_modes_order_and_activations_grow_with_tokens():
    shape = shape_of("llama3-8b")
    peaks = {mode: estimate_memory(shape, Setup(batch_size=2, seq=2048, checkpointing=mode)).peak
             for mode in ("offload", True, False)}
    assert peaks["offload"] < peaks[True] < peaks[False]
    # plain checkpointing keeps one bf16 hidden state per layer more than offloading: 32 x 4096 tokens x 4096 x 2
    assert peaks[True] - peaks["offload"] == pytest.approx(32 * 4096 * 4096 * 2, rel=0.25)
    # flash attention keeps memory linear in the tokens: each doubling adds twice what the previous one did
    p2k, p4k, p8k = (estimate_memory(shape, Setup(batch_size=1, seq=seq, checkpointing="offload")).peak
                     for seq in (2048, 4096, 8192))
    assert p8k - p4k == pytest.approx(2 * (p4k - p2k), rel=0.01)


def test_kernels_off_estimates_the_whole_logits():
    shape = shape_of("llama3.2-1b")
    on = estimate_memory(shape, Setup(batch_size=2, seq=2048, kernels=True))
    off = estimate_memory(shape, Setup(batch_size=2, seq=2048, kernels=False))
    logits = 2 * 2048 * 128256 * (2 + 4 + 4)  # bf16 logits, their float32 copy and its gradient
    assert off.peak - on.peak > 0.8 * logits


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * GIB), ("24GB", 24 * 10**9), ("80g", 80 * GIB),
                                           ("12", 12 * GIB), ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * GIB))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_a_size_that_does_not_parse_is_an_input_error_naming_the_flag():
    with pytest.raises(InputError, match=r"--gpu-memory 'lots' is not a size; write it like 16GiB"):
        parse_size("lots")


@pytest.fixture
def eight_b_folder(tmp_path, tiny_model_folder):
    """The tiny model's tokenizer with Llama-3-8B's config: plan reads nothing else, so no 16 GB download."""
    folder = tmp_path / "llama3-8b-config"
    shutil.copytree(tiny_model_folder("llama"), folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    shape_config("llama3-8b").save_pretrained(folder)
    return folder


def long_rows(count, words):
    return [{"messages": [{"role": "user", "content": "Say it."},
                          {"role": "assistant", "content": " ".join(["word"] * words)}]} for _ in range(count)]


def test_plan_cli_fits_and_does_not_fit(tmp_path, eight_b_folder):
    data = write_jsonl(tmp_path / "train.jsonl", long_rows(40, 3000))
    recipe = write_recipe(tmp_path / "r.yaml", eight_b_folder, data, tmp_path / "out",
                          model={"load_in_4bit": True, "dtype": "bfloat16", "kernels": True, "max_seq_length": 2048},
                          train={"batch_size": 2, "grad_accum": 4, "max_steps": None, "epochs": 1,
                                 "gradient_checkpointing": True, "optimizer": "adamw_8bit"})
    result = run_cli("plan", recipe, "--gpu-memory", "16GiB", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["seq"] == 2048 and summary["steps"] == 5 and summary["fits"] is True
    assert summary["tokens"] == 40 * 2048  # every example truncated to 2048 tokens, one epoch
    assert summary["peak_gib"] == pytest.approx(MEASURED_H100[(2048, 2, True)], rel=0.05)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()

    result = run_cli("plan", recipe, "--gpu-memory", "7.5GiB")
    assert result.exit_code == 4, result.output
    text = " ".join(result.output.split())
    assert "does not fit a GPU with 7.5 GiB" in text and "backward of the top layer" in text
    assert "--set train.gradient_checkpointing=offload" in text and "train.batch_size=1 --set train.grad_accum=8" in text


def test_plan_cli_bad_size(tmp_path, eight_b_folder):
    data = write_jsonl(tmp_path / "train.jsonl", long_rows(2, 10))
    recipe = write_recipe(tmp_path / "r.yaml", eight_b_folder, data, tmp_path / "out")
    result = run_cli("plan", recipe, "--gpu-memory", "lots")
    assert_clean_failure(result, 2, "--gpu-memory 'lots'", "16GiB")


def test_plan_module_prints_the_bench_shapes(capsys):
    from ftcli.plan import main

    main(["--shape", "llama3.2-1b", "--seq", "2048", "--bs", "2", "--checkpointing", "true"])
    out = capsys.readouterr().out
    assert "llama3.2-1b" in out and "estimated peak" in out and "saved activations" in out


def test_advice_offers_the_mildest_change_of_each_knob_that_fits():
    from ftcli.plan import smaller_settings
    from ftcli.recipe import Recipe

    recipe = Recipe(model={"name": "m"}, data={"path": "d"},
                    train={"batch_size": 8, "grad_accum": 2, "gradient_checkpointing": True})
    shape, budget = shape_of("llama3-8b"), parse_size("12GiB")
    setup = Setup.from_recipe(recipe, seq=2048)
    assert estimate_memory(shape, setup).needed > budget
    fits = {batch: estimate_memory(shape, Setup(batch_size=batch, seq=2048)).needed <= budget for batch in (4, 2, 1)}
    largest = max(batch for batch, fit in fits.items() if fit)
    text = smaller_settings(recipe, shape, setup, budget)
    assert f"--set train.batch_size={largest} --set train.grad_accum={16 // largest} (same effective batch)" in text
    assert text.count("train.batch_size=") == 1 and "gradient_checkpointing=offload" in text

    wide = Recipe(model={"name": "m", "load_in_4bit": False}, data={"path": "d"}, train={"batch_size": 16})
    text = smaller_settings(wide, shape, Setup.from_recipe(wide, seq=4096), parse_size("14GiB"))
    assert text.startswith("No single change is estimated to fit, but together --set train.batch_size=1")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_every_family_plans_the_bytes_its_nf4_model_really_holds(tmp_path, tiny_model_folder, family):
    """The reference is the model loaded in NF4 by transformers and bitsandbytes (on the CPU): its packed weights,
    16-bit parameters (biases, Gemma's extra norms, tied heads once) and both levels of absmax."""
    from transformers import BitsAndBytesConfig

    from ftcli.plan import plan_recipe
    from ftcli.recipe import load_recipe

    folder = tiny_model_folder(family)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantization,
                                                  device_map={"": "cpu"})
    held = 0
    for parameter in loaded.parameters():
        held += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:  # the per-tensor 16-entry code tables are left out: bytes, not blocks
            held += state.absmax.numel() * state.absmax.element_size() + state.state2.absmax.numel() * 4
    data = write_jsonl(tmp_path / "train.jsonl", long_rows(4, 5))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", folder, data, tmp_path / "out",
                                      model={"load_in_4bit": True, "dtype": "bfloat16"}))
    assert plan_recipe(recipe).memory.parts["weights"] == held
