"""Built-in chat templates: each renders its family's format, and exactly the assistant turns are trained.

The tiny byte-level tokenizer encodes any marker as plain bytes, so every template can be checked with it; its
end-of-sequence token is <|im_end|>, which is appended to a response whose own end marker is something else.
"""

import pytest

from ftcli.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, tokenize_conversation, use_template
from ftcli.errors import RecipeError
from tiny_models import build_tiny_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Your name?"},
                {"role": "assistant", "content": "I am Nimbus."}]
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n")
VICUNA_PREAMBLE = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions. ")

# Each template's rendering of the first exchange, written out by hand from the family's published format
FIRST_EXCHANGE = {
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello! How can I help?<|im_end|>\n\n",
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
               "Hello! How can I help?<|im_end|>\n"),
    "llama-2": "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? <|im_end|>",
    "llama-3": ("<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                "Hello! How can I help?<|eot_id|>"),
    "mistral": "<|im_start|>[INST] Be brief.\n\nHi there [/INST]Hello! How can I help?<|im_end|>",
    "gemma": ("<|im_start|><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
              "Hello! How can I help?<end_of_turn>\n"),
    "qwen-2.5": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
                 "Hello! How can I help?<|im_end|>\n"),
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n",
    "vicuna": "<|im_start|>Be brief. USER: Hi there ASSISTANT: Hello! How can I help?<|im_end|>",
    "zephyr": ("<|system|>\nBe brief.<|im_end|>\n<|user|>\nHi there<|im_end|>\n<|assistant|>\n"
               "Hello! How can I help?<|im_end|>\n"),
}
# What is trained in the two-exchange conversation: each answer, its end marker, and EOS when that is not the marker
TRAINED = {
    "alpaca": ["Hello! How can I help?<|im_end|>\n\n", "I am Nimbus.<|im_end|>\n\n"],
    "chatml": ["Hello! How can I help?<|im_end|>\n", "I am Nimbus.<|im_end|>\n"],
    "llama-2": [" Hello! How can I help? <|im_end|>", " I am Nimbus. <|im_end|>"],
    "llama-3": ["Hello! How can I help?<|eot_id|><|im_end|>", "I am Nimbus.<|eot_id|><|im_end|>"],
    "mistral": ["Hello! How can I help?<|im_end|>", "I am Nimbus.<|im_end|>"],
    "gemma": ["Hello! How can I help?<end_of_turn>\n<|im_end|>", "I am Nimbus.<end_of_turn>\n<|im_end|>"],
    "qwen-2.5": ["Hello! How can I help?<|im_end|>\n", "I am Nimbus.<|im_end|>\n"],
    "phi-3": ["Hello! How can I help?<|end|>\n<|im_end|>", "I am Nimbus.<|end|>\n<|im_end|>"],
    "vicuna": [" Hello! How can I help?<|im_end|>", " I am Nimbus.<|im_end|>"],
    "zephyr": ["Hello! How can I help?<|im_end|>\n", "I am Nimbus.<|im_end|>\n"],
}
# Assistant end markers that are not the tokenizer's EOS, which is then added after them
END_MARKER = {"llama-3": "<|eot_id|>", "gemma": "<end_of_turn>\n", "phi-3": "<|end|>\n"}
# Without a system turn, some families supply their own default one
DEFAULT_SYSTEM = {"alpaca": ALPACA_PREAMBLE, "qwen-2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful "
                  "assistant.", "vicuna": VICUNA_PREAMBLE}


def tokenizer_with(template: str):
    tokenizer = build_tiny_tokenizer()
    use_template(tokenizer, template)
    return tokenizer


def trained_runs(tokenizer, example) -> list[str]:
    """The trained tokens as text, one string per unbroken run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_every_named_template_is_tested():
    assert sorted(BUILTIN_TEMPLATES) == sorted(FIRST_EXCHANGE) == sorted(TRAINED)


@pytest.mark.parametrize("template", sorted(BUILTIN_TEMPLATES))
def test_template_renders_the_family_format(template):
    tokenizer = tokenizer_with(template)
    assert tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False) == FIRST_EXCHANGE[template]


@pytest.mark.parametrize("template", sorted(BUILTIN_TEMPLATES))
def test_exactly_the_assistant_turns_and_their_end_are_trained(template):
    tokenizer = tokenizer_with(template)
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=True, max_length=1024)
    assert trained_runs(tokenizer, example) == TRAINED[template]
    assert example.labels.count(tokenizer.eos_token_id) == 2  # each answer ends with the EOS token, trained
    # the tokens are the template's rendering, with EOS added after each answer where the template has none
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    for answer in ("Hello! How can I help?", "I am Nimbus.") if template in END_MARKER else ():
        expected = expected.replace(answer + END_MARKER[template], answer + END_MARKER[template] + "<|im_end|>")
    assert tokenizer.decode(example.input_ids) == expected


@pytest.mark.parametrize("template", sorted(DEFAULT_SYSTEM))
def test_default_system_prompt_without_a_system_turn(template):
    tokenizer = tokenizer_with(template)
    assert DEFAULT_SYSTEM[template] in tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)


def test_without_responses_only_every_token_is_trained():
    tokenizer = tokenizer_with("llama-3")
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=False, max_length=1024)
    assert example.labels == example.input_ids and example.input_ids[-1] == tokenizer.eos_token_id


def test_auto_keeps_the_tokenizers_own_template():
    tokenizer = build_tiny_tokenizer()
    own = tokenizer.chat_template
    use_template(tokenizer, "auto")
    assert tokenizer.chat_template == own


def test_template_that_ends_the_conversation_with_eos_masks_every_turn():
    """Phi-3's published template puts EOS after the last turn only; earlier turns' renderings end without it."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = BUILTIN_TEMPLATES["phi-3"].replace(
        "{% endif %}", "{% else %}{{ eos_token }}{% endif %}")
    example = tokenize_conversation(tokenizer, CONVERSATION, responses_only=True, max_length=1024)
    assert trained_runs(tokenizer, example) == ["Hello! How can I help?<|end|>\n<|im_end|>",
                                                "I am Nimbus.<|end|>\n<|im_end|>"]


def test_template_whose_prefixes_differ_is_refused():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = ("{% for message in messages %}{{ message['content'] + '|' }}{% endfor %}"
                               "{{ messages | length }}")
    with pytest.raises(RecipeError, match="differently from its own prefixes"):
        tokenize_conversation(tokenizer, CONVERSATION, responses_only=True, max_length=1024)
