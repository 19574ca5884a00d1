"""Packing: several tokenized examples in one max_seq_length row, kept apart from each other.

Short chat examples padded to the longest of their batch waste most of a GPU's work on padding; packed rows
waste almost none. Each packed row carries position ids that restart at 0 for every example, and that is all
the model needs: called with them and without a padding mask, transformers reads the restarts as example
boundaries and builds a block-diagonal causal mask for SDPA and eager attention (sliding windows included),
and flash-attention is given the boundaries as cumulative lengths (`train.model_inputs`). RoPE is computed
from the same position ids, so every example sees the positions it would see alone.

The first token of each example is never a target: it would be predicted from the previous example's last
token. Unpacked, that token is at position 0 and has no prediction either, so the loss is the same.
"""

import bisect

from ftcli.data.templates import IGNORE_INDEX, TokenizedExample


def pack_examples(examples: list[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Best-fit decreasing: longest example first, each into the fullest row that still has room for it."""
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index].input_ids))
    rows: list[list[int]] = []
    free_rows: list[tuple[int, int]] = []  # (room left, row index), sorted, so bisect finds the tightest fit
    for index in order:
        length = len(examples[index].input_ids)
        place = bisect.bisect_left(free_rows, (length, -1))
        if place < len(free_rows):
            room, row = free_rows.pop(place)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free_rows, (room - length, row))
    return [join_examples([examples[index] for index in row]) for row in rows]


def join_examples(examples: list[TokenizedExample]) -> TokenizedExample:
    """One row of the given examples, positions restarting at each and no target on each one's first token."""
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        position_ids += range(len(example.input_ids))
    return TokenizedExample(input_ids, labels, any(example.truncated for example in examples), position_ids,
                            origin="; ".join(example.origin for example in examples))
