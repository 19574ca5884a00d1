"""The errors ftcli reports to a person: one paragraph with the fix, and the process exit code.

Every module raises these instead of letting a library's traceback reach the terminal; the CLI prints
the message and exits with `exit_code`. Messages pass through `redact`, so a token from the environment
never reaches a terminal or a CI log.
"""

import os
import re

# Hugging Face user access tokens look like this wherever they come from
_HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_SECRET_NAME = re.compile(r"TOKEN(?!IZ)|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY", re.IGNORECASE)  # not TOKENIZERS_*


def redact(text: str) -> str:
    """`text` with every secret replaced by ***: the values of HF_TOKEN, HUGGING_FACE_HUB_TOKEN and any other
    environment variable whose name says it holds a token, secret, password or key, and hub-token-shaped strings."""
    secrets = sorted((value for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= 8),
                     key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    return _HF_TOKEN_PATTERN.sub("***", text)


class FtcliError(Exception):
    """A problem the user can fix; `exit_code` is what the process exits with."""

    exit_code = 1

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


class InputError(BadInput):
    """A path or value given on the command line is wrong: a missing folder, a memory size that does not parse."""


class TrainingDiverged(FtcliError):
    """The loss became NaN or infinite (exit code 3)."""

    exit_code = 3


class OutOfMemory(FtcliError):
    """The GPU ran out of memory; the message names recipe settings that would fit (exit code 4)."""

    exit_code = 4


class Interrupted(FtcliError):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint: exit code 128 + the signal (130 or 143),
    as a shell reports a process killed by it."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
