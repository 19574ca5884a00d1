"""The errors ftcli reports to a person: one paragraph with the fix, and the process exit code.

Every module raises these instead of letting a library's traceback reach the terminal; the CLI prints
the message and exits with `exit_code`. What no module anticipated (a library's own exception) still reaches
the person as one paragraph, through `unexpected_error`. Messages pass through `redact`, so a token from the
environment never reaches a terminal or a CI log.
"""

import os
import re
import signal
import sys
import traceback

# Hugging Face user access tokens look like this wherever they come from
_HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_SECRET_NAME = re.compile(r"TOKEN(?!IZ)|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY", re.IGNORECASE)  # not TOKENIZERS_*
# the credentials of a URL (https://user:token@host/...) and the values of its token-like query parameters
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s@]+(?=@)")
_SECRET_QUERY_VALUE = re.compile(r"(?<=[?&])([A-Za-z_-]*(?:token|secret|password|key|signature|sig))=[^&#\s]+",
                                 re.IGNORECASE)
SHORTEST_SECRET = 4  # characters; a shorter value cannot be told apart from the text around it
ALWAYS_SECRET = 8  # characters; a value this long is replaced wherever it appears, even inside a longer word
DEBUG_VARIABLE = "FTCLI_DEBUG"


def redact(text: str) -> str:
    """`text` with every secret replaced by ***: the values of HF_TOKEN, HUGGING_FACE_HUB_TOKEN and any other
    environment variable whose name says it holds a token, secret, password or key, hub-token-shaped strings,
    and the credentials and token parameters of URLs."""
    for secret in sorted(_secret_values(), key=len, reverse=True):
        if len(secret) >= ALWAYS_SECRET:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    text = _URL_CREDENTIALS.sub("***", text)
    text = _SECRET_QUERY_VALUE.sub(r"\1=***", text)
    return _HF_TOKEN_PATTERN.sub("***", text)


def _secret_values() -> set[str]:
    """The values of secret-named environment variables worth replacing.

    Values of 8 characters or more always are. A value of 4 to 7 characters is when it does not read as an
    ordinary word or number ("true", "none", "main", "8080"): replacing those would rewrite ordinary text and
    numbers in messages and in written files (`load_in_4bit: true` in recipe.yaml), so only values that mix
    letters with digits or symbols, or mix case inside the word ("s3cr", "Xk9q2", "pa$$"), are replaced, and
    only where they stand alone, not inside a longer word."""
    values = set()
    for name, value in os.environ.items():
        if not _SECRET_NAME.search(name) or len(value) < SHORTEST_SECRET:
            continue
        ordinary = value.isdigit() or (value.isalpha() and (value.islower() or value.isupper() or value.istitle()))
        if len(value) >= ALWAYS_SECRET or not ordinary:
            values.add(value)
    return values


class FtcliError(Exception):
    """A problem the user can fix; `exit_code` is what the process exits with.

    With several processes, most errors are met by all of them alike (a recipe field, a NaN in the loss they sum
    together), and process 0 alone reports them; one that `can_be_one_process_alone` meets (its own rows, its own
    GPU) is reported by the process that met it."""

    exit_code = 1
    can_be_one_process_alone = False

    def __init__(self, message: str):
        message = redact(message)
        super().__init__(message)
        self.message = message


class BadInput(FtcliError):
    """Something the user gave ftcli is wrong and must be changed before the command can work (exit code 2).

    The subclasses say what: the message's reader knows whether to edit the recipe, the data, a folder or a flag."""

    exit_code = 2


class RecipeError(BadInput):
    """A recipe field, or the combination of fields, is wrong."""


class DataError(BadInput):
    """A dataset file or one of its rows cannot be used; the message names the file and row."""


class ModelError(BadInput):
    """A model folder, config, tokenizer or weight file cannot be loaded or is not supported."""


class OutputFolderError(BadInput):
    """An output folder cannot be written: it exists, is locked by another run, or is not safe to replace."""


class CheckpointError(BadInput):
    """A checkpoint cannot continue this run: it is damaged, or its recipe differs in a field that must match."""


class ExportError(BadInput):
    """An export cannot be made from this output folder with these options."""


class RewardError(BadInput):
    """A GRPO reward cannot be loaded, or failed or returned something unusable while scoring completions."""

    can_be_one_process_alone = True  # each process scores the completions of its own prompts


class InputError(BadInput):
    """A path or value given on the command line is wrong: a missing folder, a memory size that does not parse."""


class TrainingDiverged(FtcliError):
    """The loss became NaN or infinite (exit code 3)."""

    exit_code = 3


class OutOfMemory(FtcliError):
    """The GPU ran out of memory; the message names recipe settings that would fit (exit code 4)."""

    exit_code = 4
    can_be_one_process_alone = True


class Interrupted(FtcliError):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint: exit code 128 + the signal (130 or 143),
    as a shell reports a process killed by it."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class PeerStopped(FtcliError):
    """A collective failed because another process of the run stopped: that process reports why, this one only
    exits (its message would be a second one about the same failure)."""


def first_line(error: BaseException) -> str:
    """The first line of a library exception's message (its type without one), to quote inside a paragraph."""
    return str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__


def unexpected_error(error: BaseException, command: str) -> FtcliError:
    """The paragraph for an exception no ftcli module turned into an error of its own: what failed, in which
    command and where, with the exit code of its kind (4 for CUDA out of memory, 130 for Ctrl-C, else 1)."""
    if isinstance(error, KeyboardInterrupt):
        return Interrupted(f"`ftcli {command}` was interrupted (Ctrl-C).", signal.SIGINT)
    detail = " ".join(str(error).split())[:500].rstrip(".") or "(no message)"
    if _is_cuda_out_of_memory(error):
        return OutOfMemory(f"CUDA ran out of memory during `ftcli {command}`: {detail}. Free GPU memory (nvidia-smi "
                           "lists the processes holding it), or run on the CPU with CUDA_VISIBLE_DEVICES=\"\"; for "
                           "training, `ftcli plan RECIPE.yaml --gpu-memory SIZE` lists recipe changes that fit.")
    if _is_collective_failure(error):
        return PeerStopped(f"`ftcli {command}` stopped: another process of this run stopped first, and the "
                           f"collective this one waited in failed ({detail}). That process's own message says why.")
    unexpected = FtcliError(f"`ftcli {command}` failed: {type(error).__name__}: {detail}{_raised_at(error)}. ftcli did "
                            "not expect this failure, so the reason given is the failing library's own and ftcli cannot "
                            f"name the input to fix. Set {DEBUG_VARIABLE}=1 to see the traceback, and report it if the "
                            "cause is not yours.")
    unexpected.can_be_one_process_alone = True
    return unexpected


def debugging() -> bool:
    """FTCLI_DEBUG=1 asks for the traceback of every failure, on top of its paragraph."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def redacted_traceback(error: BaseException) -> str:
    return redact("".join(traceback.format_exception(error)))


def _is_cuda_out_of_memory(error: BaseException) -> bool:
    # only code that imported torch can run out of GPU memory; reading sys.modules keeps torch out of `ftcli --help`
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _is_collective_failure(error: BaseException) -> bool:
    """A collective of torch.distributed failed, as it does when a process it waited for died: NCCL raises its
    DistError, gloo a RuntimeError from inside torch.distributed."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(error, RuntimeError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, torch.distributed.DistError) or bool(frames) and "torch/distributed/" in frames[-1].filename


def _raised_at(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    return f" (raised at {frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno})"
