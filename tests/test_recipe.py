"""load_recipe: defaults, `--set` overrides, and errors that name the file, the line, the field and the fix."""

from pathlib import Path

import pytest

from ftcli.errors import InputError, RecipeError
from ftcli.recipe import load_recipe

# Lines 1-4; anything a test appends starts on line 5.
MINIMAL = """\
model:
  name: ./models/smollm2
data:
  path: data/train.jsonl
"""
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe_file(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides=None, kind=RecipeError) -> str:
    """The message of the error of `kind` that loading `path` raises; it must exit with code 2."""
    with pytest.raises(kind) as caught:
        load_recipe(path, overrides)
    assert caught.value.exit_code == 2
    assert "\n\n" not in caught.value.message  # one paragraph
    return caught.value.message


# Defaults


def test_minimal_recipe_gets_every_default(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL))
    assert recipe.model.name == "./models/smollm2" and recipe.data.path == "data/train.jsonl"
    assert recipe.train.batch_size == 2
    assert recipe.train.grad_accum == 4
    assert recipe.train.learning_rate == 2e-4
    assert recipe.train.optimizer == "adamw_8bit"
    assert (recipe.train.max_steps, recipe.train.epochs, recipe.train.seed) == (60, None, 3407)
    assert recipe.lora.target_modules == SEVEN_PROJECTIONS
    assert (recipe.lora.r, recipe.lora.alpha) == (16, 16)
    assert (recipe.model.load_in_4bit, recipe.model.dtype, recipe.model.trust_remote_code) == (True, "auto", False)
    assert (recipe.data.format, recipe.data.template, recipe.data.train_on_responses_only) == ("messages", "auto", True)
    assert recipe.output.dir == "outputs/run"


def test_default_target_modules_are_not_shared_between_recipes(tmp_path):
    first = load_recipe(recipe_file(tmp_path, MINIMAL))
    first.lora.target_modules.append("lm_head")
    assert load_recipe(recipe_file(tmp_path, MINIMAL)).lora.target_modules == SEVEN_PROJECTIONS


def test_a_section_with_nothing_under_it_gets_its_defaults(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL + "train:\nlora:\n"))
    assert recipe.train.max_steps == 60 and recipe.lora.r == 16


# Errors in the file


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: [10\n  seed: 3\n"))
    assert message.startswith(f"{tmp_path / 'recipe.yaml'} is not valid YAML at line ")
    assert "Fix the syntax there" in message


def test_tab_indentation_names_its_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n\tmax_steps: 3\n"))
    assert "is not valid YAML at line 6, column 1" in message and "'\\t'" in message


def test_control_character_names_its_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "output:\n  dir: out\x07\n"))
    assert "is not valid YAML at line 6: the character U+0007 is not allowed" in message


def test_unknown_key_names_the_nearest_valid_key_and_its_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: 3\n  learnig_rate: 1.0e-4\n"))
    assert "recipe.yaml line 7: train.learnig_rate is not a recipe field; did you mean 'learning_rate'?" in message
    assert "See the recipe reference in README.md" in message


def test_every_unknown_key_is_reported_at_once(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  warmup: 1\n  sed: 2\n"))
    assert "line 6: train.warmup is not a recipe field; did you mean 'warmup_steps'?" in message
    assert "line 7: train.sed is not a recipe field; did you mean 'seed'?" in message


def test_unknown_key_with_no_near_match_lists_the_valid_keys(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "output:\n  zzz: 1\n"))
    assert "line 6: output.zzz is not a recipe field; valid keys here: dir, overwrite, tensorboard." in message


def test_unknown_section_names_its_line_and_the_sections(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "optimiser:\n  lr: 1\n"))
    assert "recipe.yaml line 5: optimiser is not a recipe field" in message
    assert "valid keys here: model, lora, data, train, preference, grpo, output." in message


def test_misspelt_section_names_the_nearest_section(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "trian:\n  max_steps: 3\n"))
    assert "line 5: trian is not a recipe field; did you mean 'train'?" in message


def test_wrong_type_names_the_field_the_value_and_the_line(tmp_path):
    text = MINIMAL.replace("  name: ./models/smollm2\n", "  name: ./models/smollm2\n  load_in_4bit: maybe\n")
    message = error_of(recipe_file(tmp_path, text))
    assert "recipe.yaml line 3: model.load_in_4bit: Input should be a valid boolean" in message
    assert "(got 'maybe')" in message


def test_number_out_of_range_names_the_limit(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  batch_size: 0\n"))
    assert "line 6: train.batch_size: Input should be greater than 0 (got 0)." in message


def test_bad_choice_lists_the_allowed_values(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "  format: chatml\n"))
    assert "line 5: data.format: Input should be 'alpaca', 'sharegpt', 'messages', 'text', 'preference' or 'prompts' (got 'chatml')." in message


def test_missing_model_name_says_required(tmp_path):
    message = error_of(recipe_file(tmp_path, "model:\n  max_seq_length: 10\ndata:\n  path: x.jsonl\n"))
    assert "recipe.yaml line 1: model.name is required but missing; add it to the recipe." in message


def test_missing_data_path_says_required(tmp_path):
    message = error_of(recipe_file(tmp_path, "model:\n  name: m\ndata:\n  format: alpaca\n"))
    assert "recipe.yaml line 3: data.path is required but missing" in message


def test_missing_sections_say_required(tmp_path):
    message = error_of(recipe_file(tmp_path, "lora:\n  r: 8\n"))
    assert "model is required but missing" in message and "data is required but missing" in message


def test_max_steps_and_epochs_both_null_is_an_error(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: null\n  epochs: null\n"))
    assert "line 5: train: max_steps and epochs are both null; set one of them" in message


def test_epochs_alone_is_enough(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: null\n  epochs: 2\n"))
    assert (recipe.train.max_steps, recipe.train.epochs) == (None, 2)


def test_a_key_written_twice_is_an_error(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  seed: 1\ntrain:\n  max_steps: 3\n"))
    assert "line 7: train is written twice (first on line 5); YAML would keep only the last one" in message


def test_a_key_yaml_reads_as_a_boolean_is_explained(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "on: 1\n"))
    assert "the key True is not text" in message and "quote that key" in message


def test_missing_recipe_file(tmp_path):
    message = error_of(tmp_path / "nope.yaml", kind=InputError)
    assert f"Recipe file {tmp_path / 'nope.yaml'} does not exist" in message and "recipes/" in message


def test_a_folder_is_not_a_recipe(tmp_path):
    assert f"{tmp_path} is a folder" in error_of(tmp_path, kind=InputError)


def test_recipe_that_is_a_list(tmp_path):
    message = error_of(recipe_file(tmp_path, "- model\n- data\n"))
    assert "must be a mapping with the sections model, lora, data, train, preference, grpo and output; it holds a list." in message


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    assert "is not UTF-8 text" in error_of(path)


# --set overrides


def test_set_values_are_read_as_yaml(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL),
                         ["train.max_steps=10", "model.load_in_4bit=false", "lora.target_modules=all-linear"])
    assert recipe.train.max_steps == 10 and isinstance(recipe.train.max_steps, int)
    assert recipe.model.load_in_4bit is False
    assert recipe.lora.target_modules == "all-linear"


def test_set_a_list(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL), ["lora.target_modules=[q_proj, v_proj]"])
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]


def test_set_a_key_of_a_section_the_file_does_not_have(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL), ["output.dir=out/x", "train.seed=5"])
    assert recipe.output.dir == "out/x" and recipe.train.seed == 5
    assert recipe.train.batch_size == 2  # the rest of the new section keeps its defaults


def test_set_into_an_empty_section(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL + "train:\n"), ["train.max_steps=10"])
    assert recipe.train.max_steps == 10


def test_set_wins_over_the_file(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: 5\n"), ["train.max_steps=7"])
    assert recipe.train.max_steps == 7


@pytest.mark.parametrize("override", ["train.max_steps", "a.b.c=1", "=3", "train.=3"])
def test_malformed_override_is_named(tmp_path, override):
    message = error_of(recipe_file(tmp_path, MINIMAL), [override])
    assert f"--set {override!r} is not of the form section.key=value, for example --set train.max_steps=10." == message


def test_override_into_a_section_that_is_not_a_mapping(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train: 5\n"), ["train.max_steps=3"])
    assert message == "--set 'train.max_steps=3': recipe section 'train' is not a mapping."


def test_bad_override_value_names_the_override_not_the_file_line(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL + "train:\n  max_steps: 5\n"), ["train.max_steps=abc"])
    assert "--set 'train.max_steps=abc': train.max_steps: Input should be a valid integer" in message
    assert "(got 'abc')" in message and "line 6" not in message


def test_override_of_an_unknown_field_names_the_override(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL), ["train.max_step=3"])
    assert "--set 'train.max_step=3': train.max_step is not a recipe field; did you mean 'max_steps'?" in message


def test_override_of_an_unknown_section_names_the_override(tmp_path):
    message = error_of(recipe_file(tmp_path, MINIMAL), ["foo.bar=1"])
    assert "--set 'foo.bar=1': foo is not a recipe field; valid keys here: model, lora, data, train, preference, grpo, output." in message


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("offload", "offload"), ("auto", "auto")])
def test_gradient_checkpointing_is_true_false_offload_or_auto(tmp_path, value, expected):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL), [f"train.gradient_checkpointing={value}"])
    assert recipe.train.gradient_checkpointing == expected
    assert load_recipe(recipe_file(tmp_path, recipe.to_yaml(), name="resolved.yaml")) == recipe


@pytest.mark.parametrize("value", ["offlaod", "1", "cpu"])
def test_other_gradient_checkpointing_values_name_the_choices(tmp_path, value):
    message = error_of(recipe_file(tmp_path, MINIMAL + f"train:\n  gradient_checkpointing: {value}\n"))
    shown = repr(int(value)) if value.isdigit() else repr(value)
    assert f"line 6: train.gradient_checkpointing: must be true, false, offload or auto (got {shown})." in message


# The resolved recipe


def test_to_yaml_round_trips(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL + "train:\n  epochs: 2\n  learning_rate: 1.0e-4\n"),
                         ["lora.target_modules=all-linear"])
    dumped = recipe.to_yaml()
    assert "batch_size: 2" in dumped and "target_modules: all-linear" in dumped  # defaults are written out
    again = load_recipe(recipe_file(tmp_path, dumped, name="resolved.yaml"))
    assert again == recipe
    assert (again.train.epochs, again.train.learning_rate) == (2, 1e-4)


def test_to_yaml_round_trips_the_default_target_list(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, MINIMAL))
    again = load_recipe(recipe_file(tmp_path, recipe.to_yaml(), name="resolved.yaml"))
    assert again == recipe and again.lora.target_modules == SEVEN_PROJECTIONS
