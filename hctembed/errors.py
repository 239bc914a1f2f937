"""The base class of errors a user can act on: the CLI prints their message, not a traceback."""


class HctembedError(Exception):
    """An error whose message tells the user what is wrong and what to do."""
