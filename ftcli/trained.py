"""What a training output folder says about the model it was trained on, for chat and export to load the same base.

`ftcli train` saves the resolved recipe beside the adapter; a folder from another tool may have only peft's
adapter_config.json, which names the base but not how it was loaded.
"""

import json
from pathlib import Path

import yaml

from ftcli.errors import InputError, ModelError


def trained_model_section(folder: Path) -> dict:
    """The recipe's `model:` section (empty without recipe.yaml), its `name` filled from adapter_config.json's
    base_model_name_or_path when the recipe does not give one."""
    model = {}
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        try:
            model = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            raise InputError(f"{recipe} is not a readable recipe. Restore the file the training run wrote.") from None
        if not isinstance(model, dict):
            model = {}
    adapter_config = folder / "adapter_config.json"
    if not model.get("name") and adapter_config.is_file():
        try:
            model = {**model, "name": json.loads(adapter_config.read_text()).get("base_model_name_or_path")}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{adapter_config} is not valid JSON; the adapter folder is damaged. Restore the file "
                             "the training run wrote.") from None
    return model
