"""The architectures of certaudit models and the in-model ``Normalize`` layer (all re-exported by
:mod:`certaudit.models`).

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
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from certaudit.errors import InputError

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


def count_parameters(model: nn.Module) -> int:
    """The number of parameter values of a model."""
    return sum(p.numel() for p in model.parameters())
