"""GRPO rewards: functions imported from the user's file and called on a batch, the built-ins' values, the weighted
total, and every way a reward can fail, each a RewardError (exit 2) naming the reward, the rows and the fix."""

import json
import math
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, write_recipe
from ftcli.data.templates import PromptExample
from ftcli.errors import RewardError
from ftcli.recipe import RewardSettings, load_recipe
from ftcli.rewards import MODULE_PREFIX, load_rewards, read_number, same_answer, score_completions

EXAMPLE_FILE = ROOT / "recipes" / "grpo_rewards.py"


def reward_file(tmp_path, source: str, name: str = "my_rewards.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def rewards(*entries: dict):
    return load_rewards([RewardSettings(**entry) for entry in entries])


def examples(*answers, column: str = "answer") -> list[PromptExample]:
    """One prompt per answer, from rows 1, 2, ... of problems.jsonl."""
    return [PromptExample([1, 2, 3], f"prompt {number}", {column: answer}, f"problems.jsonl row {number}")
            for number, answer in enumerate(answers, start=1)]


def score(loaded, completions: list[str], answers=None, token_counts=None):
    answers = answers if answers is not None else ["1"] * len(completions)
    return score_completions(loaded, completions, token_counts or [5] * len(completions), examples(*answers))


def failure(loaded, completions: list[str], answers=None, token_counts=None) -> str:
    with pytest.raises(RewardError) as caught:
        score(loaded, completions, answers, token_counts)
    assert caught.value.exit_code == 2
    return caught.value.message


def load_failure(*entries: dict) -> str:
    with pytest.raises(RewardError) as caught:
        rewards(*entries)
    assert caught.value.exit_code == 2
    return caught.value.message


def test_a_function_gets_completions_prompts_and_columns_by_keyword(tmp_path):
    path = reward_file(tmp_path, """
        CALLS = []

        def seen(prompts, completions, answer, level):
            CALLS.append({"completions": completions, "prompts": prompts, "answer": answer, "level": level})
            return [float(len(c)) for c in completions]
    """)
    loaded = rewards({"function": f"{path}:seen", "weight": 2.0})
    rows = [PromptExample([1], "P1", {"answer": "4", "level": 1}, "row 1"),
            PromptExample([1], "P2", {"answer": "5"}, "row 2")]
    scores = score_completions(loaded, ["a", "bb", "ccc"], [1, 1, 1], [rows[0], rows[0], rows[1]])
    module = sys.modules[loaded[0].score.args[0].__module__]
    assert module.CALLS == [{"completions": ["a", "bb", "ccc"], "prompts": ["P1", "P1", "P2"],
                             "answer": ["4", "4", "5"], "level": [1, 1, None]}]
    assert loaded[0].name == "seen" and loaded[0].weight == 2.0
    assert scores.per_reward.dtype == torch.float32 and scores.per_reward.shape == (3, 1)
    torch.testing.assert_close(scores.per_reward[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(scores.total, torch.tensor([2.0, 4.0, 6.0]))


def test_the_total_is_weighted_and_none_is_nan_counting_zero(tmp_path):
    path = reward_file(tmp_path, """
        def half(completions, **columns):
            return [0.5, None, 1.0]

        def sign(completions, **columns):
            return (-1, 1, None)
    """)
    loaded = rewards({"function": f"{path}:half", "weight": 2.0}, {"function": f"{path}:sign", "weight": 0.25,
                                                                   "name": "direction"})
    scores = score(loaded, ["x", "y", "z"])
    assert [reward.name for reward in loaded] == ["half", "direction"]
    expected = torch.tensor([[0.5, -1.0], [math.nan, 1.0], [1.0, math.nan]])
    torch.testing.assert_close(scores.per_reward, expected, equal_nan=True)
    torch.testing.assert_close(scores.total, torch.tensor([2 * 0.5 - 0.25, 0.25, 2.0]))


def test_a_function_editing_its_lists_changes_nothing_for_the_next(tmp_path):
    path = reward_file(tmp_path, """
        def greedy(completions, answer, **columns):
            completions.clear()
            answer[0] = "changed"
            return [1.0, 1.0]

        def fair(completions, answer, **columns):
            return [float(c == a) for c, a in zip(completions, answer)]
    """)
    loaded = rewards({"function": f"{path}:greedy"}, {"function": f"{path}:fair"})
    torch.testing.assert_close(score(loaded, ["1", "2"], answers=["1", "2"]).per_reward[:, 1], torch.tensor([1.0, 1.0]))


def test_a_function_file_is_relative_to_the_recipe(tmp_path, smollm2_folder):
    (tmp_path / "recipe").mkdir()
    reward_file(tmp_path / "recipe", "def short(completions, **columns):\n    return [-len(c) for c in completions]\n")
    recipe = write_recipe(tmp_path / "recipe" / "r.yaml", smollm2_folder, "prompts.jsonl", tmp_path / "out",
                          data={"format": "prompts"}, train={"method": "grpo"},
                          grpo={"max_prompt_length": 32, "max_completion_length": 32,
                                "rewards": [{"function": "my_rewards.py:short", "weight": 0.5}]})
    loaded = load_rewards(load_recipe(recipe).grpo.rewards)
    assert loaded[0].file == tmp_path / "recipe" / "my_rewards.py"
    torch.testing.assert_close(score(loaded, ["abc", ""]).total, torch.tensor([-1.5, 0.0]))


@pytest.mark.parametrize("returned", ["numpy.array([1.0, 0.0])", "torch.tensor([1, 0])", "[True, False]",
                                      "[numpy.float32(1.0), 0]"])
def test_arrays_tensors_and_bools_are_numbers(tmp_path, returned):
    path = reward_file(tmp_path, f"""
        import numpy, torch

        def values(completions, **columns):
            return {returned}
    """)
    torch.testing.assert_close(score(rewards({"function": f"{path}:values"}), ["x", "y"]).total,
                               torch.tensor([1.0, 0.0]))


def test_each_file_is_imported_once_under_a_name_that_cannot_clash(tmp_path):
    log = tmp_path / "imports.log"
    path = reward_file(tmp_path, f"""
        import json  # the standard library's, not this file, although this file is json.py
        with open({str(log)!r}, "a") as log:
            log.write("imported\\n")

        def one(completions, **columns):
            return [json.loads("1")] * len(completions)

        def two(completions, **columns):
            return [2] * len(completions)
    """, name="json.py")
    loaded = rewards({"function": f"{path}:one"}, {"builtin": "length", "target": 5}, {"function": f"{path}:two"})
    assert log.read_text() == "imported\n"
    torch.testing.assert_close(score(loaded, ["x"]).per_reward, torch.tensor([[1.0, 1.0, 2.0]]))
    module_name = loaded[0].score.args[0].__module__
    assert module_name.startswith(MODULE_PREFIX) and module_name == loaded[2].score.args[0].__module__
    assert sys.modules["json"] is json


def test_a_missing_file_names_the_field_and_the_fix(tmp_path):
    message = load_failure({"builtin": "length", "target": 5}, {"function": f"{tmp_path}/nowhere.py:score"})
    assert message.startswith(f"grpo.rewards[1].function: the reward file {tmp_path}/nowhere.py does not exist")
    assert "relative to the recipe's folder" in message and "Fix the path" in message


def test_a_syntax_error_shows_the_users_line_only(tmp_path):
    path = reward_file(tmp_path, """
        def broken(completions, **columns)
            return [1.0] * len(completions)
    """)
    message = load_failure({"function": f"{path}:broken"})
    assert message.startswith(f"grpo.rewards[0].function: importing the reward file {path} failed with SyntaxError")
    assert f'File "{path}", line 2' in message and "def broken(completions, **columns)" in message
    assert "importlib" not in message and "ftcli" not in message.replace(MODULE_PREFIX, "")


def test_an_import_error_shows_the_users_frames_only(tmp_path):
    path = reward_file(tmp_path, """
        import math

        def helper():
            import no_such_package_for_ftcli

        helper()
    """)
    message = load_failure({"function": f"{path}:anything"})
    assert "failed with ModuleNotFoundError: No module named 'no_such_package_for_ftcli'. Fix the file." in message
    trace = message.split("Traceback (your code only):\n")[1]
    assert [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")] == [
        f'File "{path}", line 7, in <module>', f'File "{path}", line 5, in helper']
    assert "importlib" not in message and "<frozen" not in message and "ftcli/rewards.py" not in message
    assert not any(name.startswith(MODULE_PREFIX) and module.__file__ == str(path)
                   for name, module in sys.modules.items() if hasattr(module, "__file__"))


def test_a_missing_name_lists_the_files_functions(tmp_path):
    path = reward_file(tmp_path, """
        from math import isclose

        def correctness(completions, **columns):
            return [1.0] * len(completions)

        def strict_format(completions, **columns):
            return [1.0] * len(completions)
    """)
    message = load_failure({"function": f"{path}:corectness"})
    assert message == (f"grpo.rewards[0].function: {path} defines no 'corectness' (did you mean 'correctness'?); its "
                       "functions are: correctness, strict_format. Fix NAME in FILE.py:NAME, or define the function.")


def test_a_name_that_is_not_a_function(tmp_path):
    path = reward_file(tmp_path, "THRESHOLD = 0.5\n")
    message = load_failure({"function": f"{path}:THRESHOLD"})
    assert message.startswith(f"grpo.rewards[0].function: THRESHOLD in {path} is a float, not a function.")
    assert "fn(completions, prompts, **columns)" in message


def test_an_exception_names_the_function_the_rows_and_shows_the_users_traceback(tmp_path):
    path = reward_file(tmp_path, """
        def parse(text):
            return int(text)

        def exact(completions, **columns):
            scores = []  # a loop, not a comprehension, which Python 3.12 no longer shows as a frame of its own
            for completion in completions:
                scores.append(float(parse(completion)))
            return scores
    """)
    loaded = rewards({"builtin": "length", "target": 5}, {"function": f"{path}:exact"})
    message = failure(loaded, ["1", "2", "two"], answers=["1", "2", "3"])
    assert message.startswith(f"reward function exact in {path} (grpo.rewards[1].function) raised ValueError: "
                              "invalid literal for int() with base 10: 'two', scoring the completions of "
                              "problems.jsonl row 1, problems.jsonl row 2, problems.jsonl row 3. Fix the function.")
    trace = message.split("Traceback (your code only):\n")[1].splitlines()
    assert [line.strip() for line in trace if line.strip().startswith("File ")] == [
        f'File "{path}", line 8, in exact', f'File "{path}", line 3, in parse']
    assert trace[-1] == "ValueError: invalid literal for int() with base 10: 'two'"
    assert "ftcli/rewards.py" not in message


def test_a_function_that_refuses_a_column_is_told_about_kwargs(tmp_path):
    path = reward_file(tmp_path, """
        def narrow(completions, prompts):
            return [1.0] * len(completions)
    """)
    message = failure(rewards({"function": f"{path}:narrow"}), ["x"])
    assert "raised TypeError: narrow() got an unexpected keyword argument 'answer'" in message
    assert "A function that does not read every column takes **kwargs for the others." in message


def test_the_rows_of_a_large_call_are_cut_short(tmp_path):
    path = reward_file(tmp_path, "def fails(completions, **columns):\n    raise KeyError('x')\n")
    message = failure(rewards({"function": f"{path}:fails"}), ["c"] * 8, answers=[str(n) for n in range(8)])
    assert ("scoring the completions of problems.jsonl row 1, problems.jsonl row 2, problems.jsonl row 3, "
            "problems.jsonl row 4, problems.jsonl row 5 and 3 more rows.") in message


BAD_RETURNS = [
    ("[1.0]", "returned 1 values for 3 completions; it must return one number, or None for no opinion, per "
              "completion, in their order (3 here, the completions of"),
    ("1.0", "returned a float (1.0); it must return one number"),
    ("'1 0 1'", "returned a str ('1 0 1'); it must return one number"),
    ("(c for c in completions)", "returned a generator"),
    ("numpy.ones((3, 1))", "returned an array of shape (3, 1); it must return one number"),
    ("[1.0, '0.5', 1.0]", "returned '0.5' (str) for completion 2 of 3 (an answer to problems.jsonl row 2), which is "
                          "not a number. Return a float, or None for no opinion."),
    ("[1.0, 1.0, float('nan')]", "returned nan for completion 3 of 3 (an answer to problems.jsonl row 3); a NaN or "
                                 "an infinity is not a usable number here. Return a finite float, or None"),
    ("[math.inf, 1.0, 1.0]", "returned inf for completion 1 of 3 (an answer to problems.jsonl row 1); a NaN"),
]


@pytest.mark.parametrize("returned,fragment", BAD_RETURNS)
def test_a_bad_return_names_the_function_what_it_returned_and_the_row(tmp_path, returned, fragment):
    path = reward_file(tmp_path, f"""
        import math, numpy

        def bad(completions, **columns):
            return {returned}
    """)
    message = failure(rewards({"function": f"{path}:bad"}), ["x", "y", "z"])
    assert message.startswith(f"reward function bad in {path} (grpo.rewards[0].function) ")
    assert fragment in message


def test_regex_format_matches_anywhere_across_lines():
    loaded = rewards({"builtin": "regex_format", "pattern": r"<reasoning>.+</reasoning>\s*<answer>"})
    completions = ["<reasoning>\nstep 1\nstep 2\n</reasoning>\n<answer>4</answer>", "I think <reasoning>x</reasoning> "
                   "<answer>", "<answer>4</answer>", ""]
    torch.testing.assert_close(score(loaded, completions).total, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    anchored = rewards({"builtin": "regex_format", "pattern": r"^<answer>\d+</answer>$"})
    torch.testing.assert_close(score(anchored, ["<answer>4</answer>", "so <answer>4</answer>"]).total,
                               torch.tensor([1.0, 0.0]))


def test_answer_match_compares_the_last_match_numbers_as_numbers():
    loaded = rewards({"builtin": "answer_match", "pattern": r"<answer>(.*?)</answer>", "weight": 3.0})
    cases = [("<answer>7</answer> no, <answer>19</answer>", "19", 1.0),  # the last match
             ("<answer>19</answer> no, <answer>7</answer>", "19", 0.0),
             ("<answer> $1,234. </answer>", "1234", 1.0),
             ("<answer>3.50</answer>", "3.5", 1.0),
             ("<answer>12,34</answer>", "1234", 0.0),  # not a thousands comma: compared as text
             ("<answer> Paris </answer>", "Paris", 1.0),
             ("<answer>paris</answer>", "Paris", 0.0),
             ("<answer>\n19\n</answer>", "19", 1.0),  # DOTALL: the group spans lines
             ("the answer is 19", "19", 0.0)]  # no match
    scores = score(loaded, [case[0] for case in cases], answers=[case[1] for case in cases])
    torch.testing.assert_close(scores.per_reward[:, 0], torch.tensor([case[2] for case in cases]))
    torch.testing.assert_close(scores.total, 3.0 * torch.tensor([case[2] for case in cases]))


def test_answer_match_without_a_group_takes_the_whole_match_and_reads_another_column():
    loaded = rewards({"builtin": "answer_match", "pattern": r"-?\d+", "column": "solution"})
    scores = score_completions(loaded, ["3 apples and 4 pears: 7", "7, or 8"], [3, 3],
                               examples("7", "7", column="solution"))
    torch.testing.assert_close(scores.total, torch.tensor([1.0, 0.0]))


def test_answer_match_on_a_row_without_the_column_names_the_column_and_row():
    loaded = rewards({"builtin": "length", "target": 3}, {"builtin": "answer_match", "pattern": r"(\d+)"})
    rows = examples("4", "5") + [PromptExample([1], "p", {"solution": "6"}, "problems.jsonl row 3")]
    with pytest.raises(RewardError) as caught:
        score_completions(loaded, ["4", "5", "6"], [1, 1, 1], rows)
    assert caught.value.exit_code == 2
    assert caught.value.message == (
        "built-in reward answer_match (grpo.rewards[1]) compares with the column 'answer', which problems.jsonl row 3 "
        "does not have (its columns: solution). Add the answer to every row, or set the reward's column: to the "
        "column holding it.")


def test_length_peaks_at_the_target_and_falls_linearly():
    loaded = rewards({"builtin": "length", "target": 10})
    counts = [0, 5, 10, 15, 20, 30, 1]
    scores = score(loaded, ["x"] * len(counts), token_counts=counts)
    torch.testing.assert_close(scores.total, torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0, 0.0, 0.1]))


@pytest.mark.parametrize("text,number", [("42", 42.0), (" $1,234,567.5 ", 1234567.5), ("19.", 19.0), ("-3", -3.0),
                                         ("$ 7", 7.0), ("0.25", 0.25), ("nineteen", None), ("nan", None),
                                         ("inf", None), ("1,23", None), ("", None)])
def test_read_number(text, number):
    assert read_number(text) == number


def test_same_answer_falls_back_to_text_when_one_side_is_no_number():
    assert same_answer("19", "19.0") and same_answer(" 19 ", "$19")
    assert same_answer(" x = 1 ", "x = 1") and not same_answer("19 apples", "19")


def test_the_example_file_scores_the_notebooks_way():
    loaded = rewards({"function": f"{EXAMPLE_FILE}:correctness"}, {"function": f"{EXAMPLE_FILE}:strict_format"})
    completions = ["<reasoning>\n12 + 7 = 19\n</reasoning>\n<answer>\n19\n</answer>\n",
                   "<reasoning>\n12 + 7 = 18\n</reasoning>\n<answer>\n18\n</answer>",
                   "The answer is <answer>19</answer>",
                   "<reasoning>\nhm\n</reasoning>\n<answer>\n19\n</answer> and more",
                   "19"]
    scores = score(loaded, completions, answers=["19"] * len(completions))
    torch.testing.assert_close(scores.per_reward, torch.tensor([[2.0, 0.5], [0.0, 0.5], [2.0, 0.0], [2.0, 0.0],
                                                                [0.0, 0.0]]))
    torch.testing.assert_close(scores.total, torch.tensor([2.5, 0.5, 2.0, 2.0, 0.0]))


def test_the_example_correctness_reads_gsm8k_answers():
    loaded = rewards({"function": f"{EXAMPLE_FILE}:correctness"})
    worked = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    scores = score(loaded, ["<answer>72</answer>", "<answer>24</answer>"], answers=[worked, worked])
    assert scores.total.tolist() == [2.0, 0.0]
