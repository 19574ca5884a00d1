"""Output folders appear whole or not at all: work happens in a hidden sibling that is renamed at the end.

The sibling, `.NAME.partial`, has a stable name so that a run killed on a spot machine can be resumed from
the checkpoints inside it; an exclusive lock on it keeps two runs from sharing it. Files copied into it
go through ftcli/staging.py, so a crash never leaves a truncated one. A finished run is marked as ftcli's
(ftcli/owned_folders.py): only such a folder, or an empty one, is replaced, and `ftcli chat` and `ftcli export`
without OUT take the newest one under ./outputs.
"""

import fcntl
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ftcli.errors import OutputFolderError
from ftcli.owned_folders import TRAINING_RUN, check_not_protected, check_replaceable, read_marker, write_marker
from ftcli.staging import atomic_copy, replace_folder
from ftcli.snapshots import CHECKPOINTS, copy_snapshots, list_snapshots, newest_snapshot

RUNS_FOLDER = Path("outputs")  # where the shipped recipes' output.dir puts runs
_FIX = "Choose another output folder with --output (or output.dir), or move or delete this one yourself."


def partial_folder(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def check_output_free(final: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that exists (without `overwrite`) or that ftcli must not replace."""
    check_not_protected(final, _FIX)
    if final.exists() and not overwrite and (final.is_file() or any(final.iterdir())):
        raise OutputFolderError(f"Output folder {final} already exists. Choose another with --output, set "
                                "output.overwrite: true to replace it, or delete it; if it holds checkpoints, --resume "
                                "trains it further.")
    check_replaceable(final, _FIX)


@contextmanager
def locked_output_folder(final: Path, overwrite: bool, resume: bool = False) -> Iterator[Path]:
    """Yield the locked staging folder; on success it replaces `final`.

    On a failure the staging folder is kept when it holds a checkpoint (for --resume), else removed.
    With `resume` and no checkpoint in the staging folder, a finished `final` that has checkpoints is
    copied in to continue from.
    """
    check_not_protected(final, _FIX)  # before a work folder is made beside it
    staging = partial_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(exist_ok=True)
    lock = os.open(staging, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputFolderError(f"Another ftcli run is writing {final} (its work folder {staging} is locked). Wait "
                                    "for it to finish, or choose another output folder with --output.") from None
        copied_step = None
        try:
            copied_step = _prepare(final, staging, overwrite, resume)
            yield staging
        except BaseException:
            if not _holds_new_checkpoint(staging, copied_step):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        write_marker(staging, TRAINING_RUN)
        replace_folder(final, staging)
    finally:
        os.close(lock)


def _holds_new_checkpoint(staging: Path, copied_step: Optional[int]) -> bool:
    """Whether a failed run's work folder is worth keeping for --resume: it holds a checkpoint that is not just the
    copy of a finished run's last one (which OUT still has)."""
    newest = newest_snapshot(staging)
    return newest is not None and (copied_step is None or newest.step > copied_step)


def _prepare(final: Path, staging: Path, overwrite: bool, resume: bool) -> Optional[int]:
    """Check what is already there, and fill the staging folder with what the run starts from; returns the step of
    the newest checkpoint copied from a finished `final`, if the run continues one."""
    has_checkpoint = bool(list_snapshots(staging))
    if has_checkpoint and not resume:
        raise OutputFolderError(f"{staging} holds checkpoints of an interrupted run for {final}. Pass --resume to "
                                f"continue it, or delete {staging} to start again.")
    continues_finished_run = resume and not has_checkpoint and bool(list_snapshots(final))
    if has_checkpoint or continues_finished_run:  # the run replaces `final` when it finishes
        check_replaceable(final, _FIX)
    else:
        check_output_free(final, overwrite)
    if has_checkpoint:  # an interrupted run, which replaces `final` when it finishes, as it would have
        return None
    _empty(staging)
    if not continues_finished_run:
        return None
    _copy_finished_run(final, staging)
    return newest_snapshot(staging).step


def _empty(folder: Path) -> None:
    """Remove what a run that died before its first checkpoint left in `folder`, keeping the folder (it is locked)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _copy_finished_run(final: Path, staging: Path) -> None:
    """A finished output folder's files, checkpoints included, so that training continues from them."""
    for entry in final.iterdir():
        if entry.name == CHECKPOINTS:
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name)
        else:
            atomic_copy(entry, staging / entry.name)
    copy_snapshots(final, staging)


def run_folder_or_newest(out: Optional[Path]) -> Path:
    """`out` when given; else the newest finished training run under ./outputs, named on stderr so the person
    knows which one `ftcli chat` or `ftcli export` reads."""
    if out is not None:
        return out
    newest = newest_finished_run(RUNS_FOLDER)
    print(f"Using {newest}, the newest finished training run under ./{RUNS_FOLDER}.", file=sys.stderr)
    return newest


def newest_finished_run(runs: Path) -> Path:
    """The folder under `runs` that a training run finished last (by the finish time in its marker); work folders
    (.NAME.partial) and export folders are not finished training runs."""
    finished = []
    if runs.is_dir():
        for folder in runs.iterdir():
            marker = read_marker(folder) if folder.is_dir() and not folder.name.startswith(".") else None
            if marker is not None and marker.kind == TRAINING_RUN:
                finished.append((marker.finished, folder))
    if not finished:
        raise OutputFolderError(f"No finished training run under ./{runs} (a folder `ftcli train` wrote there), so "
                                "there is no OUT to default to. Pass OUT, the output folder of a training run, e.g. "
                                f"`ftcli export {runs}/run --gguf q4_k_m`.")
    return max(finished)[1]
