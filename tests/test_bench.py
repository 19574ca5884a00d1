"""The benchmark script runs both sides on a tiny shape, and they compute the same losses."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_sides_train_the_same_model_to_the_same_losses():
    command = [sys.executable, "-m", "ftcli.bench", "--shape", "tiny", "--seq", "32", "--bs", "2",
               "--steps", "2", "--warmup", "1", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TRITON_INTERPRET": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    hf, ftcli = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (hf["side"], ftcli["side"]) == ("hf", "ftcli") and "error" not in ftcli, ftcli.get("stderr")
    assert len(hf["step_s"]) == len(ftcli["step_s"]) == 2 and min(ftcli["step_s"]) > 0
    # Same weights, data and LoRA seed: float32 on the CPU, so both sides agree step for step
    assert ftcli["losses"] == pytest.approx(hf["losses"], rel=1e-4)
    assert ftcli["losses"][-1] != ftcli["losses"][0]  # the LoRA weights really moved
