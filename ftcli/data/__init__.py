"""From `data:` in a recipe to tokenized training and evaluation examples, with statistics to show first."""

import random
from dataclasses import dataclass, field
from typing import Callable, Union

from jinja2 import TemplateError, TemplateSyntaxError

from ftcli.data.formats import check_columns, extend_conversations, to_conversation, to_pair, to_prompt
from ftcli.data.packing import pack_examples
from ftcli.data.sources import Row, read_rows
from ftcli.data.templates import (IGNORE_INDEX, PreferenceExample, PromptExample, TokenizedExample,
                                  tokenize_conversation, tokenize_pair, tokenize_prompt, tokenize_text, use_template)
from ftcli.errors import DataError, RecipeError
from ftcli.recipe import DataSettings


@dataclass
class DataStats:
    """Counts over the examples; a preference pair counts as one example of its prompt and both answers, and a
    GRPO prompt as one example of its tokens, none of them trained."""
    rows: int = 0
    skipped_invalid: int = 0
    first_invalid: str = ""  # the message of the first skipped row, to show what was wrong
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0
    packed_rows: int = 0  # training rows after packing; 0 without packing
    lengths: list[int] = field(default_factory=list, repr=False)


# pairs for format preference, prompts for format prompts
Examples = Union[list[TokenizedExample], list[PreferenceExample], list[PromptExample]]


@dataclass
class PreparedData:
    train: Examples
    eval: Examples
    stats: DataStats


def prepare_data(settings: DataSettings, tokenizer, max_seq_length: int, seed: int) -> PreparedData:
    """Read every row, check it, render it with the chat template, split off the evaluation share, and pack.

    For format prompts, max_seq_length is the longest prompt (grpo.max_prompt_length)."""
    check_columns(settings.format, settings.columns, settings.prompt)
    rows = read_rows(settings)
    if settings.format != "text":
        use_template(tokenizer, settings.template)
    stats = DataStats(rows=len(rows))
    train_rows, eval_rows = choose_rows(rows, settings, seed)
    if settings.format == "preference":
        train = _tokenize_pairs(train_rows, settings, tokenizer, max_seq_length, stats)
        evaluation = _tokenize_pairs(eval_rows, settings, tokenizer, max_seq_length, stats)
    elif settings.format == "prompts":
        train = _tokenize_prompts(train_rows, settings, tokenizer, max_seq_length, stats)
        evaluation = _tokenize_prompts(eval_rows, settings, tokenizer, max_seq_length, stats)
    else:
        train_items = _convert(train_rows, settings, stats)
        eval_items = _convert(eval_rows, settings, stats)
        if settings.conversation_extension > 1 and settings.format != "text":
            conversations = extend_conversations([item for item, _ in train_items], settings.conversation_extension,
                                                 seed)
            train_items = [(conversation, origin) for conversation, (_, origin) in zip(conversations, train_items)]
        train = _tokenize(train_items, settings, tokenizer, max_seq_length, stats)
        evaluation = _tokenize(eval_items, settings, tokenizer, max_seq_length, stats)
    stats.longest = max(stats.lengths, default=0)
    if not train and settings.format == "prompts":
        raise DataError(f"No prompt in {settings.path} is left to train on: data.skip_invalid skipped all "
                        f"{stats.skipped_invalid} invalid rows, and no valid one was among the training rows (the "
                        f"first problem: {stats.first_invalid}). Fix the rows.")
    if not train:
        raise DataError(f"No training example in {settings.path} has a token to learn from (of {stats.rows} rows, "
                        f"{stats.skipped_invalid} were invalid and skipped; the rest were empty, held out, or lost "
                        "their assistant turn to truncation). Check the data, or raise model.max_seq_length.")
    if settings.packing:
        train, evaluation = pack_examples(train, max_seq_length), pack_examples(evaluation, max_seq_length)
        stats.packed_rows = len(train)
    return PreparedData(train, evaluation, stats)


def choose_rows(rows: list[Row], settings: DataSettings, seed: int) -> tuple[list[Row], list[Row]]:
    """Shuffle (when asked), keep max_samples, and split off the evaluation rows."""
    order = list(range(len(rows)))
    if settings.shuffle:
        random.Random(seed).shuffle(order)
    order = order[:settings.max_samples]
    eval_count = round(len(order) * settings.eval_fraction)
    if settings.eval_fraction > 0 and not 1 <= eval_count < len(order):
        raise RecipeError(f"data.eval_fraction {settings.eval_fraction} of {len(order)} rows leaves no evaluation "
                          "or no training rows; change the fraction or add rows.")
    cut = len(order) - eval_count
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def _convert(rows: list[Row], settings: DataSettings, stats: DataStats) -> list[tuple]:
    """(conversation or text, origin) for each valid row; invalid rows stop the run, or are counted and skipped."""
    items = []
    for row in rows:
        try:
            items.append((to_conversation(row.values, row.origin, settings.format, settings.columns, settings.prompt),
                          row.origin))
        except DataError as error:
            _reject_row(error.message, settings, stats)
    return items


def _reject_row(message: str, settings: DataSettings, stats: DataStats) -> None:
    """An invalid row stops the run, or with data.skip_invalid is counted (the first one's problem kept) and skipped."""
    if not settings.skip_invalid:
        raise DataError(f"{message} (Or set data.skip_invalid: true to skip such rows.)")
    stats.skipped_invalid += 1
    stats.first_invalid = stats.first_invalid or message


def _tokenize(items: list[tuple], settings: DataSettings, tokenizer, max_length: int,
              stats: DataStats) -> list[TokenizedExample]:
    examples = []
    for item, origin in items:
        if isinstance(item, str):
            tokenized = tokenize_text(tokenizer, item, max_length)
        else:
            tokenized = _through_template(
                lambda: [tokenize_conversation(tokenizer, item, settings.train_on_responses_only, max_length)],
                origin, settings, stats) or []
        for example in tokenized:
            target = sum(label != IGNORE_INDEX for label in example.labels[1:])
            if target == 0:
                stats.dropped_no_target += 1
                continue
            example.origin = origin
            stats.examples += 1
            stats.truncated += example.truncated
            stats.tokens += len(example.input_ids)
            stats.target_tokens += target
            stats.lengths.append(len(example.input_ids))
            examples.append(example)
    return examples


def _tokenize_pairs(rows: list[Row], settings: DataSettings, tokenizer, max_length: int,
                    stats: DataStats) -> list[PreferenceExample]:
    """Each valid row's pair; invalid rows stop the run or are skipped, and a pair is dropped when truncation left
    one of its answers without a trained token."""
    examples = []
    for row in rows:
        try:
            pair = to_pair(row.values, row.origin, settings.columns)
            example = _through_template(lambda: tokenize_pair(tokenizer, pair, max_length, row.origin), row.origin,
                                        settings, stats)
        except DataError as error:
            _reject_row(error.message, settings, stats)
            continue
        if example is None:
            continue
        targets = [sum(label != IGNORE_INDEX for label in labels) for labels in (example.chosen_labels,
                                                                                  example.rejected_labels)]
        if 0 in targets:
            stats.dropped_no_target += 1
            continue
        length = example.row_length()
        stats.examples += 1
        stats.truncated += example.truncated
        stats.tokens += length
        stats.target_tokens += sum(targets)
        stats.lengths.append(length)
        examples.append(example)
    return examples


def _tokenize_prompts(rows: list[Row], settings: DataSettings, tokenizer, max_length: int,
                      stats: DataStats) -> list[PromptExample]:
    """Each valid row's prompt, rendered to be answered; invalid rows stop the run or are skipped."""
    examples = []
    for row in rows:
        try:
            conversation, columns = to_prompt(row.values, row.origin, settings.columns)
            if settings.system_prompt is not None and conversation[0]["role"] != "system":
                conversation = [{"role": "system", "content": settings.system_prompt}] + conversation
            example = _through_template(lambda: tokenize_prompt(tokenizer, conversation, columns, max_length,
                                                                row.origin), row.origin, settings, stats)
        except DataError as error:
            _reject_row(error.message, settings, stats)
            continue
        if example is None:
            continue
        stats.examples += 1
        stats.tokens += example.row_length()
        stats.lengths.append(example.row_length())
        examples.append(example)
    return examples


def _through_template(tokenize: Callable, origin: str, settings: DataSettings, stats: DataStats):
    """What tokenize() returns, or None when the chat template refuses the row and data.skip_invalid skips it."""
    try:
        return tokenize()
    except TemplateSyntaxError as error:  # no row can be rendered: the template itself is wrong
        raise RecipeError(f"The chat template (data.template {settings.template}) is not valid Jinja: {error} "
                          f"(template line {error.lineno}). Fix the template, or set data.template to a "
                          "built-in one.") from None
    except TemplateError as error:  # the template's own check of a row, such as raise_exception('...')
        _reject_row(f"{origin}: the chat template rejects this row: {error}. Fix the row so the template "
                    "accepts it, or choose another template with data.template.", settings, stats)
        return None
