"""Architectures, the in-model ``Normalize`` layer, and safetensors checkpoints with metadata.

Architectures:

* ``2c2f``, ``4c3f``, ``6c2f``: the small convolutional nets of the GloRo paper (Leino et al. 2021),
  with ReLU; ``2c2f`` is also the Wong & Kolter (2018) model. Feed-forward ``nn.Sequential`` of
  ``Normalize``, ``Conv2d``, ``ReLU``, ``Flatten``, ``Linear`` so layer-wise bound methods can walk it.
* ``resnet20``, ``resnet110``: the CIFAR ResNets that Cohen et al. (2019) smoothed (BasicBlock,
  widths 16/32/64, BatchNorm); parameter names follow the public checkpoints so they import.
* ``resnet50``: the ImageNet ResNet-50 (bottleneck blocks, stride in the 3x3 convolution) with the
  parameter names of torchvision's, written here so Cohen et al.'s ImageNet models import without
  torchvision.

Every model is ``nn.Sequential(Normalize(mean, std), body...)``: inputs are always in [0, 1] and
radii are measured in input space.

Checkpoints are ``safetensors`` files whose metadata holds a JSON :class:`ModelMeta`, so any command
rebuilds the model from the file alone. Pickles are never unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from certaudit.errors import CheckpointError, InputError

FORMAT_VERSION = 1
META_KEY = "certaudit"

ARCHITECTURES = ("2c2f", "4c3f", "6c2f", "resnet20", "resnet110", "resnet50")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so data and radii stay in [0, 1] space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.dim() != 1 or mean_t.shape != std_t.shape:
            raise InputError("normalization mean and std must be equal-length lists, one per channel")
        if not bool(torch.isfinite(mean_t).all()) or not bool((std_t > 0).all()):
            raise InputError("normalization std must be > 0 and mean finite")
        self.register_buffer("mean", mean_t.view(-1, 1, 1))
        self.register_buffer("std", std_t.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _feedforward(in_shape: tuple[int, int, int], convs: list[tuple[int, int, int]], dense: list[int],
                 num_classes: int, normalize: Normalize) -> nn.Sequential:
    """Conv(out, k, stride) with 'same'-style padding, ReLU after each, then dense layers."""
    c, h, w = in_shape
    layers: list[nn.Module] = [normalize]
    for out, k, stride in convs:
        pad = 1  # 3x3 stride 1 keeps the size; 4x4 stride 2 halves it (as the GloRo/KW models)
        layers += [nn.Conv2d(c, out, k, stride=stride, padding=pad), nn.ReLU()]
        h = (h + 2 * pad - k) // stride + 1
        w = (w + 2 * pad - k) // stride + 1
        c = out
        if h < 1 or w < 1:
            raise InputError(f"input shape {in_shape} is too small for this architecture")
    layers.append(nn.Flatten())
    width = c * h * w
    for d in dense:
        layers += [nn.Linear(width, d), nn.ReLU()]
        width = d
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 conv) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016), as used by Cohen et al. (2019)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise InputError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.inplanes = 16
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(8) on 32x32 inputs, no parameters
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 64)
        return self.fc(x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), BatchNorm after each; projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ImageNetResNet50(nn.Module):
    """ResNet-50 for 224x224 inputs (He et al. 2016; layers 3-4-6-3), torchvision's parameter names."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(self.inplanes, planes, stride)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(arch: str, input_shape: Sequence[int], num_classes: int,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Sequential:
    """Build ``Sequential(Normalize, ...)`` for an architecture name and an input shape (C, H, W)."""
    name = str(arch).lower()
    if name not in ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"input shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    if int(num_classes) < 2:
        raise InputError(f"num_classes must be >= 2, got {num_classes}")
    c = shape[0]
    mean = [0.0] * c if mean is None else list(mean)
    std = [1.0] * c if std is None else list(std)
    if len(mean) != c or len(std) != c:
        raise InputError(f"normalization needs {c} means and stds, got {len(mean)} and {len(std)}")
    norm = Normalize(mean, std)
    if name == "2c2f":
        return _feedforward(shape, [(16, 4, 2), (32, 4, 2)], [100], num_classes, norm)
    if name == "4c3f":
        return _feedforward(shape, [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512], num_classes, norm)
    if name == "6c2f":
        convs = [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)]
        return _feedforward(shape, convs, [512], num_classes, norm)
    if name == "resnet50":
        return nn.Sequential(norm, ImageNetResNet50(num_classes, in_channels=c))
    depth = 20 if name == "resnet20" else 110
    return nn.Sequential(norm, CifarResNet(depth, num_classes, in_channels=c))


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
    from safetensors.torch import save_file

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
    from safetensors import safe_open

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
    from safetensors.torch import load_file

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
        from safetensors.torch import load_file

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
    import importlib

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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHITECTURES", "Normalize", "CifarResNet", "BasicBlock", "ImageNetResNet50", "Bottleneck", "build_model", "ModelMeta",
    "save_checkpoint", "load_checkpoint", "read_meta", "read_state_dict", "resolve_device",
    "count_parameters", "FORMAT_VERSION",
]
