"""Attention over rows of prompt, chosen answer and rejected answer, as two causal attentions instead of one masked.

A preference pair's shared row (ftcli/answer_logprobs.py) needs a mask that no flash kernel takes: the rejected
answer sees the prompt but not the chosen answer. Given as a 4-D mask, SDPA falls back to its masked kernel and
computes every query against every key, three times the work of the causal attention the row really needs and at
a slower kernel's speed. Split, it is two attentions flash kernels do take: prompt + chosen, causal; and the
rejected answer's queries over the prompt's and its own keys, causal from the lower right (each rejected token sees
the whole prompt and the rejected tokens up to itself).

transformers picks a model's attention function by name from its registry (`AttentionInterface`, its public way
to add one); this registers one, `ftcli_pairs`, that takes this path when the forward carries the rows' layout
(`pair_layout`, passed down to every attention call with the model's other keyword arguments) and is SDPA's own
function otherwise, so the model runs exactly as with SDPA everywhere else.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PAIR_ATTENTION = "ftcli_pairs"


def pair_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                   dropout: float = 0.0, scaling=None, pair_layout=None, **kwargs):
    """An attention function for transformers' registry: (batch, heads, length, head_dim) inputs, the output as
    (batch, length, heads, head_dim) and no attention weights."""
    if pair_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    rows = []
    for row, (prompt, chosen, rejected) in enumerate(pair_layout):
        q, k, v = query[row:row + 1], key[row:row + 1], value[row:row + 1]
        first = prompt + chosen
        parts = [F.scaled_dot_product_attention(q[:, :, :first], k[:, :, :first], v[:, :, :first], is_causal=True,
                                                dropout_p=dropout, scale=scaling)]
        seen = [slice(0, prompt), slice(first, first + rejected)]
        parts.append(F.scaled_dot_product_attention(
            q[:, :, first:first + rejected], torch.cat([k[:, :, s] for s in seen], 2),
            torch.cat([v[:, :, s] for s in seen], 2), attn_mask=causal_lower_right(rejected, prompt + rejected),
            dropout_p=dropout, scale=scaling))
        padding = query.shape[2] - first - rejected
        if padding:
            parts.append(q.new_zeros(1, q.shape[1], padding, value.shape[-1]))
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def use_pair_attention(model) -> bool:
    """Switch a model that runs SDPA to `ftcli_pairs` (the same SDPA outside pair forwards); whether it runs it."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PAIR_ATTENTION)
    return model.config._attn_implementation == PAIR_ATTENTION


AttentionInterface.register(PAIR_ATTENTION, pair_attention)
AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)
