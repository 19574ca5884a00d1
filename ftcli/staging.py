"""Files and folders that appear whole or not at all: written under a hidden temporary sibling, then renamed.

A crash or an error part-way leaves no truncated file and no half-filled folder under the final name, and
the temporary sibling is removed. A folder is marked as ftcli's before it is renamed into place, and only an
empty folder or one ftcli marked is ever replaced (ftcli/owned_folders.py). (Training output folders add a lock and
resumable checkpoints on top of this: ftcli/output.py.)
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftcli.owned_folders import FOLDER, check_replaceable, write_marker

_REPLACE_FIX = "Move or delete it yourself, or choose another folder to write."


def _temporary_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it becomes `path` when the block ends well, else it is removed."""
    temporary = _temporary_sibling(path)
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `final` to fill; marked as ftcli's, it replaces `final` when the
    block ends well, else it is removed."""
    temporary = _temporary_sibling(final)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        write_marker(temporary, FOLDER)
        replace_folder(final, temporary)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def replace_folder(final: Path, replacement: Path) -> None:
    """Put `replacement` in place of `final`; the old one is moved aside first, so one of the two is always whole.

    Only an empty folder or one ftcli wrote is replaced (a symbolic link to one loses the link, not the folder)."""
    check_replaceable(final, _REPLACE_FIX)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists() or final.is_symlink():
        final.rename(old)
    replacement.rename(final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, flush it to disk, and rename it to `path`."""
    with staged_file(path) as temporary, temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def atomic_copy(source: Path, destination: Path) -> None:
    with staged_file(destination) as temporary:
        shutil.copyfile(source, temporary)
