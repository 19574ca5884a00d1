"""`ftcli data preview`: what the model will learn from a recipe's data, shown before a GPU is paid for.

Rendered examples with the masked part dimmed and the trained part highlighted, then the token lengths as
a histogram with the number of examples that max_seq_length cuts.
"""

import statistics

from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ftcli.data import DataStats, prepare_data
from ftcli.data.packing import pack_examples
from ftcli.data.templates import IGNORE_INDEX, TokenizedExample
from ftcli.loader import load_tokenizer
from ftcli.recipe import Recipe

MASKED_STYLE, TRAINED_STYLE = "dim", "bold green"
HISTOGRAM_BINS, BAR_WIDTH = 10, 40


def preview_data(recipe: Recipe, count: int, console: Console) -> DataStats:
    """Print `count` training examples as the model sees them, and the data's length statistics."""
    tokenizer = load_tokenizer(recipe.model)
    max_length = recipe.model.max_seq_length
    data = prepare_data(recipe.data.model_copy(update={"packing": False}), tokenizer, max_length, recipe.train.seed)
    for example in data.train[:count]:
        console.print(Rule(style="cyan"))
        console.print(Text(example.origin, style="bold cyan"), soft_wrap=True)
        console.print(render_example(tokenizer, example), soft_wrap=True)
        if example.truncated:
            console.print(f"[yellow](cut at max_seq_length {max_length}: the model never sees the rest)[/]")
    console.print(Rule(style="cyan"))
    console.print(Text.assemble("legend: ", ("masked (context only)", MASKED_STYLE), "  ",
                                ("trained (in the loss)", TRAINED_STYLE)))
    packed_rows = len(pack_examples(data.train, max_length)) if recipe.data.packing else 0
    console.print(length_report(data.stats, max_length, len(data.train), len(data.eval), packed_rows))
    return data.stats


def render_example(tokenizer, example: TokenizedExample) -> Text:
    """The example's text, each run of masked or trained tokens decoded and styled as one piece.

    Pieces are differences of decoded prefixes, so tokenizers that drop a leading space when decoding a piece
    alone still show the text as it really is."""
    trained = [label != IGNORE_INDEX for label in example.labels]
    boundaries = [0] + [i for i in range(1, len(trained)) if trained[i] != trained[i - 1]] + [len(trained)]
    text, shown = Text(), ""
    for begin, end in zip(boundaries, boundaries[1:]):
        upto = tokenizer.decode(example.input_ids[:end])
        text.append(upto[len(shown):], style=TRAINED_STYLE if trained[begin] else MASKED_STYLE)
        shown = upto
    return text


def length_report(stats: DataStats, max_length: int, train: int, evaluation: int, packed_rows: int) -> Group:
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
    lines = [Text("token lengths (per example, after truncation)", style="bold"), table]
    if lengths:
        lines.append(Text(f"mean {statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, "
                          f"longest {max(lengths)}; {stats.tokens:,} tokens, {stats.target_tokens:,} trained "
                          f"({100 * stats.target_tokens / max(stats.tokens, 1):.0f}%)"))
    lines.append(Text(f"{stats.rows} rows -> {train} training / {evaluation} eval examples; "
                      f"{stats.truncated} truncated at max_seq_length {max_length}; "
                      f"{stats.dropped_no_target} dropped with nothing to learn; "
                      f"{stats.skipped_invalid} invalid rows skipped",
                      style="bold yellow" if stats.truncated or stats.skipped_invalid else ""))
    if stats.first_invalid:
        lines.append(Text(f"first skipped row: {stats.first_invalid}", style="yellow"))
    if packed_rows:
        lines.append(Text(f"packing: {train} training examples in {packed_rows} rows of {max_length} tokens"))
    return Group(*lines)
