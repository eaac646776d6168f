"""Exceptions that the CLI turns into one line on stderr and an exit code."""

from __future__ import annotations


class SlimError(Exception):
    """A problem the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(SlimError):
    """Bad input: missing/corrupt/invalid model, unsafe path, bad option value (exit 2)."""

    exit_code = 2


class GateError(SlimError):
    """The optimized model missed its accuracy/speed gate; nothing was written (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class PassError(SlimError):
    """A pass failed; the message names the pass and the passes that ran before it (exit 1)."""

    exit_code = 1
