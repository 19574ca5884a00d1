"""Output folders: ftcli replaces only empty folders and its own (marked) ones, never the working directory, the
home folder, the root or their parents, and refuses before training; without OUT, chat and export take the newest
finished run under ./outputs."""

import os
import time
from pathlib import Path

import pytest

from conftest import make_output_folder, run_cli, write_jsonl, write_recipe
from ftcli.errors import OutputFolderError
from ftcli.output import locked_output_folder, newest_finished_run, partial_folder
from ftcli.owned_folders import MARKER_FILE, TRAINING_RUN, read_marker, write_marker
from ftcli.staging import replace_folder, staged_folder

ROWS = [{"messages": [{"role": "user", "content": "Say the number 7."},
                      {"role": "assistant", "content": "The number is 7."}]}] * 4


def finished_run(final: Path, name: str = "adapter_model.safetensors") -> Path:
    """A folder as a finished `ftcli train` leaves it (its files do not matter here)."""
    with locked_output_folder(final, overwrite=False) as staging:
        (staging / name).write_text("weights")
    return final


def persons_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


@pytest.fixture
def recipe(tmp_path, tiny_model_folder):
    """A 3-step recipe on the tiny Llama whose output folder each test overrides with --output."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return write_recipe(tmp_path / "r.yaml", tiny_model_folder("llama"), data, tmp_path / "unused")


def expect_refusal(result, *phrases):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for phrase in phrases:
        assert phrase in result.output, (phrase, result.output)


def test_a_finished_run_is_marked_and_overwrite_replaces_it(tmp_path):
    final = finished_run(tmp_path / "run")
    assert read_marker(final).kind == TRAINING_RUN
    with locked_output_folder(final, overwrite=True) as staging:
        (staging / "second.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == [MARKER_FILE, "second.txt"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_overwrite_refuses_a_folder_ftcli_did_not_write(recipe, tmp_path, dry_run):
    mine = persons_folder(tmp_path / "mine")
    result = run_cli("train", recipe, "--output", mine, "--set", "output.overwrite=true",
                     *(["--dry-run"] if dry_run else []))
    expect_refusal(result, f"{mine} is a folder ftcli did not write", MARKER_FILE, "Choose another output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r.yaml", "train.jsonl"]  # no work folder either
    assert (mine / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_working_directory_is_refused_before_training(recipe, tmp_path, monkeypatch, dry_run):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    for output, overwrite in ((".", "false"), (".", "true"), ("..", "true")):
        started = time.perf_counter()
        result = run_cli("train", recipe, "--output", output, "--set", f"output.overwrite={overwrite}",
                         *(["--dry-run"] if dry_run else []))
        name = "the working directory" if output == "." else "a parent of the working directory"
        expect_refusal(result, f"{output} is {name}", "Choose another output folder")
        assert time.perf_counter() - started < 5 and not any(workdir.iterdir())


def test_home_root_and_their_parents_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home" / "someone"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for folder, name in ((home, "the home folder"), (home.parent, "a parent of the home folder"),
                         (Path("/"), "the filesystem root")):
        with pytest.raises(OutputFolderError, match=f"is {name}"):
            with locked_output_folder(folder, overwrite=True):
                pass
        with pytest.raises(OutputFolderError, match=f"is {name}"):
            replace_folder(folder, tmp_path / "replacement")
    assert home.is_dir() and not partial_folder(home).exists()


def test_replace_folder_keeps_a_persons_folder_and_a_file(tmp_path):
    replacement = tmp_path / "new"
    replacement.mkdir()
    mine = persons_folder(tmp_path / "mine")
    with pytest.raises(OutputFolderError, match="is a folder ftcli did not write"):
        replace_folder(mine, replacement)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="notes.txt is a file"):
        replace_folder(tmp_path / "notes.txt", replacement)
    assert (mine / "thesis.tex").is_file() and (tmp_path / "notes.txt").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    replace_folder(tmp_path / "empty", replacement)
    assert (tmp_path / "empty").is_dir() and not replacement.exists()


def test_staged_folder_does_not_replace_a_persons_folder_and_leaves_no_temporary(tmp_path):
    mine = persons_folder(tmp_path / "merged")
    with pytest.raises(OutputFolderError), staged_folder(mine) as temporary:
        (temporary / "model.safetensors").write_text("weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_link_to_an_ftcli_folder_is_replaced_not_its_target(tmp_path):
    target = finished_run(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    with staged_folder(tmp_path / "link") as temporary:
        (temporary / "new.txt").write_text("new")
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "new.txt").is_file()
    assert (target / "adapter_model.safetensors").is_file()


def test_newest_finished_run_is_the_last_to_finish(tmp_path):
    runs = tmp_path / "outputs"
    first = finished_run(runs / "b-first")
    finished_run(runs / "a-second")
    os.utime(first, (time.time() + 60, time.time() + 60))  # modification time is not finish time
    with staged_folder(runs / "a-second-export" / "adapter") as temporary:  # an export: marked, but no run
        (temporary / "adapter_model.safetensors").write_text("copy")
    partial_folder(runs / "c-running").mkdir()
    (partial_folder(runs / "c-running") / MARKER_FILE).write_text((runs / "a-second" / MARKER_FILE).read_text())
    persons_folder(runs / "d-mine")
    assert newest_finished_run(runs) == runs / "a-second"


def test_no_finished_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    persons_folder(tmp_path / "outputs" / "mine")
    for command in ("export", "chat"):
        result = run_cli(command, *(["--gguf", "q4_k_m"] if command == "export" else ["--prompt", "hi"]))
        expect_refusal(result, "No finished training run under ./outputs", "Pass OUT")


def test_chat_without_out_answers_from_the_newest_finished_run(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_marker(make_output_folder(tiny_model_folder("llama"), tmp_path / "outputs" / "run"), TRAINING_RUN)
    result = run_cli("chat", "--prompt", "Say the number 7.", "--temperature", "0", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("Using outputs/run, the newest finished training run under ./outputs.")
    assert result.stdout.strip()
