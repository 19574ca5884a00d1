"""Row layouts people bring, each turned into one conversation: a list of {"role", "content"} turns.

Raw text (format `text`) is the exception: it has no turns, and is returned as a string. `data.columns`
says where a format's fields are in the user's data, and `data.prompt` builds an alpaca user turn from
several columns.
"""

import random
import re
from typing import Optional, Union

from ftcli.errors import DataError, RecipeError

Conversation = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
FIELDS = {"alpaca": ["instruction", "input", "output", "system"], "sharegpt": ["conversations"],
          "messages": ["messages"], "text": ["text"]}
REQUIRED_FIELDS = {"alpaca": ["instruction", "output"], "sharegpt": ["conversations"],
                   "messages": ["messages"], "text": ["text"]}
OPTIONAL_PART = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


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
    missing = [name for name in required if _empty(value(name))]
    if missing:
        present = ", ".join(column for column, item in row.items() if not _empty(item)) or "none"
        wanted = ", ".join(columns.get(name, name) for name in missing)
        raise DataError(f"{origin}: format {data_format!r} needs the column(s) {wanted}, but this row has only: "
                        f"{present}. Fix the row, map your column names with data.columns, or set data.format to "
                        "the layout your file uses (alpaca, sharegpt, messages, text).")
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
    turns = _turns(value("messages"), "role", "content", origin)
    for turn in turns:
        if turn["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{origin}: role {turn['role']!r} is not one of system, user, assistant.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in turns]


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


def _turns(turns, role_key: str, content_key: str, origin: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{origin}: the conversation must be a non-empty list of turns, got {type(turns).__name__}.")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(content_key), str):
            raise DataError(f"{origin}, turn {index + 1}: each turn needs a string {role_key!r} and a string "
                            f"{content_key!r}; this one is {turn!r:.120}.")
    if not any(SHAREGPT_ROLES.get(turn[role_key]) == "assistant" for turn in turns):
        raise DataError(f"{origin}: the conversation has no assistant turn, so there is nothing to learn from it.")
    return turns


def _sharegpt_role(name: str, origin: str) -> str:
    if name not in SHAREGPT_ROLES:
        raise DataError(f"{origin}: 'from' value {name!r} is not one of {', '.join(SHAREGPT_ROLES)}.")
    return SHAREGPT_ROLES[name]
