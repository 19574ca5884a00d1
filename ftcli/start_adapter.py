"""Starting a run from an adapter trained before (model.adapter): the folder is checked against the recipe and the
model before any weight is read, and the recipe's lora section becomes the adapter's settings.

An adapter fits only the base model it was trained on, with the rank, scaling and targets it was trained with, so
those come from its adapter_config.json; the recipe may repeat them but not contradict them. Dropout alone may
change: it shapes training, not the weights. The resolved settings are what recipe.yaml and the checkpoints record,
so that a resumed run is compared with what was really trained.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from ftcli.architectures import Architecture
from ftcli.errors import ModelError, OutputFolderError, RecipeError
from ftcli.loader import ADAPTER_WEIGHTS, linear_projection_names, meta_model, unreadable_adapter
from ftcli.recipe import LoraSettings, Recipe
from ftcli.snapshots import STATE_FILE
from ftcli.trained import trained_model_section

NAMED_BY = "model.adapter"
ADAPTER_CONFIG = "adapter_config.json"
# the recipe's LoRA settings as adapter_config.json names them, with peft's default where an older peft left one out
LORA_KEYS = {"r": ("r", 8), "alpha": ("lora_alpha", 8), "dropout": ("lora_dropout", 0.0), "bias": ("bias", "none"),
             "use_rslora": ("use_rslora", False)}
# peft options that the recipe's lora section cannot express; an adapter that turns one on is refused
UNSUPPORTED_OPTIONS = ["use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                       "layer_replication", "target_parameters", "trainable_token_indices", "lora_bias"]
CHANGEABLE = "dropout"  # the LoRA setting a recipe may set apart from the adapter's


def start_from_adapter(recipe: Recipe, config, architecture: Architecture) -> Recipe:
    """The recipe with its lora section resolved to model.adapter's settings (the recipe as it is without one),
    once the folder is known to hold a LoRA adapter of this model that the recipe does not contradict."""
    if recipe.model.adapter is None:
        return recipe
    folder = Path(recipe.model.adapter)
    check_not_output(folder, Path(recipe.output.dir))
    adapter_config = read_adapter_config(folder)
    check_trained_base(folder, recipe.model.name)
    model = meta_model(config, recipe.model.trust_remote_code)
    projections = linear_projection_names(model)
    adapter = adapter_settings(folder, adapter_config, projections)
    check_fits(folder, model, recipe.model.name)
    return recipe.model_copy(update={"lora": agreed_settings(folder, adapter, recipe.lora, architecture, projections)})


def check_not_output(folder: Path, output: Path) -> None:
    """The run replaces its output folder when it finishes, so starting from it (or from inside it) would destroy
    the adapter the run starts from."""
    start, final = folder.resolve(), output.resolve()
    if start == final or final in start.parents:
        place = "is the output folder" if start == final else "is inside the output folder"
        raise OutputFolderError(f"{NAMED_BY} {folder} {place} {output}, and a run replaces its output folder when it "
                                "finishes, which would destroy the adapter it starts from. Write the run to another "
                                "folder with --output (or output.dir).")


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of a LoRA adapter folder that has its weights in safetensors."""
    if not folder.is_dir():
        raise ModelError(f"{NAMED_BY} {folder} does not exist or is not a folder. Give the output folder of an earlier "
                         "`ftcli train` run (or another PEFT LoRA adapter folder), relative to the working directory.")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        kind = ("a model folder (it has config.json), not an adapter. A merged export already holds its adapter: "
                "give it as model.name and leave model.adapter out" if (folder / "config.json").is_file()
                else f"not an adapter folder. Point {NAMED_BY} at the output folder of an earlier `ftcli train` run")
        raise ModelError(f"{NAMED_BY} {folder} has no {ADAPTER_CONFIG}, so it is {kind}.")
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError:
        raise ModelError(f"{config_file} is not valid JSON; the adapter folder of {NAMED_BY} is damaged. Restore "
                         "the file the training run wrote.") from None
    peft_type = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
    if peft_type != "LORA":
        raise ModelError(f"{NAMED_BY} {folder} holds a {peft_type} adapter (the peft_type of its {ADAPTER_CONFIG}), "
                         "not a LoRA adapter, and ftcli trains LoRA only. Start from a LoRA adapter, or leave "
                         f"{NAMED_BY} out to start a new one.")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = (", only adapter_model.bin, the older pickle format ftcli does not read: load it with peft and "
                   "save it again, which writes safetensors" if (folder / "adapter_model.bin").is_file()
                   else f". Restore the file the training run wrote, or point {NAMED_BY} at a complete adapter folder")
        raise ModelError(f"{NAMED_BY} {folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}{pickled}.")
    return adapter_config


def check_trained_base(folder: Path, name: str) -> None:
    """An ftcli folder records the base it was trained on; an adapter of another base with the same shapes would
    load without complaint and train nonsense."""
    trained_on, record = recorded_base(folder)
    if trained_on and not same_model(str(trained_on), name):
        raise ModelError(f"{NAMED_BY} {folder} was trained on {trained_on!r} (the model.name in its {record.name}), "
                         f"but this recipe's model.name is {name!r}, and an adapter fits only the base model it was "
                         f"trained on. Set model.name to {trained_on!r}; if {name!r} is that same model in another "
                         f"place, write {name!r} as model.name in {record}.")


def recorded_base(folder: Path) -> tuple[Optional[str], Path]:
    """The base model.name an ftcli folder records, and the file it is in: a run's recipe.yaml, or a checkpoint's
    trainer_state.json; None for another tool's adapter folder."""
    recipe, state = folder / "recipe.yaml", folder / STATE_FILE
    if recipe.is_file():
        return trained_model_section(folder).get("name"), recipe
    if not state.is_file():
        return None, recipe
    try:
        return json.loads(state.read_text(encoding="utf-8"))["recipe"]["model"]["name"], state
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{state} is not a checkpoint state ftcli wrote; the checkpoint of {NAMED_BY} is damaged. "
                         "Start from another checkpoint, or from the run's output folder.") from None


def same_model(recorded: str, name: str) -> bool:
    """The same hub id or path, or two paths to the same folder."""
    if recorded == name:
        return True
    return Path(recorded).exists() and Path(name).exists() and Path(recorded).resolve() == Path(name).resolve()


def adapter_settings(folder: Path, adapter_config: dict, projections: list[str]) -> LoraSettings:
    """The adapter's LoRA settings as the recipe's lora section would write them."""
    unsupported = [key for key in UNSUPPORTED_OPTIONS if adapter_config.get(key)]
    if adapter_config.get("task_type") not in (None, "CAUSAL_LM"):
        unsupported.append(f"task_type {adapter_config['task_type']}")
    if unsupported:
        raise ModelError(f"{NAMED_BY} {folder} uses peft's {', '.join(unsupported)} (its {ADAPTER_CONFIG}), which "
                         f"ftcli's LoRA for causal language models does not train. Start from a plain LoRA adapter, "
                         f"or leave {NAMED_BY} out to start a new one.")
    targets = adapter_config.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets  # peft writes a set, in no fixed order
    if not isinstance(targets, list) or not set(targets) <= set(projections):
        raise ModelError(f"{NAMED_BY} {folder} adapts {targets!r} (the target_modules of its {ADAPTER_CONFIG}), which "
                         f"are not all among this model's linear projections ({', '.join(projections)}): it was "
                         "trained on another base model, or adapts layers ftcli does not train. Set model.name to the "
                         "base it was trained on, or start from an adapter of this model's projections.")
    values = {field: adapter_config.get(key, default) for field, (key, default) in LORA_KEYS.items()}
    try:
        return LoraSettings(**values, target_modules=targets)
    except ValidationError as err:
        problems = "; ".join(f"{error['loc'][0]}: {error['msg']}" for error in err.errors())
        raise ModelError(f"{folder / ADAPTER_CONFIG} holds LoRA settings ftcli cannot train with ({problems}). "
                         f"Start from another adapter, or leave {NAMED_BY} out to start a new one.") from None


def check_fits(folder: Path, model: torch.nn.Module, name: str) -> None:
    """Every tensor of the adapter has a place of its shape in the model (on the meta device, so no weight is
    read); peft would otherwise stop on a size mismatch with a traceback."""
    try:
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as weights:
            shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (OSError, SafetensorError) as err:
        raise unreadable_adapter(folder, err) from None
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters())
    for key, shape in shapes.items():
        needed = needed_shape(key, shape, modules, parameters)
        if needed != shape:
            place = "no place in this model" if needed is None else f"shape {shape}, where this model needs {needed}"
            raise ModelError(f"{NAMED_BY} {folder} does not fit model.name {name!r}: its tensor {key} has {place}. "
                             "It was trained on another base model; set model.name to that one (the recipe.yaml of "
                             "an ftcli run folder names it).")


def needed_shape(key: str, shape: list[int], modules: dict, parameters: dict):
    """The shape the model has room for under an adapter tensor's name (peft's lora_A, lora_B of a linear
    projection, or a bias it trains), or None where it has none."""
    path = key.removeprefix("base_model.model.")
    module_path, _, part = path.rpartition(".lora_")
    if part in ("A.weight", "B.weight"):
        module = modules.get(module_path)
        if not isinstance(module, torch.nn.Linear):
            return None
        return [shape[0], module.in_features] if part == "A.weight" else [module.out_features, shape[1]]
    parameter = parameters.get(path)
    return None if parameter is None else list(parameter.shape)


def agreed_settings(folder: Path, adapter: LoraSettings, recipe: LoraSettings, architecture: Architecture,
                    projections: list[str]) -> LoraSettings:
    """The adapter's settings, with the recipe's dropout when it sets one and the recipe's spelling of the same
    targets; a field the recipe sets to another value than the adapter's is an error naming both."""
    written = recipe.model_fields_set - {CHANGEABLE}
    conflicts = [f"lora.{field} is {getattr(recipe, field)!r} in the recipe but {getattr(adapter, field)!r} in the "
                 "adapter" for field in sorted(written - {"target_modules"})
                 if getattr(recipe, field) != getattr(adapter, field)]
    recipe_targets = (set(projections) if recipe.target_modules == "all-linear"
                      else set(architecture.lora_targets(recipe.target_modules)))
    same_targets = recipe_targets == set(adapter.target_modules)
    if "target_modules" in written and not same_targets:
        conflicts.append(f"lora.target_modules adapts {sorted(recipe_targets)} in the recipe but "
                         f"{adapter.target_modules} in the adapter")
    if conflicts:
        raise RecipeError(f"{'; '.join(conflicts)} ({NAMED_BY} {folder}, its {ADAPTER_CONFIG}). A run from an "
                          "adapter trains it with the LoRA settings it was trained with: remove those fields from the "
                          "lora section, or set them to the adapter's values (only lora.dropout may differ).")
    dropout = recipe.dropout if CHANGEABLE in recipe.model_fields_set else adapter.dropout
    targets = recipe.target_modules if same_targets else adapter.target_modules
    return adapter.model_copy(update={"dropout": dropout, "target_modules": targets})
