"""Helpers shared by CLI verbs: console, JSON output, number parsing."""

from __future__ import annotations

import hashlib
import json
import sys
from fractions import Fraction
from pathlib import Path
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


MODEL_HELP = ("certaudit checkpoint (.safetensors), or a Python factory package.module:function returning an "
              "nn.Module that takes [0,1] images (with --weights and --dataset)")
WEIGHTS_HELP = ("with a factory --model: its weights (safetensors, or a PyTorch state dict read with "
                "weights_only=True; never unpickled code)")


def load_model_for_data(model: Any, dataset: str | None, dev: Any,
                        weights: Any = None) -> tuple[Any, Any, Any, str]:
    """The model on ``dev``, its metadata, the data set's description (default: the model's own) and
    the SHA-256 that binds result files to these weights; refuses a data set whose image shape or
    class count the model does not take.

    ``model`` is a certaudit checkpoint, or a factory ``package.module:function`` (the user's own
    architecture: the module is imported, as running the user's script would) whose weights come from
    ``weights``; its input shape and classes are the data set's (``dataset`` is then required)."""
    from certaudit.data import dataset_info, sha256_file
    from certaudit.models import load_checkpoint, load_factory

    spec = str(model)
    if weights is not None or (":" in spec and not Path(spec).exists()):
        if not dataset:
            raise InputError("a factory --model needs --dataset (it fixes the input shape and the classes)")
        info = dataset_info(dataset)
        net, meta = load_factory(spec, weights, info.shape, info.num_classes, info.name, dev)
        sha = hashlib.sha256(f"{spec}|{sha256_file(weights)}".encode()).hexdigest()
    else:
        net, meta = load_checkpoint(model, dev)
        info = dataset_info(dataset or meta.dataset)
        sha = sha256_file(model)
    if list(info.shape) != list(meta.input_shape):
        raise InputError(f"model {model} expects inputs {tuple(meta.input_shape)}, data set {info.name} has {info.shape}")
    if info.num_classes != meta.num_classes:
        raise InputError(f"model {model} has {meta.num_classes} classes, data set {info.name} has {info.num_classes}")
    return net, meta, info, sha


LONG_RUN_SECONDS = 600.0


def say_if_long(enabled: bool) -> Any:
    """An ``estimate`` callback for the run loop: one stderr line when the rest of a run is projected
    to take more than :data:`LONG_RUN_SECONDS` (rerunning resumes, so stopping loses little)."""
    def estimate(seconds: float, images: int) -> None:
        if enabled and seconds > LONG_RUN_SECONDS:
            hours = seconds / 3600
            when = f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"
            err_console.print(f"expected time for the remaining {images} images: about {when} on this machine "
                              "(Ctrl-C stops; rerunning the same command resumes)")
    return estimate


def check_output(path: Any, flag: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a folder where a file is meant (or
    the reverse), something that is not a regular file (``/dev/full``), a parent that is a file or
    is read-only. Missing parent folders are created."""
    import os

    if path is None:
        return
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise InputError(f"{flag} {p} exists and is not a folder")
        if not folder and p.is_dir():
            raise InputError(f"{flag} {p} is a folder; give a file name")
        if not folder and not p.is_file():
            raise InputError(f"{flag} {p} is not a regular file")
        if not os.access(p, os.W_OK):
            raise InputError(f"{flag} {p} is not writable")
        return
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{flag} {p}: {anc} is not a folder")
    if not os.access(anc, os.W_OK):
        raise InputError(f"{flag} {p}: the folder {anc} is not writable")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{flag} {p}: cannot create {p.parent} ({exc.strerror})") from None


def progress_bar(enabled: bool):
    """A transient rich progress bar on stderr (disabled: a no-op with the same interface)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True, disable=not enabled)
