"""`ftcli export`: turn a training output folder into files other tools run.

- no flag: a copy of the PEFT adapter folder (DIR/adapter), for `PeftModel.from_pretrained`;
- `--merged`: the base model with the LoRA merged, a 16-bit Hugging Face folder (DIR/merged);
- `--gguf TYPES`: one GGUF file per type (DIR/NAME-TYPE.gguf) with an Ollama Modelfile beside it, each checked
  against the trained model unless `check` is off (ftcli/export/check.py; DIR/check.json).

DIR is `--to`, by default OUT-export beside OUT: never inside OUT, where `--resume` would copy the exports into
the next run and `output.overwrite` would delete them. Each output is written under a hidden temporary name and
renamed when complete, so a failure leaves no partial file; an existing one is replaced only with --overwrite,
and an existing folder only when ftcli wrote it (ftcli/owned_folders.py). With --merged, the GGUF files are read
from the merged folder.
"""

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ftcli.errors import ExportError, OutputFolderError
from ftcli.export.check import WrittenFile, check_files, record_checks
from ftcli.export.gguf_file import parse_types, write_gguf
from ftcli.export.merged import write_merged
from ftcli.export.modelfile import write_modelfile
from ftcli.export.source import adapter_files, open_source, safetensors_shards, source_summary
from ftcli.export.vocab import adds_bos_token
from ftcli.owned_folders import check_replaceable
from ftcli.staging import staged_file, staged_folder

_FIX = "Pass --to DIR to export into another folder, or move or delete it yourself."


def default_export_folder(out_dir: Path) -> Path:
    """OUT-export, beside the training output folder OUT."""
    out = out_dir.resolve()
    return out.parent / f"{out.name}-export"


def export(out_dir: Path, merged: bool = False, gguf_types: Optional[str] = None, to: Optional[Path] = None,
           overwrite: bool = False, trust_remote_code: bool = False, check: bool = True) -> dict:
    """Run the requested exports into `to` (default OUT-export); returns a summary of what was written.
    The model's own Python code runs only with `trust_remote_code` (--trust-remote-code), never because
    OUT's recipe.yaml says so."""
    types = parse_types(gguf_types) if gguf_types is not None else []
    source = open_source(out_dir, trust_remote_code)
    destination = to if to is not None else default_export_folder(out_dir)
    if destination.resolve().is_relative_to(out_dir.resolve()):
        raise ExportError(f"--to {destination} is inside the training output folder {out_dir}, where --resume would "
                          "copy the exports into the next run and output.overwrite would delete them. Leave --to out "
                          f"to export beside it ({default_export_folder(out_dir)}), or pass a folder outside it.")
    stem = out_dir.resolve().name
    outputs = {}
    if merged:
        folders = [destination / "merged"]
    else:
        folders = [] if types else [destination / "adapter"]
    files = [destination / f"{stem}-{name}{suffix}" for name in types for suffix in (".gguf", ".Modelfile")]
    _check_planned(folders, files, overwrite)
    destination.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if not merged and not types:
        with staged_folder(destination / "adapter") as staging:
            for file in adapter_files(out_dir):
                shutil.copy2(file, staging / file.name)
        outputs["adapter"] = {"path": str(destination / "adapter"), "seconds": _since(started)}

    gguf_source = source
    if merged:
        with staged_folder(destination / "merged") as staging:
            outputs["merged"] = write_merged(source, staging)
        outputs["merged"].update(path=str(destination / "merged"), seconds=_since(started))
        gguf_source = replace(source, base_folder=destination / "merged", lora={}, replaced={}, nf4_weights=set(),
                              shards=safetensors_shards(destination / "merged"))

    tokenizer, adds_bos = _tokenizer(out_dir, trust_remote_code), adds_bos_token(out_dir)
    written = []
    for name in types:
        begun = time.perf_counter()
        final = destination / f"{stem}-{name}.gguf"
        modelfile = final.with_suffix(".Modelfile")
        record_checks(destination, {}, [final.name])  # its entry, if any, is of the file this one replaces
        with staged_file(final) as partial, staged_file(modelfile) as modelfile_partial:
            summary = write_gguf(gguf_source, name, partial, out_dir)
            write_modelfile(modelfile_partial, final.name, tokenizer, adds_bos)
        outputs[f"gguf_{name}"] = summary | {"path": str(final), "modelfile": str(modelfile),
                                             "seconds": _since(begun)}
        written.append(WrittenFile(name, final, modelfile))
    result = {"status": "ok", "source": source_summary(source), "outputs": outputs}
    if check and written:
        result["check"] = check_files(gguf_source, written, tokenizer, destination)
    return result | {"seconds": _since(started)}


def _check_planned(folders: list[Path], files: list[Path], overwrite: bool) -> None:
    """Refuse before any work, not after the first output: an existing output without --overwrite, a folder ftcli
    did not write, or a folder where a file goes."""
    for path in folders + files:
        if not path.exists() and not path.is_symlink():
            continue
        if not overwrite:
            raise OutputFolderError(f"{path} already exists. Pass --overwrite to replace it, or --to DIR to export "
                                    "into another folder.")
        if path in folders:
            check_replaceable(path, _FIX)
        elif not path.is_file():
            raise OutputFolderError(f"{path} is not a file, so --overwrite cannot replace it with the export. {_FIX}")


def _tokenizer(out_dir: Path, trust_remote_code: bool):
    """The tokenizer saved with the adapter: the one training used, chat template included."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir, trust_remote_code=trust_remote_code)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)
