"""Write the arithmetic word problems of the GRPO recipe: arithmetic-problems.jsonl and 40 held-out ones.

Each problem takes one or two operations on small whole numbers, in varied wording and with varied names, and its
answer is a whole number of at least 0. `prompt` is the problem after the system prompt of the seeds' GRPO notebook
(reasoning, then the answer, each in its tags); `question` is the problem alone (`data.columns: {prompt: question}`
asks it without the system prompt). Every row keeps the numbers and operations it was made from (`numbers`,
`operations`), so a test can recompute `answer`. Seeded: running it again writes the same files.

    python recipes/data/make_arithmetic.py
"""

import json
import random
from pathlib import Path
from typing import Optional

FOLDER = Path(__file__).resolve().parent
FILES = {"arithmetic-problems.jsonl": 400, "arithmetic-problems-heldout.jsonl": 40}
SEED = 16
SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

NAMES = ["Maya", "Liam", "Sofia", "Noah", "Aisha", "Kenji", "Elena", "Omar", "Priya", "Lucas", "Zoe", "Mateo",
         "Hana", "Ivan", "Chloe", "Tariq", "Nora", "Diego", "Amara", "Felix"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "coins", "stamps", "cards"]
# one sentence per operation: {name}, {thing}, {a} the starting count, {b} the operand
FIRST = {
    "add": ["{name} has {a} {thing} and buys {b} more.", "{name} had {a} {thing}, then found {b} more.",
            "{name} collects {a} {thing} on Monday and {b} more on Tuesday."],
    "subtract": ["{name} has {a} {thing} and gives away {b}.", "{name} had {a} {thing} but lost {b} of them.",
                 "{name} had {a} {thing} and used {b} of them."],
    "multiply": ["{name} has {a} bags with {b} {thing} in each.",
                 "{name} buys {a} packs of {thing}, {b} in each pack."],
    "divide": ["{name} splits {a} {thing} into {b} equal piles and keeps one pile.",
               "{name} shares {a} {thing} equally among {b} children, {name} being one of them."],
}
THEN = {
    "add": ["Then {name} gets {b} more.", "A friend gives {name} {b} more."],
    "subtract": ["Then {name} gives away {b}.", "Later {name} loses {b} of them."],
    "multiply": ["Then the number of {thing} is multiplied by {b}.", "Then {name} ends up with {b} times as many."],
    "divide": ["Then {name} splits them into {b} equal groups and keeps one group."],
}
QUESTION = {1: ["How many {thing} does {name} have now?", "How many {thing} does {name} have?"],
            2: ["How many {thing} does {name} have at the end?", "How many {thing} does {name} have in the end?"]}


def apply(operation: str, left: int, right: int) -> int:
    """One operation on whole numbers; division is only ever made where it is exact."""
    return {"add": left + right, "subtract": left - right, "multiply": left * right, "divide": left // right}[operation]


def answer_of(numbers: list[int], operations: list[str]) -> int:
    """The problem's answer: the operations applied left to right, as the sentences tell them."""
    value = numbers[0]
    for operation, operand in zip(operations, numbers[1:]):
        value = apply(operation, value, operand)
    return value


def operand(rng: random.Random, operation: str, value: int) -> Optional[int]:
    """A small operand that keeps the running value a whole number of at least 0; None when there is none."""
    if operation == "add":
        return rng.randint(1, 20)
    if operation == "subtract":
        return rng.randint(1, value) if value > 0 else None
    if operation == "multiply":
        return rng.randint(2, 6)
    divisors = [d for d in range(2, 7) if value % d == 0]
    return rng.choice(divisors) if divisors else None


def problem(rng: random.Random) -> dict:
    """One word problem with its answer and what it was made from."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    operations = [rng.choice(list(FIRST))] + ([rng.choice(list(THEN))] if rng.random() < 0.5 else [])
    if operations[0] in ("multiply", "divide"):
        numbers = [rng.randint(2, 9)]
        numbers[0] *= 1 if operations[0] == "multiply" else rng.randint(2, 6)
    else:
        numbers = [rng.randint(5, 30)]
    for operation in operations:
        number = operand(rng, operation, answer_of(numbers, operations[:len(numbers) - 1]))
        if number is None:
            return problem(rng)
        numbers.append(number)
    sentences = [rng.choice(FIRST[operations[0]])]
    sentences += [rng.choice(THEN[operation]) for operation in operations[1:]]
    sentences.append(rng.choice(QUESTION[len(operations)]))
    values = {"name": name, "thing": thing, "a": numbers[0]}
    text = " ".join(sentence.format(**values, b=number) for sentence, number in zip(sentences, numbers[1:] + [0]))
    return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
            "question": text, "answer": str(answer_of(numbers, operations)), "numbers": numbers,
            "operations": operations}


def write_files(folder: Path = FOLDER) -> None:
    rng = random.Random(SEED)
    seen = set()
    for file, count in FILES.items():
        rows = []
        while len(rows) < count:
            row = problem(rng)
            if row["question"] not in seen:  # the held-out problems are new ones
                seen.add(row["question"])
                rows.append(row)
        (folder / file).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write_files()
