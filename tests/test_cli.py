"""`ftcli train` end to end on a tiny model: outputs, summaries, and every bad input's message and exit code;
what a library raises in any command (the last-resort paragraph), and secrets kept out of output and files."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_clean_failure, make_output_folder, run_cli, write_jsonl, write_recipe
from ftcli.errors import redact

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
             for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


@pytest.fixture
def workspace(tmp_path, tiny_model_folder):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    return tmp_path, tiny_model_folder("llama"), data


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".out", "out")))


def test_train_writes_a_complete_adapter_folder(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    result = run_cli("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["output"] == str(tmp / "out")
    out = tmp / "out"
    for name in ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl",
                 "tokenizer_config.json"]:
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "peak_mem_gib"} <= set(row)
    assert rows[-1]["tokens"] == summary["tokens"] > 0
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["lora"]["dropout"] == 0.0
    assert any(key.endswith("lora_B.weight") for key in load_file(out / "adapter_model.safetensors"))
    assert leftovers(tmp) == ["out"]


def test_same_seed_same_losses_other_seed_other_losses(workspace):
    tmp, model, data = workspace

    def losses(name, seed):
        recipe = write_recipe(tmp / f"{name}.yaml", model, data, tmp / name, train={"seed": seed})
        assert run_cli("train", recipe, "--json").exit_code == 0
        return [json.loads(line)["loss"] for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]

    first = losses("a", 11)
    assert losses("b", 11) == first
    assert losses("c", 12) != first


def test_eval_fraction_writes_eval_loss(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", data={"eval_fraction": 0.34})
    result = run_cli("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1] and rows[-1]["eval_loss"] > 0
    assert json.loads(result.stdout.splitlines()[-1])["eval_loss"] == rows[-1]["eval_loss"]


def test_dry_run_counts_rows_and_truncation_without_writing(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", model={"max_seq_length": 24})
    result = run_cli("train", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 6 and summary["train_examples"] + summary["dropped_no_target"] == 6
    assert summary["truncated"] > 0 and summary["longest"] <= 24
    assert leftovers(tmp) == []


def test_set_and_output_override_the_recipe(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    result = run_cli("train", recipe, "--set", "train.max_steps=2", "--output", tmp / "other", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["steps"] == 2
    assert (tmp / "other" / "adapter_config.json").is_file() and not (tmp / "out").exists()


def expect_error(recipe, *fragments, code=2, extra=()):
    result = run_cli("train", recipe, *extra)
    assert_clean_failure(result, code, *fragments)
    return result


def test_missing_dataset_file(workspace):
    tmp, model, _ = workspace
    recipe = write_recipe(tmp / "r.yaml", model, tmp / "nope.jsonl", tmp / "out")
    expect_error(recipe, "nope.jsonl", "does not exist")
    assert leftovers(tmp) == []


def test_row_missing_columns_names_row_and_columns(workspace):
    tmp, model, _ = workspace
    data = write_jsonl(tmp / "bad.jsonl", CHAT_ROWS[:2] + [{"prompt": "hi", "answer": "hello"}])
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    expect_error(recipe, "row 3", "messages", "prompt, answer")
    assert leftovers(tmp) == []


def test_broken_jsonl_line_is_named(workspace):
    tmp, model, _ = workspace
    data = tmp / "broken.jsonl"
    data.write_text(json.dumps(CHAT_ROWS[0]) + "\n" + '{"messages": [}\n')
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    expect_error(recipe, "line 2", "not valid JSON")


def test_empty_dataset(workspace):
    tmp, model, _ = workspace
    (tmp / "empty.csv").write_text("instruction,output\n")
    recipe = write_recipe(tmp / "r.yaml", model, tmp / "empty.csv", tmp / "out", data={"format": "alpaca"})
    expect_error(recipe, "no rows")


def test_unknown_architecture(workspace):
    tmp, _, data = workspace
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp / "gpt2")
    recipe = write_recipe(tmp / "r.yaml", tmp / "gpt2", data, tmp / "out")
    expect_error(recipe, "'gpt2'", "does not support", "Llama (llama)")
    assert leftovers(tmp) == []


def test_unknown_recipe_key_suggests_the_nearest(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", train={"learnig_rate": 1e-4})
    expect_error(recipe, "train.learnig_rate", "did you mean 'learning_rate'")


def test_unknown_lora_target_fails_without_leaving_an_output_folder(workspace):
    tmp, model, data = workspace
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out", lora={"target_modules": ["q_proj", "qkv"]})
    expect_error(recipe, "qkv", "q_proj", "all-linear")
    assert leftovers(tmp) == []


def test_existing_output_folder_is_not_overwritten(workspace):
    tmp, model, data = workspace
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp / "r.yaml", model, data, tmp / "out")
    expect_error(recipe, "already exists", "overwrite")
    assert (tmp / "out" / "keep.txt").read_text() == "mine"


def test_json_mode_reports_errors_as_json(workspace):
    tmp, model, _ = workspace
    recipe = write_recipe(tmp / "r.yaml", model, tmp / "nope.jsonl", tmp / "out")
    result = expect_error(recipe, extra=("--json",))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == "error" and report["exit_code"] == 2 and "nope.jsonl" in report["message"]


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("model:\n  name: x\n  bad indent: [\n")
    result = subprocess.run([sys.executable, "-m", "ftcli", "train", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "line" in result.stderr and "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_real_process_library_failure_has_no_traceback(tmp_path, tiny_model_folder):
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out")
    (out / "adapter_model.safetensors").write_bytes(b"junk" * 50)
    result = subprocess.run([sys.executable, "-m", "ftcli", "chat", str(out), "--prompt", "hi"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "`ftcli chat` failed: SafetensorError:" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout


# What a library raises reaches the person as one paragraph too (the last-resort handler)

@pytest.fixture
def broken_copy(tmp_path, tiny_model_folder):
    """A copy of the tiny model folder with one file replaced by `content`."""
    def copy(name, content: bytes, folder_name="broken"):
        folder = shutil.copytree(tiny_model_folder("llama"), tmp_path / folder_name)
        (folder / name).write_bytes(content)
        return folder

    return copy


def test_a_library_failure_is_one_paragraph_and_a_json_line(workspace, broken_copy):
    tmp, _, data = workspace
    model = broken_copy("model.safetensors", b"not safetensors" * 8)
    result = run_cli("train", write_recipe(tmp / "r.yaml", model, data, tmp / "out"), "--json")
    assert_clean_failure(result, 1, "`ftcli train` failed: SafetensorError:", "FTCLI_DEBUG=1")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == "error" and report["exit_code"] == 1 and "SafetensorError" in report["message"]
    assert leftovers(tmp) == []


def test_ftcli_debug_adds_the_redacted_traceback(tmp_path, tiny_model_folder, monkeypatch):
    token = "hf_" + "Debug7" * 5
    monkeypatch.setenv("HF_TOKEN", token)
    secret_path = tmp_path / token / "weights.bin"

    def fail_naming_the_path(*args, **kwargs):
        raise RuntimeError(f"cannot map {secret_path}")

    monkeypatch.setattr("ftcli.inference.open_model", fail_naming_the_path)
    quiet = run_cli("chat", tiny_model_folder("llama"), "--prompt", "hi")
    assert "Traceback" not in assert_clean_failure(quiet, 1, "`ftcli chat` failed: RuntimeError: cannot map")
    monkeypatch.setenv("FTCLI_DEBUG", "1")
    result = run_cli("chat", tiny_model_folder("llama"), "--prompt", "hi")
    output = assert_clean_failure(result, 1, "`ftcli chat` failed: RuntimeError: cannot map", "/***/weights.bin")
    assert "Traceback (most recent call last)" in output and "in fail_naming_the_path" in output
    assert token not in result.output


@pytest.mark.parametrize("name,content,fragments", [
    ("config.json", b"{not json", ["config of model.name", "config.json' is not a valid JSON file"]),
    ("tokenizer.json", b"{not json", ["tokenizer of model.name", "Expecting property name"]),
])
def test_a_corrupt_model_file_is_a_model_error(workspace, broken_copy, name, content, fragments):
    tmp, _, data = workspace
    model = broken_copy(name, content)
    result = run_cli("train", write_recipe(tmp / "r.yaml", model, data, tmp / "out"), "--json")
    assert_clean_failure(result, 2, str(model), *fragments)
    assert json.loads(result.stdout.strip().splitlines()[-1])["exit_code"] == 2


def test_a_gguf_file_of_garbage_bytes(workspace):
    tmp, _, data = workspace
    garbage = tmp / "model.gguf"
    garbage.write_bytes(b"garbage" * 100)
    trained = run_cli("train", write_recipe(tmp / "r.yaml", garbage, data, tmp / "out"))
    assert_clean_failure(trained, 2, f"{garbage} could not be read as a GGUF model", "not a GGUF file")
    chatted = run_cli("chat", garbage, "--prompt", "hi")
    assert_clean_failure(chatted, 2, f"{garbage} could not be read as a GGUF model", "not a GGUF file")


def test_an_unreadable_adapter_folder_in_chat_and_export(tmp_path, tiny_model_folder):
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out")
    (out / "adapter_model.safetensors").write_bytes(b"junk" * 50)
    assert_clean_failure(run_cli("chat", out, "--prompt", "hi"), 1, "`ftcli chat` failed: SafetensorError:")
    exported = run_cli("export", out, "--merged", "--json")
    assert_clean_failure(exported, 1, "`ftcli export` failed: SafetensorError:")
    assert json.loads(exported.stdout.strip().splitlines()[-1])["exit_code"] == 1
    assert not (out / "export" / "merged").exists()


def cuda_out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")


def test_cuda_out_of_memory_in_chat_and_export_exits_4_with_advice(tmp_path, tiny_model_folder, monkeypatch):
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out")
    monkeypatch.setattr("ftcli.decoding.Decoder.generate", cuda_out_of_memory)
    chatted = run_cli("chat", out, "--prompt", "hi")
    assert_clean_failure(chatted, 4, "CUDA ran out of memory during `ftcli chat`", "Tried to allocate 2.00 GiB",
                         "CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("ftcli.export.merged.merged_shards", cuda_out_of_memory)
    exported = run_cli("export", out, "--merged", "--json")
    assert_clean_failure(exported, 4, "CUDA ran out of memory during `ftcli export`")
    assert json.loads(exported.stdout.strip().splitlines()[-1])["exit_code"] == 4


def test_ctrl_c_while_loading_exits_130(tmp_path, tiny_model_folder, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ftcli.inference.open_model", interrupt)
    assert_clean_failure(run_cli("chat", tiny_model_folder("llama"), "--prompt", "hi"), 130, "interrupted")


def test_usage_errors_are_still_typers(tmp_path):
    missing = run_cli("train")
    assert missing.exit_code == 2 and isinstance(missing.exception, SystemExit)
    assert "Missing argument 'RECIPE.yaml'" in missing.output
    negative = run_cli("chat", tmp_path, "--temperature", "-1")
    assert negative.exit_code == 2 and "Invalid value for '--temperature'" in negative.output


def test_redact_short_secrets_and_url_credentials_but_not_ordinary_words(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "Xk9q2")  # short, but not a word: a secret
    monkeypatch.setenv("DB_PASSWORD", "true")  # an ordinary word: replacing it would rewrite recipe.yaml
    monkeypatch.setenv("SERVICE_TOKEN", "8080")  # a plain number
    monkeypatch.setenv("OTHER_SECRET", "a1!")  # too short to tell from the text around it
    assert redact("key Xk9q2 in /data/Xk9q2/x and model-Xk9q2, not in Xk9q2abc") == \
        "key *** in /data/***/x and model-***, not in Xk9q2abc"
    assert redact("load_in_4bit: true, port 8080, a1!") == "load_in_4bit: true, port 8080, a1!"
    assert redact("https://user:pw@hub.example/m?access_token=abc123&rev=main") == \
        "https://***@hub.example/m?access_token=***&rev=main"


def test_secrets_in_the_model_path_reach_no_written_file(workspace, monkeypatch):
    """A token (and a short secret) in the paths of the base model and the output folder reach no file of the adapter
    folder, its checkpoints, the merged folder, the GGUF file or the Modelfile, though transformers and peft record
    where models and tokenizers were loaded from (config's _name_or_path, tokenizer_config's name_or_path,
    adapter_config's base_model_name_or_path, the model card)."""
    token, short = "hf_" + "Wr1tten" * 4, "Qz7v4"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("MY_API_KEY", short)
    tmp, model, data = workspace
    secret_folder = tmp / token / short
    base, out = shutil.copytree(model, secret_folder / "base"), secret_folder / "out"
    recipe = write_recipe(tmp / "r.yaml", base, data, out, train={"max_steps": 2, "save_steps": 1})
    for as_json in ([], ["--json"]):
        trained = run_cli("train", recipe, "--set", "output.overwrite=true", *as_json)
        assert trained.exit_code == 0 and token not in trained.output and short not in trained.output
    assert_no_secret_in(out, [token, short], {"adapter_config.json", "tokenizer_config.json", "recipe.yaml",
                                              "metrics.jsonl", "trainer_state.json"})
    # recipe.yaml names the base redacted, so export needs its real place, as its error message says
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    resolved["model"]["name"] = str(base)
    (out / "recipe.yaml").write_text(yaml.safe_dump(resolved))
    exported = run_cli("export", out, "--merged", "--gguf", "f16", "--to", secret_folder / "export")
    assert exported.exit_code == 0 and token not in exported.output and short not in exported.output
    assert_no_secret_in(secret_folder / "export", [token, short], {"config.json", "tokenizer_config.json",
                                                                    "out-f16.gguf", "out-f16.Modelfile"})


def assert_no_secret_in(folder, secrets: list[str], expected_names: set[str]) -> None:
    written = [path for path in folder.rglob("*") if path.is_file()]
    assert expected_names <= {path.name for path in written}, sorted(path.name for path in written)
    for path in written:
        content = path.read_bytes()
        assert not [secret for secret in secrets if secret.encode() in content], path
