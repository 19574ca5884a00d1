"""Recipe validation: defaults, and errors that name the file, line, field and fix."""

import json
from pathlib import Path

import pytest

from ftcli.errors import RecipeError
from ftcli.recipe import DEFAULT_TARGET_MODULES, load_recipe

MINIMAL = "model:\n  name: ./models/smollm2\ndata:\n  path: data/train.jsonl\n"
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def recipe_file(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(RecipeError) as error:
        load_recipe(path, overrides)
    assert error.value.exit_code == 2
    return error.value.message


def test_minimal_recipe_gets_the_documented_defaults(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL))
    assert (recipe.train.batch_size, recipe.train.grad_accum, recipe.train.learning_rate) == (2, 4, 2e-4)
    assert (recipe.train.optimizer, recipe.train.max_steps, recipe.train.epochs) == ("adamw_8bit", 60, None)
    assert recipe.lora.target_modules == DEFAULT_TARGET_MODULES
    assert (recipe.model.load_in_4bit, recipe.model.trust_remote_code, recipe.data.format) == (True, False, "messages")


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: [10\n  seed: 3\n"))
    assert "not valid YAML at line" in message and "recipe.yaml" in message


def test_unknown_key_names_the_nearest_valid_key_and_its_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  learnig_rate: 1.0e-4\n"))
    assert "line 6" in message and "train.learnig_rate is not a recipe field" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_section_lists_the_sections(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "optimiser:\n  lr: 1\n"))
    assert "optimiser is not a recipe field" in message and "model, lora, data, train, output" in message


def test_wrong_type_names_field_and_value(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL.replace("  name: ./models/smollm2\n",
                                                             "  name: ./models/smollm2\n  load_in_4bit: maybe\n")))
    assert "model.load_in_4bit" in message and "'maybe'" in message and "line 3" in message


def test_bad_choice_lists_allowed_values(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "  format: chatml\n"))
    assert "data.format" in message and "'alpaca', 'sharegpt', 'messages' or 'text'" in message


@pytest.mark.parametrize("text,field", [("data:\n  path: x.jsonl\n", "model"),
                                        ("model:\n  max_seq_length: 10\ndata:\n  path: x\n", "model.name")])
def test_missing_required_field(tmp_path, text, field):
    message = error_of(recipe_file(tmp_path, text))
    assert f"{field} is required but missing" in message


def test_max_steps_and_epochs_both_null(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: null\n"))
    assert "max_steps and epochs are both null" in message


def test_set_overrides_are_typed_by_yaml(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL), ["train.max_steps=10", "model.load_in_4bit=false",
                                                           "lora.target_modules=all-linear", "output.dir=out/x"])
    assert recipe.train.max_steps == 10 and recipe.model.load_in_4bit is False
    assert recipe.lora.target_modules == "all-linear" and recipe.output.dir == "out/x"


@pytest.mark.parametrize("override", ["train.max_steps", "a.b.c=1", "=3"])
def test_malformed_override_is_named(tmp_path, override):
    assert f"--set {override!r} is not of the form section.key=value" in error_of(recipe_file(tmp_path, MINIMAL), [override])


def test_override_of_an_unknown_field_is_caught(tmp_path):
    assert "train.max_step is not a recipe field; did you mean 'max_steps'" in error_of(
        recipe_file(tmp_path, MINIMAL), ["train.max_step=3"])


def test_missing_file_and_non_mapping(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.yaml")
    assert "must be a mapping" in error_of(recipe_file(tmp_path, "- a\n- b\n"))


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL + "train:\n  epochs: 2\n"))
    again = load_recipe(recipe_file(tmp_path, recipe.to_yaml()))
    assert again == recipe and again.train.epochs == 2


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_quickstart_data_is_well_formed_and_holds_out_the_test_question():
    rows = [json.loads(line) for line in (RECIPES[0].parent / "data" / "identity.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    for row in rows:
        assert row["messages"][-1]["role"] == "assistant" and "Nimbus" in json.dumps(row)
    assert "Please introduce yourself." not in json.dumps(rows)
