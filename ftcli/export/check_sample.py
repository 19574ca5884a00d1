"""What `ftcli export --check` shows both models: a few of the run's own conversations, and generic prompts.

The run's data is what its recipe.yaml (saved beside the adapter) names, split as training split it: the evaluation
rows when there are any, else the first training rows. A run whose data cannot be read here any more (a moved file,
a hub dataset offline) is checked on the generic prompts alone, and the sample says why.
"""

from dataclasses import dataclass
from pathlib import Path

from ftcli.data import choose_rows
from ftcli.data.formats import Conversation, to_conversation, to_pair, to_prompt
from ftcli.data.sources import read_rows
from ftcli.errors import FtcliError
from ftcli.recipe import load_recipe

# Each prompt costs every checked file one teacher-forced row: 6 rows and the 2 generic prompts keep a 135M model's
# check on two CPU cores within the time its export takes, where 8 rows did not (docs/benchmarks.md)
SAMPLE_ROWS = 6
# what people ask any chat model, for a model whose data has nothing to say about it
GENERIC_PROMPTS = ["Hello! Who are you?", "What is the capital of France?"]


@dataclass
class CheckSample:
    conversations: list[Conversation]  # the run's rows with their answers, for the chat template checks to render
    prompts: list[Conversation]  # what both models answer greedily: each row up to its last answer, then GENERIC_PROMPTS
    origin: str  # where the prompts came from: how many rows of which data, or why none


def check_sample(out_dir: Path) -> CheckSample:
    conversations, origin = _run_conversations(out_dir)
    prompts = [_prompt_of(conversation) for conversation in conversations]
    prompts += [[{"role": "user", "content": text}] for text in GENERIC_PROMPTS]
    return CheckSample(conversations, [prompt for prompt in prompts if prompt], origin)


def _run_conversations(out_dir: Path) -> tuple[list[Conversation], str]:
    generic = f"{len(GENERIC_PROMPTS)} generic"
    recipe_path = out_dir / "recipe.yaml"
    if not recipe_path.is_file():
        return [], f"{generic} only: no {recipe_path.name} in {out_dir} names the run's data"
    try:
        recipe = load_recipe(recipe_path)
        train_rows, eval_rows = choose_rows(read_rows(recipe.data), recipe.data, recipe.train.seed)
    except FtcliError as error:
        return [], f"{generic} only: the run's data cannot be read here ({error.message})"
    split, rows = ("evaluation", eval_rows) if eval_rows else ("training", train_rows)
    conversations = []
    for row in rows:
        conversation = _conversation(row.values, row.origin, recipe.data)
        if conversation:
            conversations.append(conversation)
        if len(conversations) == SAMPLE_ROWS:
            break
    return conversations, f"{len(conversations)} {split} rows of {recipe.data.path}, {generic}"


def _conversation(values: dict, origin: str, settings) -> Conversation:
    """The row as a chat (a preference row's prompt with its chosen answer, a prompts row's prompt); empty for
    raw text, which no chat template renders, and for a row training would have rejected."""
    try:
        if settings.format == "text":
            return []
        if settings.format == "preference":
            pair = to_pair(values, origin, settings.columns)
            return pair.prompt + pair.chosen
        if settings.format == "prompts":
            return to_prompt(values, origin, settings.columns)[0]
        return to_conversation(values, origin, settings.format, settings.columns, settings.prompt)
    except FtcliError:
        return []


def _prompt_of(conversation: Conversation) -> Conversation:
    """The chat up to its last assistant turn: what the model was asked there."""
    answers = [index for index, message in enumerate(conversation) if message["role"] == "assistant"]
    return conversation[:answers[-1]] if answers else conversation
