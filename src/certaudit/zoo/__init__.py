"""Small pretrained models and test images shipped inside the package (the embedded default).

Trained by ``scripts/train_zoo.py`` (rerunnable on a CPU; ``manifest.json`` records per model the
settings, SHA-256, test accuracy and training time, and per data file its provenance). Two zoos,
each a section ``zoos.<name>`` of the manifest:

``fashion-mnist`` -- what ``certaudit demo`` audits: 2C2F networks trained on the Fashion-MNIST
training set --

* ``fmnist_gaussian``: Gaussian-noise training (σ = 0.25), the base model of randomized smoothing;
* ``fmnist_gloro_eps``: GloRo training at ε = 0.3 (ℓ2), certified at ε by the Lipschitz defense;
* ``fmnist_gloro_2eps``: GloRo training at 2ε = 0.6, certified at ε (the double-radius defense of
  §4.1 of the degradation paper);
* ``fmnist_crown_ibp``: CROWN-IBP training at ε = 0.1 (ℓ∞), certified by interval bounds;

and ``fashion_mnist_1k.npz``: 1,000 images of the official Fashion-MNIST test set (the first 100 of
each class in index order; uint8), the data set ``fashion-mnist-1k`` of :func:`certaudit.data.load_dataset`.
Fashion-MNIST is © 2017 Zalando SE, MIT licence (``FASHION_MNIST_LICENSE.txt``).

``digits`` -- the tests' tiny fixture: the same architecture on scikit-learn's 8×8 digits
(``digits_gaussian``, ``digits_gloro_eps`` at ε = 0.25, ``digits_gloro_2eps``) and
``digits_test.npz``, the 360 test images of ``load_dataset("digits", "test")`` (uint8 0..16).

Nothing here reads a file outside the package: the demo needs neither a download nor a data set
installed on the machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certaudit.errors import CheckpointError, InputError

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_ZOO = "digits"  # manifest() and load_data() without a name: the tests' fixture (as before)
DEMO_ZOO = "fashion-mnist"  # what `certaudit demo` audits
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "fashion-mnist-1k": "fashion-mnist"}


def _full_manifest() -> dict[str, Any]:
    raw = json.loads((ZOO_DIR / "manifest.json").read_text(encoding="utf-8"))
    if "zoos" not in raw:  # single-zoo manifest of earlier versions
        raw = {"zoos": {raw.get("dataset", DEFAULT_ZOO): raw}}
    return raw


def zoo_names() -> list[str]:
    """The shipped zoos (``digits``, ``fashion-mnist``)."""
    return list(_full_manifest()["zoos"])


def zoo_key(name: str | None) -> str:
    """The zoo a name means (``None``: the default, ``digits``); unknown names are refused."""
    key = DEFAULT_ZOO if name is None else _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    zoos = _full_manifest()["zoos"]
    if key not in zoos:
        raise InputError(f"no shipped zoo {name!r}; choose one of: {', '.join(zoos)}")
    return key


def manifest(zoo: str | None = None) -> dict[str, Any]:
    """One zoo's manifest section (default ``digits``): models (file, sha256, method, σ or ε, norm, test
    accuracy, seconds), the audit radii (``eps``, ``eps_linf``, ``sigma``) and the data file."""
    return _full_manifest()["zoos"][zoo_key(zoo)]


def model_entry(name: str) -> tuple[str, dict[str, Any]]:
    """(zoo, manifest entry) of a shipped model, looked up in every zoo."""
    zoos = _full_manifest()["zoos"]
    for key, section in zoos.items():
        if name in section["models"]:
            return key, section["models"][name]
    shipped = [m for section in zoos.values() for m in section["models"]]
    raise CheckpointError(f"no zoo model {name!r}; shipped: {', '.join(shipped)}")


def model_path(name: str) -> Path:
    """Path of a shipped checkpoint (of any zoo), checked against the manifest's SHA-256."""
    _, entry = model_entry(name)
    path = ZOO_DIR / entry["file"]
    _check(path, entry["sha256"])
    return path


def data_path(zoo: str | None = None) -> Path:
    """Path of a zoo's shipped test images, checked against the manifest's SHA-256."""
    info = manifest(zoo)["data"]
    path = ZOO_DIR / info["file"]
    _check(path, info["sha256"])
    return path


def load_data(zoo: str | None = None, with_index: bool = False) -> Any:
    """A zoo's shipped test images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64 (default: digits);
    ``with_index``: also the indices (N,) into the official test split they come from."""
    path = data_path(zoo)
    with np.load(path, allow_pickle=False) as data:
        x = data["x"].astype(np.float32) / float(data["scale"])
        y = data["y"].astype(np.int64)
        index = data["index"].astype(np.int64)
    out = (torch.from_numpy(x), torch.from_numpy(y))
    return (*out, torch.from_numpy(index)) if with_index else out


def _check(path: Path, sha256: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"zoo file missing: {path} (reinstall certaudit or run scripts/train_zoo.py)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise CheckpointError(f"zoo file {path} does not match its manifest SHA-256 (rerun scripts/train_zoo.py)")


__all__ = ["ZOO_DIR", "DEFAULT_ZOO", "DEMO_ZOO", "zoo_names", "zoo_key", "manifest", "model_entry", "model_path",
           "data_path", "load_data"]
