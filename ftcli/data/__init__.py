"""From `data:` in a recipe to tokenized training and evaluation examples, with statistics to show first."""

import random
from dataclasses import dataclass, field

from ftcli.data.formats import to_conversation
from ftcli.data.sources import read_rows
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample, tokenize_conversation, tokenize_text, use_template
from ftcli.errors import RecipeError
from ftcli.recipe import DataSettings


@dataclass
class DataStats:
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    stats: DataStats


def prepare_data(settings: DataSettings, tokenizer, max_seq_length: int, seed: int) -> PreparedData:
    """Read every row, check it, render it with the chat template and split off the evaluation share."""
    rows = read_rows(settings.path)
    if settings.format != "text":
        use_template(tokenizer, settings.template)
    stats = DataStats(rows=len(rows))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_count = round(len(rows) * settings.eval_fraction)
    if settings.eval_fraction > 0 and not 1 <= eval_count < len(rows):
        raise RecipeError(f"data.eval_fraction {settings.eval_fraction} of {len(rows)} rows leaves no evaluation "
                          "or no training rows; change the fraction or add rows.")
    eval_rows = set(order[:eval_count])
    train, evaluation = [], []
    for index, row in enumerate(rows):
        for example in _tokenize_row(row, index + 1, settings, tokenizer, max_seq_length):
            target = sum(label != IGNORE_INDEX for label in example.labels[1:])
            if target == 0:
                stats.dropped_no_target += 1
                continue
            example.row = index + 1
            stats.examples += 1
            stats.truncated += example.truncated
            stats.tokens += len(example.input_ids)
            stats.target_tokens += target
            stats.lengths.append(len(example.input_ids))
            (evaluation if index in eval_rows else train).append(example)
    stats.longest = max(stats.lengths, default=0)
    if not train:
        raise RecipeError(f"No training example in {settings.path} has a token to learn from (all {stats.rows} rows "
                          "were empty, held out, or lost their assistant turn to truncation). Check the data, or raise "
                          "model.max_seq_length.")
    return PreparedData(train, evaluation, stats)


def _tokenize_row(row: dict, row_number: int, settings: DataSettings, tokenizer, max_length: int):
    conversation = to_conversation(row, settings.format, row_number, settings.path)
    if isinstance(conversation, str):
        return tokenize_text(tokenizer, conversation, max_length)
    return [tokenize_conversation(tokenizer, conversation, settings.train_on_responses_only, max_length)]
