"""`ftcli chat`: one answer with --prompt, a real terminal session in a pty, the conversation, and bad paths."""

import json
import os
import pty
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REFUSES_SYSTEM, assert_clean_failure, greedy_reply, make_output_folder, run_cli
from ftcli.chat import Conversation
from ftcli.decoding import Decoder, Sampling
from ftcli.inference import open_model

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def reference_answer(model, tokenizer, question: str, new_tokens: int) -> str:
    return tokenizer.decode(greedy_reply(model, tokenizer, question, new_tokens), skip_special_tokens=True)


def test_prompt_prints_only_the_fixture_answer(smollm2_folder):
    result = run_cli("chat", smollm2_folder, "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "40")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"


def test_prompt_with_an_adapter_folder_answers_as_the_unmerged_adapter(tmp_path, tiny_model_folder):
    base = tiny_model_folder("llama")
    out = make_output_folder(base, tmp_path / "out", std=1.0)  # B large enough to change the greedy answer
    tokenizer = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    without = reference_answer(plain, tokenizer, "Say the number 7.", 12)
    expected = reference_answer(PeftModel.from_pretrained(plain, out), tokenizer, "Say the number 7.", 12)
    assert expected != without
    result = run_cli("chat", out, "--prompt", "Say the number 7.", "--temperature", "0", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_a_conversation_keeps_its_history_and_reset_clears_it(smollm2_folder):
    opened = open_model(smollm2_folder)
    conversation = Conversation(opened, Decoder(opened.model, opened.context_length), Sampling(40, 0.0), "Be brief.")
    pieces = []
    assert conversation.answer(QUESTION, pieces.append) == ANSWER == "".join(pieces)
    conversation.answer("And of Italy?", pieces.append)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"] == ANSWER
    assert "Rome" in conversation.messages[4]["content"]  # the question only makes sense with the history
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "Be brief."}]


def test_an_interrupted_answer_keeps_what_was_shown(smollm2_folder):
    opened = open_model(smollm2_folder)
    conversation = Conversation(opened, Decoder(opened.model, opened.context_length), Sampling(40, 0.0))
    shown = []

    def show_then_interrupt(piece):
        shown.append(piece)
        if len(shown) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conversation.answer(QUESTION, show_then_interrupt)
    assert conversation.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    assert ANSWER.startswith("".join(shown)) and len("".join(shown)) < len(ANSWER)
    assert conversation.answer("Thanks. " + QUESTION, lambda piece: None)  # the session goes on


def test_bad_paths_exit_2_with_the_fix(tmp_path, tiny_model_folder):
    assert_clean_failure(run_cli("chat", tmp_path / "nowhere", "--prompt", "hi"), 2, "does not exist")
    (tmp_path / "empty").mkdir()
    empty = run_cli("chat", tmp_path / "empty", "--prompt", "hi")
    assert_clean_failure(empty, 2, "adapter_config.json", "(config.json)")
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(tmp_path / "moved-base")
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert_clean_failure(run_cli("chat", out, "--prompt", "hi"), 2, "moved-base", "--base")
    rescued = run_cli("chat", out, "--base", tiny_model_folder("llama"), "--prompt", "hi", "--max-new-tokens", "3")
    assert rescued.exit_code == 0, rescued.output
    not_adapter = run_cli("chat", tiny_model_folder("llama"), "--base", out, "--prompt", "hi")
    assert_clean_failure(not_adapter, 2, "--base is for adapter folders")


class Terminal:
    """`ftcli chat` in a pseudo-terminal, as a person runs it: it reads what is typed, Ctrl-C and Ctrl-D included."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child becomes the session
            # as in a person's shell: a test run in the background (nohup, `&`) ignores SIGINT, and a child would
            # inherit that, so Ctrl-C would never reach it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(sys.executable, [sys.executable, "-m", "ftcli", "chat", *args])
        self.seen = ""
        self.ended = False

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc_info) -> None:
        """A session a failed test left running is killed, so it cannot load the machine under later tests."""
        if not self.ended:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` appears; returns everything read up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"{text!r} did not appear; the terminal shows:\n{self.seen}")
            try:
                self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"the session ended before {text!r}; it showed:\n{self.seen}") from None
        cut = self.seen.index(text) + len(text)
        read, self.seen = self.seen[:cut], self.seen[cut:]
        return read

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def waiting_for_keys(self, timeout: float = 30) -> None:
        """Wait until the session sleeps waiting for what is typed (Linux tells; elsewhere this returns at once).
        CPython's readline loop looks for signals only when its select() is interrupted, so a Ctrl-C that lands in
        the instant between the prompt and that select() waits for the next key: a test typing at once hangs
        where no person's hands are that fast."""
        wchan = Path(f"/proc/{self.pid}/wchan")
        deadline = time.monotonic() + timeout
        while wchan.exists() and time.monotonic() < deadline:
            if any(call in wchan.read_text() for call in ("poll", "select")):
                return
            time.sleep(0.01)

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:  # drain, so the child never blocks on a full terminal
                try:
                    os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.ended = True
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        raise AssertionError("the session did not end")


@pytest.mark.slow
def test_a_terminal_session_streams_answers_and_survives_ctrl_c(smollm2_folder):
    with Terminal(str(smollm2_folder), "--temperature", "0", "--max-new-tokens", "400") as terminal:
        terminal.expect(">>> ")
        terminal.type(QUESTION + "\r")
        assert ANSWER in terminal.expect(">>> ")

        terminal.type("Write a long story about a dragon who learns to bake bread.\r")
        terminal.expect("\n")  # the echo of the typed line
        terminal.expect(" ")  # the answer has begun streaming
        terminal.type("\x03")  # Ctrl-C while it is being written
        assert "[stopped]" in terminal.expect(">>> ")

        terminal.type("/reset\r")
        assert "(conversation cleared)" in terminal.expect(">>> ")
        terminal.type(QUESTION + "\r")
        assert ANSWER in terminal.expect(">>> ")
        terminal.type("/exit\r")
        assert terminal.exit_code() == 0


@pytest.mark.slow
def test_ctrl_d_and_ctrl_c_at_the_prompt_end_the_session_cleanly(smollm2_folder):
    for key in ("\x04", "\x03"):
        with Terminal(str(smollm2_folder)) as terminal:
            terminal.expect(">>> ")
            terminal.waiting_for_keys()
            terminal.type(key)
            assert terminal.exit_code() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_adapter_trained_in_4_bits_answers_the_same_compiled_or_not_on_cuda(tmp_path, tiny_model_folder):
    """The path an NF4 QLoRA output folder takes on a GPU: NF4 base, unmerged adapter, the CUDA-graph step."""
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out", load_in_4bit=True)
    assert "nf4 + adapter" in open_model(out).description
    answers = [run_cli("chat", out, "--prompt", "Say the number 7.", "--temperature", "0", "--max-new-tokens", "16",
                       compiled) for compiled in ("--compile", "--no-compile")]
    assert all(answer.exit_code == 0 for answer in answers), [answer.output for answer in answers]
    assert answers[0].stdout == answers[1].stdout


def test_prompt_with_the_fixture_gguf_file_answers_as_its_converted_folder(smollm2_folder):
    from ftcli.fixture import fixture_gguf

    result = run_cli("chat", fixture_gguf(), "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "40")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"


def test_a_template_that_refuses_the_conversation_is_a_clear_error(tmp_path, tiny_model_folder):
    folder = tmp_path / "no-system"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder("llama"))
    tokenizer.chat_template = REFUSES_SYSTEM + tokenizer.chat_template
    AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run_cli("chat", folder, "--system", "Be brief.", "--prompt", "hi")
    assert_clean_failure(result, 2, "System role not supported", "--system")
    assert run_cli("chat", folder, "--prompt", "hi", "--max-new-tokens", "2").exit_code == 0


def test_a_folders_recipe_cannot_turn_on_remote_code(tmp_path, tiny_model_folder, monkeypatch):
    """recipe.yaml comes with the folder, from anyone; only --trust-remote-code lets transformers run a model's code."""
    import transformers

    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out", trust_remote_code=True)
    asked = []
    for auto_class in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        load = auto_class.from_pretrained

        def recorded(*args, load=load, **kwargs):
            asked.append(kwargs.get("trust_remote_code"))
            return load(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", recorded)
    chat, export = ["chat", out, "--prompt", "hi", "--max-new-tokens", "2"], ["export", out, "--merged", "--overwrite"]
    for command in (chat, export):
        asked.clear()
        assert run_cli(*command).exit_code == 0
        assert asked and True not in asked, (command[0], asked)
        asked.clear()
        assert run_cli(*command, "--trust-remote-code").exit_code == 0
        assert True in asked, (command[0], asked)


def test_a_model_that_needs_its_own_code_asks_for_the_flag(tmp_path, tiny_model_folder):
    folder = shutil.copytree(tiny_model_folder("llama"), tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "the model's code ran"
    (folder / "configuration_custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    result = run_cli("chat", folder, "--prompt", "hi")
    assert_clean_failure(result, 2, "Python code shipped with the model", "pass --trust-remote-code")
    assert not ran.exists()


def test_errors_about_the_base_name_base_not_a_recipe_field(tmp_path, tiny_model_folder):
    from transformers import GPT2Config

    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out")
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = run_cli("chat", out, "--base", tmp_path / "gpt2", "--prompt", "hi")
    output = assert_clean_failure(result, 2, f"--base '{tmp_path / 'gpt2'}' is a 'gpt2' model", "does not support")
    assert "model.name" not in output
    (tmp_path / "no-config").mkdir()
    result = run_cli("chat", out, "--base", tmp_path / "no-config", "--prompt", "hi")
    assert "model.name" not in assert_clean_failure(result, 2, "--base", "folder without config.json")


def test_a_damaged_output_folder_names_the_file(tmp_path, tiny_model_folder):
    out = make_output_folder(tiny_model_folder("llama"), tmp_path / "out")
    (out / "recipe.yaml").write_text("model: [\n")
    assert_clean_failure(run_cli("chat", out, "--prompt", "hi"), 2, f"{out / 'recipe.yaml'} is not a readable recipe")
    (out / "recipe.yaml").unlink()
    (out / "adapter_config.json").write_text("{not json")
    assert_clean_failure(run_cli("chat", out, "--prompt", "hi"), 2, f"{out / 'adapter_config.json'} is not valid JSON")
