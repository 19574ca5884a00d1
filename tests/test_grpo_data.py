"""GRPO prompts (data.format: prompts): each row rendered as `ftcli chat` sends it, its other columns kept for the
rewards, bad rows, the preview, and the arithmetic problems of the recipes."""

import importlib.util
import json
import re

import pytest
from transformers import AutoTokenizer

from conftest import ROOT, assert_clean_failure, run_cli, write_jsonl, write_recipe
from ftcli.data import prepare_data
from ftcli.data.templates import PromptExample, generation_prompt_ids
from ftcli.recipe import DataSettings
from test_preference_data import user

QUESTION = "Maya has 12 apples and buys 7 more. How many apples does she have?"
SYSTEM = {"role": "system", "content": "Reason, then answer in <answer> tags."}
GOOD_ROW = {"prompt": QUESTION, "answer": "19"}
MAX_PROMPT = 60
ARITHMETIC = ROOT / "recipes" / "data"


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


def prompts_recipe(tmp_path, model, rows: list[dict], **data):
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", model, path, tmp_path / "out",
                          data={"format": "prompts", "shuffle": False, **data}, train={"method": "grpo"},
                          grpo={"max_prompt_length": MAX_PROMPT, "max_completion_length": 64,
                                "rewards": [{"builtin": "length", "target": 20}]})
    return recipe, path


def test_a_prompt_is_rendered_as_chat_sends_it_with_its_other_columns(tmp_path, tokenizer):
    rows = [{"question": QUESTION, "answer": "19", "level": 1},
            {"question": [SYSTEM, user("Hi!"), {"role": "assistant", "content": "Hello."}, user(QUESTION)],
             "answer": "19"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = prepare_data(DataSettings(path=str(path), format="prompts", columns={"prompt": "question"}, shuffle=False),
                        tokenizer, MAX_PROMPT, seed=0)
    conversations = [[user(QUESTION)], rows[1]["question"]]
    assert len(data.train) == 2 and all(isinstance(example, PromptExample) for example in data.train)
    for example, conversation, number in zip(data.train, conversations, (1, 2)):
        assert example.prompt_ids == generation_prompt_ids(tokenizer, conversation)
        assert example.prompt_text == tokenizer.apply_chat_template(conversation, tokenize=False,
                                                                    add_generation_prompt=True)
        assert example.prompt_text.endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
        assert example.origin == f"{path} row {number}"
    assert data.train[0].columns == {"answer": "19", "level": 1}
    assert data.train[1].columns == {"answer": "19", "level": None}  # `datasets` gives every row every column
    assert "Reason, then answer" in data.train[1].prompt_text and "Hello." in data.train[1].prompt_text
    lengths = [example.row_length() for example in data.train]
    assert (data.stats.examples, data.stats.tokens, data.stats.lengths) == (2, sum(lengths), lengths)
    assert (data.stats.longest, data.stats.target_tokens, data.stats.truncated) == (max(lengths), 0, 0)


def test_system_prompt_goes_before_prompts_that_have_none(tmp_path, tokenizer):
    rows = [{"prompt": QUESTION, "answer": "19"}, {"prompt": [SYSTEM, user(QUESTION)], "answer": "19"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    settings = DataSettings(path=str(path), format="prompts", shuffle=False, system_prompt="Be brief.")
    added, kept = prepare_data(settings, tokenizer, MAX_PROMPT, seed=0).train
    assert added.prompt_ids == generation_prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."},
                                                                 user(QUESTION)])
    assert kept.prompt_ids == generation_prompt_ids(tokenizer, [SYSTEM, user(QUESTION)])  # its own system turn stays


def test_system_prompt_is_for_prompts_only():
    with pytest.raises(ValueError, match="data.system_prompt applies to data.format prompts only"):
        DataSettings(path="d.jsonl", format="messages", system_prompt="Be brief.")


def test_eval_fraction_holds_out_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {n} + {n}?", "answer": str(2 * n)}
                                              for n in range(10)])
    data = prepare_data(DataSettings(path=str(path), format="prompts", eval_fraction=0.2), tokenizer, MAX_PROMPT,
                        seed=3)
    assert (len(data.train), len(data.eval)) == (8, 2)
    answers = sorted(int(example.columns["answer"]) for example in data.train + data.eval)
    assert answers == [2 * n for n in range(10)]


BAD_ROWS = [
    ({"answer": "1"}, ["format 'prompts' needs the column(s) prompt, but this row has only: answer"]),
    ({"prompt": "  ", "answer": "1"}, ["needs the column(s) prompt", "map your column names"]),
    ({"prompt": [], "answer": "1"}, ["the conversation must be a non-empty list of turns"]),
    ({"prompt": [user("Hm."), {"role": "assistant", "content": "Yes?"}], "answer": "1"},
     ["the prompt (column 'prompt') ends with the assistant's message", "must end with the user's message"]),
    ({"prompt": [user(QUESTION), SYSTEM], "answer": "1"}, ["system message after its first message", "Move it first"]),
    ({"prompt": [SYSTEM, user(" ")], "answer": "1"},
     ["the user's message that ends the prompt (column 'prompt') is empty", "Write the question"]),
    ({"prompt": "Count the apples. " * 20, "answer": "1"},
     ["the prompt is", f"tokens, more than grpo.max_prompt_length {MAX_PROMPT}",
      "Shorten the prompt, or raise grpo.max_prompt_length"]),
]


@pytest.mark.parametrize("row,fragments", BAD_ROWS)
def test_a_bad_row_stops_naming_its_file_row_and_fix(tmp_path, smollm2_folder, row, fragments):
    recipe, path = prompts_recipe(tmp_path, smollm2_folder, [GOOD_ROW, row])
    result = run_cli("data", "preview", recipe)
    assert_clean_failure(result, 2, f"{path} row 2", *fragments, "data.skip_invalid: true")


def test_a_column_named_as_a_reward_argument_is_refused(tmp_path, smollm2_folder):
    recipe, path = prompts_recipe(tmp_path, smollm2_folder, [{"prompt": QUESTION, "prompts": "x"}])
    assert_clean_failure(run_cli("data", "preview", recipe), 2, f"{path} row 1: the column 'prompts' has the name of "
                         "an argument every reward function gets (completions, prompts)", "Rename the column")


def test_skip_invalid_counts_every_bad_row(tmp_path, smollm2_folder, tokenizer):
    rows = [GOOD_ROW] + [row for row, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = prepare_data(DataSettings(path=str(path), format="prompts", skip_invalid=True, shuffle=False), tokenizer,
                        MAX_PROMPT, seed=0)
    assert (data.stats.rows, data.stats.skipped_invalid, len(data.train)) == (len(rows), len(BAD_ROWS), 1)
    assert data.stats.first_invalid.startswith(f"{path} row 2: format 'prompts' needs the column(s) prompt")

    only_bad = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    recipe, _ = prompts_recipe(tmp_path, smollm2_folder, [], skip_invalid=True)
    result = run_cli("data", "preview", recipe, "--set", f"data.path={only_bad}")
    assert_clean_failure(result, 2, f"No prompt in {only_bad} is left to train on",
                         f"skipped all {len(BAD_ROWS)} invalid rows", f"{only_bad} row 1: format 'prompts'")


def test_an_error_quoting_brackets_prints_them_as_they_are(tmp_path, smollm2_folder):
    """Messages quote rows and code, where [i] or [/] would be taken for rich markup and lost."""
    row = {"prompt": [{"role": "user", "content": ["x[i]", "[/]"]}]}
    recipe, path = prompts_recipe(tmp_path, smollm2_folder, [row])
    result = run_cli("data", "preview", recipe)
    assert_clean_failure(result, 2, f"{path} row 1, column 'prompt', turn 1:", "'content': ['x[i]', '[/]']")


def test_preview_shows_the_rendered_prompt_and_its_columns(tmp_path, smollm2_folder, tokenizer):
    rows = [GOOD_ROW, {"prompt": [SYSTEM, user("What is 2 + 2?")], "answer": "4"}, {"prompt": "Hi " * 80}]
    recipe, path = prompts_recipe(tmp_path, smollm2_folder, rows, skip_invalid=True)
    result = run_cli("data", "preview", recipe, "-n", "2")
    assert result.exit_code == 0, result.output
    rendered = tokenizer.apply_chat_template([user(QUESTION)], tokenize=False, add_generation_prompt=True)
    assert f"{path} row 1\n{rendered}answer: 19\n" in result.output
    assert f"{path} row 2\n" in result.output and "What is 2 + 2?<|im_end|>\n<|im_start|>assistant\nanswer: 4" \
        in result.output
    assert "legend: masked (context only)  columns the rewards read" in result.output
    assert "token lengths (per prompt, rendered with the generation prompt)" in result.output
    longest = max(len(generation_prompt_ids(tokenizer, conversation))
                  for conversation in ([user(QUESTION)], [SYSTEM, user("What is 2 + 2?")]))
    assert f"longest {longest} of grpo.max_prompt_length {MAX_PROMPT}" in result.output
    assert "3 rows -> 2 training / 0 eval prompts; 1 invalid rows skipped" in result.output
    assert f"first skipped row: {path} row 3: the prompt is" in " ".join(result.output.split())


@pytest.mark.parametrize("field,value", [("packing", True), ("conversation_extension", 2)])
def test_packing_and_conversation_extension_are_refused(tmp_path, smollm2_folder, field, value):
    recipe, _ = prompts_recipe(tmp_path, smollm2_folder, [GOOD_ROW], **{field: value})
    assert_clean_failure(run_cli("data", "preview", recipe), 2, f"data.{field} does not apply to data.format prompts")


def make_arithmetic():
    spec = importlib.util.spec_from_file_location("make_arithmetic", ARITHMETIC / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_arithmetic_problems_are_valid_prompts_with_right_answers(tokenizer):
    generator = make_arithmetic()
    questions = {}
    for name, count in (("arithmetic-problems.jsonl", 400), ("arithmetic-problems-heldout.jsonl", 40)):
        data = prepare_data(DataSettings(path=str(ARITHMETIC / name), format="prompts", shuffle=False), tokenizer,
                            256, seed=0)
        assert (len(data.train), data.stats.skipped_invalid) == (count, 0)
        for example in data.train:
            columns = example.columns
            numbers, question = columns["numbers"], columns["question"]
            assert example.prompt_text.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
            assert generator.SYSTEM_PROMPT in example.prompt_text
            assert [int(n) for n in re.findall(r"\d+", question)] == numbers  # the numbers as the problem tells them
            assert 1 <= len(columns["operations"]) <= 2 and len(numbers) == len(columns["operations"]) + 1
            assert columns["answer"] == str(generator.answer_of(numbers, columns["operations"]))
            assert int(columns["answer"]) >= 0
        questions[name] = {example.columns["question"] for example in data.train}
    assert len(questions["arithmetic-problems.jsonl"]) == 400
    assert not questions["arithmetic-problems.jsonl"] & questions["arithmetic-problems-heldout.jsonl"]


def test_the_answers_are_recomputed_by_hand():
    """answer_of against arithmetic done here, so a wrong operation in the generator cannot pass unseen."""
    answer_of = make_arithmetic().answer_of
    assert answer_of([12, 7], ["add"]) == 19 and answer_of([12, 7], ["subtract"]) == 5
    assert answer_of([4, 6, 3], ["multiply", "subtract"]) == 21 and answer_of([18, 3, 2], ["divide", "multiply"]) == 12


def test_the_generator_writes_the_committed_files(tmp_path):
    make_arithmetic().write_files(tmp_path)
    for name in ("arithmetic-problems.jsonl", "arithmetic-problems-heldout.jsonl"):
        assert (tmp_path / name).read_text() == (ARITHMETIC / name).read_text(), name
        kinds = {tuple(json.loads(line)["operations"]) for line in (tmp_path / name).read_text().splitlines()}
        assert {("add",), ("subtract",), ("multiply",), ("divide",)} <= kinds  # every operation, alone and paired
        assert any(len(kind) == 2 for kind in kinds)
