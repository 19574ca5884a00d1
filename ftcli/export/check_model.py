"""The model a GGUF file holds against the trained model, on the check's prompts, in one transformers model.

The trained model is the merged weights export writes (LoRA merged in float32, rounded to the 16-bit dtype of
`--merged`); the file's model is the same architecture with the file's weights as llama.cpp reads them. One
model object serves both (its weights replaced), so nothing is built twice. The reference run is made once: the
trained model answers each prompt greedily (GREEDY_TOKENS at most, through its end-of-turn token), and its top
token and logits at every position of prompt + answer are kept. A file then costs one teacher-forced pass over
the same rows. The answer positions are where the trained model writes its own answers to the run's prompts (a
trained model's answers to its training prompts are its training answers, learnt). The file's greedy answer is
the trained model's up to the first answer position where the two top tokens differ (greedy decoding picks each
top token in turn), so that is where the two answers part, found without generating from each file.
"""

from dataclasses import dataclass

import torch

from ftcli.data.formats import Conversation
from ftcli.data.templates import end_of_turn_ids, generation_prompt_ids, prompt_text_ids

GREEDY_TOKENS = 32
MAX_PROMPT_TOKENS = 256  # a longer prompt keeps its end: the check compares two models, it needs no long rows
BATCH_ROWS = 8


@dataclass
class ReferenceRun:
    """What the trained model did on the prompts, kept to compare each file with."""

    rows: list[list[int]]  # each prompt's token ids, then the trained model's greedy answer
    answer: torch.Tensor  # per position of the rows laid end to end: it predicts a token of the answer
    greedy: list[tuple[int, int, str]]  # each answer's first and end position (end to end) and its question
    top: torch.Tensor  # the trained model's top token at every position
    logits: torch.Tensor  # its logits at every position, float32


@dataclass
class Agreement:
    answers: float  # share of answer positions where the file's top token is the trained model's
    every_position: float  # the same share over every position, prompts included
    max_logit_difference: float  # largest |file - trained| logit over every position and token
    greedy_same: int  # greedy answers identical to the trained model's through its end or GREEDY_TOKENS
    first_greedy_difference: str  # where the first answer that differs parts, "" when none does

    def summary(self, answer_positions: int, positions: int, prompts: int) -> dict:
        return {"answers": round(self.answers, 4), "answer_positions": answer_positions,
                "every_position": round(self.every_position, 4), "positions": positions,
                "max_logit_difference": round(self.max_logit_difference, 4), "greedy_same": self.greedy_same,
                "greedy_prompts": prompts, "first_greedy_difference": self.first_greedy_difference}


def reference_run(model, tokenizer, prompts: list[Conversation]) -> ReferenceRun:
    """The trained model's run on the prompts, made once: each file is then one teacher-forced pass against it."""
    prompt_ids = [_prompt_ids(tokenizer, prompt)[-MAX_PROMPT_TOKENS:] for prompt in prompts]
    rows, answer, greedy, position = [], [], [], 0
    for prompt, ids, reply in zip(prompts, prompt_ids, _greedy_answers(model, tokenizer, prompt_ids)):
        rows.append(ids + reply)
        answer += [False] * (len(ids) - 1) + [True] * len(reply) + [False]  # position p predicts token p + 1
        start = position + len(ids) - 1
        greedy.append((start, start + len(reply), prompt[-1]["content"]))
        position += len(ids) + len(reply)
    logits = torch.cat(list(_row_logits(model, rows)))
    return ReferenceRun(rows, torch.tensor(answer), greedy, logits.argmax(-1), logits)


def compare(model, tokenizer, reference: ReferenceRun) -> Agreement:
    """The model now holding a file's weights against the reference run."""
    tops, largest, start = [], 0.0, 0
    for logits in _row_logits(model, reference.rows):
        expected = reference.logits[start:start + len(logits)]
        largest = max(largest, (logits - expected).abs().max().item())
        tops.append(logits.argmax(-1))
        start += len(logits)
    top = torch.cat(tops)
    agree = top == reference.top
    greedy_same, first = 0, ""
    for begin, end, question in reference.greedy:
        parted = (~agree[begin:end]).nonzero()
        if len(parted) == 0:
            greedy_same += 1
        elif not first:
            at = begin + int(parted[0])
            first = (f"{question[:40]!r}: token {at - begin + 1} of {end - begin}, trained "
                     f"{_token_shown(tokenizer, reference.top[at])}, file {_token_shown(tokenizer, top[at])}")
    return Agreement(agree[reference.answer].float().mean().item(), agree.float().mean().item(), largest,
                     greedy_same, first)


def _greedy_answers(model, tokenizer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """The trained model's greedy answer to each prompt, through its end-of-turn token or GREEDY_TOKENS long, all
    prompts in one batch: on a CPU each decoding step costs about as much for one row as for twenty."""
    ends = sorted(answer_end_ids(tokenizer, getattr(model, "generation_config", None)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    width = max(map(len, prompt_ids))
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY_TOKENS, do_sample=False,
                             eos_token_id=ends, pad_token_id=pad)
    answers = []
    for generated in out[:, width:].tolist():
        stop = next((i + 1 for i, token in enumerate(generated) if token in ends), len(generated))
        answers.append(generated[:stop])
    return answers


def answer_end_ids(tokenizer, generation_config=None) -> set[int]:
    """The ids that end the trained model's answers; the end-of-sequence id alone for a run without a chat
    template (raw text)."""
    if not tokenizer.chat_template:
        return {tokenizer.eos_token_id} - {None}
    return end_of_turn_ids(tokenizer, generation_config)


def _prompt_ids(tokenizer, prompt: Conversation) -> list[int]:
    """The prompt as training laid it out: through the chat template, or its text where there is none."""
    if not tokenizer.chat_template:
        return prompt_text_ids(tokenizer, "\n\n".join(message["content"] for message in prompt))
    return generation_prompt_ids(tokenizer, prompt)


def _token_shown(tokenizer, token: torch.Tensor) -> str:
    """The token's text, or its vocabulary entry where the text alone is not valid UTF-8 (part of a character)."""
    text = tokenizer.decode(token)
    return repr(text if "\ufffd" not in text else tokenizer.convert_ids_to_tokens(int(token)))


def _row_logits(model, rows: list[list[int]]):
    """Each row's logits (float32, one row of them per token), computed BATCH_ROWS rows at a time."""
    device = next(model.parameters()).device
    for batch in range(0, len(rows), BATCH_ROWS):
        chunk = rows[batch:batch + BATCH_ROWS]
        width = max(map(len, chunk))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in chunk], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in chunk], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        yield from (logits[index, :len(row)] for index, row in enumerate(chunk))
