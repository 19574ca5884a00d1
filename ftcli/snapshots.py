"""Checkpoints to resume training from: OUT/checkpoints/step-N, the newest `save_total_limit` kept.

A checkpoint holds everything the next step depends on, so that a resumed run computes exactly what an
uninterrupted one would have: the LoRA adapter (a PEFT folder, loadable on its own), the optimizer state
(bitsandbytes' 8-bit state included), the loss-scaler state, the Python, torch and CUDA random states (LoRA
dropout draws from them), and the position in the seeded data order. Each is written into a hidden temporary
folder that is renamed to step-N when complete, so a listed checkpoint is whole.

The optimizer's hyperparameters (learning rate, weight decay) are not taken from a checkpoint: the recipe's win,
so that a resumed run may change every field outside MUST_MATCH.
"""

import json
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ftcli.errors import CheckpointError, redact
from ftcli.loader import ADAPTER_WEIGHTS, TRAINED_ADAPTER
from ftcli.recipe import Recipe
from ftcli.staging import staged_folder

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.pt"

# Recipe fields that shape the data order, the model or the optimizer's tensors: a checkpoint only
# continues a run whose recipe has the same values for them.
# train.batch_size may change with the number of processes, as long as the micro-batch of all processes does not
# (`check_compatible`).
MUST_MATCH = ["model.name", "model.adapter", "model.max_seq_length", "model.load_in_4bit", "lora", "data",
              "train.method", "train.grad_accum", "train.seed", "train.optimizer", "preference", "grpo"]


@dataclass
class Snapshot:
    path: Path
    step: int
    state: dict  # what trainer_state.json holds: the step, the data position, tokens seen, the recipe


def list_snapshots(folder: Path) -> list[Snapshot]:
    """The complete checkpoints under `folder`/checkpoints, oldest first."""
    root = folder / CHECKPOINTS
    found = []
    if not root.is_dir():
        return found
    for path in root.glob("step-*"):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if (path / TENSORS_FILE).is_file():
            found.append(Snapshot(path, int(state["step"]), state))
    return sorted(found, key=lambda snapshot: snapshot.step)


def newest_snapshot(folder: Path) -> Optional[Snapshot]:
    snapshots = list_snapshots(folder)
    return snapshots[-1] if snapshots else None


def save_snapshot(folder: Path, step: int, model, optimizer, scaler, progress: dict, recipe: Recipe,
                  keep: int) -> Path:
    """Write checkpoint step-`step` under `folder`/checkpoints and delete all but the newest `keep`."""
    root = folder / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step}"
    with staged_folder(final) as temporary:
        model.save_pretrained(temporary, selected_adapters=[TRAINED_ADAPTER])
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": random_states()}, temporary / TENSORS_FILE)
        state = {"step": step, **progress, "recipe": recipe_record(recipe)}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1))
    for old in list_snapshots(folder)[:-keep]:
        shutil.rmtree(old.path)
    return final


def restore_snapshot(snapshot: Snapshot, model, optimizer, scaler) -> None:
    """Load the adapter weights and the optimizer, scaler and random states saved in `snapshot`."""
    from peft import set_peft_model_state_dict  # here, not at the top: peft imports transformers, which is slow

    device = next(p.device for p in model.parameters() if p.requires_grad)
    try:
        adapter = load_file(snapshot.path / ADAPTER_WEIGHTS, device=str(device))
        saved = torch.load(snapshot.path / TENSORS_FILE, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"Checkpoint {snapshot.path} is damaged and cannot be read ({error}). Delete that "
                              "folder to resume from the checkpoint before it, or delete the checkpoints to start "
                              "again.") from None
    unexpected = list(getattr(set_peft_model_state_dict(model, adapter), "unexpected_keys", []))
    if unexpected:
        raise CheckpointError(f"Checkpoint {snapshot.path} holds adapter weights this model has no place for "
                              f"({', '.join(unexpected[:3])}); it was saved from another model or LoRA setup.")
    try:
        load_optimizer_state(optimizer, saved["optimizer"])
    except CheckpointError as refused:  # the optimizer says why its state cannot continue; this names the checkpoint
        raise CheckpointError(f"Cannot resume from {snapshot.path}. {refused.message}") from None
    if scaler and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    restore_random_states(saved["rng"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The saved moments and step counts, keeping the hyperparameters the optimizer was built with from the recipe
    (load_state_dict alone would bring back the checkpoint's learning rate and weight decay)."""
    hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                       for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)


def check_compatible(snapshot: Snapshot, recipe: Recipe, processes: int = 1) -> None:
    """Refuse to continue a checkpoint with a recipe that would train a different model or data order: the same
    fields, and the same micro-batch over all processes (batch_size x processes), however many processes there are."""
    saved, current = _flatten(snapshot.state["recipe"]), _flatten(recipe_record(recipe))
    differing = [key for key in sorted(set(saved) | set(current))
                 if any(key == field or key.startswith(field + ".") for field in MUST_MATCH)
                 and saved.get(key) != current.get(key)]
    saved_processes = snapshot.state.get("processes", 1)
    saved_batch, batch = saved["train.batch_size"], recipe.train.batch_size
    hint = ""
    if saved_batch * saved_processes != batch * processes:
        differing.append("train.batch_size")
        saved["train.batch_size"] = f"{saved_batch} x {saved_processes} processes"
        current["train.batch_size"] = f"{batch} x {processes} processes"
        rows = saved_batch * saved_processes
        hint = (f" With {processes} processes, train.batch_size {rows // processes} keeps the {rows} rows of each "
                "micro-batch." if rows % processes == 0 else "")
    if differing:
        changes = "; ".join(f"{key} was {saved.get(key)!r}, now {current.get(key)!r}" for key in differing)
        raise CheckpointError(f"Cannot resume from {snapshot.path}: the recipe changed where a checkpoint must match "
                              f"({changes}). Put those fields back, or delete the checkpoints to start again.{hint}")


def recipe_record(recipe: Recipe) -> dict:
    """The resolved recipe as stored in a checkpoint, secrets redacted like everything written to OUT."""
    return json.loads(redact(json.dumps(recipe.model_dump(mode="json"))))


def copy_snapshots(source: Path, destination: Path) -> None:
    """Copy the complete checkpoints of `source` into `destination`, each whole or not at all."""
    root = destination / CHECKPOINTS
    root.mkdir(exist_ok=True)
    for snapshot in list_snapshots(source):
        with staged_folder(root / snapshot.path.name) as temporary:
            shutil.copytree(snapshot.path, temporary, dirs_exist_ok=True)


def random_states() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_random_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
