"""Output folders appear whole or not at all: work happens in a hidden sibling that is renamed at the end.

The sibling, `.NAME.partial`, has a stable name so that a run killed on a spot machine can be resumed from
the checkpoints inside it; an exclusive lock on it keeps two runs from sharing it. Files copied into it
go through ftcli/staging.py, so a crash never leaves a truncated one.
"""

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftcli.errors import RecipeError
from ftcli.staging import atomic_copy, replace_folder
from ftcli.snapshots import CHECKPOINTS, copy_snapshots, list_snapshots


def partial_folder(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def check_output_free(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite and (final.is_file() or any(final.iterdir())):
        raise RecipeError(f"Output folder {final} already exists. Choose another with --output, set "
                          "output.overwrite: true to replace it, or delete it; if it holds checkpoints, --resume "
                          "trains it further.")


@contextmanager
def locked_output_folder(final: Path, overwrite: bool, resume: bool = False) -> Iterator[Path]:
    """Yield the locked staging folder; on success it replaces `final`.

    On a failure the staging folder is kept when it holds a checkpoint (for --resume), else removed.
    With `resume` and no checkpoint in the staging folder, a finished `final` that has checkpoints is
    copied in to continue from.
    """
    staging = partial_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(exist_ok=True)
    lock = os.open(staging, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(f"Another ftcli run is writing {final} (its work folder {staging} is locked). Wait for "
                              "it to finish, or choose another output folder with --output.") from None
        try:
            _prepare(final, staging, overwrite, resume)
            yield staging
        except BaseException:
            if not list_snapshots(staging):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_folder(final, staging)
    finally:
        os.close(lock)


def _prepare(final: Path, staging: Path, overwrite: bool, resume: bool) -> None:
    """Check what is already there, and fill the staging folder with what the run starts from."""
    has_checkpoint = bool(list_snapshots(staging))
    if has_checkpoint and not resume:
        raise RecipeError(f"{staging} holds checkpoints of an interrupted run for {final}. Pass --resume to "
                          f"continue it, or delete {staging} to start again.")
    if has_checkpoint:  # an interrupted run, which replaces `final` when it finishes, as it would have
        return
    _empty(staging)
    if resume and list_snapshots(final):
        _copy_finished_run(final, staging)
    else:
        check_output_free(final, overwrite)


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
