"""Defense names -> classes, imported on first use.

Every defense class offers ``from_options(model, meta, options) -> Defense``: it takes what it needs
from ``options`` (a dict of CLI-level settings such as ``sigma``, ``n0``, ``n``, ``alpha``, ``eps``,
``batch_size``, ``seed``, ``precision``), fills defaults from the checkpoint's ``meta`` (for example
the training σ), and raises :class:`~certaudit.errors.InputError` for missing or invalid settings.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from torch import nn

from certaudit.defenses.base import Defense
from certaudit.errors import InputError

DEFENSES: dict[str, str] = {
    "smoothing": "certaudit.defenses.smoothing:SmoothedClassifier",
    "lipschitz": "certaudit.defenses.lipschitz:LipschitzDefense",
    "interval": "certaudit.defenses.interval:IntervalDefense",
}


def defense_class(name: str) -> type[Defense]:
    key = str(name).lower()
    if key not in DEFENSES:
        raise InputError(f"unknown defense {name!r}; choose one of: {', '.join(available_defenses())}")
    module, attr = DEFENSES[key].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise InputError(f"defense {name!r} is not available in this version of certaudit") from None
        raise
    return getattr(mod, attr)


def available_defenses() -> list[str]:
    out = []
    for key, target in DEFENSES.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            out.append(key)
    return out


def build_defense(name: str, model: nn.Module, meta: Any, options: dict[str, Any] | None = None) -> Defense:
    """Construct a defense by name around ``model`` (with its checkpoint metadata ``meta``)."""
    return defense_class(name).from_options(model, meta, dict(options or {}))
