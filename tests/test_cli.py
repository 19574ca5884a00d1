"""`ftcli train` end to end on a tiny model: outputs, summaries, and every bad input's message and exit code."""

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl, write_recipe

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
             for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


@pytest.fixture
def workspace(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    return tmp_path, tiny_model_folder("llama"), data


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".out", "out")))


def test_train_writes_a_complete_adapter_folder(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    result = run_cli("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["output"] == str(tmp / "out")
    out = tmp / "out"
    for name in ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl",
                 "tokenizer_config.json"]:
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "peak_mem_gib"} <= set(row)
    assert rows[-1]["tokens"] == summary["tokens"] > 0
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["lora"]["dropout"] == 0.0
    assert any(key.endswith("lora_B.weight") for key in load_file(out / "adapter_model.safetensors"))
    assert leftovers(tmp) == ["out"]


def test_same_seed_same_losses_other_seed_other_losses(workspace):
    tmp, model, data = workspace

    def losses(name, seed):
        recipe = write_recipe(tmp / f"{name}.yaml", model, data, tmp / name, train={"seed": seed})
        assert run_cli("train", recipe, "--json").exit_code == 0
        return [json.loads(line)["loss"] for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]

    first = losses("a", 11)
    assert losses("b", 11) == first
    assert losses("c", 12) != first


def test_eval_fraction_writes_eval_loss(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", data={"eval_fraction": 0.34})
    result = run_cli("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1] and rows[-1]["eval_loss"] > 0
    assert json.loads(result.stdout.splitlines()[-1])["eval_loss"] == rows[-1]["eval_loss"]


def test_dry_run_counts_rows_and_truncation_without_writing(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", model={"max_seq_length": 24})
    result = run_cli("train", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 6 and summary["train_examples"] + summary["dropped_no_target"] == 6
    assert summary["truncated"] > 0 and summary["longest"] <= 24
    assert leftovers(tmp) == []


def test_set_and_output_override_the_recipe(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    result = run_cli("train", recipe, "--set", "train.max_steps=2", "--output", tmp / "other", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["steps"] == 2
    assert (tmp / "other" / "adapter_config.json").is_file() and not (tmp / "out").exists()


def expect_error(recipe, *fragments, code=2, extra=()):
    result = run_cli("train", recipe, *extra)
    assert result.exit_code == code, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    return result


def test_missing_dataset_file(workspace):
    tmp, model, _ = workspace
    recipe = write_recipe(tmp / "r.yaml", model, tmp / "nope.jsonl", tmp / "out")
    expect_error(recipe, "nope.jsonl", "does not exist")
    assert leftovers(tmp) == []


def test_row_missing_columns_names_row_and_columns(workspace):
    tmp, model, _ = workspace
    data = write_jsonl(tmp / "bad.jsonl", CHAT_ROWS[:2] + [{"prompt": "hi", "answer": "hello"}])
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    expect_error(recipe, "row 3", "messages", "prompt, answer")
    assert leftovers(tmp) == []


def test_broken_jsonl_line_is_named(workspace):
    tmp, model, _ = workspace
    data = tmp / "broken.jsonl"
    data.write_text(json.dumps(CHAT_ROWS[0]) + "\n" + '{"messages": [}\n')
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    expect_error(recipe, "line 2", "not valid JSON")


def test_empty_dataset(workspace):
    tmp, model, _ = workspace
    (tmp / "empty.csv").write_text("instruction,output\n")
    recipe = write_recipe(tmp / "r.yaml", model, tmp / "empty.csv", tmp / "out", data={"format": "alpaca"})
    expect_error(recipe, "no rows")


def test_unknown_architecture(workspace):
    tmp, _, data = workspace
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp / "gpt2")
    recipe = write_recipe(tmp / "r.yaml", tmp / "gpt2", data, tmp / "out")
    expect_error(recipe, "'gpt2'", "does not support", "Llama (llama)")
    assert leftovers(tmp) == []


def test_unknown_recipe_key_suggests_the_nearest(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", train={"learnig_rate": 1e-4})
    expect_error(recipe, "train.learnig_rate", "did you mean 'learning_rate'")


def test_unknown_lora_target_fails_without_leaving_an_output_folder(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", lora={"target_modules": ["q_proj", "qkv"]})
    expect_error(recipe, "qkv", "q_proj", "all-linear")
    assert leftovers(tmp) == []


def test_existing_output_folder_is_not_overwritten(workspace):
    tmp, model, data = workspace
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    expect_error(recipe, "already exists", "overwrite")
    assert (tmp / "out" / "keep.txt").read_text() == "mine"


def test_json_mode_reports_errors_as_json(workspace):
    tmp, model, _ = workspace
    recipe = write_recipe(tmp / "r.yaml", model, tmp / "nope.jsonl", tmp / "out")
    result = expect_error(recipe, extra=("--json",))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == "error" and report["exit_code"] == 2 and "nope.jsonl" in report["message"]


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("model:\n  name: x\n  bad indent: [\n")
    result = subprocess.run([sys.executable, "-m", "ftcli", "train", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "line" in result.stderr and "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
