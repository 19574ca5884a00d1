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


def test_bench_decode_times_both_decoders_on_the_same_greedy_tokens():
    command = [sys.executable, "-m", "ftcli.bench", "--decode", "--shape", "tiny", "--precision", "bf16",
               "--prompt-len", "8", "--new-tokens", "12", "--steps", "1", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    generate, ftcli = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (generate["side"], ftcli["side"]) == ("generate", "ftcli")
    # float32 on the CPU: our static-cache loop picks exactly generate's greedy tokens
    assert ftcli["tokens"] == generate["tokens"] and len(ftcli["tokens"]) == 12 and ftcli["same_tokens"] == 12
    assert all(full > first > 0 for side in (generate, ftcli) for full, first in zip(side["full_s"], side["first_s"]))


def test_random_model_keeps_a_tied_head_tied(monkeypatch):
    """Llama-3.2-1B ties its head to the embedding; a copy would add 0.5 GiB to the measured peak."""
    import torch
    from ftcli import bench, shapes

    tied_shape = dict(shapes.SHAPES["tiny"], tie_word_embeddings=True)
    monkeypatch.setitem(shapes.SHAPES, "tiny-tied", tied_shape)
    tied = bench.random_model("tiny-tied", "bf16", torch.device("cpu"), torch.float32)
    untied = bench.random_model("tiny", "bf16", torch.device("cpu"), torch.float32)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
