"""Output folders appear whole or not at all: work happens in a hidden sibling that is renamed at the end."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftcli.errors import RecipeError


def check_output_free(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite and (final.is_file() or any(final.iterdir())):
        raise RecipeError(f"Output folder {final} already exists. Choose another with --output, set "
                          "output.overwrite: true to replace it, or delete it.")


@contextmanager
def staged_output(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces `final`, on any failure it is removed."""
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    staging.rename(final)
