"""Several processes started by torchrun or `ftcli train --gpus 2` (on the CPU with gloo, or on two GPUs with NCCL
where the machine has them): the same losses and adapter as one process that takes all their rows, resume onto
another number of processes, stops and failures of one process, and process 0 alone writing the output folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_jsonl, write_recipe
from ftcli.preference import REFERENCE_CACHE

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-5  # relative, per step: the same sums in another order, in float32
ADAPTER_TOLERANCE = 1e-4  # absolute, per weight, after the run's updates


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment() -> dict[str, str]:
    """One thread a process, as the CPU has few cores; on a machine with fewer than two GPUs, no GPU (gloo on the
    CPU), with two, the GPUs and NCCL. Every side of a comparison runs where the other does."""
    hidden = {} if torch.cuda.device_count() >= 2 else {"CUDA_VISIBLE_DEVICES": ""}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path} | hidden


def train(recipe, processes: int, *options: str) -> subprocess.CompletedProcess:
    """`ftcli train` in one process, or under torchrun in `processes`."""
    command = [sys.executable, "-m", "ftcli", "train", str(recipe), *options]
    if processes > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m"]
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, env=worker_environment(), cwd=ROOT)


def losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(folder, reference) -> None:
    got, expected = losses(folder), losses(reference)
    assert len(got) == len(expected)
    for step, (value, wanted) in enumerate(zip(got, expected), start=1):
        assert value == pytest.approx(wanted, rel=LOSS_TOLERANCE), f"step {step}"
    trained, wanted = load_file(folder / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert trained.keys() == wanted.keys()
    largest = max(float((trained[name] - wanted[name]).abs().max()) for name in wanted)
    assert largest <= ADAPTER_TOLERANCE


@pytest.fixture(scope="module")
def fixture_recipe(smollm2_folder, tmp_path_factory):
    """The SmolLM2 fixture in float32 on the identity data: 24 rows, so 4 rows a micro-batch and 2 micro-batches a
    step make 3 steps an epoch, and 4 steps cross into the reshuffled second epoch."""
    folder = tmp_path_factory.mktemp("distributed")

    def recipe(name: str, batch_size: int, **train):
        return write_recipe(folder / f"{name}.yaml", smollm2_folder, ROOT / "recipes" / "data" / "identity.jsonl",
                            folder / name, model={"max_seq_length": 96},
                            data={"format": "messages", "train_on_responses_only": True},
                            train={"batch_size": batch_size, "grad_accum": 2, "max_steps": 4, "learning_rate": 1e-4,
                                   "lr_scheduler": "constant", "logging_steps": 1, **train})

    return recipe, folder


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_their_rows(fixture_recipe, distributed):
    recipe, folder = fixture_recipe
    if not (folder / "one").exists():
        one = train(recipe("one", 4), 1)
        assert one.returncode == 0, one.stderr
    two = train(recipe(distributed, 2, distributed=distributed), 2, "--json")
    assert two.returncode == 0, two.stderr
    assert_same_run(folder / distributed, folder / "one")
    assert json.loads(two.stdout.splitlines()[-1])["processes"] == 2
    assert not list(folder.glob(f".{distributed}*")), "the staging folder is renamed away"


# adamw_8bit: process 0 sends its optimizer state, flat 8-bit moments included, to the other process at the start
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_resume_from_two_processes_onto_one(fixture_recipe, optimizer):
    recipe, folder = fixture_recipe
    name = "one" if optimizer == "adamw" else f"one-{optimizer}"  # "one" is shared with the test above
    if not (folder / name).exists():
        assert train(recipe(name, 4, optimizer=optimizer), 1).returncode == 0
    first = train(recipe(f"halves-{optimizer}", 2, max_steps=2, save_steps=2, optimizer=optimizer), 2)
    assert first.returncode == 0, first.stderr
    resumed = train(recipe(f"halves-{optimizer}", 4, max_steps=4, save_steps=2, optimizer=optimizer), 1, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(folder / f"halves-{optimizer}", folder / name)


def test_resume_refuses_another_micro_batch(fixture_recipe):
    recipe, folder = fixture_recipe
    assert train(recipe("steady", 2, max_steps=2, save_steps=2), 2).returncode == 0
    refused = train(recipe("steady", 2, max_steps=4), 1, "--resume")
    assert refused.returncode == 2
    assert "train.batch_size was '2 x 2 processes', now '2 x 1 processes'" in refused.stderr
    assert "With 1 processes, train.batch_size 4 keeps the 4 rows" in refused.stderr


@pytest.fixture
def tiny(tmp_path, tiny_model_folder):
    return tmp_path, tiny_model_folder("llama")


def tiny_recipe(tiny, name: str, rows: list[dict], batch_size: int, **sections):
    tmp, model = tiny
    data = write_jsonl(tmp / f"{name}.jsonl", rows)
    train_section = {"batch_size": batch_size, "grad_accum": 1, "max_steps": 3, "lr_scheduler": "constant"}
    return write_recipe(tmp / f"{name}.yaml", model, data, tmp / name,
                        train=train_section | sections.pop("train", {}), **sections)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_a_process_with_no_rows_in_a_micro_batch_adds_nothing(tiny, distributed):
    """9 rows in micro-batches of 4: the third has one row, which process 1 takes while process 0 has none (under
    fsdp it still runs a pass through the sharded layers, which process 1 gathers with it)."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(9)]
    one = train(tiny_recipe(tiny, "one", rows, 4), 1)
    assert one.returncode == 0, one.stderr
    two = train(tiny_recipe(tiny, "two", rows, 2, train={"distributed": distributed}), 2)
    assert two.returncode == 0, two.stderr
    assert_same_run(tiny[0] / "two", tiny[0] / "one")


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_dpo_over_two_processes_equals_one(tiny, distributed):
    """Pair losses are divided by the pairs of all processes, and the reward metrics are means over all of them;
    the precomputed reference is process 0's."""
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"The number is {i}."} for i in range(10)]
    sections = dict(data={"format": "preference"}, train={"method": "dpo"}, preference={"precompute_reference": True})
    one = train(tiny_recipe(tiny, "one", rows, 4, **sections), 1)
    assert one.returncode == 0, one.stderr
    two = train(tiny_recipe(tiny, "two", rows, 2, **(sections | {"train": {"method": "dpo", "distributed": distributed}})),
                2)
    assert two.returncode == 0, two.stderr
    assert_same_run(tiny[0] / "two", tiny[0] / "one")
    one_rows, two_rows = (metrics_rows(tiny[0] / name) for name in ("one", "two"))
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin"):
        assert [row[name] for row in two_rows] == pytest.approx([row[name] for row in one_rows], rel=1e-4, abs=1e-5)
    # the share of pairs with a positive margin: at step 1 the policy is the reference and each margin is rounding
    # noise (on two H200s under fsdp 0.0 against 0.25), so it is compared from step 2 on
    assert [row["reward_accuracy"] for row in two_rows[1:]] == [row["reward_accuracy"] for row in one_rows[1:]]
    assert (tiny[0] / "two" / REFERENCE_CACHE).is_file()


def test_grpo_over_two_processes_reports_the_rewards_of_all(tiny):
    tmp, _ = tiny
    (tmp / "rewards.py").write_text("def digits(completions, **columns):\n"
                                    "    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]\n")
    rows = [{"prompt": f"What is {i} plus {i}?"} for i in range(8)]
    grpo = {"num_generations": 4, "max_prompt_length": 32, "max_completion_length": 8,
            "rewards": [{"function": str(tmp / "rewards.py") + ":digits"}]}
    result = train(tiny_recipe(tiny, "two", rows, 1, data={"format": "prompts"}, train={"method": "grpo"}, grpo=grpo), 2,
                   "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["processes"] == 2 and summary["steps"] == 3
    rows = metrics_rows(tmp / "two")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(0 <= row["reward"] <= 1 and row["completion_length"] > 0 for row in rows)
    assert result.stdout.count('"status": "ok"') == 1, "process 0 alone prints the summary"


def metrics_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def launch(recipe, *options: str) -> subprocess.Popen:
    """`ftcli train RECIPE --gpus 2` on the CPU, as a user starts it."""
    return subprocess.Popen([sys.executable, "-m", "ftcli", "train", str(recipe), "--gpus", "2", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_environment(),
                            cwd=ROOT)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The launcher's workers, process 0 first."""
    children = subprocess.run(["ps", "--ppid", str(launcher.pid), "-o", "pid=", "--sort", "start_time"],
                              capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children]


def test_sigterm_to_one_process_stops_all_after_one_checkpoint(tiny):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
    recipe = tiny_recipe(tiny, "long", rows, 2, train={"max_steps": 100000})
    staging = tiny[0] / ".long.partial"
    launcher = launch(recipe)
    deadline = time.monotonic() + 300
    while not ((staging / "metrics.jsonl").is_file() and len((staging / "metrics.jsonl").read_text().splitlines()) > 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)
    os.kill(worker_pids(launcher)[1], signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 143, stderr
    checkpoints = list((staging / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.removeprefix("step-"))
    assert stderr.count("SIGTERM received: stopped after step") == 1
    assert f"stopped after step {step} of 100000" in stderr
    assert len((staging / "metrics.jsonl").read_text().splitlines()) == step


def test_a_reward_that_fails_on_one_process_stops_all_with_one_message(tiny):
    tmp, _ = tiny
    (tmp / "rewards.py").write_text("def picky(completions, prompts, **columns):\n"
                                    "    if any('plus 5' in prompt for prompt in prompts):\n"
                                    "        raise ValueError('five is not allowed')\n"
                                    "    return [1.0 for _ in completions]\n")
    rows = [{"prompt": f"What is {i} plus {i}?"} for i in range(8)]
    grpo = {"num_generations": 2, "max_prompt_length": 32, "max_completion_length": 4,
            "rewards": [{"function": str(tmp / "rewards.py") + ":picky"}]}
    launcher = launch(tiny_recipe(tiny, "picky", rows, 1, data={"format": "prompts"},
                                  train={"method": "grpo", "max_steps": 8}, grpo=grpo))
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 2, stderr
    assert stderr.count("error:") == 1, stderr
    assert "five is not allowed" in stderr and "picky" in stderr
    assert not (tmp / "picky").exists() and not (tmp / ".picky.partial").exists()
