"""Checkpoints, --resume, interruption by signals, divergence, out-of-memory advice and secret redaction."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_clean_failure, run_cli, write_jsonl, write_recipe
from ftcli.optim import FLAT_STATE
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


# r=64 makes most of the tiny model's LoRA matrices whole 256-element blocks of at least 4096 elements, which
# adamw_8bit steps as one flat tensor (the k and v projections' B matrices, 2048 elements, it steps apart)
@pytest.mark.parametrize("optimizer, r", [("adamw", 4), ("adamw_8bit", 4), ("adamw_8bit", 64)])
def test_interrupted_then_resumed_equals_uninterrupted(workspace, optimizer, r):
    from ftcli.errors import Interrupted
    from ftcli.output import locked_output_folder, partial_folder
    from ftcli.recipe import load_recipe
    from ftcli.signals import StopRequest
    from ftcli.train import run

    tmp, model, data = workspace
    settings = RESUMABLE | {"train": RESUMABLE["train"] | {"optimizer": optimizer},
                            "lora": RESUMABLE["lora"] | {"r": r, "alpha": 2 * r}}
    whole = write_recipe(tmp / "whole.yaml", model, data, tmp / "whole", **settings)
    assert run_cli("train", whole, "--json").exit_code == 0

    recipe = load_recipe(write_recipe(tmp / "cut.yaml", model, data, tmp / "cut", **settings))
    stop = StopRequest()
    with pytest.raises(Interrupted) as interrupted:
        with locked_output_folder(tmp / "cut", overwrite=False) as staging:
            run(recipe, staging, StopAfter(stop, 5), resume=False, stop=stop)
    assert interrupted.value.exit_code == 143 and "--resume" in interrupted.value.message
    partial = partial_folder(tmp / "cut")
    assert not (tmp / "cut").exists()
    # step-2 was pruned (limit 2); step-4 from save_steps and step-5 from the stop remain
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert len(losses(partial)) == 5
    saved = torch.load(partial / "checkpoints" / "step-5" / "training_state.pt", weights_only=True)["optimizer"]
    flat = saved.get(FLAT_STATE, {"members": []})["members"]
    assert len(flat) == (24 if (optimizer, r) == ("adamw_8bit", 64) else 0)  # 12 of each layer's 14 matrices

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
    # far more steps than run before the signal; the resumed run then stops two steps after the checkpoint
    settings = {"lora": RESUMABLE["lora"], "train": RESUMABLE["train"] | {"max_steps": 5000, "save_steps": 0}}
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
    assert len(checkpoints) == 1
    stopped = int(checkpoints[0].removeprefix("step-"))
    assert 3 <= stopped < 5000 and f"stopped after step {stopped} of 5000" in report["message"]
    without_resume = run_cli("train", recipe)
    assert_clean_failure(without_resume, 2, "--resume")

    result = run_cli("train", recipe, "--resume", "--set", f"train.max_steps={stopped + 2}", "--json")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 3))


def _rows(folder):
    try:
        return (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []


def interrupted_run(tmp, base, data, name="cut", stop_after=3, **sections):
    """Train `name` until a stop after step `stop_after`, leaving its .partial folder with checkpoints."""
    from ftcli.errors import Interrupted
    from ftcli.output import locked_output_folder
    from ftcli.recipe import load_recipe
    from ftcli.signals import StopRequest
    from ftcli.train import run

    settings = {key: RESUMABLE[key] | sections.get(key, {}) for key in RESUMABLE} | {
        key: value for key, value in sections.items() if key not in RESUMABLE}
    path = write_recipe(tmp / f"{name}.yaml", base, data, tmp / name, **settings)
    stop = StopRequest()
    with pytest.raises(Interrupted):
        with locked_output_folder(tmp / name, overwrite=False) as staging:
            run(load_recipe(path), staging, StopAfter(stop, stop_after), resume=False, stop=stop)
    return path


def test_resume_refuses_a_changed_recipe_and_names_the_field(workspace):
    from ftcli.errors import CheckpointError
    from ftcli.recipe import load_recipe
    from ftcli.snapshots import check_compatible, newest_snapshot

    tmp, model, data = workspace
    path = interrupted_run(tmp, model, data)
    with pytest.raises(CheckpointError, match="lora.r was 4, now 8"):
        check_compatible(newest_snapshot(tmp / ".cut.partial"), load_recipe(path, ["lora.r=8"]))
    result = run_cli("train", path, "--resume", "--set", "lora.r=8", "--set", "train.grad_accum=1")
    assert_clean_failure(result, 2, "lora.r was 4, now 8", "train.grad_accum was 2, now 1")
    result = run_cli("train", path, "--resume", "--set", "train.max_steps=3")
    assert_clean_failure(result, 2, "is at step 3", "raise train.max_steps")
    # a field a checkpoint does not pin, like the learning rate, may change
    assert run_cli("train", path, "--resume", "--set", "train.learning_rate=0.0005").exit_code == 0


def test_a_half_written_checkpoint_is_ignored(workspace):
    from ftcli.snapshots import list_snapshots

    tmp, model, data = workspace
    path = interrupted_run(tmp, model, data, stop_after=3)
    partial = tmp / ".cut.partial"
    # what a kill during the save of step 4 leaves: a temporary folder, never a step-4 folder
    (partial / "checkpoints" / ".step-4.tmp-999").mkdir()
    (partial / "checkpoints" / ".step-4.tmp-999" / "adapter_model.safetensors").write_bytes(b"trunc")
    assert [s.step for s in list_snapshots(partial)] == [2, 3]
    result = run_cli("train", path, "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["resumed_from_step"] == 3


def test_resume_without_a_checkpoint_starts_afresh_and_a_finished_run_continues_from_its_last_step(workspace):
    tmp, model, data = workspace
    # a constant rate after warmup, so 8 steps and then 2 more are the same schedule as 10 steps at once
    settings = RESUMABLE | {"train": RESUMABLE["train"] | {"lr_scheduler": "constant"}}
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out", **settings)
    first = run_cli("train", path, "--resume", "--json")
    assert first.exit_code == 0 and json.loads(first.stdout.splitlines()[-1])["resumed_from_step"] is None
    # the last step is saved too (step-2 and step-4 pruned: save_total_limit 2)
    assert sorted(p.name for p in (tmp / "out" / "checkpoints").iterdir()) == ["step-6", "step-8"]
    # nothing more to train: refused, and the copy of the finished run made to continue it is not left behind
    assert_clean_failure(run_cli("train", path, "--resume"), 2, "is at step 8", "raise train.max_steps")
    assert not (tmp / ".out.partial").exists()
    again = run_cli("train", path, "--resume", "--set", "train.max_steps=10", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.splitlines()[-1])["resumed_from_step"] == 8
    steps = [json.loads(line)["step"] for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))

    whole = write_recipe(tmp / "whole.yaml", model, data, tmp / "whole",
                         **settings | {"train": settings["train"] | {"max_steps": 10}})
    assert run_cli("train", whole, "--json").exit_code == 0
    assert losses(tmp / "out") == losses(tmp / "whole")
    final, reference = adapter(tmp / "out"), adapter(tmp / "whole")
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=0)


def test_resume_trains_with_the_recipes_learning_rate_and_weight_decay(workspace, monkeypatch):
    """Fields outside MUST_MATCH may change on resume, and the changed values are the ones used and logged."""
    import ftcli.train
    from ftcli.optim import build_optimizer

    built = []

    def recorded_optimizer(parameters, settings):
        built.append(build_optimizer(parameters, settings))
        return built[-1]

    monkeypatch.setattr(ftcli.train, "build_optimizer", recorded_optimizer)
    tmp, model, data = workspace
    constant = {"lr_scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.01}
    path = interrupted_run(tmp, model, data, stop_after=3, train=constant)
    result = run_cli("train", path, "--resume", "--set", "train.learning_rate=0.0005",
                     "--set", "train.weight_decay=0.2", "--json")
    assert result.exit_code == 0, result.output
    assert [(group["lr"], group["weight_decay"]) for group in built[-1].param_groups] == [(5e-4, 0.2)]
    rows = [json.loads(line) for line in (tmp / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == [1e-3] * 3 + [5e-4] * 5


def test_resume_from_a_damaged_checkpoint_is_a_checkpoint_error_naming_it(workspace):
    tmp, model, data = workspace
    path = interrupted_run(tmp, model, data, stop_after=3)
    damaged = tmp / ".cut.partial" / "checkpoints" / "step-3" / "training_state.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = run_cli("train", path, "--resume")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "step-3 is damaged and cannot be read" in message and "Delete that folder" in message
    assert "Traceback" not in result.output


def test_resume_from_a_checkpoint_of_the_per_matrix_8bit_adamw_is_a_checkpoint_error_naming_it(workspace):
    tmp, model, data = workspace
    path = interrupted_run(tmp, model, data, stop_after=3, lora={"r": 64, "alpha": 128},
                           train={"optimizer": "adamw_8bit"})
    written = tmp / ".cut.partial" / "checkpoints" / "step-3" / "training_state.pt"
    saved = torch.load(written, weights_only=True)
    del saved["optimizer"][FLAT_STATE]  # the earlier ftcli's optimizer saved no flat moments
    torch.save(saved, written)
    assert_clean_failure(run_cli("train", path, "--resume"), 2, "Cannot resume from", "step-3",
                         "written by an earlier ftcli", "Delete the checkpoints to start the run again")


def test_two_runs_cannot_share_an_output_folder(tmp_path):
    from ftcli.errors import OutputFolderError
    from ftcli.output import locked_output_folder

    with locked_output_folder(tmp_path / "out", overwrite=False) as staging:
        (staging / "adapter_model.safetensors").write_text("first run")
        with pytest.raises(OutputFolderError, match="Another ftcli run is writing"):
            with locked_output_folder(tmp_path / "out", overwrite=False):
                pass
        assert (staging / "adapter_model.safetensors").read_text() == "first run"
    assert (tmp_path / "out" / "adapter_model.safetensors").read_text() == "first run"


def test_nan_loss_stops_with_exit_3_naming_step_rows_and_causes(workspace):
    tmp, model, data = workspace
    # Adam moves every adapter weight by about the learning rate, so the second step's logits overflow
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out",
                        train={"learning_rate": 1e30, "max_steps": 4, "warmup_steps": 0})
    message = assert_clean_failure(run_cli("train", path), 3)
    assert "at step 2" in message and "learning rate too high" in message and "float16" in message
    rows = [int(row) for row in re.findall(rf"{re.escape(data.name)} row (\d+)", message)]
    assert len(rows) == 2 and all(1 <= row <= len(CHAT_ROWS) for row in rows)
    assert not (tmp / "out").exists()


def test_an_infinite_gradient_norm_stops_with_exit_3_naming_step_and_rows(workspace, monkeypatch):
    overflow_gradient_at_step(2, monkeypatch)
    tmp, model, data = workspace
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out", train={"max_steps": 4})
    result = run_cli("train", path)
    assert result.exit_code == 3, result.output
    message = " ".join(result.output.split())
    assert "The gradient norm became inf at step 2" in message and "learning rate too high" in message
    assert len(re.findall(rf"{re.escape(data.name)} row (\d+)", message)) == 2
    assert "Traceback" not in result.output and not (tmp / "out").exists()


def test_an_infinite_gradient_norm_in_float16_is_a_skipped_step_logged_as_null(workspace, monkeypatch):
    """With float16 loss scaling an overflow is the scaler's business: it skips the step and lowers its scale."""
    overflow_gradient_at_step(2, monkeypatch)
    tmp, model, data = workspace
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out", model={"dtype": "float16"}, train={"max_steps": 3})
    result = run_cli("train", path)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line, parse_constant=strict_json) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["grad_norm"] is None for row in rows] == [False, True, False]


def strict_json(constant):
    raise ValueError(f"{constant} is not JSON")


def overflow_gradient_at_step(step, monkeypatch):
    """Make one LoRA gradient infinite after the backward of optimizer step `step`, as an overflow would."""
    import ftcli.train

    backward = ftcli.train.accumulate_gradients
    steps = []

    def overflowing(model, *args, **kwargs):
        result = backward(model, *args, **kwargs)
        steps.append(len(steps) + 1)
        if steps[-1] == step:
            next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(ftcli.train, "accumulate_gradients", overflowing)


def test_a_nan_evaluation_loss_stops_with_exit_3_naming_the_evaluation_rows(workspace, monkeypatch):
    import ftcli.train

    loss = ftcli.train.summed_token_loss
    monkeypatch.setattr(ftcli.train, "summed_token_loss", lambda model, batch, fused=False: (
        loss(model, batch, fused) if torch.is_grad_enabled() else torch.tensor(float("nan"))))
    tmp, model, data = workspace
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out", data={"eval_fraction": 0.25},
                        train={"max_steps": 4, "eval_steps": 2})
    result = run_cli("train", path)
    assert result.exit_code == 3, result.output
    message = " ".join(result.output.split())
    assert "The evaluation loss became nan at step 2" in message
    assert len(re.findall(rf"{re.escape(data.name)} row (\d+)", message)) == 3  # a quarter of the 12 rows
    assert "Traceback" not in result.output and not (tmp / "out").exists()


def test_out_of_memory_exits_4_with_settings_that_fit(workspace, monkeypatch):
    import ftcli.train

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ftcli.train, "accumulate_gradients", out_of_memory)  # no GPU here to fill
    tmp, model, data = workspace
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out", train={"batch_size": 4, "grad_accum": 2})
    # without a GPU to size against, the mildest change of each knob is offered
    assert_clean_failure(run_cli("train", path), 4, "--set train.batch_size=2 --set train.grad_accum=4",
                         "--set train.gradient_checkpointing=offload", "model.load_in_4bit=true", "ftcli plan")
    assert not (tmp / ".out.partial").exists()


def test_secrets_from_the_environment_never_reach_messages_or_out(workspace, monkeypatch):
    from ftcli.errors import redact

    token = "hf_" + "Zq7" * 10
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("MY_SERVICE_SECRET", "s3cr3t-value-42")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-but-long")  # a setting, not a secret
    assert redact(f"auth {token} and s3cr3t-value-42 and hf_{'x' * 30}") == "auth *** and *** and ***"
    assert redact("no secret here: HF_TOKEN is set, false-but-long") == "no secret here: HF_TOKEN is set, false-but-long"

    tmp, model, data = workspace
    missing = write_recipe(tmp / "bad.yaml", model, tmp / f"{token}.jsonl", tmp / "out")
    result = run_cli("train", missing, "--json")
    assert_clean_failure(result, 2, "***.jsonl")
    assert token not in result.output

    folder = tmp / token
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", CHAT_ROWS)
    path = write_recipe(tmp / "r.yaml", model, folder / "train.jsonl", tmp / "out", train={"max_steps": 2})
    result = run_cli("train", path)
    assert result.exit_code == 0 and token not in result.output, result.output
    for written in (tmp / "out").rglob("*"):
        if written.is_file() and written.suffix in {".yaml", ".json", ".jsonl"}:
            assert token not in written.read_text(), written
    assert "/***/train.jsonl" in (tmp / "out" / "recipe.yaml").read_text()
    assert yaml_field(tmp / "out" / "recipe.yaml", "model", "trust_remote_code") is False


def yaml_field(path, section, key):
    import yaml

    return yaml.safe_load(path.read_text())[section][key]


def test_metrics_tensorboard_and_loss_plot(workspace):
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, model, data = workspace
    path = write_recipe(tmp / "r.yaml", model, data, tmp / "out", data={"eval_fraction": 0.25},
                        train={"max_steps": 4, "eval_steps": 2})
    result = run_cli("train", path, "--set", "output.tensorboard=true", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp / "out" / "tensorboard"))
    events.Reload()
    logged = [(event.step, round(event.value, 6)) for event in events.Scalars("train/loss")]
    assert logged == [(row["step"], pytest.approx(row["loss"], abs=1e-5)) for row in rows]
    assert [event.step for event in events.Scalars("eval/loss")] == [2, 4]
    png = tmp / "out" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.imread(png).shape[:2] == (400, 700)
    assert json.loads(result.stdout.splitlines()[-1])["loss_plot"] is True


SIGNAL_SCRIPT = """
import os, signal, sys, time
from ftcli.signals import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIG{first})
    time.sleep(0.2)
    print("after first:", stop.signal_name, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("first", ["INT", "TERM"])
def test_first_signal_only_sets_the_flag_a_second_ctrl_c_quits_at_once(first):
    result = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT.format(first=first)], capture_output=True, text=True,
                            timeout=60)
    assert f"after first: SIG{first}" in result.stdout and "saving a checkpoint after this step" in result.stderr
    assert result.returncode == 130 and "still running" not in result.stdout and "quitting now" in result.stderr
