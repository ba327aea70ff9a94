"""Importers of published checkpoints (the library behind ``certaudit import``).

Formats (one function each in :data:`IMPORTERS`; adding one is adding an entry):

* ``cohen``: the public randomized-smoothing models of Cohen, Rosenfeld & Kolter (2019), files
  ``models/<dataset>/<arch>/noise_<σ>/checkpoint.pth.tar`` holding ``{"arch", "state_dict", ...}``.
  Their network is ``Sequential(NormalizeLayer, net)``; the normalize layer keeps its mean and std
  as plain attributes (so they are not in the state dict; the data set's values are used) and the
  net may be wrapped in ``DataParallel`` (``module.`` in the keys). ``cifar_resnet20`` and
  ``cifar_resnet110`` (CIFAR-10) and ``resnet50`` (ImageNet, torchvision parameter names, built
  here without torchvision) are supported.
* ``kw``: the ℓ∞-certified models of Wong & Kolter (2018, 2018b) (``locuslab/convex_adversarial``):
  a plain 2C2F state dict (``fashion_mnist.pth``, MNIST), or a cascade file
  (``cifar_small_8px.pth``: ``{"state_dict": [three state dicts], "err", ...}``) of which ``--stage``
  picks one model (stage 0, the default, is an ordinary certified model). The CIFAR models get
  their input normalization (mean (0.485, 0.456, 0.406), std 0.225) as the model's first layer, so
  ε stays in pixel space (8/255); see :mod:`certaudit.defenses.interval.kw`.

Files are read by :func:`certaudit.models.read_state_dict`: safetensors, or ``torch.load`` with
``weights_only=True``. A pickle that needs code to load is refused, never executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from certaudit.data import dataset_info
from certaudit.defenses.interval.kw import import_kw as _import
from certaudit.errors import CheckpointError, InputError
from certaudit.models import ModelMeta, build_model

COHEN_ARCHS = {"cifar_resnet20": "resnet20", "cifar_resnet110": "resnet110", "resnet50": "resnet50"}
_COHEN_UNSUPPORTED: dict[str, str] = {}


# ------------------------------------------------------------------------------------------- cohen

def import_cohen(raw: dict[str, Any], *, source: Path, dataset: str | None, sigma: float | None,
                 arch: str | None) -> tuple[Any, Any]:
    """Cohen et al.'s ``{"arch", "state_dict"}`` -> (model, ModelMeta) with the training σ recorded."""

    state = raw.get("state_dict", raw) if isinstance(raw.get("state_dict", None), dict) else raw
    name = arch or raw.get("arch")
    state = {_strip_module(k): v for k, v in state.items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: the state dict holds non-tensor entries")
    if name is None:
        name = _infer_cohen_arch(state, source)
    name = str(name).lower()
    if name in _COHEN_UNSUPPORTED:
        raise InputError(f"{source}: {_COHEN_UNSUPPORTED[name]}")
    target = COHEN_ARCHS.get(name) or (name if name in COHEN_ARCHS.values() else None)
    if target is None:
        raise InputError(f"{source}: unknown Cohen architecture {name!r}; supported: {', '.join(COHEN_ARCHS)}")
    info = dataset_info(dataset or ("imagenet" if target == "resnet50" else "cifar10"))
    need = (3, 224, 224) if target == "resnet50" else (3, 32, 32)
    if tuple(info.shape) != need:
        raise InputError(f"{name} takes {'x'.join(map(str, need))} images; data set {info.name} has shape {info.shape}")
    if sigma is None:
        sigma = _sigma_from_path(source)
    if sigma is None:
        raise InputError(f"{source}: cannot tell the training noise level; pass --sigma (Cohen's folders are noise_<σ>)")

    # The normalize layer (index 0) has no state in Cohen's files; take any stored values, else the data set's.
    mean, std = list(info.mean), list(info.std)
    norm_keys = {k for k in state if k.startswith("0.")}
    for k in norm_keys:
        leaf = k.split(".", 1)[1]
        values = [float(v) for v in state[k].flatten().tolist()]
        if leaf in ("mean", "means") and len(values) == 3:
            mean = values
        elif leaf in ("std", "sds", "stds") and len(values) == 3:
            std = values
    body = {k: v for k, v in state.items() if k not in norm_keys}
    if body and all(not k.startswith("1.") for k in body):
        body = {"1." + k: v for k, v in body.items()}  # a bare network state dict (no Sequential wrapper)

    fc = body.get("1.fc.weight")
    num_classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else info.num_classes
    if num_classes != info.num_classes:
        raise InputError(f"{source}: the model has {num_classes} outputs, data set {info.name} has {info.num_classes} classes")
    model = build_model(target, info.shape, num_classes, mean, std)
    expected = model.state_dict()
    for k, v in expected.items():  # files from before BatchNorm counted batches lack these
        if k.endswith("num_batches_tracked") and k not in body and k.startswith("1."):
            body[k] = torch.zeros_like(v)
    body["0.mean"] = expected["0.mean"]
    body["0.std"] = expected["0.std"]
    missing = sorted(set(expected) - set(body))
    extra = sorted(set(body) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: weights do not match {name} ({_few('missing', missing)}{'; ' if missing and extra else ''}"
            f"{_few('unexpected', extra)})"
        )
    bad = [k for k in expected if tuple(body[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{source}: {k} has shape {tuple(body[k].shape)}, {name} needs {tuple(expected[k].shape)}")
    for k, v in body.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k!r} contains NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in body.items()}, strict=True)
    model.eval()
    meta = ModelMeta(
        arch=target, dataset=info.name, input_shape=list(info.shape), num_classes=num_classes, mean=mean, std=std,
        method="gaussian", sigma=float(sigma), norm="l2",
        training={"source": "cohen", "file": Path(source).name, "cohen_arch": name,
                  "epoch": raw.get("epoch") if isinstance(raw.get("epoch"), int) else None},
    )
    return model, meta


def _strip_module(key: str) -> str:
    """Drop ``DataParallel``'s ``module.`` path components wherever they occur."""
    return ".".join(part for part in str(key).split(".") if part != "module")


def _sigma_from_path(path: Path) -> float | None:
    for part in reversed(Path(path).parts):
        m = re.fullmatch(r"noise_([0-9]*\.?[0-9]+)", part)
        if m:
            value = float(m.group(1))
            return value if value > 0 else None
    return None


def _infer_cohen_arch(state: dict[str, Any], source: Path) -> str:
    """ImageNet ResNet-50 has a fourth stage of bottlenecks; a CIFAR ResNet-(6n+2) has n BasicBlocks per stage."""
    if any(re.search(r"(?:^|\.)layer4\.\d+\.conv3\.", k) for k in state):
        return "resnet50"
    blocks = {int(m.group(1)) for k in state if (m := re.search(r"(?:^|\.)layer1\.(\d+)\.", k))}
    if not blocks:
        raise InputError(f"{source}: the file does not name its architecture and does not look like a CIFAR ResNet; pass --arch")
    depth = 6 * (max(blocks) + 1) + 2
    name = f"cifar_resnet{depth}"
    if name not in COHEN_ARCHS:
        raise InputError(f"{source}: looks like a CIFAR ResNet-{depth}; only ResNet-20 and ResNet-110 are supported")
    return name


def _few(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{what}: {', '.join(keys[:3])}{more}"


def import_kw(raw: dict[str, Any], *, source: Path, dataset: str | None, sigma: float | None, arch: str | None,
              stage: int = 0, eps: float | None = None) -> tuple[Any, Any]:
    """Wong & Kolter's state dicts (and cascade stages): see :func:`certaudit.defenses.interval.kw.import_kw`."""

    return _import(raw, source=source, dataset=dataset, sigma=sigma, arch=arch, stage=stage, eps=eps)


Importer = Callable[..., tuple[Any, Any]]
IMPORTERS: dict[str, Importer] = {"cohen": import_cohen, "kw": import_kw}
"""Format name -> importer ``(raw_dict, *, source, dataset, sigma, arch) -> (model, ModelMeta)``."""
