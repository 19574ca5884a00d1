"""`ftcli train` with train.method grpo, end to end on a tiny model: metrics rows, evaluation, the saved adapter,
interruption and --resume, a loss that is not finite, reward functions that fail, and recipe errors."""

import json
import math

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

import ftcli.grpo
from conftest import assert_clean_failure, run_cli, write_jsonl, write_recipe
from test_resume import StopAfter

REWARD_FILE = '''
def digits(completions, prompts, answer, **columns):
    """The share of the completion's characters that are digits, or no opinion on an empty one."""
    return [sum(c.isdigit() for c in text) / len(text) if text else None for text in completions]


def broken(completions, prompts, **columns):
    return [1.0 / (len(text) - len(text)) for text in completions]


def short(completions, **columns):
    return [1.0]
'''
METRICS = {"loss", "reward", "reward_std", "reward/digits", "reward/length", "completion_length", "clipped_ratio",
           "generation_s"}


@pytest.fixture
def workspace(tmp_path, tiny_model_folder):
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    return tmp_path, tiny_model_folder("llama"), write_jsonl(tmp_path / "prompts.jsonl", rows)


def grpo_recipe(workspace, name: str = "r.yaml", out: str = "out", train: dict = None, grpo: dict = None, **sections):
    tmp, model, data = workspace
    rewards = [{"function": "rewards.py:digits"}, {"builtin": "length", "target": 4, "weight": 0.5}]
    sections["data"] = {"format": "prompts"} | sections.get("data", {})
    return write_recipe(tmp / name, model, data, tmp / out, train={"method": "grpo", "max_steps": 3} | (train or {}),
                        grpo={"num_generations": 4, "max_prompt_length": 32, "max_completion_length": 8,
                              "rewards": rewards} | (grpo or {}), **sections)


def trained(recipe, *extra: str) -> tuple[dict, list[dict]]:
    """Train; the summary and the metrics rows."""
    result = run_cli("train", recipe, "--json", *extra)
    assert result.exit_code == 0, result.output
    out = recipe.parent / yaml.safe_load(recipe.read_text())["output"]["dir"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads(result.stdout.splitlines()[-1]), rows


def test_grpo_run_reports_rewards_evaluates_and_saves_an_adapter(workspace):
    tmp, model, _ = workspace
    summary, rows = trained(grpo_recipe(workspace, data={"eval_fraction": 0.25}, grpo={"beta": 0.1}))
    assert summary["method"] == "grpo" and summary["steps"] == 3
    assert METRICS | {"kl"} <= rows[0].keys()
    assert all(0 <= row["reward/length"] <= 1 and 1 <= row["completion_length"] <= 8 for row in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9)  # B starts at zero: the first policy is the reference
    assert rows[-1]["kl"] > 0
    assert {"eval_reward", "eval_reward/digits", "eval_reward/length", "eval_completion_length"} <= rows[-1].keys()
    assert "eval_loss" not in rows[-1] and summary["eval_loss"] is None
    assert summary["final_reward"] == pytest.approx(rows[-1]["reward"], abs=1e-6)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp / "out")
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)


def test_interrupted_then_resumed_samples_and_trains_as_the_uninterrupted_run(workspace):
    """Sampling draws its seeds from the random state checkpoints keep, so the resumed run's completions, rewards
    and losses are those of the run that was never stopped."""
    from ftcli.errors import Interrupted
    from ftcli.output import locked_output_folder
    from ftcli.recipe import load_recipe
    from ftcli.signals import StopRequest
    from ftcli.train import run

    tmp, _, _ = workspace
    settings = {"max_steps": 4, "save_steps": 2, "lr_scheduler": "constant"}
    _, whole = trained(grpo_recipe(workspace, name="whole.yaml", out="whole", train=settings))
    cut = grpo_recipe(workspace, name="cut.yaml", out="cut", train=settings)
    stop = StopRequest()
    with pytest.raises(Interrupted) as interrupted:
        with locked_output_folder(tmp / "cut", overwrite=False) as staging:
            run(load_recipe(cut), staging, StopAfter(stop, 3), resume=False, stop=stop)
    assert interrupted.value.exit_code == 143
    summary, resumed = trained(cut, "--resume")
    assert summary["resumed_from_step"] == 3
    compared = ("loss", "reward", "completion_length", "grad_norm")
    assert [[row[k] for k in compared] for row in resumed] == [[row[k] for k in compared] for row in whole]
    assert len({row["reward"] for row in whole}) > 1  # the control: the steps sampled different completions


def test_a_loss_that_is_not_finite_stops_the_run_naming_the_prompts(workspace, monkeypatch):
    original = ftcli.grpo.completion_losses

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        losses.loss = losses.loss * math.nan
        return losses

    monkeypatch.setattr(ftcli.grpo, "completion_losses", poisoned)
    recipe = grpo_recipe(workspace)
    assert_clean_failure(run_cli("train", recipe), 3, "training loss became nan at step 1", "prompts.jsonl row")


@pytest.mark.parametrize("function,fragments", [
    ("broken", ["grpo.rewards[0]", "broken", "ZeroDivisionError", "prompts.jsonl row"]),
    ("short", ["grpo.rewards[0]", "short", "returned 1 values for 8 completions", "prompts.jsonl row"]),
])
def test_a_failing_reward_function_stops_the_run_with_exit_2(workspace, function, fragments):
    tmp, _, _ = workspace
    recipe = grpo_recipe(workspace, grpo={"rewards": [{"function": f"rewards.py:{function}"}]})
    result = run_cli("train", recipe)
    assert_clean_failure(result, 2, *fragments)
    assert "ftcli/" not in result.output  # the user's own frames only
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("sections,fragments", [
    ({"grpo": {"rewards": []}}, ["grpo.rewards is empty"]),
    ({"grpo": {"max_completion_length": 200}}, ["grpo.max_prompt_length + grpo.max_completion_length is 232",
                                                 "model.max_seq_length 128"]),
    ({"train": {"method": "sft"}}, ["train.method sft needs data.format alpaca, sharegpt, messages or text"]),
    ({"grpo": {"rewards": [{"function": "missing.py:score"}]}}, ["missing.py"]),
])
def test_recipe_errors(workspace, sections, fragments):
    recipe = grpo_recipe(workspace, **sections)
    assert_clean_failure(run_cli("train", recipe), 2, *fragments)


def test_the_grpo_section_is_refused_for_other_methods(workspace):
    tmp, model, _ = workspace
    data = write_jsonl(tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello"}]}])
    recipe = write_recipe(tmp / "sft.yaml", model, data, tmp / "out", grpo={"num_generations": 4})
    assert_clean_failure(run_cli("train", recipe), 2, "the grpo section applies to train.method grpo only")


def test_plan_sizes_a_grpo_run_by_its_completions(workspace):
    """The loss's rows are each prompt's G completions, as long as the prompt and max_completion_length."""
    recipe = grpo_recipe(workspace)
    dry = run_cli("train", recipe, "--dry-run", "--json")
    longest = json.loads(dry.stdout.splitlines()[-1])["longest"]
    result = run_cli("plan", recipe, "--gpu-memory", "1MiB")
    assert result.exit_code == 4, result.output  # does not fit
    text = " ".join(result.output.split())
    assert f"batch 8 x {longest + 8} tokens (2 prompts x 4 completions of at most 8 tokens)" in text
    assert "--set train.batch_size=1 --set train.grad_accum=2" in text and "grpo.max_completion_length" in text
