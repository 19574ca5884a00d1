"""Which folders ftcli may replace: empty ones and the ones it wrote whole, which carry its marker file.

Every folder ftcli writes whole (a training run's output, an exported adapter or merged model, a checkpoint, a
converted model in the cache) gets `.ftcli-folder.json` just before it is renamed into place: what kind of folder
it is and when it was finished. Known file names would not tell ftcli's folders from a person's: their own adapter
or model folder has adapter_config.json or config.json too, and `output.overwrite` must never delete it. The
working directory, the home folder, the filesystem root and their parents are never replaced, marker or not.
"""

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ftcli.errors import OutputFolderError

MARKER_FILE = ".ftcli-folder.json"
TRAINING_RUN = "training run"  # the kind `ftcli chat` and `ftcli export` look for when OUT is left out
FOLDER = "folder"  # any other folder ftcli wrote whole


@dataclass
class FolderMarker:
    kind: str
    finished: datetime


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as ftcli's, finished now. It is written into a folder that is renamed into place whole
    afterwards, so a plain write cannot leave a truncated marker under the final name."""
    record = {"written_by": "ftcli", "kind": kind, "finished": datetime.now(timezone.utc).isoformat()}
    (folder / MARKER_FILE).write_text(json.dumps(record) + "\n")


def read_marker(folder: Path) -> Optional[FolderMarker]:
    """The marker of a folder ftcli wrote; None for any other folder (or a damaged marker)."""
    try:
        record = json.loads((folder / MARKER_FILE).read_text())
        return FolderMarker(str(record["kind"]), datetime.fromisoformat(record["finished"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_replaceable(folder: Path, fix: str) -> None:
    """Raise OutputFolderError unless `folder` is absent, an empty folder or a folder ftcli wrote, and is not one
    of the protected folders; `fix` ends the message with what the person can do instead."""
    check_not_protected(folder, fix)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and (read_marker(folder) is not None or not any(folder.iterdir())):
        return
    what = "a file" if folder.is_file() else f"a folder ftcli did not write (it has no {MARKER_FILE})"
    raise OutputFolderError(f"{folder} is {what}, so ftcli will not delete it to replace it. {fix}")


def check_not_protected(folder: Path, fix: str) -> None:
    """Refuse the working directory, the home folder, the filesystem root and every parent of them."""
    target = folder.resolve()
    for name, protected in (("the working directory", Path.cwd()), ("the home folder", Path.home())):
        protected = protected.resolve()
        if not protected.is_relative_to(target):
            continue
        if target == Path(target.anchor):
            name = "the filesystem root"
        elif target != protected:
            name = f"a parent of {name} ({protected})"
        raise OutputFolderError(f"{folder} is {name}, which ftcli never writes an output folder over (it would be "
                                f"replaced whole). {fix}")
