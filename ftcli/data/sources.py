"""Reading rows from local files, folders or the hub, through the `datasets` loaders.

`datasets` does the parsing; this module only picks the loader for each file type and turns its
failures into messages that name the file and, for JSON lines, the bad line.
"""

import json
from pathlib import Path

from ftcli.errors import RecipeError

LOADER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def read_rows(path: str) -> list[dict]:
    """All rows of the dataset at `path` (a file, a folder of one file type, or a hub id) as dicts."""
    import datasets

    datasets.disable_progress_bars()
    local = Path(path)
    if local.exists():
        files = _data_files(local)
        loader = LOADER_BY_SUFFIX[files[0].suffix]
        try:
            table = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train")
        except Exception as err:
            if "corresponds to no data" in str(err):  # how `datasets` says that every file was empty
                table = []
            else:
                raise RecipeError(_explain_unreadable(files, err)) from None
    elif _looks_like_hub_id(path):
        try:
            table = datasets.load_dataset(path, split="train")
        except Exception as err:
            raise RecipeError(f"data.path {path!r} is not a local file or folder, and loading it as a hub dataset "
                              f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                              "Check the path, or the dataset id and your network.") from None
    else:
        raise RecipeError(f"data.path {path!r} does not exist. Point it at a json, jsonl, csv, parquet or txt file, "
                          "a folder of them, or a hub dataset id.")
    rows = table.to_list() if table else []
    if not rows:
        raise RecipeError(f"data.path {path!r} holds no rows. Add training examples to it.")
    return rows


def _data_files(local: Path) -> list[Path]:
    if local.is_file():
        files = [local]
    else:
        files = sorted(f for f in local.rglob("*") if f.is_file() and f.suffix in LOADER_BY_SUFFIX)
        if not files:
            raise RecipeError(f"data.path folder {local} holds no json, jsonl, csv, parquet or txt files.")
    unsupported = [f for f in files if f.suffix not in LOADER_BY_SUFFIX]
    if unsupported:
        raise RecipeError(f"data.path {unsupported[0]} has the suffix {unsupported[0].suffix!r}, which ftcli cannot "
                          f"read; use one of {', '.join(LOADER_BY_SUFFIX)}.")
    loaders = {LOADER_BY_SUFFIX[f.suffix] for f in files}
    if len(loaders) > 1:
        raise RecipeError(f"data.path folder {local} mixes file types ({', '.join(sorted(loaders))}); "
                          "keep one type per folder.")
    return files


def _explain_unreadable(files: list[Path], err: Exception) -> str:
    for file in files:
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
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"Could not read {', '.join(map(str, files))}: {first}. Check that the file is well-formed "
            "and that every row has the same fields with the same types.")


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
