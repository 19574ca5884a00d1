"""Reward functions for GRPO, in the shape of the seeds' GRPO notebook: copy this file next to your recipe and edit.

A recipe names each function as `{function: grpo_rewards.py:NAME, weight: W}` (the file relative to the recipe).
ftcli calls a function once per batch, with keywords:

- `completions`: the model's answers, list[str];
- `prompts`: the rendered prompts they answer, list[str], one per completion (a prompt repeats for its G answers);
- every other column of the data rows, by its name, as a list aligned with the completions (here `answer`).

It returns one float per completion, or None where it has no opinion (counted as 0 in the total, left out of its
reward/NAME metric). Take `**columns` for the columns a function does not read. An exception or a list of the
wrong length stops the run with a message naming the function and the rows.
"""

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# the whole completion: reasoning, then the answer, each in its tags on lines of their own
STRICT_FORMAT = re.compile(r"^<reasoning>\n.+?\n</reasoning>\n<answer>\n.+?\n</answer>\s*$", re.DOTALL)


def correctness(completions: list[str], prompts: list[str], answer: list[str], **columns) -> list[float]:
    """2.0 when the text inside the last <answer>...</answer> is the row's answer, else 0.0. GSM8K's answers hold
    the worked solution, then "#### " and the number: only the number counts."""
    return [2.0 if answer_in(completion) == expected.split("####")[-1].strip() else 0.0
            for completion, expected in zip(completions, answer)]


def strict_format(completions: list[str], **columns) -> list[float]:
    """0.5 when the completion is exactly <reasoning>...</reasoning> then <answer>...</answer>, else 0.0."""
    return [0.5 if STRICT_FORMAT.match(completion) else 0.0 for completion in completions]


def answer_in(completion: str) -> str:
    """The text of the completion's last <answer> tag, stripped; empty when it has none."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else ""
