"""Every supported family trains in 16-bit and in NF4 4-bit, with falling loss, and saves an adapter peft loads."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import run_cli, write_jsonl, write_recipe
from tiny_models import FAMILIES

ROWS = [{"messages": [{"role": "user", "content": f"Say the number {n}."},
                      {"role": "assistant", "content": f"The number is {n}."}]} for n in range(4)]


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_saves_a_loadable_adapter(family, load_in_4bit, tmp_path, tiny_model_folder):
    model_folder = tiny_model_folder(family)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    # batch_size = all rows, so every step sees the same batch and the loss must fall
    recipe = write_recipe(tmp_path / "r.yaml", model_folder, data, tmp_path / "out",
                          model={"load_in_4bit": load_in_4bit},
                          train={"batch_size": 4, "max_steps": 20, "learning_rate": 2e-2, "warmup_steps": 0,
                                 "lr_scheduler": "constant", "optimizer": "adamw_8bit" if load_in_4bit else "adamw",
                                 "gradient_checkpointing": True})
    result = run_cli("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["precision"] == ("nf4" if load_in_4bit else "float32")

    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses

    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    probe = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        base_logits = base(probe).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "out")
        tuned_logits = tuned(probe).logits
    assert tuned.peft_config["default"].r == 4
    assert (tuned_logits - base_logits).abs().max() > 1e-4  # the saved adapter is not a no-op
