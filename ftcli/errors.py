"""The errors ftcli reports to a person: one paragraph with the fix, and the process exit code.

Every module raises these instead of letting a library's traceback reach the terminal; the CLI prints
the message and exits with `exit_code`.
"""


class FtcliError(Exception):
    """A problem the user can fix; `exit_code` is what the process exits with."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RecipeError(FtcliError):
    """The recipe, a file it names, or the data it points to is wrong (exit code 2)."""

    exit_code = 2


class InputError(FtcliError):
    """A path or value given on the command line is wrong: a missing folder, a base model that is not there
    (exit code 2)."""

    exit_code = 2
