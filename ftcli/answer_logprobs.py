"""Each preference pair's answers scored by the model: the summed log-probability of their trained tokens.

Both answers go through one forward. Where the attention allows it, a pair is one row, prompt then chosen then
rejected, and the rejected answer's tokens see the prompt but not the chosen answer (a 4-D attention mask), with
positions that continue from the prompt as if the chosen answer were not there: the prompt is computed once for
both answers, which is a third fewer tokens for a prompt as long as each answer. Under SDPA the row's attention
runs as two causal ones (ftcli/pair_attention.py) rather than through the mask. Flash-attention takes no such
mask, and a sliding window shorter than the row would be lost under it, so there each answer gets its own row,
prompt repeated ("separate rows").

Only the hidden states that predict a trained answer token go through the head, and with kernels through it in
chunks (ftcli_kernels/token_logprobs.py), so the logits of the whole batch never exist.
"""

from dataclasses import dataclass

import torch

from ftcli.data.templates import IGNORE_INDEX, PreferenceExample
from ftcli.pair_attention import use_pair_attention
from ftcli.preference_losses import PairLogprobs

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3  # what each position of a shared row holds


@dataclass
class PairBatch:
    """A micro-batch of pairs as the decoder takes it, and which hidden state predicts which scored token."""

    inputs: dict[str, torch.Tensor]  # input_ids, position_ids and the attention mask
    source: torch.Tensor  # for each scored token, the flat index (row * width + position) of the state predicting it
    targets: torch.Tensor  # the scored tokens
    answer: torch.Tensor  # for each scored token, its answer: 2 * pair for the chosen one, 2 * pair + 1 the rejected
    layout: list[tuple[int, int, int]]  # each shared row's prompt, chosen and rejected lengths; empty for separate rows
    pairs: int
    tokens: int  # prompt once and both answers, of every pair


def shared_prompt_fits(config, row_length: int) -> bool:
    """Whether pairs can be rows of prompt, chosen and rejected: an attention that takes a 4-D mask, and no sliding
    window shorter than the row (the mask given replaces the model's own, window included)."""
    if "flash" in (config._attn_implementation or ""):
        return False
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types else window is not None
    return not sliding or window is None or row_length <= window


def collate_pairs(examples: list[PreferenceExample], pad_id: int, device: torch.device, shared_prompt: bool,
                  mask_dtype: torch.dtype) -> PairBatch:
    rows = shared_rows(examples) if shared_prompt else separate_rows(examples)
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, positions, _) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        position_ids[row, :len(ids)] = torch.tensor(positions)
    source, targets, answer = scored_tokens(examples, rows, width, shared_prompt)
    if shared_prompt:
        parts = torch.full((len(rows), width), PADDING, dtype=torch.long)
        for row, (ids, _, row_parts) in enumerate(rows):
            parts[row, :len(ids)] = torch.tensor(row_parts)
        mask = shared_prompt_mask(parts.to(device), mask_dtype)  # built where it is used: rows x width^2
    else:
        mask = (torch.arange(width) < torch.tensor([[len(ids)] for ids, _, _ in rows])).long()
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
    tokens = sum(example.row_length() for example in examples)
    layout = [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in examples] if shared_prompt else []
    return PairBatch({name: tensor.to(device) for name, tensor in inputs.items()}, source.to(device),
                     targets.to(device), answer.to(device), layout, len(examples), tokens)


def shared_rows(examples: list[PreferenceExample]) -> list[tuple[list[int], list[int], list[int]]]:
    """(token ids, positions, part of each position) of one row per pair: prompt, chosen, rejected."""
    rows = []
    for e in examples:
        prompt, chosen, rejected = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        positions = list(range(prompt + chosen)) + list(range(prompt, prompt + rejected))
        parts = [PROMPT] * prompt + [CHOSEN] * chosen + [REJECTED] * rejected
        rows.append((e.prompt_ids + e.chosen_ids + e.rejected_ids, positions, parts))
    return rows


def separate_rows(examples: list[PreferenceExample]) -> list[tuple[list[int], list[int], list[int]]]:
    """Two rows per pair, prompt + chosen and prompt + rejected."""
    rows = []
    for e in examples:
        for answer in (e.chosen_ids, e.rejected_ids):
            ids = e.prompt_ids + answer
            rows.append((ids, list(range(len(ids))), []))
    return rows


def shared_prompt_mask(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, width, width) additive mask: causal, blind to padding, and the rejected answer blind to the chosen.

    Padding positions still see the real positions before them, so their attention has no empty row (whose softmax
    would be NaN, and NaN times a zero gradient is NaN)."""
    width = parts.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=parts.device).tril()
    query, key = parts.unsqueeze(2), parts.unsqueeze(1)
    allowed = causal & (key != PADDING) & ~((query == REJECTED) & (key == CHOSEN))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=parts.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def scored_tokens(examples: list[PreferenceExample], rows: list, width: int,
                  shared_prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each trained answer token: the flat index of the position that predicts it, the token, its answer.

    An answer's first token is predicted by the prompt's last position; in a shared row, the rejected answer's
    first token too, from across the chosen answer."""
    source, targets, answer = [], [], []
    for pair, e in enumerate(examples):
        prompt = len(e.prompt_ids)
        for side, labels in enumerate((e.chosen_labels, e.rejected_labels)):
            row = pair if shared_prompt else 2 * pair + side
            offset = prompt + (len(e.chosen_ids) if shared_prompt and side == 1 else 0)
            for index, label in enumerate(labels):
                if label == IGNORE_INDEX:
                    continue
                predictor = prompt - 1 if index == 0 else offset + index - 1
                source.append(row * width + predictor)
                targets.append(label)
                answer.append(2 * pair + side)
    return torch.tensor(source), torch.tensor(targets), torch.tensor(answer)


def pair_logprobs(model, batch: PairBatch, fused: bool) -> PairLogprobs:
    """The summed log-probabilities of every pair's answers, differentiable when gradients are on."""
    split_attention = {"pair_layout": batch.layout} if batch.layout and use_pair_attention(model) else {}
    hidden = model.get_decoder()(**batch.inputs, **split_attention, use_cache=False).last_hidden_state
    logprobs = scored_logprobs(model, hidden, batch.source, batch.targets, fused)
    sums = torch.zeros(2 * batch.pairs, dtype=torch.float32, device=logprobs.device).index_add(0, batch.answer, logprobs)
    return PairLogprobs(sums[0::2], sums[1::2], *answer_token_counts(batch))


def scored_logprobs(model, hidden: torch.Tensor, source: torch.Tensor, targets: torch.Tensor,
                    fused: bool) -> torch.Tensor:
    """(scored tokens,) float32 log-probabilities of `targets`, each predicted by the decoder's output `hidden` at
    flat index `source` (row * width + position) through the model's head (and Gemma 2's soft-capping).

    `fused` scores through the chunked kernel where it can: it keeps no gradient for the head, so a head that is
    trained while gradients are recorded gets PyTorch's logits of the scored positions instead."""
    scoring = hidden.reshape(-1, hidden.shape[-1]).index_select(0, source)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if fused and not (head.weight.requires_grad and torch.is_grad_enabled()):
        from ftcli_kernels.token_logprobs import token_logprobs  # here, not at the top: it imports Triton

        return token_logprobs(scoring, head.weight, targets, softcap)
    logits = head(scoring).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def answer_token_counts(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """How many trained tokens each pair's chosen and rejected answer has."""
    counts = torch.bincount(batch.answer, minlength=2 * batch.pairs).to(torch.float32)
    return counts[0::2], counts[1::2]
