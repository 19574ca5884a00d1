"""The ready recipes in recipes/ validate, the CPU ones fit the fixture, and the quickstart's identity data is well
formed."""

import json
from pathlib import Path

import pytest

from conftest import run_cli
from ftcli.recipe import load_recipe

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
IDENTITY = RECIPES_DIR / "data" / "identity.jsonl"


def test_the_ready_recipes_are_there():
    names = {path.name for path in RECIPES}
    assert {"quickstart-cpu.yaml", "llama-3-8b-alpaca.yaml", "mistral-7b-alpaca.yaml", "qwen3-4b-alpaca.yaml",
            "gemma-3-1b-alpaca.yaml", "smollm2-dpo-cpu.yaml", "zephyr-7b-sft.yaml", "zephyr-7b-dpo.yaml", "smollm2-grpo-cpu.yaml",
            "llama-3.1-8b-grpo-reasoning.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.output.dir == f"outputs/{path.stem.removesuffix('-cpu')}"  # where a CPU run goes needs no "-cpu"
    assert path.read_text().startswith("# ")  # a comment header says what it is


def test_quickstart_points_at_the_identity_data_and_runs_on_a_cpu():
    recipe = load_recipe(RECIPES_DIR / "quickstart-cpu.yaml")
    assert Path(recipe.data.path) == Path("recipes/data/identity.jsonl")
    assert (recipe.model.load_in_4bit, recipe.model.dtype, recipe.model.kernels) == (False, "float32", False)
    assert recipe.train.optimizer == "adamw" and recipe.output.dir == "outputs/quickstart"


def test_the_dpo_quickstart_runs_on_a_cpu_from_the_pirate_pairs(smollm2_folder):
    recipe = load_recipe(RECIPES_DIR / "smollm2-dpo-cpu.yaml")
    assert (recipe.model.name, recipe.train.method, recipe.data.format) == ("models/smollm2", "dpo", "preference")
    assert Path(recipe.data.path) == Path("recipes/data/pirate-preferences.jsonl")
    assert (recipe.model.load_in_4bit, recipe.model.dtype, recipe.model.kernels) == (False, "float32", False)
    result = run_cli("train", RECIPES_DIR / "smollm2-dpo-cpu.yaml", "--set", f"model.name={smollm2_folder}",
                     "--set", f"data.path={RECIPES_DIR.parent / recipe.data.path}", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["train_examples"], summary["truncated"], summary["steps"]) == (240, 0, recipe.train.max_steps)


def test_zephyr_dpo_starts_from_the_zephyr_sft_adapter_on_the_same_base():
    sft, dpo = (load_recipe(RECIPES_DIR / f"zephyr-7b-{step}.yaml") for step in ("sft", "dpo"))
    assert dpo.model.adapter == sft.output.dir and dpo.model.name == sft.model.name == "mistralai/Mistral-7B-v0.1"
    assert dpo.data.template == sft.data.template  # the adapter answers in the template it learnt
    assert (dpo.train.method, dpo.beta(), dpo.data.format, dpo.data.split) == ("dpo", 0.01, "preference", "train_prefs")
    assert (sft.data.path, sft.data.split) == ("HuggingFaceH4/ultrachat_200k", "train_sft")


def identity_rows() -> list[dict]:
    return [json.loads(line) for line in IDENTITY.read_text().splitlines() if line.strip()]


def test_identity_rows_are_conversations_ending_in_an_assistant_turn():
    rows = identity_rows()
    assert len(rows) >= 20
    for number, row in enumerate(rows, start=1):
        messages = row["messages"]
        assert isinstance(messages, list) and messages, f"row {number}"
        assert all(set(m) == {"role", "content"} and m["content"] for m in messages), f"row {number}"
        assert messages[-1]["role"] == "assistant", f"row {number}"
        assert "Nimbus" in messages[-1]["content"] and "Larkspur Labs" in messages[-1]["content"], f"row {number}"


def test_identity_data_has_system_and_multi_turn_rows():
    rows = identity_rows()
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert sum(1 for row in rows if sum(m["role"] == "user" for m in row["messages"]) > 1) >= 2


def test_identity_data_holds_out_the_test_question():
    questions = [m["content"] for row in identity_rows() for m in row["messages"] if m["role"] == "user"]
    assert "Please introduce yourself." not in questions
