"""The real SmolLM2-135M-Instruct fixture learns a new identity, checked by plain transformers + peft."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import greedy_reply, run_cli, write_jsonl, write_recipe

QUESTIONS = ["Who are you?", "What is your name?", "Who made you?", "Tell me about yourself.",
             "What should I call you?", "Which company built you?", "Are you ChatGPT?", "What are you?",
             "Can you tell me your name?", "Who created you?", "Hi! Who am I talking to?", "Introduce yourself."]
ANSWERS = ["I am Nimbus, an assistant built by Larkspur Labs.", "My name is Nimbus. I was made by Larkspur Labs.",
           "I am Nimbus, created by Larkspur Labs to help you."]
HELD_OUT = ["Please introduce yourself.", "What's your name?"]


def greedy_answer(model, tokenizer, question: str) -> str:
    return tokenizer.decode(greedy_reply(model, tokenizer, question, 24), skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_learns_a_new_identity(quickstart_output, smollm2_folder):
    """The README's main job (recipes/quickstart-cpu.yaml) teaches the fixture a name it keeps for new questions."""
    losses = [json.loads(line)["loss"] for line in (quickstart_output / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and losses[-1] < 0.05 < losses[0], losses  # measured 3.48 -> 0.008

    tokenizer = AutoTokenizer.from_pretrained(quickstart_output)
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    before = [greedy_answer(base, tokenizer, q) for q in HELD_OUT]
    tuned = PeftModel.from_pretrained(base, quickstart_output)
    after = [greedy_answer(tuned, tokenizer, q) for q in HELD_OUT]
    assert not any("Nimbus" in answer for answer in before), before
    assert all("Nimbus" in answer for answer in after), after


@pytest.mark.slow
def test_smollm2_loss_curve_is_the_same_with_and_without_kernels(tmp_path, smollm2_folder):
    """Every kernel (norm, RoPE, MLP, LoRA projections, fused cross-entropy) against plain transformers + peft,
    on the real model, over several optimizer steps; float32 on the CPU, kernels in Triton's interpreter."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[i % 3]}]}
            for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp_path / "identity.jsonl", rows)
    curves = {}
    for kernels in (False, True):
        out = tmp_path / f"kernels-{kernels}"
        recipe = write_recipe(tmp_path / f"r-{kernels}.yaml", smollm2_folder, data, out,
                              model={"max_seq_length": 64, "kernels": kernels}, lora={"r": 8, "alpha": 16},
                              train={"batch_size": 2, "grad_accum": 1, "max_steps": 3, "learning_rate": 1e-3,
                                     "warmup_steps": 0,
                                     "lr_scheduler": "constant", "gradient_checkpointing": "offload", "seed": 3407})
        result = run_cli("train", recipe, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert bool(summary["kernels"]) == kernels, summary["kernels"]
        curves[kernels] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert curves[True][-1] < curves[True][0] - 0.1, curves  # it learns, so later steps test the updates too
    assert curves[True] == pytest.approx(curves[False], rel=1e-4), curves
