"""The one place where user-given numbers are checked (library arguments and CLI options alike).

Every check raises :class:`~certaudit.errors.InputError` with a one-line message naming the value
(``name``) and what it must be, so the CLI prints it as it is and exits with code 2. Numbers may be
written as fractions (``"8/255"``); booleans are never numbers; NaN and ±∞ are refused everywhere, and so
is a number too large for a float (``"1e400"``, a 400-digit integer or fraction). A long input is shown
shortened in the message (:func:`shown`), so a hostile 400-digit argument gives a one-line error.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

from certaudit.errors import InputError

SHOWN_CHARS = 32  # an input longer than this is shortened in error messages


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message; past ``limit`` characters only its start, an ellipsis and the
    full length: ``'10000000000000000000000000000000'… (400 characters)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{value[:limit]!r}… ({len(value)} characters)"
    return f"{text[:limit]}… ({len(text)} characters)"


def _range_text(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"be {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"be {'<' if high_open else '<='} {high:g}"
    return "be finite"


def number(value: Any, name: str, *, low: float | None = None, low_open: bool = False,
           high: float | None = None, high_open: bool = False) -> float:
    """A finite float within the given bounds (``low_open``/``high_open``: the bound itself is refused).
    Strings may be decimals or fractions like ``8/255``."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {shown(value)}")
    try:  # OverflowError: an integer or fraction beyond the float range (10**400, "10...0/1")
        if isinstance(value, numbers.Real):
            v = float(value)
        elif isinstance(value, str):
            s = value.strip()
            try:
                v = float(Fraction(s)) if "/" in s else float(s)
            except (ValueError, ZeroDivisionError):
                raise InputError(f"{name} must be a number like 0.5 or 8/255, got {shown(value)}") from None
        else:
            try:  # 0-dim tensors and arrays
                v = float(value)
            except (TypeError, ValueError):
                raise InputError(f"{name} must be a single number, got {type(value).__name__}") from None
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {shown(value)}")
    if (low is not None and (v < low or (low_open and v == low))) or \
            (high is not None and (v > high or (high_open and v == high))):
        raise InputError(f"{name} must {_range_text(low, low_open, high, high_open)}, got {shown(value)}")
    return v


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer within the bounds; an integral float (``3.0``) is taken, ``3.5``, bools and strings
    that are not integers are refused."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:  # also a string of more digits than Python converts
            raise InputError(f"{name} must be an integer, got {shown(value)}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            (not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer())):
        raise InputError(f"{name} must be an integer, got {shown(value)}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        bound = _range_text(low, False, high, False).replace("lie in ", "in ").replace("be ", "")
        raise InputError(f"{name} must be an integer {bound}, got {shown(value)}")
    return v


def positive(value: Any, name: str) -> float:
    """A finite number > 0 (a radius ε, a noise level σ, a step size)."""
    return number(value, name, low=0.0, low_open=True)


def nonnegative(value: Any, name: str) -> float:
    """A finite number >= 0 (a weight, a start range)."""
    return number(value, name, low=0.0)


def probability(value: Any, name: str) -> float:
    """A number strictly between 0 and 1 (a failure probability α)."""
    return number(value, name, low=0.0, low_open=True, high=1.0, high_open=True)


def count(value: Any, name: str, *, high: int | None = None) -> int:
    """A count of samples, steps or images: an integer >= 1."""
    return integer(value, name, low=1, high=high)


def seed(value: Any, name: str = "seed") -> int:
    """A random seed: any integer, but not a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {shown(value)}")
    return int(value)


def seed_or_draw(value: Any = None, generator: Any = None) -> int | None:
    """A run's base seed: ``value`` (checked), else one integer drawn from ``generator`` (a
    ``torch.Generator``), else None (the caller's default)."""
    if value is not None:
        return seed(value)
    if generator is None:
        return None
    import torch  # validate stays importable without torch for the CLI's argument checks

    if not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def eps(value: Any, name: str = "eps") -> float:
    """A radius ε: a finite number > 0."""
    return positive(value, name)
