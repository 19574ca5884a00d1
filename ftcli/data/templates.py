"""Chat templates, and turning a conversation into token ids with the loss mask.

The tokenizer's own template is the default because it is what the model was taught to read. Assistant
spans are found by rendering each conversation prefix with the same template, so masking works for any
template whose rendering of a prefix is a prefix of the whole: no per-template marker strings.
"""

from dataclasses import dataclass
from typing import Any, Optional

from ftcli.data.formats import Conversation, PreferencePair
from ftcli.errors import DataError, RecipeError

IGNORE_INDEX = -100

# Each family's published chat format as a Jinja template. The assistant turn's own end marker is part of its
# rendering, so it is trained; the tokenizer's end-of-sequence token is appended to it when it is not that marker.
# A system turn goes where the family puts it: its own block, or before the first user message (Mistral, Gemma).
_FIRST_SYSTEM = ("{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}{% endif %}")
BUILTIN_TEMPLATES = {
    "alpaca": (
        _FIRST_SYSTEM
        + "{{ (system if system is not none else 'Below is an instruction that describes a task. Write a response "
        "that appropriately completes the request.') + '\n\n' }}"
        "{% for message in turns %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] "
        "+ '\n\n' }}{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-2": (
        _FIRST_SYSTEM
        + "{% for message in turns %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
        "{% if loop.first and system is not none %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        _FIRST_SYSTEM
        + "{{ bos_token }}{% for message in turns %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% if loop.first and system is not none %}{{ system + '\n\n' }}{% endif %}{{ message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        _FIRST_SYSTEM
        + "{{ bos_token }}{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' }}{% if loop.first and system is not none %}{{ system + '\n\n' }}{% endif %}"
        "{{ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "qwen-2.5": (
        _FIRST_SYSTEM
        + "{{ '<|im_start|>system\n' + (system if system is not none else 'You are Qwen, created by Alibaba Cloud. You "
        "are a helpful assistant.') + '<|im_end|>\n' }}{% for message in turns %}{{ '<|im_start|>' + message['role'] + "
        "'\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "phi-3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "vicuna": (
        _FIRST_SYSTEM
        + "{{ bos_token + (system if system is not none else 'A chat between a curious user and an artificial "
        "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s questions.') "
        "+ ' ' }}{% for message in turns %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    position_ids: Optional[list[int]] = None  # set on packed rows, where positions restart at each example
    origin: str = ""  # the row it came from ("data.jsonl row 3"), for the preview

    def row_length(self) -> int:
        """Tokens the model computes for it."""
        return len(self.input_ids)


@dataclass
class PreferenceExample:
    """One preference pair, tokenized: the prompt's tokens once, then each answer's tokens that follow it."""

    prompt_ids: list[int]  # the rendered prompt (chat template up to where the answer starts), >= 1 token
    chosen_ids: list[int]  # the chosen answer's tokens that follow prompt_ids in the rendering of prompt+chosen
    chosen_labels: list[int]  # same length as chosen_ids: the token id where the loss covers it, else IGNORE_INDEX
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: bool = False
    origin: str = ""  # "pairs.jsonl row 3"

    def row_length(self) -> int:
        """Tokens the model computes for it: one row of the prompt and both answers (ftcli/answer_logprobs.py)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PromptExample:
    """One GRPO prompt: rendered by the chat template with its generation prompt, and the row's other columns."""

    prompt_ids: list[int]  # tokens of the rendered prompt, >= 1 and at most grpo.max_prompt_length
    prompt_text: str  # the rendered prompt, what reward functions get as `prompts`
    columns: dict[str, Any]  # the row's other columns by name, e.g. {"answer": "42"}
    origin: str = ""  # "problems.jsonl row 3"

    def row_length(self) -> int:
        return len(self.prompt_ids)


def use_template(tokenizer, name: str) -> None:
    """Install the chosen template on the tokenizer, so training, chat and export all render alike."""
    if name == "auto":
        if not tokenizer.chat_template:
            raise RecipeError("data.template is auto, but this model's tokenizer has no chat template. Set "
                              f"data.template to one of: {', '.join(BUILTIN_TEMPLATES)}.")
        return
    if name not in BUILTIN_TEMPLATES:
        raise RecipeError(f"data.template {name!r} is not a known template; use auto (the tokenizer's own) "
                          f"or one of: {', '.join(BUILTIN_TEMPLATES)}.")
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]


def tokenize_conversation(tokenizer, conversation: Conversation, responses_only: bool,
                          max_length: int) -> TokenizedExample:
    """Token ids of the rendered conversation; labels keep only assistant turns (with their end token) when asked."""
    text, trained_spans = _render_with_spans(tokenizer, conversation)
    if not responses_only:
        trained_spans = [(0, len(text))]
    ids, labels = _ids_and_labels(tokenizer, text, trained_spans)
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int, origin: str) -> PreferenceExample:
    """The pair rendered as SFT renders it, once with each answer; the tokens both renderings share before either
    answer starts are the prompt, and each answer is cut to fit into max_length after the prompt."""
    chosen_ids, chosen_labels = _tokenize_answer(tokenizer, pair.prompt, pair.chosen)
    rejected_ids, rejected_labels = _tokenize_answer(tokenizer, pair.prompt, pair.rejected)
    shared = next((i for i, (a, b) in enumerate(zip(chosen_ids, rejected_ids)) if a != b),
                  min(len(chosen_ids), len(rejected_ids)))
    prompt_length = min(shared, _first_trained(chosen_labels), _first_trained(rejected_labels))
    if prompt_length == 0:
        raise RecipeError("The chat template renders nothing before the answer, so a preference pair has no prompt "
                          f"tokens to share. Set data.template to a built-in one ({', '.join(BUILTIN_TEMPLATES)}).")
    if prompt_length >= max_length:
        raise DataError(f"{origin}: the prompt is {prompt_length} tokens, which leaves no room for an answer within "
                        f"model.max_seq_length {max_length}. Shorten the prompt, or raise model.max_seq_length.")
    answer = slice(prompt_length, max_length)
    return PreferenceExample(chosen_ids[:prompt_length], chosen_ids[answer], chosen_labels[answer],
                             rejected_ids[answer], rejected_labels[answer],
                             max(len(chosen_ids), len(rejected_ids)) > max_length, origin)


def tokenize_prompt(tokenizer, conversation: Conversation, columns: dict[str, Any], max_length: int,
                    origin: str) -> PromptExample:
    """The prompt as `ftcli chat` would send it to the model; one longer than max_length is a bad row, since a cut
    prompt would ask something else."""
    text = render_generation_prompt(tokenizer, conversation)
    ids = prompt_text_ids(tokenizer, text)
    if len(ids) > max_length:
        raise DataError(f"{origin}: the prompt is {len(ids)} tokens, more than grpo.max_prompt_length {max_length}. "
                        "Shorten the prompt, or raise grpo.max_prompt_length (model.max_seq_length must hold it "
                        "and grpo.max_completion_length together).")
    return PromptExample(ids, text, columns, origin)


def tokenize_text(tokenizer, text: str, max_length: int) -> list[TokenizedExample]:
    """Raw text ends with the end-of-sequence token and is cut into max_length chunks, every token trained."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = list(ids) + [tokenizer.eos_token_id]
    return [TokenizedExample(ids[i:i + max_length], ids[i:i + max_length], False)
            for i in range(0, len(ids), max_length)]


def _tokenize_answer(tokenizer, prompt: Conversation, answer: Conversation) -> tuple[list[int], list[int]]:
    """prompt + answer tokenized, with labels on the answer's turns only, each through its end marker (and EOS)
    but without the whitespace the template writes after it, which the model never generates."""
    text, spans = _render_with_spans(tokenizer, prompt + answer)
    answer_spans = [(start, start + len(text[start:end].rstrip())) for start, end in spans[-len(answer):]]
    return _ids_and_labels(tokenizer, text, answer_spans)


def _ids_and_labels(tokenizer, text: str, trained_spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The text's token ids (BOS first when the tokenizer adds one), and labels: the id of each token that
    starts inside a trained character span, IGNORE_INDEX for the others."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    if training_adds_bos(tokenizer, text):
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    labels = [token if any(start <= begin < end for start, end in trained_spans) and begin < finish else IGNORE_INDEX
              for token, (begin, finish) in zip(ids, offsets)]
    return ids, labels


def _first_trained(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _render_with_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn, its end-of-turn marker included.

    A turn's span runs from the end of the rendering of the turns before it (with the generation prompt) to the
    end of the rendering through it; both renderings must be prefixes of the whole conversation's."""
    def render(turns: Conversation, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(conversation)
    eos = tokenizer.eos_token or ""
    text, cursor, spans = "", 0, []
    for index, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        before, through = render(conversation[:index], True), render(conversation[:index + 1])
        if eos and through.endswith(eos) and not full.startswith(through):
            through = through[:-len(eos)]  # templates that close the whole conversation with EOS, such as Phi-3's
        if not (full.startswith(through) and through.startswith(before) and cursor <= len(before)
                and turn["content"] in through[len(before):]):
            raise RecipeError("The chat template renders a conversation differently from its own prefixes, so "
                              "ftcli cannot tell which tokens are the assistant's. Set data.template to a built-in "
                              f"({', '.join(BUILTIN_TEMPLATES)}) or data.train_on_responses_only to false.")
        start, end = len(before), len(through)
        text += full[cursor:end]
        span_start = len(text) - (end - start)
        if eos and eos not in full[start:end]:
            text += eos
        spans.append((span_start, len(text)))
        cursor = end
    return text + full[cursor:], spans


def tokenizer_adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def training_adds_bos(tokenizer, text: str) -> bool:
    """Training puts the BOS token before a rendered text where the tokenizer starts plain text with it and the
    template did not write it already, so that it is never doubled."""
    return tokenizer_adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token)


def generation_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation so far, rendered with the tokenizer's template up to the point where the
    assistant's answer begins."""
    return prompt_text_ids(tokenizer, render_generation_prompt(tokenizer, messages))


def render_generation_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation so far in the chat template, up to where the assistant's answer begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_text_ids(tokenizer, text: str) -> list[int]:
    """A rendered prompt's token ids as in training: no special tokens added twice, the BOS as trained."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if training_adds_bos(tokenizer, text):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """The token ids that end an assistant's answer: the end-of-sequence ids of the tokenizer and of the
    model's generation config, and the special token the template writes right after an answer
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...), found by rendering a one-turn conversation."""
    stops = set()
    for ids in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        stops.update(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    marker = "ftcli-answer-end"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    after_answer = rendered[rendered.rfind(marker) + len(marker):]
    special = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    following = [i for i in tokenizer(after_answer, add_special_tokens=False)["input_ids"] if i in special]
    return stops | set(following[:1])
