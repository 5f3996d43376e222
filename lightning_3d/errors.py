"""The project's own error type for bad input: a configuration, layout, data or checkpoint problem."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input the user can fix, with its numbers in the message.

    A ``ValueError`` (so ``except ValueError`` keeps working); the CLI prints it as one line
    with no traceback, while any other ``ValueError`` (from torch, or the user's own code)
    keeps its traceback.
    """
