"""`ftcli train` with train.method dpo, orpo or simpo, end to end on a tiny model: the metrics rows, the saved
adapter, a start from an earlier adapter, the precomputed reference, resume, chat and export, and recipe errors."""

import json
import math

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

import ftcli.train

from conftest import assert_clean_failure, make_output_folder, run_cli, write_jsonl, write_recipe
from ftcli.preference import REFERENCE_CACHE

REWARDS = {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}


@pytest.fixture
def workspace(tmp_path, tiny_model_folder):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"The number is {i}."} for i in range(12)]
    return tmp_path, tiny_model_folder("llama"), write_jsonl(tmp_path / "pairs.jsonl", rows)


def pairs_recipe(workspace, name: str = "r.yaml", method: str = "dpo", out: str = "out", train: dict = None,
                 **sections):
    tmp, model, data = workspace
    sections["data"] = {"format": "preference"} | sections.get("data", {})
    return write_recipe(tmp / name, model, data, tmp / out, train={"method": method, "max_steps": 3} | (train or {}),
                        **sections)


def trained(recipe, *extra: str) -> tuple[dict, list[dict]]:
    """Train; the summary and the metrics rows."""
    result = run_cli("train", recipe, "--json", *extra)
    assert result.exit_code == 0, result.output
    out = yaml.safe_load(recipe.read_text())["output"]["dir"]
    rows = [json.loads(line) for line in (recipe.parent / out / "metrics.jsonl").read_text().splitlines()]
    return json.loads(result.stdout.splitlines()[-1]), rows


def test_dpo_run_saves_an_adapter_and_reports_rewards(workspace):
    tmp, model, _ = workspace
    summary, rows = trained(pairs_recipe(workspace, data={"eval_fraction": 0.25}))
    assert summary["method"] == "dpo" and summary["steps"] == 3
    assert REWARDS <= rows[0].keys()
    # LoRA's B starts at zero, so the first step's policy is its reference: loss log 2, no reward
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards_chosen"] == rows[0]["rewards_rejected"] == 0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_margin"] > 0
    assert {f"eval_{name}" for name in REWARDS} | {"eval_loss"} <= rows[-1].keys()
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp / "out")
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("method,terms", [("orpo", {"nll_loss", "log_odds_ratio"}), ("simpo", set())])
def test_orpo_and_simpo_runs_report_their_terms(workspace, method, terms):
    summary, rows = trained(pairs_recipe(workspace, method=method))
    assert summary["method"] == method
    assert REWARDS | terms <= rows[0].keys()
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_dpo_from_an_adapter_measures_against_that_adapter(workspace, monkeypatch):
    """The starting adapter is the reference: the first step's policy equals it, so its loss is log 2 exactly;
    measured against the base instead (the control, without the reference adapter), it is not."""
    tmp, model, _ = workspace
    start = make_output_folder(model, tmp / "sft")
    _, rows = trained(pairs_recipe(workspace, model={"adapter": str(start)}))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(rows[0]["rewards_chosen"]) < 1e-6 and abs(rows[0]["rewards_rejected"]) < 1e-6
    monkeypatch.setattr(ftcli.train, "load_reference_adapter", lambda model, folder: None)
    _, against_base = trained(pairs_recipe(workspace, name="base.yaml", out="base-out", model={"adapter": str(start)}))
    assert abs(against_base[0]["loss"] - math.log(2)) > 1e-4


def test_precomputed_reference_is_cached_and_changes_no_loss(workspace):
    tmp, _, _ = workspace
    _, live = trained(pairs_recipe(workspace))
    _, cached = trained(pairs_recipe(workspace, name="cached.yaml", out="cached",
                                     preference={"precompute_reference": True}))
    # 3 steps of 2 pairs: the pass computed the 6 pairs the run trains on, not all 12
    assert torch.load(tmp / "cached" / REFERENCE_CACHE, weights_only=True)["logprobs"].shape == (6, 2)
    assert [row["loss"] for row in cached] == pytest.approx([row["loss"] for row in live], abs=1e-6)


def test_resume_continues_a_dpo_run_with_its_cached_reference(workspace):
    tmp, _, _ = workspace
    constant = {"lr_scheduler": "constant"}  # the schedule's length changes on resume; a constant rate ignores it
    _, straight = trained(pairs_recipe(workspace, train={"max_steps": 4} | constant,
                                       preference={"precompute_reference": True}))
    recipe = pairs_recipe(workspace, name="split.yaml", out="split", train={"max_steps": 2, "save_steps": 1} | constant,
                          preference={"precompute_reference": True})
    trained(recipe)
    _, resumed = trained(recipe, "--resume", "--set", "train.max_steps=4")
    assert [row["loss"] for row in resumed] == pytest.approx([row["loss"] for row in straight], abs=1e-6)


def test_chat_and_export_read_a_dpo_run(workspace):
    tmp, _, _ = workspace
    trained(pairs_recipe(workspace))
    chat = run_cli("chat", tmp / "out", "--prompt", "What is 2 plus 2?", "--temperature", "0", "--max-new-tokens", "4")
    assert chat.exit_code == 0, chat.output
    export = run_cli("export", tmp / "out", "--merged")
    assert export.exit_code == 0, export.output


@pytest.mark.parametrize("method,sections,fragments", [
    ("dpo", {"preference": {"gamma": 1.0}}, ["preference: gamma applies to simpo only, and train.method is dpo"]),
    ("sft", {"preference": {"beta": 0.2}}, ["beta applies to dpo and simpo only, and train.method is sft"]),
    ("orpo", {"preference": {"precompute_reference": True}}, ["precompute_reference applies to dpo only"]),
    ("dpo", {"preference": {"loss_type": "ipo", "label_smoothing": 0.1}},
     ["label_smoothing applies to the sigmoid loss only, and loss_type is ipo"]),
    ("dpo", {"data": {"format": "messages"}}, ["train.method dpo needs data.format preference"]),
    ("sft", {}, ["train.method sft needs data.format alpaca, sharegpt, messages or text"]),
])
def test_settings_the_method_does_not_read_are_errors(workspace, method, sections, fragments):
    recipe = pairs_recipe(workspace, method=method, **sections)
    assert_clean_failure(run_cli("train", recipe), 2, str(recipe), *fragments)


def test_plan_sizes_a_preference_run_by_its_rows_of_prompt_and_both_answers(workspace):
    recipe = pairs_recipe(workspace)
    dry = run_cli("train", recipe, "--dry-run", "--json")
    longest = json.loads(dry.stdout.splitlines()[-1])["longest"]
    result = run_cli("plan", recipe)
    assert result.exit_code == 0, result.output
    assert f"batch 2 x {longest} tokens" in " ".join(result.output.split())
