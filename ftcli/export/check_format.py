"""The chat format a GGUF file and its Modelfile give llama.cpp and Ollama, against the one training used.

A model fed a prompt laid out differently from training, or never told where its answer ends, talks gibberish or
never stops, however good its weights. So, for each sample conversation:
- the file's `tokenizer.chat_template`, rendered by Jinja as transformers renders it (with the file's own BOS and
  EOS tokens), gives the text the training tokenizer's template gives: whole, and as a prompt to answer;
- the Modelfile's TEMPLATE and SYSTEM, filled as Ollama fills them, after the BOS llama.cpp adds when the file's
  `tokenizer.ggml.add_bos_token` says so, give the prompt text training tokenized;
- the file's end-of-sequence id is the one training appended, an end-of-turn (eot/eom) id it writes is one the
  trained model ends an answer with, and the Modelfile stops at each of those tokens.
Each difference is a problem, named with what differs: the first differing line of the two texts, or both ids
with their tokens.
"""

from typing import Optional

from ftcli.data.formats import Conversation
from ftcli.data.templates import training_adds_bos
from ftcli.export.check_model import answer_end_ids
from ftcli.export.go_template import UnsupportedTemplate, ollama_prompt
from ftcli.export.gguf_reader import GgufFile
from ftcli.export.modelfile import modelfile_fields, render

SYSTEM_PROBE = {"role": "system", "content": "Answer briefly."}  # a system turn, where the sample has none


def format_problems(file: GgufFile, modelfile: str, tokenizer, conversations: list[Conversation],
                    prompts: list[Conversation]) -> tuple[list[str], list[str]]:
    """(problems, warnings): what the file or its Modelfile get wrong, and what the check could not look at."""
    template, system, stops = modelfile_fields(modelfile)
    if not tokenizer.chat_template:  # a raw-text run: no chat format to check, only where text ends
        return _stop_problems(file, tokenizer, stops, needs_end_of_turn=False), []
    if not any(message["role"] == "system" for prompt in prompts for message in prompt):
        prompts = prompts + [[SYSTEM_PROBE] + prompts[0]]
    problems, notes = _template_problems(file, tokenizer, conversations, prompts), []
    if template is None:
        notes.append("the Modelfile has no TEMPLATE (the chat template is like no built-in one): Ollama will not lay "
                     "out chats as training did; write its TEMPLATE by hand")
    else:
        problems += _modelfile_problems(file, template, system, tokenizer, prompts)
    problems += _stop_problems(file, tokenizer, stops, needs_end_of_turn=template is not None)
    return problems, notes


def _template_problems(file: GgufFile, tokenizer, conversations: list[Conversation],
                       prompts: list[Conversation]) -> list[str]:
    stored = file.fields.get("tokenizer.chat_template")
    if stored is None:
        return ["the file has no tokenizer.chat_template, so llama.cpp falls back to a template of its own choosing"]
    special = {"bos_token": _token(file, "tokenizer.ggml.bos_token_id") or "",
               "eos_token": _token(file, "tokenizer.ggml.eos_token_id") or ""}
    cases = [(conversation, False) for conversation in conversations] + [(prompt, True) for prompt in prompts]
    for messages, generation_prompt in cases:
        trained = render(tokenizer, None, messages, generation_prompt)
        if trained is None:
            continue  # a chat the training template refuses (a system turn for Gemma's) is not one it trained on
        in_file = render(tokenizer, stored, messages, generation_prompt, **special)
        if in_file != trained:
            refused = "(an error: the template refuses this chat)"
            return ["the file's tokenizer.chat_template renders a sample chat differently from the training template: "
                    + first_difference(trained, refused if in_file is None else in_file)]
    return []


def _modelfile_problems(file: GgufFile, template: str, system: Optional[str], tokenizer, prompts) -> list[str]:
    adds_bos = bool(file.fields.get("tokenizer.ggml.add_bos_token"))
    bos = _token(file, "tokenizer.ggml.bos_token_id") or ""
    for messages in prompts:
        trained = render(tokenizer, None, messages)
        if trained is None:
            continue
        if training_adds_bos(tokenizer, trained):
            trained = tokenizer.bos_token + trained
        try:
            in_ollama = (bos if adds_bos else "") + ollama_prompt(template, system, messages)
        except UnsupportedTemplate as error:
            return [f"the Modelfile's TEMPLATE cannot be filled as Ollama fills it ({error}); the check reads the Go "
                    "template subset ftcli writes (ftcli/export/go_template.py), so it cannot vouch for this one"]
        if in_ollama != trained:
            return ["the Modelfile's TEMPLATE, filled as Ollama fills it, gives a sample prompt other than the text "
                    "training tokenized: " + first_difference(trained, in_ollama)]
    return []


def _stop_problems(file: GgufFile, tokenizer, stops: list[str], needs_end_of_turn: bool) -> list[str]:
    problems = []
    eos = file.fields.get("tokenizer.ggml.eos_token_id")
    if eos != tokenizer.eos_token_id:
        problems.append(f"the file's end-of-sequence id (tokenizer.ggml.eos_token_id) is {_id_shown(file, eos)}, but "
                        f"training appended {tokenizer.eos_token_id} ({tokenizer.eos_token!r}) to every answer, so "
                        "generation would not stop where the trained model stops")
    ends = answer_end_ids(tokenizer)
    for kind in ("eot", "eom"):
        written = file.fields.get(f"tokenizer.ggml.{kind}_token_id")
        if written is not None and written not in ends:
            problems.append(f"the file's tokenizer.ggml.{kind}_token_id is {_id_shown(file, written)}, which the "
                            f"trained model never ends an answer with (it ends with {_ids_shown(tokenizer, ends)})")
    wanted = {tokenizer.convert_ids_to_tokens(index) for index in (ends if needs_end_of_turn else
                                                                   {tokenizer.eos_token_id} - {None})}
    missing = sorted(wanted - set(stops))
    if missing:
        problems.append(f"the Modelfile does not stop at {', '.join(map(repr, missing))}, which ends the trained "
                        f"model's answers (its stops: {', '.join(map(repr, stops)) or 'none'})")
    return problems


def first_difference(expected: str, got: str) -> str:
    """Where two renderings part: the character and line, and that line of each."""
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    line = expected.count("\n", 0, index)
    return (f"first difference at character {index} (line {line + 1}): training gives "
            f"{_line_at(expected, index)!r}, the file gives {_line_at(got, index)!r}")


def _line_at(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start:end if end >= 0 else len(text)] or "(end of text)"


def _token(file: GgufFile, key: str) -> Optional[str]:
    index = file.fields.get(key)
    return None if index is None else file.token(index)


def _id_shown(file: GgufFile, index: Optional[int]) -> str:
    if index is None:
        return "missing"
    token = file.token(index)
    return f"{index} (not in the file's vocabulary)" if token is None else f"{index} ({token!r})"


def _ids_shown(tokenizer, ids: set[int]) -> str:
    return ", ".join(f"{index} ({tokenizer.convert_ids_to_tokens(index)!r})" for index in sorted(ids))
