"""An Ollama Modelfile beside each GGUF: FROM the file, the chat format as a Go template, its default system
message, and stop tokens.

Ollama does not run the Jinja chat template stored in the GGUF, so the format is written in Ollama's own Go
template syntax. Each built-in template (ftcli/data/templates.py) has its Go twin here. A tokenizer's template is
matched to a built-in by what it renders, not by marker strings (alpaca's or vicuna's have none): probe
conversations, with and without a system message, must render exactly as the built-in renders them. A
model's own template that differs from a built-in only in its default system message (Qwen 2.5's, SmolLM2's)
matches too; the default becomes the Modelfile's SYSTEM, which Ollama adds when a chat has no system message.
Templates that refuse a system message (Gemma's) are matched without one.

Go templates see Ollama's values: .Messages (the system message included) and $.System (its content). Where the
Jinja template writes the BOS token first, the Go template leaves it to llama.cpp, which adds it when the GGUF's
tokenizer.ggml.add_bos_token says so, and writes it itself otherwise.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jinja2 import TemplateError

from ftcli.data.templates import BUILTIN_TEMPLATES

EOS = "<<EOS>>"  # where a Go template writes the tokenizer's end-of-sequence token
BOS = "<<BOS>>"  # the same for the beginning-of-sequence token inside a conversation (Llama 2's later turns)

_FIRST_USER_TURN_SYSTEM = '{{ if and $.System (lt $i 2) }}{{ $.System }}\n\n{{ end }}'  # Mistral's and Gemma's


def _system_block_then_turns(system: str, turn: str, generation_prompt: str) -> str:
    """A Go template for a format that writes the system message as a block of its own before the turns."""
    return ('{{- if .System }}' + system + '{{ end }}{{ range .Messages }}{{ if ne .Role "system" }}' + turn +
            '{{ end }}{{ end }}' + generation_prompt)


_CHATML = _system_block_then_turns("<|im_start|>system\n{{ .System }}<|im_end|>\n",
                                   "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n", "<|im_start|>assistant\n")


@dataclass
class ChatFormat:
    go_template: str
    stops: list[str]  # what ends an answer besides the end-of-sequence token
    starts_with_bos: bool = False  # the Jinja template writes the BOS token first


CHAT_FORMATS = {
    "alpaca": ChatFormat(_system_block_then_turns(
        "{{ .System }}\n\n",
        '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n{{ else }}### Response:\n{{ .Content }}' + EOS +
        '\n\n{{ end }}', "### Response:\n"),
        ["### Instruction:"]),
    "chatml": ChatFormat(_CHATML, ["<|im_end|>"]),
    "llama-2": ChatFormat(
        '{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ if gt $i 1 }}' + BOS + '{{ end }}[INST] '
        '{{ if and $.System (lt $i 2) }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }} {{ .Content }} ' + EOS + '{{ end }}{{ end }}',
        ["[INST]"], starts_with_bos=True),
    "llama-3": ChatFormat(_system_block_then_turns(
        "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>",
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ["<|eot_id|>"], starts_with_bos=True),
    "mistral": ChatFormat(
        '{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}[INST] ' + _FIRST_USER_TURN_SYSTEM +
        '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}' + EOS + '{{ end }}{{ end }}',
        ["[INST]"], starts_with_bos=True),
    "gemma": ChatFormat(
        '{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n' + _FIRST_USER_TURN_SYSTEM +
        '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
        '<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n',
        ["<end_of_turn>"], starts_with_bos=True),
    "qwen-2.5": ChatFormat(_CHATML, ["<|im_end|>"]),  # ChatML whose default system message is Qwen's
    "phi-3": ChatFormat(_system_block_then_turns("<|system|>\n{{ .System }}<|end|>\n",
                                                 "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n", "<|assistant|>\n"),
                        ["<|end|>"]),
    "vicuna": ChatFormat(_system_block_then_turns(
        "{{ .System }} ",
        '{{ if eq .Role "user" }}USER: {{ .Content }} {{ else }}ASSISTANT: {{ .Content }}' + EOS + '{{ end }}',
        "ASSISTANT:"),
        ["USER:"], starts_with_bos=True),
    "zephyr": ChatFormat(_system_block_then_turns("<|system|>\n{{ .System }}" + EOS + "\n",
                                                  "<|{{ .Role }}|>\n{{ .Content }}" + EOS + "\n", "<|assistant|>\n"),
                         ["<|user|>"]),
}

# probe conversations: every role, two user turns (templates treat the first one apart), and a generation prompt
_SYSTEM = "ftcli-probe-system"
PROBE = [{"role": "user", "content": "ftcli-probe-question"}, {"role": "assistant", "content": "ftcli-probe-answer"},
         {"role": "user", "content": "ftcli-probe-follow-up"}]
PROBE_WITH_SYSTEM = [{"role": "system", "content": _SYSTEM}] + PROBE


@dataclass
class MatchedFormat:
    name: str  # the built-in template the tokenizer's own renders like
    default_system: Optional[str]  # what it renders as the system message when a chat has none


def match_chat_format(tokenizer) -> Optional[MatchedFormat]:
    """The built-in template that renders the probe conversations as the tokenizer's own template does, with the
    default system message that makes them agree; None when no built-in does."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    own_probe = render(tokenizer, own, PROBE) if own is not None else None
    if own_probe is None:
        return None
    own_with_system = render(tokenizer, own, PROBE_WITH_SYSTEM)
    for name, builtin in BUILTIN_TEMPLATES.items():
        if own_with_system is not None and render(tokenizer, builtin, PROBE_WITH_SYSTEM) != own_with_system:
            continue
        default = _default_system(tokenizer, builtin, own_probe)
        if default is not None or render(tokenizer, builtin, PROBE) == own_probe:
            return MatchedFormat(name, default)
    return None


def _default_system(tokenizer, builtin: str, own_probe: str) -> Optional[str]:
    """The system message that makes `builtin` render the system-less probe as the tokenizer's own template did
    (`own_probe`), if there is one: found where `builtin` puts a system message, then checked by rendering it."""
    before, found, after = (render(tokenizer, builtin, PROBE_WITH_SYSTEM) or "").partition(_SYSTEM)
    room = len(own_probe) - len(before) - len(after)
    if not found or room <= 0 or not own_probe.startswith(before) or not own_probe.endswith(after):
        return None
    default = own_probe[len(before):len(before) + room]
    with_default = [{"role": "system", "content": default}] + PROBE
    return default if render(tokenizer, builtin, with_default) == own_probe else None


def render(tokenizer, template: Optional[str], messages: list[dict], generation_prompt: bool = True,
           **special_tokens: str) -> Optional[str]:
    """`messages` as the Jinja `template` (None: the tokenizer's own) lays them out, for the model to answer with
    `generation_prompt`; None when the template refuses them. `special_tokens` (bos_token, eos_token) stand in for
    the tokenizer's own, as a GGUF file's are for llama.cpp."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt, **special_tokens)
    except TemplateError:
        return None


def modelfile_text(gguf_name: str, tokenizer, adds_bos: bool) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder); without a known chat format, FROM and the
    end-of-sequence stop only. `adds_bos`: llama.cpp puts the BOS token first itself."""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    matched = match_chat_format(tokenizer)
    if matched is not None:
        chat_format = CHAT_FORMATS[matched.name]
        bos = tokenizer.bos_token if chat_format.starts_with_bos and not adds_bos and tokenizer.bos_token else ""
        lines.append(f'TEMPLATE """{bos}{_with_tokens(chat_format.go_template, tokenizer)}"""')
        if matched.default_system is not None:
            lines.append(f'SYSTEM """{matched.default_system}"""')
        stops = list(chat_format.stops)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def _with_tokens(go_template: str, tokenizer) -> str:
    return go_template.replace(EOS, tokenizer.eos_token or "").replace(BOS, tokenizer.bos_token or "")


def write_modelfile(path: Path, gguf_name: str, tokenizer, adds_bos: bool) -> None:
    path.write_text(modelfile_text(gguf_name, tokenizer, adds_bos))


def modelfile_fields(text: str) -> tuple[Optional[str], Optional[str], list[str]]:
    """TEMPLATE and SYSTEM of a Modelfile (None where it has none) and its stops, as modelfile_text writes them."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)
    return template.group(1) if template else None, system.group(1) if system else None, stops
