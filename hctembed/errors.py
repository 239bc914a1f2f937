"""The errors a user can act on: the CLI prints their message as one line (exit status 2), not a traceback.

Anything else that escapes a command is a bug and keeps its traceback. Subclasses also derive from the builtin
a caller would expect (``ValueError``, ``KeyError``), so ``except ValueError`` keeps working in Python code.
"""


class HctembedError(Exception):
    """An error whose message tells the user what is wrong and what to do."""

    exit_code = 2  # the CLI's exit status for it (documented in docs/quick-start.md, "Exit status")


class InputError(HctembedError, ValueError):
    """Bad input from the user: a file's content, an option's value, a configuration."""


class UnknownNameError(HctembedError, KeyError):
    """A name (model, view, label column, scan id) that is not known; the message lists what is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NothingToDoError(HctembedError):
    """A run asked for work and found none to do (an archive without a single scan): exit status 3, so that a
    script can tell "nothing there" from "done"."""

    exit_code = 3


def first_line(exc: BaseException, *, limit: int = 300) -> str:
    """An exception's message as one short line for a one-line error: its first line, spaces collapsed, at most
    ``limit`` characters; the exception's type name when it has no message."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:limit] if text else type(exc).__name__
