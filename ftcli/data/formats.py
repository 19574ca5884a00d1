"""Row layouts people bring, each turned into one conversation: a list of {"role", "content"} turns.

Raw text (format `text`) is the exception: it has no turns, and is returned as a string. A preference row
(format `preference`) becomes three conversations: the prompt, the chosen answer and the rejected answer. A
prompt row (format `prompts`, for GRPO) becomes the conversation to answer and the row's other columns, which the
reward functions read.
`data.columns` says where a format's fields are in the user's data, and `data.prompt` builds an alpaca
user turn from several columns.
"""

import random
import re
from dataclasses import dataclass
from typing import Optional, Union

from ftcli.errors import DataError, RecipeError

Conversation = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
FIELDS = {"alpaca": ["instruction", "input", "output", "system"], "sharegpt": ["conversations"],
          "messages": ["messages"], "text": ["text"], "preference": ["prompt", "chosen", "rejected"],
          "prompts": ["prompt"]}
REQUIRED_FIELDS = {"alpaca": ["instruction", "output"], "sharegpt": ["conversations"],
                   "messages": ["messages"], "text": ["text"], "preference": ["chosen", "rejected"],
                   "prompts": ["prompt"]}
REWARD_ARGUMENTS = ("completions", "prompts")  # what every reward function is called with besides the columns
ROLES = ("system", "user", "assistant")
# Anthropic HH's raw layout: "\n\nHuman: ...\n\nAssistant: ..." in one string
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
OPTIONAL_PART = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass
class PreferencePair:
    """A preference row as conversations: the prompt (ending with the user turn answered) and each answer's turns."""
    prompt: Conversation
    chosen: Conversation
    rejected: Conversation


def check_columns(data_format: str, columns: dict[str, str], prompt: Optional[str]) -> None:
    """Recipe-level checks of data.columns and data.prompt, before any row is read."""
    unknown = [name for name in columns if name not in FIELDS[data_format]]
    if unknown:
        raise RecipeError(f"data.columns maps {unknown[0]!r}, which is not a field of format {data_format!r}; its "
                          f"fields are {', '.join(FIELDS[data_format])} (write field: your column).")
    if prompt is not None and data_format != "alpaca":
        raise RecipeError(f"data.prompt builds the user turn of an instruction/response row, so it needs data.format "
                          f"alpaca (the response comes from the output column), not {data_format!r}.")
    if prompt is not None and not PLACEHOLDER.search(prompt):
        raise RecipeError(f"data.prompt {prompt!r} names no column; write columns as {{name}}, e.g. "
                          "\"Describe {name}.[[ Its color is {color}.]]\".")


def to_conversation(row: dict, origin: str, data_format: str, columns: Optional[dict[str, str]] = None,
                    prompt: Optional[str] = None) -> Union[Conversation, str]:
    """One row in the given format as a conversation (or a string for `text`); errors name the row's origin."""
    columns = columns or {}

    def value(name: str):
        return row.get(columns.get(name, name))

    required = [name for name in REQUIRED_FIELDS[data_format] if not (prompt and name == "instruction")]
    _require(row, origin, data_format, columns, [name for name in required if _empty(value(name))])
    if data_format == "text":
        return str(value("text"))
    if data_format == "alpaca":
        if prompt:
            user = fill_prompt(prompt, row, origin)
        else:
            user = str(value("instruction")) + ("" if _empty(value("input")) else "\n\n" + str(value("input")))
        system = [] if _empty(value("system")) else [{"role": "system", "content": str(value("system"))}]
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": str(value("output"))}]
    if data_format == "sharegpt":
        turns = _turns(value("conversations"), "from", "value", origin)
        return [{"role": _sharegpt_role(turn["from"], origin), "content": turn["value"]} for turn in turns]
    return _messages(_turns(value("messages"), "role", "content", origin), origin)


def to_pair(row: dict, origin: str, columns: Optional[dict[str, str]] = None) -> PreferencePair:
    """One preference row as a prompt and two answers; errors name the row's origin.

    Without a prompt, chosen and rejected are whole conversations that share all but their last assistant turn
    (Anthropic HH's layout, as message lists or as "\\n\\nHuman: ...\\n\\nAssistant: ..." text), and the shared
    part is the prompt."""
    columns = columns or {}
    column = {name: columns.get(name, name) for name in FIELDS["preference"]}
    chosen, rejected = row.get(column["chosen"]), row.get(column["rejected"])
    _require(row, origin, "preference", columns, [name for name in REQUIRED_FIELDS["preference"]
                                                  if _empty(row.get(column[name]))])
    prompt = row.get(column["prompt"])
    if _empty(prompt):
        pair = _split_conversations(row, origin, columns)
    else:
        prompt = _prompt_turns(prompt, origin, column["prompt"])
        pair = PreferencePair(prompt, _answer_after(prompt, chosen, origin, column["chosen"]),
                              _answer_after(prompt, rejected, origin, column["rejected"]))
    if _said(pair.chosen) == _said(pair.rejected):
        raise DataError(f"{origin}: the chosen and the rejected answer are the same, so the row prefers nothing. "
                        "Fix one of them, or remove the row.")
    return pair


def to_prompt(row: dict, origin: str, columns: Optional[dict[str, str]] = None) -> tuple[Conversation, dict]:
    """A prompt row as the conversation to answer (ending with the user's turn) and its other columns by name."""
    column = (columns or {}).get("prompt", "prompt")
    _require(row, origin, "prompts", columns or {}, ["prompt"] if _empty(row.get(column)) else [])
    clashing = [name for name in REWARD_ARGUMENTS if name in row and name != column]
    if clashing:
        raise DataError(f"{origin}: the column {clashing[0]!r} has the name of an argument every reward function "
                        f"gets ({', '.join(REWARD_ARGUMENTS)}), so it cannot be passed to them. Rename the column.")
    conversation = _prompt_turns(row[column], origin, column)
    if _empty(conversation[-1]["content"]):
        raise DataError(f"{origin}: the user's message that ends the prompt (column {column!r}) is empty, so there "
                        "is nothing to answer. Write the question, or remove the row.")
    return conversation, {name: value for name, value in row.items() if name != column}


def fill_prompt(prompt: str, row: dict, origin: str) -> str:
    """data.prompt with each {column} replaced; a [[ ... ]] part goes away when one of its columns is empty."""
    def optional(match: re.Match) -> str:
        part = match.group(1)
        return "" if any(_empty(row.get(name)) for name in PLACEHOLDER.findall(part)) else part

    text = OPTIONAL_PART.sub(optional, prompt)
    missing = [name for name in PLACEHOLDER.findall(text) if _empty(row.get(name))]
    if missing:
        raise DataError(f"{origin}: data.prompt uses the column {missing[0]!r}, which is missing or empty in this "
                        f"row (it has: {', '.join(row) or 'nothing'}). Fix the row, or wrap that part of the prompt "
                        "in [[ ]] so it is left out when the column is empty.")
    return PLACEHOLDER.sub(lambda match: str(row[match.group(1)]), text)


def extend_conversations(conversations: list[Conversation], turns_per_row: int, seed: int) -> list[Conversation]:
    """Each conversation followed by the turns of `turns_per_row - 1` others drawn at random (seeded).

    Later parts lose their system turn, so one conversation keeps one system prompt; the row count stays."""
    if turns_per_row == 1 or len(conversations) < 2:
        return conversations
    rng = random.Random(seed)
    extended = []
    for index, conversation in enumerate(conversations):
        others = [i for i in range(len(conversations)) if i != index]
        picks = rng.sample(others, min(turns_per_row - 1, len(others)))
        extended.append(conversation + [turn for pick in picks for turn in conversations[pick]
                                        if turn["role"] != "system"])
    return extended


def _empty(item) -> bool:
    return item is None or (isinstance(item, str) and not item.strip())


def _require(row: dict, origin: str, data_format: str, columns: dict[str, str], missing: list[str]) -> None:
    """A row without the format's required fields is an error naming what it lacks and what it has."""
    if missing:
        present = ", ".join(column for column, item in row.items() if not _empty(item)) or "none"
        wanted = ", ".join(columns.get(name, name) for name in missing)
        raise DataError(f"{origin}: format {data_format!r} needs the column(s) {wanted}, but this row has only: "
                        f"{present}. Fix the row, map your column names with data.columns, or set data.format to "
                        "the layout your file uses (alpaca, sharegpt, messages, text, preference).")


def _turns(turns, role_key: str, content_key: str, origin: str) -> list[dict]:
    turns = _turn_shapes(turns, role_key, content_key, origin)
    if not any(SHAREGPT_ROLES.get(turn[role_key]) == "assistant" for turn in turns):
        raise DataError(f"{origin}: the conversation has no assistant turn, so there is nothing to learn from it.")
    return turns


def _turn_shapes(turns, role_key: str, content_key: str, origin: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{origin}: the conversation must be a non-empty list of turns, got {type(turns).__name__}.")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(content_key), str):
            raise DataError(f"{origin}, turn {index + 1}: each turn needs a string {role_key!r} and a string "
                            f"{content_key!r}; this one is {turn!r:.120}.")
    return turns


def _messages(turns: list[dict], origin: str) -> Conversation:
    for turn in turns:
        if turn["role"] not in ROLES:
            raise DataError(f"{origin}: role {turn['role']!r} is not one of {', '.join(ROLES)}.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in turns]


def _prompt_turns(prompt, origin: str, column: str) -> Conversation:
    """A string is one user turn; a list is the context the answers follow, an optional system turn first."""
    if not isinstance(prompt, list):
        return [{"role": "user", "content": str(prompt)}]
    turns = _messages(_turn_shapes(prompt, "role", "content", f"{origin}, column {column!r}"), origin)
    _check_prompt(turns, origin, f"column {column!r}")
    return turns


def _check_prompt(turns: Conversation, origin: str, where: str) -> None:
    if any(turn["role"] == "system" for turn in turns[1:]):
        raise DataError(f"{origin}: the prompt ({where}) has a system message after its first message; a system "
                        "message can only open the conversation. Move it first, or remove it.")
    if turns[-1]["role"] != "user":
        raise DataError(f"{origin}: the prompt ({where}) ends with the {turns[-1]['role']}'s message; it must end with "
                        "the user's message that the answers reply to.")


def _answer_after(prompt: Conversation, answer, origin: str, column: str) -> Conversation:
    """The answer to `prompt`; an answer list that opens with the prompt's messages (UltraFeedback's layout: a
    prompt column, and chosen and rejected as whole conversations) loses them."""
    if isinstance(answer, list):
        turns = _messages(_turn_shapes(answer, "role", "content", f"{origin}, column {column!r}"), origin)
        if len(turns) > len(prompt) and _said(turns[:len(prompt)]) == _said(prompt):
            answer = turns[len(prompt):]
    return _answer_turns(answer, origin, column)


def _answer_turns(answer, origin: str, column: str) -> Conversation:
    """A string is one assistant turn; a list holds the answer's assistant turns, each with something said."""
    if isinstance(answer, list):
        turns = _messages(_turn_shapes(answer, "role", "content", f"{origin}, column {column!r}"), origin)
    else:
        turns = [{"role": "assistant", "content": str(answer)}]
    for number, turn in enumerate(turns, start=1):
        if turn["role"] != "assistant":
            raise DataError(f"{origin}: message {number} of the answer in column {column!r} is a {turn['role']} "
                            "message; an answer holds assistant messages only. Move the context into the prompt.")
        if _empty(turn["content"]):
            raise DataError(f"{origin}: the answer in column {column!r} is empty, so there is nothing to compare. "
                            "Write the answer, or remove the row.")
    return turns


def _split_conversations(row: dict, origin: str, columns: dict[str, str]) -> PreferencePair:
    """HH's layout: the turns before the last assistant turn, the same in both, are the prompt."""
    parts = {}
    for name in ("chosen", "rejected"):
        column = columns.get(name, name)
        conversation = _whole_conversation(row[column], origin, column)
        if not any(turn["role"] == "user" for turn in conversation):
            _require(row, origin, "preference", columns, ["prompt"])
        last = max((i for i, turn in enumerate(conversation) if turn["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{origin}: column {column!r} is a conversation with no assistant turn, so it holds no "
                            "answer. End it with the assistant's answer.")
        parts[name] = (conversation[:last], _answer_turns(conversation[last:], origin, column))
    (prompt, chosen), (rejected_prompt, rejected) = parts["chosen"], parts["rejected"]
    if _said(prompt) != _said(rejected_prompt):
        raise DataError(f"{origin}: there is no prompt column, and the chosen and rejected conversations differ "
                        "before their last assistant turn, so they share no prompt to split off. Give the row a "
                        "prompt, or make the conversations the same up to their final answers.")
    _check_prompt(prompt, origin, "the turns before the last assistant turn")
    return PreferencePair(prompt, chosen, rejected)


def _whole_conversation(value, origin: str, column: str) -> Conversation:
    """A list of role/content messages, or HH's text split into turns (Human: user, Assistant: assistant);
    anything else has no turns."""
    if isinstance(value, list):
        return _messages(_turn_shapes(value, "role", "content", f"{origin}, column {column!r}"), origin)
    parts = HH_TURN.split(str(value).strip())
    if parts[0].strip():
        return []
    return [{"role": HH_ROLES[speaker], "content": said.strip()} for speaker, said in zip(parts[1::2], parts[2::2])]


def _said(conversation: Conversation) -> list[tuple[str, str]]:
    return [(turn["role"], turn["content"].strip()) for turn in conversation]


def _sharegpt_role(name: str, origin: str) -> str:
    if name not in SHAREGPT_ROLES:
        raise DataError(f"{origin}: 'from' value {name!r} is not one of {', '.join(SHAREGPT_ROLES)}.")
    return SHAREGPT_ROLES[name]
