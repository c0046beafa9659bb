"""The error types every stage raises. The CLI turns them into one line and an exit code.

PrismError is a runtime failure (exit 1): bad input data, a corrupt checkpoint, a teacher outage.
UsageError is a mistake in how prism was called (exit 2): unknown config key, wrong type, bad YAML.
Anything else escaping a stage is a bug and is shown with its type (and traceback under --debug).
"""

from __future__ import annotations


class PrismError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(PrismError):
    exit_code = 2

