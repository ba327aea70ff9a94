"""Tiny pretrained models and a test subset shipped inside the package (the embedded default).

Trained by ``scripts/train_zoo.py`` (rerunnable; see ``manifest.json`` for the settings, SHA-256
sums and test accuracies): 2C2F networks on scikit-learn's 8×8 digits --

* ``digits_gaussian``: Gaussian-noise training (σ = 0.25), the base model of randomized smoothing;
* ``digits_gloro_eps``: GloRo training at ε = 0.25 (ℓ2), certified at ε by the Lipschitz defense;
* ``digits_gloro_2eps``: GloRo training at 2ε = 0.5, certified at ε (the double-radius defense of
  §4.1 of the degradation paper).

``digits_test.npz`` holds the 360 test images of ``load_dataset("digits", "test")`` (uint8 0..16,
divided by 16 on load), so the demo needs neither a download nor scikit-learn's data files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certaudit.errors import CheckpointError

ZOO_DIR = Path(__file__).resolve().parent


def manifest() -> dict[str, Any]:
    """The zoo's manifest: models (file, sha256, method, σ or ε, test accuracy) and data."""
    return json.loads((ZOO_DIR / "manifest.json").read_text(encoding="utf-8"))


def model_path(name: str) -> Path:
    """Path of a shipped checkpoint, checked against the manifest's SHA-256."""
    models = manifest()["models"]
    if name not in models:
        raise CheckpointError(f"no zoo model {name!r}; shipped: {', '.join(models)}")
    path = ZOO_DIR / models[name]["file"]
    _check(path, models[name]["sha256"])
    return path


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped test images (N, 1, 8, 8) float32 in [0, 1] and labels (N,) int64."""
    info = manifest()["data"]
    path = ZOO_DIR / info["file"]
    _check(path, info["sha256"])
    with np.load(path, allow_pickle=False) as data:
        x = data["x"].astype(np.float32) / float(data["scale"])
        y = data["y"].astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def _check(path: Path, sha256: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"zoo file missing: {path} (reinstall certaudit or run scripts/train_zoo.py)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise CheckpointError(f"zoo file {path} does not match its manifest SHA-256 (rerun scripts/train_zoo.py)")


__all__ = ["ZOO_DIR", "manifest", "model_path", "load_data"]
