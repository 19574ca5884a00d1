"""An Ollama Modelfile beside each GGUF: FROM the file, the chat format as a Go template, and stop tokens.

Ollama does not run the Jinja chat template stored in the GGUF, so the template is written in its own syntax,
chosen by the family of the tokenizer's chat template (recognised by its turn markers).
"""

from pathlib import Path
from typing import Optional

# turn marker in the Jinja template -> (Ollama template, end-of-turn tokens)
CHAT_FAMILIES = {
    "<|im_start|>": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_end|>"]),
    "<|start_header_id|>": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>"]),
    "<start_of_turn>": (
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ["<end_of_turn>"]),
    "<|user|>": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ["<|end|>"]),
    "[INST]": (
        "{{- range .Messages }}{{ if eq .Role \"assistant\" }}{{ .Content }}</s>{{ else }}[INST] {{ .Content }} [/INST]"
        "{{ end }}{{ end }}",
        ["[INST]"]),
}


def modelfile_text(gguf_name: str, chat_template: Optional[str], eos_token: Optional[str]) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder); without a known chat format, FROM and stops only."""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    for marker, (template, end_of_turn) in CHAT_FAMILIES.items():
        if chat_template and marker in chat_template:
            lines.append(f'TEMPLATE """{template}"""')
            stops = list(end_of_turn)
            break
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, chat_template: Optional[str], eos_token: Optional[str]) -> None:
    path.write_text(modelfile_text(gguf_name, chat_template, eos_token))
