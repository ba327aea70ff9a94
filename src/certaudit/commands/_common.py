"""Helpers shared by CLI verbs: the console, JSON output, number parsing (see :mod:`certaudit.validate`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from certaudit import validate
from certaudit.errors import InputError
from certaudit.audits.session import check_output, err_console, load_model_for_data, progress_bar, say_if_long
from certaudit.commands.options import MODEL_HELP, WEIGHTS_HELP

console = Console(stderr=False)


def parse_number(text: str | float, name: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    """A CLI number (fractions like ``8/255`` allowed): finite; ``positive``: > 0, or >= 0 with ``allow_zero``."""
    if not positive:
        return validate.number(text, name)
    return validate.number(text, name, low=0.0, low_open=not allow_zero)


def parse_list(text: str, name: str, *, allow_zero: bool = True) -> list[float]:
    """A comma list of distinct radii (each >= 0, or > 0 without ``allow_zero``), sorted."""
    parts = str(text).replace(" ", "").split(",")
    if not any(parts):
        raise InputError(f"{name} needs at least one radius, e.g. 0,0.25,0.5")
    if not all(parts):
        raise InputError(f"{name} has an empty entry: {text!r} (write e.g. 0,0.25,0.5)")
    values = [parse_number(p, name, positive=True, allow_zero=allow_zero) for p in parts]
    if len(set(values)) != len(values):
        raise InputError(f"{name} lists a radius twice: {text!r}")
    return sorted(values)


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout (machine output)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


__all__ = ["MODEL_HELP", "WEIGHTS_HELP", "check_output", "console", "err_console", "load_model_for_data",
           "parse_list", "parse_number", "print_json", "progress_bar", "say_if_long"]
