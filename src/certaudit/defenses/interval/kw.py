"""Import the published models of Wong & Kolter (2018, 2018b) as certaudit checkpoints.

Their repository (locuslab/convex_adversarial, MIT licence) publishes plain PyTorch state dicts of
the small convolutional net that GloRo calls 2C2F::

    0: Conv2d(C, 16, 4, stride=2, padding=1)   1: ReLU
    2: Conv2d(16, 32, 4, stride=2, padding=1)  3: ReLU
    4: Flatten                                 5: Linear(32·7·7 or 32·8·8, 100)   6: ReLU
    7: Linear(100, 10)

* ``fashion_mnist.pth`` (and the MNIST model): the state dict itself; inputs in [0, 1], no
  normalization; trained and verified at ℓ∞ ε = 0.1.
* ``cifar_small_8px.pth`` ("Scaling provable adversarial defenses"): ``{"state_dict": [three state
  dicts], "err", "epoch", ...}``, a *cascade* of three 2C2F models; stage 0 alone is an ordinary
  certified model. Inputs were normalized with mean (0.485, 0.456, 0.406) and std 0.225 per
  channel and ε = 8/255 applied in pixel space (8/255/0.225 in normalized space).

certaudit's 2C2F starts with a ``Normalize`` layer, so their layer ``i`` is our layer ``i + 1``.
Files are read with :func:`certaudit.models.read_state_dict` (``weights_only=True``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from certaudit.errors import CheckpointError, InputError

KW_CIFAR_MEAN = (0.485, 0.456, 0.406)
KW_CIFAR_STD = (0.225, 0.225, 0.225)
KW_LAYERS = ("0", "2", "5", "7")  # their indices of the parameter layers

REPORTED = {
    "fashion_mnist.pth": {"eps": 0.1, "clean_error": 0.2173, "robust_error": 0.3453,
                          "source": "Wong & Kolter 2018, Table 1 (Fashion-MNIST, ℓ∞ ε = 0.1)"},
    "cifar_small_8px.pth": {"eps": 8 / 255, "robust_error_cascade": 0.7171,
                            "source": "Wong et al. 2018 (Scaling provable adversarial defenses), cascade of 3"},
}


def convert_kw(path: str | os.PathLike, dataset: str | None = None, stage: int = 0, *,
               eps: float | None = None) -> tuple[torch.nn.Sequential, Any]:
    """Read a Wong & Kolter file and return (certaudit 2C2F model in eval mode, ModelMeta)."""
    from certaudit.models import read_state_dict

    raw = read_state_dict(path)
    return import_kw(raw, source=Path(path), dataset=dataset, stage=stage, eps=eps)


def import_kw(raw: dict[str, Any], *, source: str | os.PathLike, dataset: str | None = None,
              sigma: float | None = None, arch: str | None = None, stage: int = 0,
              eps: float | None = None) -> tuple[torch.nn.Sequential, Any]:
    """Importer with the signature of ``certaudit.importers.IMPORTERS`` entries."""
    from certaudit.data import dataset_info
    from certaudit.models import ModelMeta, build_model

    source = Path(source)
    if sigma is not None:
        raise InputError("--sigma does not apply to Wong & Kolter models (they are ℓ∞ certified, not smoothed)")
    if arch is not None and str(arch).lower() != "2c2f":
        raise InputError(f"Wong & Kolter models are 2c2f; got --arch {arch}")
    states = raw.get("state_dict") if isinstance(raw.get("state_dict"), (list, tuple)) else None
    if states is not None:
        if not 0 <= int(stage) < len(states):
            if not states:
                raise InputError(f"{source}: the cascade holds no model (its state_dict list is empty)")
            raise InputError(f"{source}: stage {stage} does not exist; the cascade has stages 0..{len(states) - 1}")
        state = states[int(stage)]
    else:
        if int(stage) != 0:
            raise InputError(f"{source} holds a single model; only stage 0 exists")
        state = raw.get("state_dict", raw) if isinstance(raw.get("state_dict"), dict) else raw
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: expected a state dict of tensors")
    expected = {f"{i}.{p}" for i in KW_LAYERS for p in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{source}: not a Wong & Kolter 2C2F state dict (missing: {missing[:3]}, unexpected: {extra[:3]})")
    channels = int(state["0.weight"].shape[1])
    name = (dataset or _dataset_from_name(source, channels))
    info = dataset_info(name)
    if info.shape[0] != channels:
        raise InputError(f"{source}: the model takes {channels}-channel images, data set {info.name} has {info.shape[0]}")
    if info.name == "cifar10":
        mean, std = list(KW_CIFAR_MEAN), list(KW_CIFAR_STD)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    model = build_model("2c2f", info.shape, info.num_classes, mean, std)
    ours = model.state_dict()
    body = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    for k, v in body.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, 2c2f on {info.name} needs {tuple(ours[k].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k!r} contains NaN or infinite values")
    body["0.mean"], body["0.std"] = ours["0.mean"], ours["0.std"]
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in body.items()}, strict=True)
    model.eval()
    if eps is None:
        eps = _eps_from_name(source, info.name)
    training: dict[str, Any] = {"source": "wong-kolter", "file": source.name, "stage": int(stage),
                                "normalization": "kw-cifar" if info.name == "cifar10" else "none"}
    if states is not None:
        training["cascade_stages"] = len(states)
        if int(stage) > 0:
            training["note"] = "a later cascade stage: alone it is not the published model"
    for key in ("err", "epoch"):
        v = raw.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            training[key] = v
    if source.name in REPORTED:
        training["reported"] = REPORTED[source.name]
    meta = ModelMeta(arch="2c2f", dataset=info.name, input_shape=list(info.shape), num_classes=info.num_classes,
                     mean=mean, std=std, method="kw", eps=None if eps is None else float(eps),
                     norm="linf", training=training)
    return model, meta


def _dataset_from_name(source: Path, channels: int) -> str:
    name = source.name.lower()
    if "fashion" in name:
        return "fashion-mnist"
    if "cifar" in name or channels == 3:
        return "cifar10"
    if "mnist" in name:
        return "mnist"
    raise InputError(f"{source}: cannot tell the data set from the file name; pass --dataset (mnist or fashion-mnist)")


def _eps_from_name(source: Path, dataset: str) -> float | None:
    m = re.search(r"(\d+)px", source.name.lower())
    if m:
        return int(m.group(1)) / 255
    if dataset in ("mnist", "fashion-mnist"):
        return 0.1  # the radius of the published (Fashion-)MNIST models
    return None
