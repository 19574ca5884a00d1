"""`ftcli export --check`: the fixture's files pass with the agreement the fixture tests measure, every family's
tiny model passes, and a file with an altered chat template, end-of-sequence id or tensor is caught, named."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import DEVICE, assert_clean_failure, make_output_folder, run_cli, write_jsonl, write_recipe
from ftcli.errors import FtcliError
from ftcli.export import default_export_folder, export
from ftcli.export.check import CHECK_FILE, WrittenFile, check_failure, check_files
from ftcli.export.check_format import first_difference
from ftcli.export.gguf_file import gguf_weight, hf_weight
from ftcli.export.gguf_reader import GgufFile
from ftcli.export.modelfile import CHAT_FORMATS, ChatFormat
from ftcli.export.source import open_source
from tiny_models import FAMILIES, tiny_config

ROWS = [{"messages": [{"role": "user", "content": f"What is {n} plus one?"},
                      {"role": "assistant", "content": f"{n} plus one is {n + 1}."}]} for n in range(6)]


@pytest.fixture(scope="module")
def checked_run(tiny_model_folder, tmp_path_factory):
    """A tiny Llama run whose recipe.yaml names its data, exported to f16 with the check."""
    root = tmp_path_factory.mktemp("checked")
    base = tiny_model_folder("llama")
    out = make_output_folder(base, root / "run")
    write_recipe(out / "recipe.yaml", base, write_jsonl(root / "data.jsonl", ROWS), out)
    summary = export(out, gguf_types="f16")
    return out, summary


def altered_copy(path, folder, change):
    """A copy of the GGUF file and its Modelfile in `folder`, the copy changed in place by change(reader)."""
    folder.mkdir(exist_ok=True)
    copy = folder / path.name
    shutil.copy(path, copy)
    shutil.copy(path.with_suffix(".Modelfile"), copy.with_suffix(".Modelfile"))
    reader = gguf.GGUFReader(copy, "r+")
    change(reader)
    reader.data.flush()
    return copy


def check_one(out, path, type_name="f16") -> dict:
    return check_files(open_source(out), [WrittenFile(type_name, path, path.with_suffix(".Modelfile"))],
                       AutoTokenizer.from_pretrained(out), path.parent)


@pytest.mark.slow
def test_fixture_files_pass_with_the_agreement_the_fixture_tests_measure(quickstart_export):
    """The quickstart export (conftest) checks its files; check.json holds the figures. The thresholds are
    test_export_fixture's, over the trained model's own answers to 6 identity prompts and 2 generic ones (measured,
    answers / all positions / greedy: f16 100% / 100% / 8 of 8, q8_0 99.4% / 99.8% / 7, q4_k_m 98.7% / 90.8% / 7,
    q6_k 99.4% / 94.3% / 7, q5_k_m 90.8% / 67.5% / 1)."""
    check = json.loads((quickstart_export / CHECK_FILE).read_text())
    files = {result["type"]: result for result in check["files"].values()}
    assert sorted(files) == ["f16", "q4_k_m", "q5_k_m", "q6_k", "q8_0"] and check["status"] != "failed"
    assert all(result["problems"] == [] for result in files.values())
    f16 = files["f16"]
    assert (f16["verdict"], f16["answers"], f16["every_position"], f16["greedy_same"]) == ("passed", 1.0, 1.0, 8)
    assert f16["max_logit_difference"] < 1e-3 and f16["largest_weight_error"]["relative_rms"] == 0
    assert files["q8_0"]["verdict"] == "passed" and files["q8_0"]["answers"] >= 0.99
    assert files["q8_0"]["every_position"] >= 0.95 and files["q8_0"]["greedy_same"] >= 6
    assert files["q4_k_m"]["verdict"] == "passed" and files["q4_k_m"]["answers"] >= 0.90
    assert files["q4_k_m"]["every_position"] >= 0.85
    assert files["q6_k"]["verdict"] == "passed"
    # q5_k_m is worse than q4_k_m on this model (README: its rows fall back to Q5_1): a warning, not a failure
    assert files["q5_k_m"]["verdict"] in ("passed", "warning") and files["q5_k_m"]["answers"] >= 0.85
    assert all("quantization error; try q6_k or q8_0" in warning for warning in files["q5_k_m"]["warnings"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_export_passes_the_check(family, tiny_model_folder, tmp_path):
    """Template, Modelfile, stop tokens and weights pass for every family; f16 holds the merged weights exactly.
    Quantized files of tiny random models may warn: their top tokens are often near-ties."""
    out = make_output_folder(tiny_model_folder(family), tmp_path / "run")
    check = export(out, gguf_types="f16,q8_0,q4_k_m")["check"]
    assert check["status"] != "failed", check
    for result in check["files"].values():
        assert result["problems"] == [] and result["largest_weight_error"]["relative_rms"] < 0.1, result
    f16 = check["files"]["run-f16.gguf"]
    assert f16["verdict"] == "passed" and f16["answers"] == f16["every_position"] == 1.0
    assert f16["max_logit_difference"] < 1e-4 and f16["greedy_same"] == f16["greedy_prompts"] == 2


def test_a_run_is_checked_on_its_own_data(checked_run):
    out, summary = checked_run
    check = summary["check"]
    assert check["sample"].startswith("6 training rows of") and check["sample"].endswith("2 generic")
    assert check["status"] == "passed", check
    assert check["files"]["run-f16.gguf"]["greedy_prompts"] == 6 + 2  # the rows' questions and the generic ones
    assert json.loads((default_export_folder(out) / CHECK_FILE).read_text())["files"] == check["files"]


def test_a_run_whose_rows_open_with_a_system_turn_passes(tiny_model_folder, tmp_path):
    """The check adds its own system turn only to a sample without one: a second system turn would be merged into
    the first by Ollama but not by Jinja, a difference no real chat of the run has."""
    rows = [{"messages": [{"role": "system", "content": "You count."}] + row["messages"]} for row in ROWS]
    base = tiny_model_folder("llama")
    out = make_output_folder(base, tmp_path / "run")
    write_recipe(out / "recipe.yaml", base, write_jsonl(tmp_path / "data.jsonl", rows), out)
    check = export(out, gguf_types="f16")["check"]
    assert check["sample"].startswith("6 training rows of")
    assert (check["status"], check["files"]["run-f16.gguf"]["problems"]) == ("passed", []), check


def test_a_raw_text_run_is_checked_on_raw_prompts(tiny_model_folder, tmp_path):
    """A run without a chat template (data.format text): prompts as plain text, ended by the end-of-sequence id."""
    out = make_output_folder(tiny_model_folder("qwen2"), tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = None
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    check = export(out, gguf_types="f16")["check"]
    result = check["files"]["run-f16.gguf"]
    assert (result["verdict"], result["problems"], result["answers"]) == ("passed", [], 1.0), result


def test_check_json_never_describes_a_file_written_after_it(checked_run, tmp_path, monkeypatch):
    """A file rewritten by an export whose check stops before recording (out of memory, say) loses its old entry;
    a check.json that is not as ftcli writes it is replaced, not a crash."""
    out, _ = checked_run
    to = tmp_path / "exports"
    export(out, gguf_types="f16", to=to)
    assert json.loads((to / CHECK_FILE).read_text())["files"]["run-f16.gguf"]["verdict"] == "passed"

    def stopped(*arguments):
        raise FtcliError("the check stopped")

    monkeypatch.setattr("ftcli.export.check_files", stopped)
    with pytest.raises(FtcliError, match="the check stopped"):
        export(out, gguf_types="f16", to=to, overwrite=True)
    assert not (to / CHECK_FILE).exists()  # its one entry was of the replaced file
    monkeypatch.undo()
    (to / CHECK_FILE).write_text('{"files": ["run-f16.gguf"]}')
    export(out, gguf_types="f16", to=to, overwrite=True)
    assert list(json.loads((to / CHECK_FILE).read_text())["files"]) == ["run-f16.gguf"]


def test_an_altered_chat_template_is_caught_with_its_first_difference(checked_run, tmp_path):
    out, summary = checked_run

    def rename_end_marker(reader):
        template = reader.fields["tokenizer.chat_template"].parts[-1]
        template[:] = np.frombuffer(bytes(template).replace(b"im_end", b"im_eos"), np.uint8)

    path = altered_copy(default_export_folder(out) / "run-f16.gguf", tmp_path / "altered", rename_end_marker)
    result = check_one(out, path)["files"]["run-f16.gguf"]
    assert result["verdict"] == "failed" and len(result["problems"]) == 1
    assert "tokenizer.chat_template renders a sample chat differently" in result["problems"][0]
    assert "training gives '<|im_start|>user'" not in result["problems"][0]  # the line that differs, not the first
    assert "<|im_end|>" in result["problems"][0] and "<|im_eos|>" in result["problems"][0]


def test_a_changed_end_of_sequence_id_is_caught_with_both_tokens(checked_run, tmp_path):
    out, summary = checked_run

    def end_with_padding(reader):
        reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0] = 0

    path = altered_copy(default_export_folder(out) / "run-f16.gguf", tmp_path / "altered", end_with_padding)
    check = check_one(out, path)
    [problem] = check["files"]["run-f16.gguf"]["problems"]
    assert "end-of-sequence id (tokenizer.ggml.eos_token_id) is 0 ('<|endoftext|>')" in problem
    assert "training appended 2 ('<|im_end|>')" in problem
    error = check_failure(check)
    assert error.exit_code == 1 and "run-f16.gguf: the file's end-of-sequence id" in error.message


def test_an_id_outside_the_vocabulary_and_a_modelfile_template_it_cannot_fill_are_problems(checked_run, tmp_path):
    """An end-of-sequence id past the vocabulary, and a Go pipe (outside the subset go_template.py renders), are
    each named as a problem, not raised."""
    out, summary = checked_run

    def end_past_the_vocabulary(reader):
        reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0] = 10**6

    path = altered_copy(default_export_folder(out) / "run-f16.gguf", tmp_path / "altered", end_past_the_vocabulary)
    modelfile = path.with_suffix(".Modelfile")
    modelfile.write_text(modelfile.read_text().replace("{{ .Content }}", "{{ .Content | printf }}"))
    problems = check_one(out, path)["files"]["run-f16.gguf"]["problems"]
    assert len(problems) == 2, problems
    assert "(tokenizer.ggml.eos_token_id) is 1000000 (not in the file's vocabulary)" in problems[1]
    assert problems[0].startswith("the Modelfile's TEMPLATE cannot be filled as Ollama fills it (cannot read '|")


def test_a_corrupted_tensor_is_caught_by_name(checked_run, tmp_path):
    out, summary = checked_run

    def negate_a_query(reader):
        tensor = next(tensor for tensor in reader.tensors if tensor.name == "blk.1.attn_q.weight")
        tensor.data[:] = -tensor.data

    path = altered_copy(default_export_folder(out) / "run-f16.gguf", tmp_path / "altered", negate_a_query)
    result = check_one(out, path)["files"]["run-f16.gguf"]
    [problem] = result["problems"]
    assert "model.layers.1.self_attn.q_proj.weight (F16) differs from the trained weight by 200.0%" in problem
    assert result["largest_weight_error"]["tensor"] == "model.layers.1.self_attn.q_proj.weight"
    assert result["answers"] < 1.0  # and the model reads differently too


def test_a_tensor_of_another_shape_is_caught_by_name(checked_run, tmp_path):
    """A tensor whose header gives it half its rows: a problem naming both shapes, and check.json stays JSON (no
    Infinity for an error that cannot be measured)."""
    out, summary = checked_run

    def halve_a_key(reader):
        tensor = next(tensor for tensor in reader.tensors if tensor.name == "blk.1.attn_k.weight")
        tensor.field.parts[3][1] //= 2  # GGUF dims run columns first: (64, 32) -> (64, 16)

    path = altered_copy(default_export_folder(out) / "run-f16.gguf", tmp_path / "altered", halve_a_key)
    result = check_one(out, path)["files"]["run-f16.gguf"]
    assert result["problems"] == ["the tensor for model.layers.1.self_attn.k_proj.weight (F16) has shape [16, 64], "
                                  "the trained weight [32, 64]: the file is damaged or holds another model"]
    json.loads((path.parent / CHECK_FILE).read_text(), parse_constant=pytest.fail)


def test_cli_prints_the_table_writes_json_and_no_check_skips(checked_run, tmp_path):
    out, _ = checked_run
    to = tmp_path / "exports"
    result = run_cli("export", out, "--gguf", "f16,q8_0", "--to", to)
    output = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "Export check on 8 prompts (6 training rows of" in output and "run-q8_0.gguf" in output
    assert "passed" in output and "check.json" in output
    result = run_cli("export", out, "--gguf", "q8_0", "--to", to, "--overwrite", "--no-check", "--json")
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert result.exit_code == 0 and "check" not in summary
    # the q8_0 file was rewritten unchecked: check.json keeps f16's entry only
    assert list(json.loads((to / CHECK_FILE).read_text())["files"]) == ["run-f16.gguf"]
    result = run_cli("export", out, "--gguf", "q8_0", "--to", to, "--overwrite", "--json")
    files = json.loads(result.output.strip().splitlines()[-1])["check"]["files"]
    assert result.exit_code == 0 and set(files["run-q8_0.gguf"]) >= {
        "answers", "every_position", "max_logit_difference", "greedy_same", "largest_weight_error", "verdict"}


def test_cli_exits_1_when_the_modelfile_template_differs_from_training(checked_run, tmp_path, monkeypatch):
    """A ChatML Go template that forgets the newline after the role: Ollama's prompt would not be training's."""
    out, _ = checked_run
    broken = CHAT_FORMATS["chatml"].go_template.replace("{{ .Role }}\n", "{{ .Role }}")
    monkeypatch.setitem(CHAT_FORMATS, "chatml", ChatFormat(broken, ["<|im_end|>"]))
    result = run_cli("export", out, "--gguf", "f16", "--to", tmp_path / "exports")
    assert_clean_failure(result, 1, "The export check failed: run-f16.gguf: the Modelfile's TEMPLATE",
                         "training gives '<|im_start|>user'", "the file gives '<|im_start|>userWhat is ")
    assert (tmp_path / "exports" / "run-f16.gguf").is_file()  # kept, and check.json says it failed
    assert json.loads((tmp_path / "exports" / CHECK_FILE).read_text())["status"] == "failed"
    result = run_cli("export", out, "--gguf", "f16", "--to", tmp_path / "exports", "--overwrite", "--json")
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert result.exit_code == 1 and summary["status"] == "error" and summary["exit_code"] == 1
    assert summary["check"]["files"]["run-f16.gguf"]["answers"] == 1.0  # the numbers, with the error


def test_gguf_reader_reads_what_ggufs_own_reader_reads(checked_run):
    out, summary = checked_run
    path = default_export_folder(out) / "run-f16.gguf"
    ours, theirs = GgufFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key] == field.contents(), key
    for tensor in theirs.tensors:
        expected = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
        assert torch.equal(ours.values(tensor.name, DEVICE).cpu(), expected), tensor.name


def test_a_cut_or_empty_gguf_file_is_named_damaged(checked_run, tmp_path):
    """A file cut inside its header (or empty) cannot be opened, one cut inside its tensor data cannot give that
    tensor: both an FtcliError naming the file and the fix, not a struct or numpy error."""
    out, summary = checked_run
    whole = (default_export_folder(out) / "run-f16.gguf").read_bytes()
    last = max(GgufFile(default_export_folder(out) / "run-f16.gguf").tensors.items(), key=lambda item: item[1].offset)
    for name, cut in [("empty", 0), ("header", 1000), ("data", last[1].offset + 10)]:
        (tmp_path / name).write_bytes(whole[:cut])
    for name in ("empty", "header"):
        with pytest.raises(FtcliError, match=f"{tmp_path / name} is not a GGUF file the export check can read: its "
                                             "header is cut short or damaged .*Export it again with --overwrite"):
            GgufFile(tmp_path / name)
    data_cut = GgufFile(tmp_path / "data")
    with pytest.raises(FtcliError, match=r"but 10 torch.uint8 values were read for it: the GGUF file is truncated"):
        data_cut.values(last[0], DEVICE)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_hf_weight_undoes_gguf_weight(family):
    """Llama's q/k rows go into llama.cpp's rope order (each head's two halves interleaved) and Gemma's norms are
    stored as 1 + w; everything else is stored as it is; hf_weight brings each back exactly."""
    config = tiny_config(family, 320)
    generator = torch.Generator().manual_seed(0)
    for name, shape in [("model.layers.0.self_attn.q_proj.weight", (128, 64)),
                        ("model.layers.0.self_attn.k_proj.weight", (64, 64)), ("model.norm.weight", (64,))]:
        weight = torch.randn(shape, generator=generator).to(torch.bfloat16).float()  # exported weights are 16-bit
        stored = gguf_weight(config, name, weight)
        expected = weight
        if family == "llama" and "proj" in name:
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            half = shape[0] // heads // 2
            expected = weight[[head * 2 * half + which * half + row for head in range(heads) for row in range(half)
                               for which in range(2)]]
        elif family == "gemma" and name.endswith("norm.weight"):
            expected = weight + 1
        assert torch.equal(stored, expected), name
        assert torch.equal(hf_weight(config, name, stored), weight), name


def test_first_difference_names_the_line():
    assert first_difference("a\nbc\nd", "a\nbx\nd") == ("first difference at character 3 (line 2): training gives "
                                                        "'bc', the file gives 'bx'")
    assert first_difference("abc", "ab").startswith("first difference at character 2 (line 1)")
