"""Row layouts people bring, each turned into one conversation: a list of {"role", "content"} turns.

Raw text (format `text`) is the exception: it has no turns, and is returned as a string.
"""

from typing import Union

from ftcli.errors import RecipeError

Conversation = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
REQUIRED_COLUMNS = {"alpaca": ["instruction", "output"], "sharegpt": ["conversations"],
                    "messages": ["messages"], "text": ["text"]}


def to_conversation(row: dict, data_format: str, row_number: int, source: str) -> Union[Conversation, str]:
    """One row in the given format as a conversation (or a string for `text`); errors name the row."""
    missing = [column for column in REQUIRED_COLUMNS[data_format] if row.get(column) in (None, "")]
    if missing:
        present = ", ".join(column for column, value in row.items() if value not in (None, "")) or "none"
        raise RecipeError(f"{source} row {row_number}: format {data_format!r} needs the column(s) "
                          f"{', '.join(missing)}, but this row has only: {present}. Fix the row, or set data.format "
                          "to the layout your file uses (alpaca, sharegpt, messages, text).")
    if data_format == "text":
        return str(row["text"])
    if data_format == "alpaca":
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    if data_format == "sharegpt":
        turns = _turns(row["conversations"], "from", "value", row_number, source)
        return [{"role": _sharegpt_role(turn["from"], row_number, source), "content": turn["value"]} for turn in turns]
    turns = _turns(row["messages"], "role", "content", row_number, source)
    for turn in turns:
        if turn["role"] not in ("system", "user", "assistant"):
            raise RecipeError(f"{source} row {row_number}: role {turn['role']!r} is not one of system, user, assistant.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in turns]


def _turns(turns, role_key: str, content_key: str, row_number: int, source: str) -> list[dict]:
    where = f"{source} row {row_number}"
    if not isinstance(turns, list) or not turns:
        raise RecipeError(f"{where}: the conversation must be a non-empty list of turns, got {type(turns).__name__}.")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(content_key), str):
            raise RecipeError(f"{where}, turn {index + 1}: each turn needs a string {role_key!r} and a string "
                              f"{content_key!r}; this one is {turn!r:.120}.")
    if not any(SHAREGPT_ROLES.get(turn[role_key]) == "assistant" for turn in turns):
        raise RecipeError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it.")
    return turns


def _sharegpt_role(name: str, row_number: int, source: str) -> str:
    if name not in SHAREGPT_ROLES:
        raise RecipeError(f"{source} row {row_number}: 'from' value {name!r} is not one of "
                          f"{', '.join(SHAREGPT_ROLES)}.")
    return SHAREGPT_ROLES[name]
