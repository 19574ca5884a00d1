"""`ftcli data preview`: what the model will learn from a recipe's data, shown before a GPU is paid for.

Rendered examples with the masked part dimmed and the trained part highlighted, then the token lengths as
a histogram with the number of examples that max_seq_length cuts. A preference pair shows its prompt once,
then the chosen and the rejected answer, each labelled and highlighted in its own colour. A GRPO prompt shows
as the model will answer it, rendered with its generation prompt, and then the columns its rewards read.
"""

import statistics
from collections.abc import Sequence

from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ftcli.data import DataStats, prepare_data
from ftcli.data.packing import pack_examples
from ftcli.data.templates import IGNORE_INDEX, PreferenceExample, PromptExample, TokenizedExample
from ftcli.loader import load_tokenizer
from ftcli.recipe import Recipe

MASKED_STYLE, TRAINED_STYLE, REJECTED_STYLE, COLUMN_STYLE = "dim", "bold green", "bold red", "cyan"
HISTOGRAM_BINS, BAR_WIDTH = 10, 40
LEGENDS = {"preference": [("chosen answer (in the loss)", TRAINED_STYLE),  # beside the masked context
                          ("rejected answer (in the loss)", REJECTED_STYLE)],
           "prompts": [("columns the rewards read", COLUMN_STYLE)]}


def preview_data(recipe: Recipe, count: int, console: Console) -> DataStats:
    """Print `count` training examples as the model sees them, and the data's length statistics."""
    tokenizer = load_tokenizer(recipe.model)
    data_format = recipe.data.format
    max_length = recipe.example_length_limit()
    data = prepare_data(recipe.data.model_copy(update={"packing": False}), tokenizer, max_length, recipe.train.seed)
    render = {"preference": render_pair, "prompts": render_prompt}.get(data_format, render_example)
    for example in data.train[:count]:
        console.print(Rule(style="cyan"))
        console.print(Text(example.origin, style="bold cyan"), soft_wrap=True)
        console.print(render(tokenizer, example), soft_wrap=True)
        if data_format != "prompts" and example.truncated:
            console.print(f"[yellow](cut at max_seq_length {max_length}: the model never sees the rest)[/]")
    console.print(Rule(style="cyan"))
    console.print(legend(data_format))
    packed_rows = len(pack_examples(data.train, max_length)) if recipe.data.packing else 0
    console.print(length_report(data.stats, max_length, len(data.train), len(data.eval), packed_rows, data_format))
    return data.stats


def legend(data_format: str) -> Text:
    """What each style means for this format."""
    text = Text("legend: ").append("masked (context only)", MASKED_STYLE)
    for label, style in LEGENDS.get(data_format, [("trained (in the loss)", TRAINED_STYLE)]):
        text.append("  ").append(label, style)
    return text


def render_example(tokenizer, example: TokenizedExample) -> Text:
    """The example's text, each run of masked or trained tokens decoded and styled as one piece."""
    return render_tokens(tokenizer, example.input_ids, example.labels, TRAINED_STYLE)


def render_pair(tokenizer, pair: PreferenceExample) -> Text:
    """The prompt once, then each answer as it follows the prompt, under its label."""
    text = render_tokens(tokenizer, pair.prompt_ids, [IGNORE_INDEX] * len(pair.prompt_ids), TRAINED_STYLE)
    for label, ids, labels, style in (("chosen", pair.chosen_ids, pair.chosen_labels, TRAINED_STYLE),
                                      ("rejected", pair.rejected_ids, pair.rejected_labels, REJECTED_STYLE)):
        text.append("" if text.plain.endswith("\n") else "\n")
        text.append(f"[{label} answer]", style=f"{style} reverse")
        text.append("\n")
        text.append_text(render_tokens(tokenizer, ids, labels, style, context=pair.prompt_ids))
    return text


def render_prompt(tokenizer, example: PromptExample) -> Text:
    """The prompt as the model will answer it (context only: the model writes the rest), then each column the
    reward functions get, by name."""
    text = render_tokens(tokenizer, example.prompt_ids, [IGNORE_INDEX] * len(example.prompt_ids), TRAINED_STYLE)
    for name, value in example.columns.items():
        text.append("" if text.plain.endswith("\n") else "\n")
        text.append(f"{name}: {value}", style=COLUMN_STYLE)
    return text


def render_tokens(tokenizer, ids: list[int], labels: list[int], trained_style: str,
                  context: Sequence[int] = ()) -> Text:
    """The tokens' text after `context` (tokens shown before them), each run of masked or trained tokens one piece.

    Pieces are differences of decoded prefixes, so tokenizers that drop a leading space when decoding a piece
    alone still show the text as it really is."""
    trained = [label != IGNORE_INDEX for label in labels]
    boundaries = [0] + [i for i in range(1, len(trained)) if trained[i] != trained[i - 1]] + [len(trained)]
    text, shown = Text(), tokenizer.decode(list(context))
    for begin, end in zip(boundaries, boundaries[1:]):
        upto = tokenizer.decode(list(context) + ids[:end])
        text.append(upto[len(shown):], style=trained_style if trained[begin] else MASKED_STYLE)
        shown = upto
    return text


def length_report(stats: DataStats, max_length: int, train: int, evaluation: int, packed_rows: int,
                  data_format: str = "messages") -> Group:
    """Histogram of example lengths in tokens, and the counts a user decides max_seq_length and packing by."""
    lengths = stats.lengths
    width = max(1, -(-max(lengths, default=max_length) // HISTOGRAM_BINS))  # bins up to the longest example
    counts = [0] * HISTOGRAM_BINS
    for length in lengths:
        counts[min((length - 1) // width, HISTOGRAM_BINS - 1)] += 1
    table = Table.grid(padding=(0, 2))
    tallest = max(counts, default=0) or 1
    for index, number in enumerate(counts):
        low, high = index * width + 1, (index + 1) * width
        bar = "█" * round(BAR_WIDTH * number / tallest) or ("▏" if number else "")
        table.add_row(f"{low:>6}-{high:<6}", Text(bar, style="green"), str(number))
    if data_format == "prompts":
        return _prompt_lengths(stats, max_length, train, evaluation, table)
    measured = "per pair: its prompt once and both answers" if data_format == "preference" else "per example"
    lines = [Text(f"token lengths ({measured}, after truncation)", style="bold"), table]
    if lengths:
        lines.append(Text(f"mean {statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, "
                          f"longest {max(lengths)}; {stats.tokens:,} tokens, {stats.target_tokens:,} trained "
                          f"({100 * stats.target_tokens / max(stats.tokens, 1):.0f}%)"))
    lines.append(Text(f"{stats.rows} rows -> {train} training / {evaluation} eval examples; "
                      f"{stats.truncated} truncated at max_seq_length {max_length}; "
                      f"{stats.dropped_no_target} dropped with nothing to learn; "
                      f"{stats.skipped_invalid} invalid rows skipped",
                      style="bold yellow" if stats.truncated or stats.skipped_invalid else ""))
    if packed_rows:
        lines.append(Text(f"packing: {train} training examples in {packed_rows} rows of {max_length} tokens"))
    return Group(*lines, *_first_skipped(stats))


def _prompt_lengths(stats: DataStats, max_length: int, train: int, evaluation: int, table: Table) -> Group:
    """GRPO prompts are never cut and train no token of their own: their lengths against grpo.max_prompt_length."""
    lines = [Text("token lengths (per prompt, rendered with the generation prompt)", style="bold"), table]
    if stats.lengths:
        lines.append(Text(f"mean {statistics.mean(stats.lengths):.0f}, median {statistics.median(stats.lengths):.0f}, "
                          f"longest {max(stats.lengths)} of grpo.max_prompt_length {max_length}; "
                          f"{stats.tokens:,} prompt tokens"))
    lines.append(Text(f"{stats.rows} rows -> {train} training / {evaluation} eval prompts; "
                      f"{stats.skipped_invalid} invalid rows skipped", style="bold yellow" if stats.skipped_invalid
                      else ""))
    return Group(*lines, *_first_skipped(stats))


def _first_skipped(stats: DataStats) -> list[Text]:
    return [Text(f"first skipped row: {stats.first_invalid}", style="yellow")] if stats.first_invalid else []
