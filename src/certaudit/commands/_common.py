"""Helpers shared by CLI verbs: console, JSON output, number parsing."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from typing import Any

from rich.console import Console

from certaudit.errors import InputError

console = Console(stderr=False)
err_console = Console(stderr=True)


def parse_number(text: str | float, name: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    """Parse a number that may be written as a fraction (``8/255``); check range."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(Fraction(s)) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"{name} must be a number like 0.5 or 8/255, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{name} must be finite, got {text!r}")
    if positive and not (value > 0 or (allow_zero and value == 0)):
        raise InputError(f"{name} must be > 0, got {text!r}")
    return value


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout (machine output)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
