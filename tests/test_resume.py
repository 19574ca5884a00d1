"""Checkpoints, --resume, interruption by signals, divergence, out-of-memory advice and secret redaction."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl, write_recipe
from ftcli.progress import TrainingDisplay

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
             for a in range(1, 5) for b in range(1, 4)]


@pytest.fixture
def workspace(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    return tmp_path, tiny_model_folder("llama"), data


# Dropout draws from the random state and the 12 rows make 2 epochs reshuffle, so a resume must restore both
RESUMABLE = dict(lora={"r": 4, "alpha": 8, "dropout": 0.1},
                 train={"max_steps": 8, "batch_size": 2, "grad_accum": 2, "save_steps": 2, "warmup_steps": 2,
                        "save_total_limit": 2})


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


class StopAfter(TrainingDisplay):
    """A silent display that raises the stop flag after step `k`, as a SIGTERM arriving during that step would."""

    def __init__(self, stop, k):
        super().__init__(console=None, enabled=False)
        self.stop, self.k = stop, k

    def step(self, step, loss, lr, row):
        if step == self.k:
            self.stop.signal_number = signal.SIGTERM


def test_interrupted_then_resumed_equals_uninterrupted(workspace):
    from ftcli.errors import Interrupted
    from ftcli.output import staged_output, staging_folder
    from ftcli.recipe import load_recipe
    from ftcli.signals import StopRequest
    from ftcli.train import run

    tmp, model, data = workspace
    whole = write_recipe(tmp / "whole.yaml", model, data, tmp / "whole", **RESUMABLE)
    assert run_cli("train", whole, "--json").exit_code == 0

    recipe = load_recipe(write_recipe(tmp / "cut.yaml", model, data, tmp / "cut", **RESUMABLE))
    stop = StopRequest()
    with pytest.raises(Interrupted) as interrupted:
        with staged_output(tmp / "cut", overwrite=False) as staging:
            run(recipe, staging, StopAfter(stop, 5), resume=False, stop=stop)
    assert interrupted.value.exit_code == 143 and "--resume" in interrupted.value.message
    partial = staging_folder(tmp / "cut")
    assert not (tmp / "cut").exists()
    # step-2 was pruned (limit 2); step-4 from save_steps and step-5 from the stop remain
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert len(losses(partial)) == 5

    result = run_cli("train", tmp / "cut.yaml", "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["resumed_from_step"] == 5
    assert losses(tmp / "cut") == losses(tmp / "whole")  # every row, to the 6 digits written
    final, reference = adapter(tmp / "cut"), adapter(tmp / "whole")
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=0)
    assert not partial.exists()


def test_sigterm_to_a_real_process_saves_and_exits_143_then_resume_finishes(workspace):
    tmp, model, data = workspace
    settings = {"lora": RESUMABLE["lora"], "train": RESUMABLE["train"] | {"max_steps": 400, "save_steps": 0}}
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", **settings)
    partial = tmp / ".out.partial"
    process = subprocess.Popen([sys.executable, "-m", "ftcli", "train", str(recipe), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_rows(partial)) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    report = json.loads(stdout.splitlines()[-1])
    assert report["status"] == "error" and "SIGTERM" in report["message"] and "Traceback" not in stderr
    checkpoints = [p.name for p in (partial / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and 3 <= int(checkpoints[0].removeprefix("step-")) < 400
    without_resume = run_cli("train", recipe)
    assert without_resume.exit_code == 2 and "--resume" in without_resume.output

    result = run_cli("train", recipe, "--resume", "--set", "train.max_steps=400", "--json")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))


def _rows(folder):
    try:
        return (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
