"""Packing: several examples per row give the same logits, loss and gradients as the examples one by one.

Float32 on the CPU: packed and unpacked losses agree within rel 1e-5 and logits within 1e-4 (measured: about
1e-7 and 1e-6, from the different matrix shapes). The negative control, the same rows attended as single
sequences, moves logits by several units (max 3.6 to 4.5 on these models), so the comparison catches any
cross-example attention; the mean loss alone would hardly move (2e-4 relative), which is why logits are compared.
"""

import importlib.util
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DEVICE, randomise, run_cli, write_jsonl, write_recipe
from ftcli.architectures import ARCHITECTURES
from ftcli.data.packing import join_examples, pack_examples
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample
from ftcli.loader import add_lora
from ftcli.patch import apply_kernels, apply_lora_kernels
from ftcli.recipe import LoraSettings
from ftcli.train import (accumulate_gradients, collate, example_boundaries, model_inputs, summed_token_loss,
                         target_tokens)
from tiny_models import FAMILIES, SLIDING_WINDOW

CPU = torch.device("cpu")


def examples_of(lengths, seed: int = 0) -> list[TokenizedExample]:
    """Random token examples; each has a prompt of 2 untrained tokens, except the fully trained last one."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index, length in enumerate(lengths):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        labels = ids if index == len(lengths) - 1 else [IGNORE_INDEX] * 2 + ids[2:]
        examples.append(TokenizedExample(ids, list(labels), False))
    return examples


# Longer than the tiny models' sliding window (16), so windows really cut inside packed examples
LENGTHS = [5, 9, 2 * SLIDING_WINDOW, 3, 30, 12, 7, 1]


def counted(function, calls: list):
    """`function`, appending its name to `calls` each time it runs."""
    def wrapper(*args, **kwargs):
        calls.append(function.__name__)
        return function(*args, **kwargs)
    return wrapper


def logits_by_example(model, rows: list[TokenizedExample], device=CPU,
                      attend_across: bool = False) -> dict[tuple, torch.Tensor]:
    """Each example's logits, keyed by its token ids, cut out of (packed or unpacked) rows. `attend_across` is
    the negative control: packed rows called as single sequences, without their restarting positions."""
    batch = collate(rows, 0, device)
    inputs = ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]} if attend_across
              else model_inputs(model, batch))
    logits = model(**inputs).logits.float().cpu()
    found = {}
    for row, example in enumerate(rows):
        positions = example.position_ids or list(range(len(example.input_ids)))
        bounds = [i for i, position in enumerate(positions) if position == 0] + [len(positions)]
        for begin, end in zip(bounds, bounds[1:]):
            found[tuple(example.input_ids[begin:end])] = logits[row, begin:end]
    return found


def largest_logit_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key] - second[key]).abs().max()) for key in first)


def mean_loss(model, examples, fused: bool = False, device=CPU) -> float:
    batch = collate(examples, 0, device)
    return float(summed_token_loss(model, batch, fused)) / target_tokens(batch)


def test_best_fit_packs_every_example_once_within_the_length():
    examples = examples_of(LENGTHS)
    packed = pack_examples(examples, 40)
    assert sum(len(row.input_ids) for row in packed) == sum(LENGTHS)
    assert all(len(row.input_ids) <= 40 for row in packed) and len(packed) == 3  # 99 tokens need 3 rows of 40
    starts = [i for row in packed for i, position in enumerate(row.position_ids) if position == 0]
    assert len(starts) == len(LENGTHS)
    originals = sorted(tuple(e.input_ids) for e in examples)
    pieces = []
    for row in packed:
        bounds = [i for i, position in enumerate(row.position_ids) if position == 0] + [len(row.input_ids)]
        for begin, end in zip(bounds, bounds[1:]):
            pieces.append(tuple(row.input_ids[begin:end]))
            assert row.position_ids[begin:end] == list(range(end - begin))
            assert row.labels[begin] == IGNORE_INDEX  # never predicted from the previous example's last token
    assert sorted(pieces) == originals


def test_packing_keeps_the_number_of_target_tokens():
    examples = examples_of(LENGTHS)
    packed = pack_examples(examples, 40)
    assert target_tokens(collate(packed, 0, CPU)) == target_tokens(collate(examples, 0, CPU))


def test_collate_gives_padding_its_own_positions():
    row = join_examples(examples_of([3, 2]))
    batch = collate([row, join_examples(examples_of([6]))], 0, CPU)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert "position_ids" not in collate(examples_of([3, 2]), 0, CPU)


def test_flash_attention_boundaries_span_the_flattened_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    boundaries = example_boundaries(position_ids)
    assert boundaries["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12] and boundaries["max_length_q"] == 6
    assert boundaries["cu_seq_lens_q"].dtype == torch.int32


def test_flash_attention_models_get_the_boundaries(tiny_model_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama"), dtype=torch.float32)
    batch = collate(pack_examples(examples_of([3, 2, 4]), 5), 0, CPU)
    assert "attention_mask" not in model_inputs(model, batch) and "cu_seq_lens_q" not in model_inputs(model, batch)
    model.config._attn_implementation = "flash_attention_2"  # only read here; no forward runs without CUDA
    inputs = model_inputs(model, batch)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 4, 5, 8, 10] and inputs["max_length_q"] == 4
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_equals_unpacked_loss(family, tiny_model_folder):
    architecture = ARCHITECTURES[family]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder(family), dtype=torch.float32,
                                                 attn_implementation=architecture.attention)
    examples = examples_of(LENGTHS)
    packed = pack_examples(examples, 40)
    with torch.no_grad():
        unpacked_loss, packed_loss = mean_loss(model, examples), mean_loss(model, packed)
        unpacked, packed_logits = logits_by_example(model, examples), logits_by_example(model, packed)
        leaked_logits = logits_by_example(model, packed, attend_across=True)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    assert largest_logit_difference(packed_logits, unpacked) < 1e-4
    assert largest_logit_difference(leaked_logits, unpacked) > 0.5


def test_packed_gradients_equal_unpacked_gradients_through_the_loop(tiny_model_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("mistral"), dtype=torch.float32)
    model = add_lora(model, LoraSettings(r=4, alpha=8), ARCHITECTURES["mistral"], seed=0)
    randomise(model, "lora_B", 0.05, seed=0)
    examples = examples_of(LENGTHS)
    packed = pack_examples(examples, 40)
    results = []
    for micro_batches in ([examples[:4], examples[4:]], [packed[:2], packed[2:]]):
        loss, _ = accumulate_gradients(model, [collate(batch, 0, CPU) for batch in micro_batches])
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (unpacked_loss, unpacked_grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    for name, grad in unpacked_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_packed_loss_with_kernels(tiny_model_folder, monkeypatch):
    """ftcli's RoPE kernel takes cos and sin computed from the restarting position ids, and the fused loss
    kernel sees the same labels: packed equals unpacked with every kernel on, on conftest.DEVICE. Triton's
    interpreter on a CPU, rel 1e-5; natively on CUDA, where Triton's float32 products use TF32, rel 1e-3."""
    from ftcli_kernels import cross_entropy, rope

    calls = []
    for module, name in ((rope, "apply_rope"), (cross_entropy, "fused_linear_cross_entropy")):
        monkeypatch.setattr(module, name, counted(getattr(module, name), calls))
    architecture = ARCHITECTURES["llama"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama"), dtype=torch.float32).to(DEVICE)
    apply_kernels(model, architecture)
    model = add_lora(model, LoraSettings(r=4, alpha=8), architecture, seed=0)
    apply_lora_kernels(model)
    examples = examples_of([5, 9, 12, 7])
    with torch.no_grad():
        unpacked_loss = mean_loss(model, examples, fused=True, device=DEVICE)
        packed_loss = mean_loss(model, pack_examples(examples, 20), fused=True, device=DEVICE)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5 if DEVICE.type == "cpu" else 1e-3)
    layers = model.config.num_hidden_layers
    assert calls.count("apply_rope") == 2 * layers and calls.count("fused_linear_cross_entropy") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_on_cuda(attention, tiny_model_folder):
    """SDPA's CUDA kernels and flash-attention's varlen kernel, in bfloat16: loss within rel 1e-2 and logits
    within 0.1; the negative control moves logits by units."""
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("the flash_attn package is not installed")
    cuda = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder("mistral"), dtype=torch.bfloat16,
                                                 attn_implementation=attention).to(cuda)
    examples = examples_of(LENGTHS)
    packed = pack_examples(examples, 40)

    def loss(rows):
        batch = collate(rows, 0, cuda)
        return float(summed_token_loss(model, batch)) / target_tokens(batch)

    with torch.no_grad():
        unpacked_loss, packed_loss = loss(examples), loss(packed)
        unpacked = logits_by_example(model, examples, cuda)
        packed_logits = logits_by_example(model, packed, cuda)
        leaked_logits = logits_by_example(model, packed, cuda, attend_across=True)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-2)
    assert largest_logit_difference(packed_logits, unpacked) < 0.1
    assert largest_logit_difference(leaked_logits, unpacked) > 0.5


def test_train_and_dry_run_with_packing(tmp_path, tiny_model_folder):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} for a in range(4) for b in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_folder("qwen2"), data, tmp_path / "out",
                          data={"packing": True})
    dry = run_cli("train", recipe, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    summary = json.loads(dry.stdout.strip().splitlines()[-1])
    assert summary["train_examples"] == summary["packed_rows"] < 12  # 12 chat rows fit in fewer 128-token rows
    result = run_cli("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(row["loss"]) for row in metrics)
