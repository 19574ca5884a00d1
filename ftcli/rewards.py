"""GRPO's rewards: the recipe's functions and built-ins, called on a batch of completions, and their scores.

A function of the user's is imported once, before the model loads, so a typo in it costs seconds, not a model load.
When a reward fails or returns something unusable, the run stops with a message that names the reward, the prompt
rows it was scoring and, for an exception, the traceback of the user's own code: ftcli's frames would only hide it.
The built-ins cover the seeds' GRPO notebook: a format regex, the answer against a column, a target length.
"""

import difflib
import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from ftcli.data.templates import PromptExample
from ftcli.errors import RewardError, first_line
from ftcli.recipe import RewardSettings

MODULE_PREFIX = "ftcli_reward_file_"  # + a digest of the file's path: a module name no package of the user's has
SHOWN_ROWS = 5  # prompt rows a message lists before "and N more"
THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")  # 1,234,567.89


@dataclass
class ScoringBatch:
    """What every reward is called on: the completions and, aligned with them, their prompts and columns."""

    completions: list[str]
    prompts: list[str]
    columns: dict[str, list]  # each column of the rows, one value per completion (None where a row lacks it)
    token_counts: list[int]
    origins: list[str]  # each completion's prompt row, for messages


@dataclass
class Reward:
    name: str  # RewardSettings.metric_name()
    weight: float
    described: str  # how messages name it: "reward function correctness in rewards.py (grpo.rewards[0].function)"
    score: Callable[[ScoringBatch], Any]  # one number, or None (no opinion), per completion
    file: Optional[Path] = None  # the user's file, whose frames a traceback shows; None for a built-in


@dataclass
class RewardScores:
    per_reward: torch.Tensor  # (completions, rewards) float32, unweighted, NaN where a reward had no opinion (None)
    total: torch.Tensor  # (completions,) float32: sum over rewards of weight x value, a NaN counting as 0


def load_rewards(settings: list[RewardSettings]) -> list[Reward]:
    """Import every function reward's file once, before the model loads (load_recipe made the paths absolute)."""
    modules: dict[str, ModuleType] = {}
    rewards = []
    for index, reward in enumerate(settings):
        field = f"grpo.rewards[{index}]"
        if reward.builtin:
            described = f"built-in reward {reward.builtin} ({field})"
            rewards.append(Reward(reward.metric_name(), reward.weight, described, _builtin_score(reward, described)))
            continue
        file, _, name = reward.function.rpartition(":")
        if file not in modules:
            modules[file] = _import_file(Path(file), f"{field}.function")
        function = _function_in(modules[file], name, Path(file), f"{field}.function")
        rewards.append(Reward(reward.metric_name(), reward.weight,
                              f"reward function {name} in {file} ({field}.function)",
                              partial(_call_function, function), Path(file)))
    return rewards


def score_completions(rewards: list[Reward], completions: list[str], token_counts: list[int],
                      examples: list[PromptExample]) -> RewardScores:
    """examples[i] is the prompt of completions[i] (the caller repeats each prompt G times); each reward is called
    once for the whole list."""
    names = dict.fromkeys(name for example in examples for name in example.columns)
    batch = ScoringBatch(completions, [example.prompt_text for example in examples],
                         {name: [example.columns.get(name) for example in examples] for name in names},
                         token_counts, [example.origin for example in examples])
    values = [_values(reward, batch) for reward in rewards]
    per_reward = torch.tensor(values, dtype=torch.float32).reshape(len(rewards), len(completions)).T.contiguous()
    weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float32)
    return RewardScores(per_reward, (per_reward.nan_to_num(0.0) * weights).sum(dim=1))


def _import_file(path: Path, field: str) -> ModuleType:
    """The file run as a module of its own name (registered, so its dataclasses and pickling work)."""
    if not path.is_file():
        raise RewardError(f"{field}: the reward file {path} does not exist (FILE in FILE.py:NAME is relative to the "
                          "recipe's folder). Fix the path, or create the file.")
    name = MODULE_PREFIX + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise RewardError(f"{field}: importing the reward file {path} failed with {type(error).__name__}: "
                          f"{first_line(error)}. Fix the file.\n{_user_traceback(error, path)}") from None
    return module


def _function_in(module: ModuleType, name: str, path: Path, field: str) -> Callable:
    function = getattr(module, name, None)
    if function is None:
        defined = [item for item, value in vars(module).items()
                   if inspect.isfunction(value) and value.__module__ == module.__name__]
        close = difflib.get_close_matches(name, defined, n=1)
        raise RewardError(f"{field}: {path} defines no {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                          f"its functions are: {', '.join(defined) or 'none'}. Fix NAME in FILE.py:NAME, or define "
                          "the function.")
    if not callable(function):
        raise RewardError(f"{field}: {name} in {path} is a {type(function).__name__}, not a function. Point "
                          "FILE.py:NAME at a function fn(completions, prompts, **columns).")
    return function


def _call_function(function: Callable, batch: ScoringBatch):
    """Keywords, as TRL passes them, so that a function may take its arguments in any order; copies, so that one
    function editing its lists in place cannot change what the next one gets."""
    return function(completions=list(batch.completions), prompts=list(batch.prompts),
                    **{name: list(values) for name, values in batch.columns.items()})


def _values(reward: Reward, batch: ScoringBatch) -> list[float]:
    """The reward's value for each completion, NaN for None; anything else stops the run, naming the reward."""
    try:
        returned = reward.score(batch)
    except RewardError:
        raise
    except Exception as error:
        hint = (" A function that does not read every column takes **kwargs for the others." if
                isinstance(error, TypeError) and "keyword argument" in str(error) else "")
        raise RewardError(f"{reward.described} raised {type(error).__name__}: {first_line(error)}, scoring the "
                          f"completions of {_rows(batch.origins)}. Fix the function.{hint}\n"
                          f"{_user_traceback(error, reward.file)}") from None
    returned = _as_list(reward, returned, batch)
    return [_as_number(reward, value, index, batch) for index, value in enumerate(returned)]


def _as_list(reward: Reward, returned, batch: ScoringBatch) -> list:
    """A list or tuple as it is, a 1-D array or tensor as its list; any other shape or length is an error, naming
    the prompt rows of the call."""
    count = len(batch.completions)
    wanted = (f"it must return one number, or None for no opinion, per completion, in their order ({count} "
              f"here, the completions of {_rows(batch.origins)}), as a list.")
    if getattr(returned, "ndim", 1) != 1:
        raise RewardError(f"{reward.described} returned an array of shape {tuple(returned.shape)}; {wanted}")
    if hasattr(returned, "tolist"):
        returned = returned.tolist()
    if not isinstance(returned, (list, tuple)):
        raise RewardError(f"{reward.described} returned a {type(returned).__name__} ({returned!r:.80}); {wanted}")
    if len(returned) != count:
        raise RewardError(f"{reward.described} returned {len(returned)} values for {count} completions; {wanted}")
    return list(returned)


def _as_number(reward: Reward, value, index: int, batch: ScoringBatch) -> float:
    if value is None:
        return math.nan
    which = f"for completion {index + 1} of {len(batch.completions)} (an answer to {batch.origins[index]})"
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{reward.described} returned {value!r:.80} ({type(value).__name__}) {which}, which is "
                          "not a number. Return a float, or None for no opinion.")
    if not math.isfinite(value):
        raise RewardError(f"{reward.described} returned {value} {which}; a NaN or an infinity is not a usable "
                          "number here. Return a finite float, or None for no opinion.")
    return float(value)


def _user_traceback(error: BaseException, file: Optional[Path]) -> str:
    """The traceback's frames in the user's file only, and the exception (a syntax error with its line)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if file and frame.filename == str(file)]
    return "".join(["Traceback (your code only):\n", *traceback.format_list(frames),
                    *traceback.format_exception_only(error)]).rstrip()


def _rows(origins: list[str]) -> str:
    """The distinct prompt rows, the first few of them."""
    distinct = list(dict.fromkeys(origins))
    more = f" and {len(distinct) - SHOWN_ROWS} more rows" if len(distinct) > SHOWN_ROWS else ""
    return ", ".join(distinct[:SHOWN_ROWS]) + more


def _builtin_score(settings: RewardSettings, described: str) -> Callable[[ScoringBatch], list[float]]:
    if settings.builtin == "length":
        return partial(_length_scores, settings.target)
    pattern = re.compile(settings.pattern, re.DOTALL)
    if settings.builtin == "regex_format":
        return partial(_format_scores, pattern)
    return partial(_answer_scores, pattern, settings.column, described)


def _format_scores(pattern: re.Pattern, batch: ScoringBatch) -> list[float]:
    """1 where the pattern matches anywhere in the completion."""
    return [float(pattern.search(completion) is not None) for completion in batch.completions]


def _length_scores(target: int, batch: ScoringBatch) -> list[float]:
    """1 at the target length, falling linearly to 0 at no tokens and at twice the target, 0 beyond."""
    return [max(0.0, 1.0 - abs(count - target) / target) for count in batch.token_counts]


def _answer_scores(pattern: re.Pattern, column: str, described: str, batch: ScoringBatch) -> list[float]:
    """1 where the pattern's last match in the completion (its first group, if it has one) is the row's answer."""
    expected = batch.columns.get(column, [None] * len(batch.completions))
    scores = []
    for index, (completion, answer) in enumerate(zip(batch.completions, expected)):
        if answer is None or not str(answer).strip():
            present = [name for name, values in batch.columns.items() if values[index] is not None]
            raise RewardError(f"{described} compares with the column {column!r}, which {batch.origins[index]} does "
                              f"not have (its columns: {', '.join(present) or 'none'}). Add the answer to every "
                              "row, or set the reward's column: to the column holding it.")
        matches = list(pattern.finditer(completion))
        given = (matches[-1].group(1) if pattern.groups else matches[-1].group(0)) if matches else None
        scores.append(float(given is not None and same_answer(given, str(answer))))
    return scores


def same_answer(given: str, expected: str) -> bool:
    """Equal as numbers when both read as numbers ($1,234. and 1234 do), else equal as stripped strings."""
    given_number, expected_number = read_number(given), read_number(expected)
    if given_number is not None and expected_number is not None:
        return given_number == expected_number
    return given.strip() == expected.strip()


def read_number(text: str) -> Optional[float]:
    """The number a person wrote: spaces, a $, thousands commas and a trailing period allowed; else None."""
    cleaned = text.replace(" ", "").replace("$", "").rstrip(".")
    if THOUSANDS.fullmatch(cleaned):
        cleaned = cleaned.replace(",", "")
    try:
        number = float(cleaned)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
