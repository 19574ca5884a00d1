"""Chat templates, and turning a conversation into token ids with the loss mask.

The tokenizer's own template is the default because it is what the model was taught to read. Assistant
spans are found by rendering each conversation prefix with the same template, so masking works for any
template whose rendering of a prefix is a prefix of the whole: no per-template marker strings.
"""

from dataclasses import dataclass

from ftcli.data.formats import Conversation
from ftcli.errors import RecipeError

IGNORE_INDEX = -100

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


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
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    if _tokenizer_adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    labels = [token if any(start <= begin < end for start, end in trained_spans) and begin < finish else IGNORE_INDEX
              for token, (begin, finish) in zip(ids, offsets)]
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def tokenize_text(tokenizer, text: str, max_length: int) -> list[TokenizedExample]:
    """Raw text ends with the end-of-sequence token and is cut into max_length chunks, every token trained."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = list(ids) + [tokenizer.eos_token_id]
    return [TokenizedExample(ids[i:i + max_length], ids[i:i + max_length], False)
            for i in range(0, len(ids), max_length)]


def _render_with_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn, its end-of-turn marker included."""
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    eos = tokenizer.eos_token or ""
    text, cursor, spans = "", 0, []
    for index, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(conversation[:index], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(conversation[:index + 1], tokenize=False))
        if not (cursor <= start <= end <= len(full)) or turn["content"] not in full[start:end]:
            raise RecipeError("The chat template renders a conversation differently from its own prefixes, so "
                              "ftcli cannot tell which tokens are the assistant's. Set data.template to a built-in "
                              f"({', '.join(BUILTIN_TEMPLATES)}) or data.train_on_responses_only to false.")
        text += full[cursor:end]
        span_start = len(text) - (end - start)
        if eos and eos not in full[start:end]:
            text += eos
        spans.append((span_start, len(text)))
        cursor = end
    return text + full[cursor:], spans


def _tokenizer_adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def generation_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation so far, rendered with the tokenizer's template up to the point where the
    assistant's answer begins; tokenized as in training (no special tokens added twice, the BOS as trained)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if _tokenizer_adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
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
