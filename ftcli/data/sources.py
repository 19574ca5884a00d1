"""Reading rows from local files, folders or the hub, through the `datasets` loaders.

`datasets` does the parsing; this module picks the loader for each file type, reads a folder's files one
by one so every row knows its file and its number there, and turns the loaders' failures into messages
that name the file and, for JSON lines, the bad line.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import DataError, RecipeError, first_line
from ftcli.recipe import DataSettings

LOADER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Row:
    values: dict
    origin: str  # where the row came from, for messages: "data/a.jsonl row 3"


def read_rows(settings: DataSettings) -> list[Row]:
    """All rows of the dataset at data.path (a file, a folder of supported files, or a hub id), in order."""
    import datasets

    datasets.disable_progress_bars()
    local = Path(settings.path)
    if local.exists():
        if settings.split != "train" or settings.subset:
            raise RecipeError(f"data.split and data.subset choose part of a hub dataset, but {settings.path} is a "
                              "local file or folder, which is one split; remove them (data.max_samples limits rows).")
        rows = [row for file in _data_files(local) for row in _read_file(datasets, file)]
    elif _looks_like_hub_id(settings.path):
        rows = _read_hub(datasets, settings)
    else:
        raise DataError(f"data.path {settings.path!r} does not exist. Point it at a json, jsonl, csv, parquet or txt "
                        "file, a folder of them, or a hub dataset id (owner/name).")
    if not rows:
        raise DataError(f"data.path {settings.path!r} holds no rows. Add training examples to it.")
    return rows


def _read_file(datasets, file: Path) -> list[Row]:
    try:
        table = datasets.load_dataset(LOADER_BY_SUFFIX[file.suffix], data_files=[str(file)], split="train")
    except Exception as err:
        if "corresponds to no data" in str(err):  # how `datasets` says that the file was empty
            return []
        raise DataError(_explain_unreadable(file, err)) from None
    return [Row(values, f"{file} row {number}") for number, values in enumerate(table.to_list(), start=1)]


def _read_hub(datasets, settings: DataSettings) -> list[Row]:
    name = settings.path
    try:
        table = datasets.load_dataset(name, settings.subset, split=settings.split)
    except Exception as err:
        offline = (" This machine is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set), so only datasets already "
                   "in the local cache can load." if datasets.config.HF_HUB_OFFLINE else "")
        raise DataError(f"data.path {name!r} is not a local file or folder, and loading it as a hub dataset "
                        f"(subset {settings.subset}, split {settings.split!r}) failed: {type(err).__name__}: "
                        f"{first_line(err)}.{offline} Check the path, or the dataset id, subset, split and your "
                        "network.") from None
    return [Row(values, f"hub dataset {name} ({settings.split}) row {number}")
            for number, values in enumerate(table.to_list(), start=1)]


def _data_files(local: Path) -> list[Path]:
    if local.is_file():
        if local.suffix not in LOADER_BY_SUFFIX:
            raise DataError(f"data.path {local} has the suffix {local.suffix!r}, which ftcli cannot read; use one "
                            f"of {', '.join(LOADER_BY_SUFFIX)}.")
        return [local]
    files = sorted(f for f in local.rglob("*") if f.is_file() and f.suffix in LOADER_BY_SUFFIX
                   and not any(part.startswith(".") for part in f.relative_to(local).parts))  # no hidden caches
    if not files:
        raise DataError(f"data.path folder {local} holds no json, jsonl, csv, parquet or txt files.")
    return files


def _explain_unreadable(file: Path, err: Exception) -> str:
    if file.suffix == ".jsonl":
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                return (f"{file} line {number} is not valid JSON ({bad.msg} at column {bad.colno}). "
                        "Each line of a .jsonl file must be one JSON object.")
            if not isinstance(row, dict):
                return f"{file} line {number} is a JSON {type(row).__name__}, not an object with named fields."
    return (f"Could not read {file}: {first_line(err)}. Check that the file is well-formed and that every row has "
            "the same fields with the same types.")


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
