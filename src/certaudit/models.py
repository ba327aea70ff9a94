"""Models: safetensors checkpoints with metadata, foreign weights, user factories, devices.

The architectures and the in-model ``Normalize`` layer are in :mod:`certaudit.models_arch`; they are
re-exported here, so ``certaudit.models`` stays the one place to import models from.

Checkpoints are ``safetensors`` files whose metadata holds a JSON :class:`ModelMeta`, so any command
rebuilds the model from the file alone. Pickles are never unpickled.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from certaudit.errors import CheckpointError, InputError
from certaudit.models_arch import (  # noqa: F401 (re-exported: part of this module's API)
    ARCHITECTURES, BasicBlock, Bottleneck, CifarResNet, ImageNetResNet50, Normalize, build_model, count_parameters,
)

FORMAT_VERSION = 1
META_KEY = "certaudit"


@dataclass
class ModelMeta:
    """Everything needed to rebuild a model and interpret its certificates."""

    arch: str
    dataset: str
    input_shape: list[int]
    num_classes: int
    mean: list[float]
    std: list[float]
    method: str = "standard"  # training method: standard, gaussian, gloro, ibp, crown-ibp, imported
    sigma: float | None = None  # Gaussian-noise training σ (randomized smoothing)
    eps: float | None = None  # certified-training radius (GloRo: ℓ2, IBP: ℓ∞)
    norm: str | None = None  # threat-model norm of eps
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)  # epochs, seed, accuracy, source, ...

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint metadata is not valid JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise CheckpointError("checkpoint metadata must be a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format version {version!r} (this certaudit reads {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        missing = {"arch", "dataset", "input_shape", "num_classes", "mean", "std"} - set(raw)
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {', '.join(sorted(missing))}")
        _check_meta(raw)
        return cls(**{k: v for k, v in raw.items() if k in known})


MAX_INPUT_ELEMENTS = 3 * 1024 * 1024  # one image: up to 3×1024×1024
MAX_CLASSES = 100_000


def _check_meta(raw: dict[str, Any]) -> None:
    """Types and sizes of checkpoint metadata, before anything is built from it (a hostile or broken
    file must not make ``build_model`` allocate petabytes or fail with a traceback)."""
    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"checkpoint metadata: {key} must be {want}, got {raw.get(key)!r}"[:300])

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    for key in ("arch", "dataset"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise bad(key, "a non-empty string")
    shape = raw["input_shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(is_int(v) and v >= 1 for v in shape):
        raise bad("input_shape", "a list of three integers >= 1 (C, H, W)")
    if shape[0] * shape[1] * shape[2] > MAX_INPUT_ELEMENTS:
        raise bad("input_shape", f"at most {MAX_INPUT_ELEMENTS:,} values per image")
    if not is_int(raw["num_classes"]) or not (2 <= raw["num_classes"] <= MAX_CLASSES):
        raise bad("num_classes", f"an integer in [2, {MAX_CLASSES:,}]")
    for key in ("mean", "std"):
        v = raw[key]
        if not isinstance(v, list) or not v or len(v) > shape[0] or not all(is_num(t) for t in v):
            raise bad(key, "a list of 1 to C finite numbers")
    if not all(t > 0 for t in raw["std"]):
        raise bad("std", "a list of numbers > 0")
    for key in ("method", "norm"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise bad(key, "a string")
    for key in ("sigma", "eps"):
        if raw.get(key) is not None and not (is_num(raw[key]) and raw[key] > 0):
            raise bad(key, "a finite number > 0 (or null)")
    if raw.get("training") is not None and not isinstance(raw["training"], dict):
        raise bad("training", "an object")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: ModelMeta) -> Path:
    """Write weights as safetensors with ``meta`` as JSON metadata (atomic rename)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={META_KEY: meta.to_json()})
    os.replace(tmp, path)
    return path


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """Read only the metadata of a checkpoint."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint ({_short(exc)})") from None
    if META_KEY not in md:
        raise CheckpointError(f"{path} has no certaudit metadata; convert it with `certaudit import`")
    return ModelMeta.from_json(md[META_KEY])


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Sequential, ModelMeta]:
    """Rebuild the model from a certaudit checkpoint; the model is in eval mode on ``device``."""
    path = _existing(path)
    meta = read_meta(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({_short(exc)})") from None
    try:
        model = build_model(meta.arch, meta.input_shape, meta.num_classes, meta.mean, meta.std)
    except InputError as exc:
        raise CheckpointError(f"{path}: metadata describes no valid model ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match architecture {meta.arch!r} ({_short(exc)})") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} contains NaN or infinite values")
    model.eval()
    return model.to(_device(device)), meta


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a foreign checkpoint (safetensors, or a PyTorch file through ``weights_only=True``).

    Never unpickles code: a file that needs arbitrary classes is refused.
    """
    path = _existing(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) == 8 and path.suffix == ".safetensors":
        try:
            state = dict(load_file(str(path)))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file ({_short(exc)})") from None
        _refuse_complex(state, path)
        return state
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(_torch_load_error(path, exc)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    _refuse_complex(obj, path)
    return obj


def _refuse_complex(obj: Any, path: Path, where: str = "") -> None:
    """Complex tensors would be cast to real (the imaginary part silently dropped): refuse them."""
    if isinstance(obj, torch.Tensor):
        if obj.is_complex():
            raise CheckpointError(f"{path}: tensor {where or '(top level)'} is complex ({obj.dtype}); certaudit "
                                  "certifies real-valued networks")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _refuse_complex(v, path, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _refuse_complex(v, path, f"{where}[{i}]")


_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def load_factory(spec: str, weights: str | os.PathLike | None, input_shape: Sequence[int], num_classes: int,
                 dataset: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The user's own architecture: ``package.module:function`` called with no arguments must return
    an ``nn.Module`` taking [0, 1] images of ``input_shape`` to ``num_classes`` logits (normalization
    inside it); its weights come from ``weights`` (safetensors, or a state dict read with
    ``weights_only=True``), loaded strictly. Importing the module runs the user's code, as running
    their script would; the weights file never does."""
    if not _FACTORY.match(str(spec)):
        raise InputError(f"--model {spec!r} is neither a checkpoint file nor a factory package.module:function")
    if weights is None:
        raise InputError(f"--model {spec} is a factory: give its weights with --weights FILE")
    module_name, attr = str(spec).split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import {module_name!r} for --model {spec} ({_short(exc)}); is it on PYTHONPATH?") from None
    factory = vars(module).get(attr)
    if not callable(factory):
        raise InputError(f"{module_name} has no function {attr!r} (--model {spec})")
    try:
        model = factory()
    except Exception as exc:  # the user's own code: say so in one line, with what it raised
        raise InputError(f"{spec}() raised {type(exc).__name__}: {_short(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    state = read_state_dict(weights)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{weights}: weights do not match {spec}() ({_short(exc)})") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: tensor {name!r} contains NaN or infinite values")
    model = model.to(_device(device)).eval()
    shape = [int(s) for s in input_shape]
    with torch.no_grad():
        try:
            out = model(torch.zeros((1, *shape), device=_device(device)))
        except Exception as exc:  # the user's forward: any failure is a mismatch with the data set
            raise InputError(f"{spec}() cannot take {dataset} images {tuple(shape)} ({_short(exc)})") from None
    if out.dim() != 2 or int(out.shape[1]) != int(num_classes):
        raise InputError(f"{spec}() returns shape {tuple(out.shape)} for one {dataset} image; "
                         f"expected (1, {num_classes}) logits")
    meta = ModelMeta(arch=str(spec), dataset=dataset, input_shape=shape, num_classes=int(num_classes),
                     mean=[0.0], std=[1.0], method="imported", training={"source": f"factory {spec}"})
    return model, meta


def _torch_load_error(path: Path, exc: BaseException) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in one plain line (without
    torch's advice to load with ``weights_only=False``, which would run the file's code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    code = re.search(r"(?:Unsupported global|GLOBAL|REDUCE|BUILD|Trying to call reduce)[^\n]*", text)
    if code:  # the pickle names a class or function to run
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (f"{path}: refused: it needs pickled code{what} to load, and certaudit never runs code from a "
                "file (save a plain state dict, or safetensors)")
    if ("Unsupported operand" in text or "zip" in text.lower() or "EOF" in text or "truncated" in text.lower()
            or isinstance(exc, EOFError)):
        return f"{path}: refused: it is truncated or not a PyTorch file ({type(exc).__name__})"
    first = " ".join(text.split(". ")[0].split())[:200]
    return f"{path} cannot be read as a PyTorch state dict ({type(exc).__name__}: {first})"


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model file not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"model path is not a file: {p}")
    return p


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda requested but CUDA is not available")
    return dev


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; otherwise validate the name."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _device(device)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


__all__ = [
    "ARCHITECTURES", "Normalize", "CifarResNet", "BasicBlock", "ImageNetResNet50", "Bottleneck", "build_model", "ModelMeta",
    "save_checkpoint", "load_checkpoint", "read_meta", "read_state_dict", "resolve_device",
    "count_parameters", "FORMAT_VERSION",
]
