"""`ftcli export --check`: each GGUF file written, against the trained model, before anyone runs it.

A file fails (exit code 1) when it cannot behave like the trained model whatever its type:
- weights: a tensor, dequantized as llama.cpp reads it, is further from the merged weight than its type's rounding
  ever puts it (WEIGHT_ERROR): a damaged file, or one written from other weights; the message names the tensor;
- chat format and stop tokens (ftcli/export/check_format.py): a template or a Modelfile that lays out a chat
  otherwise than training did, or an end-of-sequence or end-of-turn id training did not append.
A file warns when its model agrees with the trained one less than its type should (THRESHOLDS): the top token
teacher-forced where the assistant writes, and greedy answers (ftcli/export/check_model.py). That is quantization
losing too much for this model, not a broken file, so the warning names the type to try instead.

Failed files are kept, with check.json saying why: they are whole files (each was renamed into place complete),
a failure may need a look rather than a re-export, and `--overwrite` replaces them. check.json, beside the files,
holds each checked file's numbers by file name. An entry goes as its file is rewritten (before, so that a check
that stops never leaves the old file's verdict on the new one) or deleted; the other files' entries stay.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from gguf import GGMLQuantizationType as Q
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ftcli.errors import FtcliError
from ftcli.export.check_format import format_problems
from ftcli.export.check_model import Agreement, ReferenceRun, compare, reference_run
from ftcli.export.check_sample import check_sample
from ftcli.export.gguf_file import gguf_weight, hf_weight
from ftcli.export.gguf_reader import GgufFile, StoredWeight, stored_weights
from ftcli.export.source import ExportSource, merged_tensors
from ftcli.loader import pick_device
from ftcli.staging import atomic_write_text

CHECK_FILE = "check.json"
VERDICT_STYLES = {"passed": "green", "warning": "yellow", "failed": "bold red"}


class CheckFailed(FtcliError):
    """A written file does not hold the trained model, or not its chat format or stop tokens (exit code 1)."""


@dataclass(frozen=True)
class Thresholds:
    answers: float  # least share of answer positions where the file's top token is the trained model's
    greedy: float  # least share of greedy answers identical to the trained model's
    instead: str  # the types to try when a file falls short


# Float types hold the merged weights (f32 exactly, f16 but for values below its precision, bf16 within its
# rounding); q8_0 keeps nearly every top token; the k-quants and q4_0 lose some. What the quickstart fixture
# (SmolLM2-135M) measures: README's table.
THRESHOLDS = {
    "f32": Thresholds(0.99, 0.9, "f16"),
    "f16": Thresholds(0.99, 0.9, "f32"),
    "bf16": Thresholds(0.99, 0.9, "f16"),
    "q8_0": Thresholds(0.97, 0.75, "f16"),
    "q6_k": Thresholds(0.95, 0.5, "q8_0"),
    "q5_k_m": Thresholds(0.85, 0.25, "q6_k or q8_0"),
    "q4_k_m": Thresholds(0.85, 0.25, "q6_k or q8_0"),
    "q4_0": Thresholds(0.8, 0.25, "q4_k_m, q6_k or q8_0"),
}
# Largest RMS error of a stored tensor relative to the RMS of the weight it was made from, per tensor type: a few
# times what the type's rounding gives on Gaussian weights (Q8_0 0.4%, Q6_K 1.8%, Q5 4%, Q4 7-9%); a damaged or
# misplaced tensor is off by order 1
WEIGHT_ERROR = {Q.F32: 1e-6, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.03, Q.Q6_K: 0.08, Q.Q5_K: 0.15, Q.Q5_0: 0.15,
                Q.Q5_1: 0.15, Q.Q4_K: 0.3, Q.Q4_0: 0.3}


@dataclass
class WrittenFile:
    type_name: str
    gguf: Path
    modelfile: Path


def check_files(source: ExportSource, files: list[WrittenFile], tokenizer, folder: Path) -> dict:
    """Check each written file; write check.json into `folder`; returns the summary the CLI prints."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    config = source.config
    device = pick_device()
    weights = dict(merged_tensors(source))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             trust_remote_code=source.trust_remote_code).to(device).eval()
    _load(model, weights)
    sample = check_sample(source.out_dir)
    reference = reference_run(model, tokenizer, sample.prompts)
    parameters = sum(weight.numel() for name, weight in weights.items() if name != "lm_head.weight")
    results = {}
    for file in files:
        begun = time.perf_counter()
        results[file.gguf.name] = _check_file(file, model, config, weights, tokenizer, sample, reference, parameters)
        results[file.gguf.name]["seconds"] = round(time.perf_counter() - begun, 2)
    status = _worst(result["verdict"] for result in results.values())
    path = record_checks(folder, results, [])
    return {"status": status, "path": str(path), "sample": sample.origin, "prompts": len(reference.rows),
            "files": results, "seconds": round(time.perf_counter() - started, 2)}


def check_failure(check: dict) -> Optional[CheckFailed]:
    """The error naming every failed file's problems, or None when no file failed."""
    failed = {name: result for name, result in check["files"].items() if result["verdict"] == "failed"}
    if not failed:
        return None
    details = "; ".join(f"{name}: {', and '.join(result['problems'])}" for name, result in failed.items())
    return CheckFailed(f"The export check failed: {details}. The files are kept and {check['path']} records "
                       "this; fix the cause (a tokenizer or template edited after training, a damaged file) and "
                       "export again with --overwrite, or pass --no-check to skip the check.")


def check_report(check: dict) -> Group:
    """The check as the terminal shows it: one row per file, then each file's problems and warnings. Columns:
    the largest weight error, the share of answer and of all positions with the trained model's top token, the
    largest logit difference, and the greedy answers identical to the trained model's."""
    first = next(iter(check["files"].values()))
    table = Table(title=f"Export check on {first['greedy_prompts']} prompts ({check['sample']}): "
                        f"{first['answer_positions']} answer positions of {first['positions']}", title_justify="left")
    table.add_column("file", no_wrap=True)
    for column in ("weights", "answers", "all", "logits", "greedy"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    lines = []
    for name, result in check["files"].items():
        weight = result["largest_weight_error"]
        weights = f"{weight['relative_rms']:.2%} {weight['type']}" if weight else "shapes differ"
        table.add_row(name, weights, f"{result['answers']:.1%}",
                      f"{result['every_position']:.1%}", f"{result['max_logit_difference']:.3g}",
                      f"{result['greedy_same']}/{result['greedy_prompts']}",
                      Text(result["verdict"], style=VERDICT_STYLES[result["verdict"]]))
        lines += [Text.assemble(("error: ", "bold red"), f"{name}: {problem}") for problem in result["problems"]]
        lines += [Text.assemble(("warning: ", "yellow"), f"{name}: {warning}") for warning in result["warnings"]]
    return Group(table, *lines, Text(f"check.json: {check['path']} ({check['seconds']:.1f} s)"))


def _check_file(file: WrittenFile, model, config, weights, tokenizer, sample, reference: ReferenceRun,
                parameters: int) -> dict:
    gguf_file = GgufFile(file.gguf)
    errors, problems = [], []
    device = next(model.parameters()).device
    for name, stored in stored_weights(gguf_file, config, list(weights), device):  # one at a time: memory holds one
        trained = weights[name]
        if stored.values.shape != trained.shape:
            problems.append(f"the tensor for {name} ({stored.qtype.name}) has shape {list(stored.values.shape)}, the "
                            f"trained weight {list(trained.shape)}: the file is damaged or holds another model")
            model.get_parameter(name).data.copy_(trained)  # not the previous file's tensor
            continue
        errors.append((name, stored.qtype, _weight_error(config, trained, name, stored)))
        model.get_parameter(name).data.copy_(hf_weight(config, name, stored.values))
    problems += _weight_problems(errors)
    format_found, notes = format_problems(gguf_file, file.modelfile.read_text(), tokenizer, sample.conversations,
                                          sample.prompts)
    problems += format_found
    agreement = compare(model, tokenizer, reference)
    warnings = notes + _agreement_warnings(file.type_name, agreement, len(reference.greedy), parameters)
    verdict = "failed" if problems else "warning" if warnings else "passed"
    return {"type": file.type_name, "verdict": verdict, "problems": problems, "warnings": warnings,
            "largest_weight_error": _largest_weight_error(errors),
            **agreement.summary(int(reference.answer.sum()), len(reference.answer), len(reference.greedy))}


def _weight_error(config, weight: torch.Tensor, name: str, stored: StoredWeight) -> float:
    """The RMS of the stored tensor's error over the RMS of the weight it was made from, in the file's layout:
    relative, so that one bound per type holds for embeddings and norms alike."""
    expected = gguf_weight(config, name, weight.to(stored.values.device))
    scale = torch.linalg.vector_norm(expected).item()
    error = torch.linalg.vector_norm(stored.values - expected).item()
    return error / scale if scale else error


def _weight_problems(errors: list[tuple[str, Q, float]]) -> list[str]:
    problems = []
    for name, qtype, error in errors:
        bound = WEIGHT_ERROR[qtype]
        if error > bound:
            problems.append(f"the tensor for {name} ({qtype.name}) differs from the trained weight by {error:.1%} "
                            f"(RMS), where {qtype.name} rounding stays under {bound:.1%}: the file is damaged or "
                            "holds other weights")
    return problems


def _largest_weight_error(errors: list[tuple[str, Q, float]]) -> Optional[dict]:
    """None when no tensor could be compared (every one had another shape)."""
    largest = max(errors, key=lambda found: found[2], default=None)
    if largest is None:
        return None
    name, qtype, error = largest
    return {"tensor": name, "type": qtype.name, "relative_rms": round(error, 5)}


def _agreement_warnings(type_name: str, agreement: Agreement, prompts: int, parameters: int) -> list[str]:
    wanted = THRESHOLDS[type_name]
    lost = 1 - agreement.answers
    warnings = []
    if agreement.answers < wanted.answers:
        warnings.append(f"{type_name} of a {_size(parameters)} model loses the trained top token at {lost:.1%} "
                        f"of the answer positions (at most {1 - wanted.answers:.0%} expected): quantization error; "
                        f"try {wanted.instead}")
    if agreement.greedy_same < wanted.greedy * prompts:
        warnings.append(f"{type_name} answers {prompts - agreement.greedy_same} of {prompts} prompts otherwise than "
                        f"the trained model (first: {agreement.first_greedy_difference}): quantization error; try "
                        f"{wanted.instead}")
    return warnings


def _size(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.3g}M"


def _load(model, state: dict[str, torch.Tensor]) -> None:
    """Put the 16-bit `state` into the model's float32 weights; load_state_dict copies each tensor to the
    parameter's device and dtype, so no float32 copy of the whole model is made on the host first. Only a head tied
    to the embedding may be missing from it."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise FtcliError(f"The export check could not rebuild the model from its weights (missing {missing}, "
                         f"unexpected {unexpected}). Pass --no-check to export without the check, and report this.")


def _worst(verdicts) -> str:
    order = ["passed", "warning", "failed"]
    return max(verdicts, key=order.index, default="passed")


def record_checks(folder: Path, results: dict, unchecked: list[str]) -> Path:
    """Update check.json in `folder`: these results in, the entries of `unchecked` files (about to be rewritten,
    or rewritten without a check) and of files no longer there out; returns its path."""
    path = folder / CHECK_FILE
    entries = {name: entry for name, entry in _recorded_entries(path).items()
               if name not in unchecked and (folder / name).is_file()} | results
    if entries:
        atomic_write_text(path, json.dumps({"status": _worst(entry["verdict"] for entry in entries.values()),
                                            "files": entries}, indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)
    return path


def _recorded_entries(path: Path) -> dict:
    """The entries check.json holds; none where it is missing or not as ftcli writes it (it is then rewritten)."""
    try:
        files = json.loads(path.read_text()).get("files") if path.is_file() else None
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return {}
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items()
            if isinstance(entry, dict) and entry.get("verdict") in VERDICT_STYLES}
