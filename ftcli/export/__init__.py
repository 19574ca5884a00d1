"""`ftcli export`: turn a training output folder into files other tools run.

- no flag: a copy of the PEFT adapter folder (DIR/adapter), for `PeftModel.from_pretrained`;
- `--merged`: the base model with the LoRA merged, a 16-bit Hugging Face folder (DIR/merged);
- `--gguf TYPES`: one GGUF file per type (DIR/NAME-TYPE.gguf) with an Ollama Modelfile beside it.

DIR is `--to`, by default OUT/export. Each output is written under a hidden temporary name and renamed when
complete, so a failure leaves no partial file. With --merged, the GGUF files are read from the merged folder.
"""

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ftcli.errors import RecipeError
from ftcli.export.gguf_file import parse_types, write_gguf
from ftcli.export.merged import write_merged
from ftcli.export.modelfile import write_modelfile
from ftcli.export.source import adapter_files, open_source, safetensors_shards, source_summary
from ftcli.output import locked_output_folder
from ftcli.staging import staged_file


def export(out_dir: Path, merged: bool = False, gguf_types: Optional[str] = None, to: Optional[Path] = None,
           overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Run the requested exports into `to` (default OUT/export); returns a summary of what was written.
    The model's own Python code runs only with `trust_remote_code` (--trust-remote-code), never because
    OUT's recipe.yaml says so."""
    types = parse_types(gguf_types) if gguf_types is not None else []
    source = open_source(out_dir, trust_remote_code)
    destination = to if to is not None else out_dir / "export"
    stem = out_dir.resolve().name
    outputs = {}
    planned = ([destination / "merged"] if merged else []) + [destination / f"{stem}-{name}.gguf" for name in types]
    if not merged and not types:
        planned = [destination / "adapter"]
    for path in planned:  # refuse before any work, not after the first output
        if path.exists() and not overwrite:
            raise RecipeError(f"{path} already exists. Pass --overwrite to replace it, or --to DIR to export into "
                              "another folder.")
    destination.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if not merged and not types:
        with locked_output_folder(destination / "adapter", overwrite) as staging:
            for file in adapter_files(out_dir):
                shutil.copy2(file, staging / file.name)
        outputs["adapter"] = {"path": str(destination / "adapter"), "seconds": _since(started)}

    gguf_source = source
    if merged:
        with locked_output_folder(destination / "merged", overwrite) as staging:
            outputs["merged"] = write_merged(source, staging)
        outputs["merged"].update(path=str(destination / "merged"), seconds=_since(started))
        gguf_source = replace(source, base_folder=destination / "merged", lora={}, replaced={}, nf4_weights=set(),
                              shards=safetensors_shards(destination / "merged"))

    chat_template, eos_token = _chat_format(out_dir, trust_remote_code)
    for name in types:
        begun = time.perf_counter()
        final = destination / f"{stem}-{name}.gguf"
        modelfile = final.with_suffix(".Modelfile")
        with staged_file(final) as partial, staged_file(modelfile) as modelfile_partial:
            summary = write_gguf(gguf_source, name, partial, out_dir)
            write_modelfile(modelfile_partial, final.name, chat_template, eos_token)
        outputs[f"gguf_{name}"] = summary | {"path": str(final), "modelfile": str(modelfile),
                                             "seconds": _since(begun)}
    return {"status": "ok", "source": source_summary(source), "outputs": outputs, "seconds": _since(started)}


def _chat_format(out_dir: Path, trust_remote_code: bool) -> tuple[Optional[str], Optional[str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=trust_remote_code)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return template, tokenizer.eos_token


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)
