"""`ftcli train --gpus N`'s launcher, on tiny Python workers instead of training processes: exit codes, the
grace-then-kill of a worker left hanging, signals forwarded, each worker's environment, and the --gpus checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer

from conftest import ROOT, assert_clean_failure, run_cli, write_jsonl, write_recipe
from ftcli import launch
from ftcli.cli import app
from ftcli.launch import Worker, run_workers, train_workers

WAIT = 30.0  # seconds a test waits for a worker to start on a loaded machine; a pass takes a fraction of it


def python_worker(code: str, **environment: str) -> Worker:
    return Worker([sys.executable, "-c", code], dict(os.environ, **environment))


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def wait_for(*paths: Path) -> None:
    eventually(lambda: all(path.exists() for path in paths), f"never appeared: {[str(path) for path in paths]}")


def gone(pid: int) -> bool:
    """The process has ended: it no longer exists, or is a zombie that its adopter has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def exits_after(seconds: float, code: int, mark: Path) -> str:
    """A worker that exits with `code` after `seconds`, leaving `mark` just before, so a test can tell that it
    ended by itself and was not killed."""
    return f"import time, sys; time.sleep({seconds}); open({str(mark)!r}, 'w').close(); sys.exit({code})"


def test_all_workers_succeeding_exit_0(tmp_path):
    assert run_workers([python_worker(exits_after(0, 0, tmp_path / str(rank))) for rank in range(3)]) == 0


def test_the_first_failure_in_time_wins_and_the_others_may_finish(tmp_path):
    """Process 1 fails first; process 0 fails later with another code, within the grace, and is not killed."""
    workers = [python_worker(exits_after(2.0, 7, tmp_path / "0")), python_worker(exits_after(0.1, 5, tmp_path / "1"))]
    assert run_workers(workers, grace=10.0) == 5
    assert (tmp_path / "0").exists() and (tmp_path / "1").exists()


def test_a_hung_worker_is_killed_after_the_grace_with_what_it_started(tmp_path, capfd):
    pid_file = tmp_path / "pid"
    hung = python_worker("import os, subprocess, sys, time\n"
                         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                         f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
                         "time.sleep(600)")
    failing = python_worker(f"import os, sys, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\n"
                            "sys.exit(3)")
    started = time.monotonic()
    assert run_workers([hung, failing], grace=0.3) == 3
    assert time.monotonic() - started < WAIT
    pids = [int(pid) for pid in pid_file.read_text().split()]
    assert gone(pids[0])
    eventually(lambda: gone(pids[1]), "the hung worker's child is still running")  # SIGKILL takes a moment to land
    assert "Stopping process(es) 0: still running 0.3 s after another failed." in capfd.readouterr().err


def test_a_worker_killed_by_a_signal_exits_as_a_shell_reports_it(capfd):
    killed = python_worker("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert run_workers([python_worker("pass"), killed]) == 128 + signal.SIGKILL
    assert "error: process 1 was killed by SIGKILL." in capfd.readouterr().err


def test_starting_a_worker_that_cannot_start_leaves_none_running(tmp_path):
    pid_file = tmp_path / "pid"
    running = python_worker(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    with pytest.raises(FileNotFoundError):
        run_workers([running, Worker([str(tmp_path / "no-such-program")], dict(os.environ))])
    # the first worker was started, then killed and reaped before the error left run_workers
    if pid_file.exists():
        assert gone(int(pid_file.read_text()))


# A worker that marks it is ready once its handlers are in place, and records each SIGINT or SIGTERM it gets. On
# SIGTERM it takes `save_s` seconds (process 0's checkpoint), marks it saved and exits with 143; SIGINT it only
# records.
SIGNALLED_WORKER = """
import os, signal, sys, time
folder, save_s = sys.argv[1], float(sys.argv[2])
rank = os.environ["RANK"]
def record(number, frame):
    with open(os.path.join(folder, f"{rank}-{signal.Signals(number).name}"), "a") as marks:
        marks.write("x")
    if number == signal.SIGTERM:
        time.sleep(save_s)
        open(os.path.join(folder, f"{rank}-saved"), "w").close()
        sys.exit(143)
signal.signal(signal.SIGTERM, record)
signal.signal(signal.SIGINT, record)
open(os.path.join(folder, f"{rank}-pid"), "w").write(str(os.getpid()))
open(os.path.join(folder, f"{rank}-ready"), "w").close()
while True:
    time.sleep(0.05)
"""

# the launcher in a process of its own, so that the test can signal it
LAUNCHER = """
import os, sys
from ftcli.launch import Worker, run_workers
folder, grace = sys.argv[1], float(sys.argv[2])
workers = [Worker([sys.executable, "-c", {worker!r}, folder, "1.0" if rank == 0 else "0"], dict(os.environ, RANK=str(rank)))
           for rank in range(2)]
sys.exit(run_workers(workers, grace))
""".format(worker=SIGNALLED_WORKER)


@pytest.fixture
def launcher(tmp_path):
    # a process group of its own, which the test signals as a terminal signals its foreground job
    process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), "0.2"], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(tmp_path / "0-ready", tmp_path / "1-ready")
    yield process
    if process.poll() is None:  # the test failed: leave no process behind
        process.kill()
        for rank in range(2):
            if not gone(pid := int((tmp_path / f"{rank}-pid").read_text())):
                os.kill(pid, signal.SIGKILL)
    process.wait()


def test_sigterm_reaches_every_worker_and_process_0_may_finish_its_checkpoint(launcher, tmp_path):
    """Process 1 exits at once; process 0 takes a second, five times the grace, and is not killed for it."""
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=WAIT) == 143
    assert (tmp_path / "0-SIGTERM").read_text() == (tmp_path / "1-SIGTERM").read_text() == "x"
    assert (tmp_path / "0-saved").exists()


def test_ctrl_c_is_forwarded_once_and_a_second_one_kills_every_worker(launcher, tmp_path):
    """The terminal sends Ctrl-C to the launcher's process group; the workers, in groups of their own, get it
    once, from the launcher (twice would mean "quit now" to them)."""
    workers = [int((tmp_path / f"{rank}-pid").read_text()) for rank in range(2)]
    assert os.getpgid(launcher.pid) not in {os.getpgid(pid) for pid in workers}
    os.killpg(launcher.pid, signal.SIGINT)
    wait_for(tmp_path / "0-SIGINT", tmp_path / "1-SIGINT")
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=WAIT) == 130
    assert (tmp_path / "0-SIGINT").read_text() == (tmp_path / "1-SIGINT").read_text() == "x"
    assert gone(workers[0]) and gone(workers[1])
    errors = launcher.stderr.read()
    assert "Second Ctrl-C: stopping every process now" in errors and "Traceback" not in errors


def test_each_worker_gets_torchruns_variables_and_the_rest_of_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    workers = train_workers(["r.yaml", "--json"], 3)
    assert [worker.command for worker in workers] == [[sys.executable, "-m", "ftcli", "train", "r.yaml", "--json"]] * 3
    # what reaches the processes, as each of them reads it
    code = ("import json, os, sys; keys = sys.argv[1:-1]; "
            "open(sys.argv[-1], 'w').write(json.dumps({key: os.environ.get(key) for key in keys}))")
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS", "PATH"]
    assert run_workers([Worker([sys.executable, "-c", code, *keys, str(tmp_path / str(rank))], worker.environment)
                        for rank, worker in enumerate(workers)]) == 0
    seen = [json.loads((tmp_path / str(rank)).read_text()) for rank in range(3)]
    port = seen[0]["MASTER_PORT"]
    threads = str(max(1, len(os.sched_getaffinity(0)) // 3))
    for rank, environment in enumerate(seen):
        assert environment == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NCCL_SOCKET_IFNAME": "lo",
                               "OMP_NUM_THREADS": threads, "PATH": os.environ["PATH"]}
    assert 0 < int(port) < 65536


def test_a_thread_count_of_the_users_own_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert {worker.environment["OMP_NUM_THREADS"] for worker in train_workers(["r.yaml"], 2)} == {"3"}


@pytest.fixture
def recipe(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "Hi?"},
                                                                {"role": "assistant", "content": "Hello."}]}] * 4)
    return write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "out")


@pytest.fixture
def launched(monkeypatch):
    """The workers `ftcli train --gpus N` would start, recorded instead of started, on a machine that, if it has
    CUDA, has GPUs enough for them (a test that needs fewer says so itself)."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    started = []
    monkeypatch.setattr(launch, "run_workers", lambda workers: started.append(workers) or 0)
    return started


def test_train_gpus_starts_workers_with_every_other_option(recipe, tmp_path, launched):
    result = run_cli("train", recipe, "--gpus", "2", "--set", "train.max_steps=2", "--set", "train.seed=3", "-o",
                     tmp_path / "o", "--json", "--resume")
    assert result.exit_code == 0, result.output
    [workers] = launched
    assert [worker.command[3:] for worker in workers] == [[
        "train", str(recipe), "--set", "train.max_steps=2", "--set", "train.seed=3", "--output", str(tmp_path / "o"),
        "--json", "--resume"]] * 2
    assert result.stdout == ""  # with --json, stdout is the workers' JSON line alone
    if not torch.cuda.is_available():
        assert result.stderr.count("No CUDA GPU here: the 2 processes train on the CPU (gloo).") == 1


def test_every_option_of_train_is_forwarded_or_handled_by_the_launcher():
    """The control for the test above: an option added to `ftcli train` must be added to what workers get."""
    command = typer.main.get_command(app).commands["train"]
    assert {parameter.name for parameter in command.params} == {
        "recipe_path", "overrides", "output", "as_json", "resume", "dry_run", "gpus"}


def test_one_gpu_trains_in_this_process(recipe, tmp_path, launched):
    result = run_cli("train", recipe, "--gpus", "1", "--json")
    assert result.exit_code == 0, result.output
    assert launched == [] and json.loads(result.stdout.splitlines()[-1])["steps"] == 3


def test_gpus_with_dry_run_validates_once_in_this_process(recipe, launched):
    """It counts the steps of two processes: an epoch of 4 rows is 2 steps of 2 rows, or 1 step of 2 x 2 rows."""
    one_epoch = ["--set", "train.max_steps=null", "--set", "train.epochs=1", "--dry-run", "--json"]
    result = run_cli("train", recipe, "--gpus", "2", *one_epoch)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert launched == [] and summary["dry_run"] is True and summary["steps"] == 1
    assert json.loads(run_cli("train", recipe, *one_epoch).stdout.splitlines()[-1])["steps"] == 2


def test_a_bad_recipe_is_reported_once_before_any_worker_starts(recipe, launched):
    result = run_cli("train", recipe, "--gpus", "2", "--set", "train.batch_sise=2")
    assert_clean_failure(result, 2, "batch_sise")
    assert launched == []


@pytest.mark.parametrize("count", [0, -1])
def test_gpus_below_1_is_an_error(recipe, launched, count):
    assert_clean_failure(run_cli("train", recipe, "--gpus", str(count)), 2, f"--gpus {count}", "1 or more")
    assert launched == []


def test_more_gpus_than_the_machine_has_is_an_error(recipe, launched, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_clean_failure(run_cli("train", recipe, "--gpus", "3"), 2, "--gpus 3", "has 1 CUDA GPU(s)")
    assert launched == []


def test_gpus_inside_torchrun_is_an_error(recipe, launched, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_clean_failure(run_cli("train", recipe, "--gpus", "2"), 2, "--gpus 2", "leave --gpus out", "torchrun")
    assert launched == []
