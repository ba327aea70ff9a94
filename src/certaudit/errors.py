"""Exceptions for bad user input.

Anything the user can get wrong (shapes, ranges, NaN, unknown names, bad files) raises an
:class:`InputError`; the CLI turns it into one line on stderr and exit code 2. Bugs are any
other exception (exit code 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: wrong shape/range, unknown name, unreadable or untrusted file."""


class DataNotFoundError(InputError):
    """A data set is not on disk and cannot be downloaded."""


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, untrusted or inconsistent."""


def require(cond: bool, message: str) -> None:
    """Raise :class:`InputError` with ``message`` unless ``cond`` holds (never ``assert``)."""
    if not cond:
        raise InputError(message)
