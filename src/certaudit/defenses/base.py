"""The defense protocol every certified run-time defense implements.

A defense answers, for a batch of inputs ``x`` in ``[0,1]^d`` (float32, NCHW):

* :meth:`Defense.certify` -- which label, certified up to which radius (``Certificates``);
* :meth:`Defense.accept` -- Algorithm 2.1 of the degradation paper (PredictWithDefense): the label
  if it is certified at radius ``eps``, else :data:`ABSTAIN` (the rejection symbol ⊥);
* :meth:`Defense.margin` -- a differentiable score, positive iff the defense would certify
  ``target`` at ``x`` with radius ``eps``; attacks are written once against it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum

import torch

from certaudit.errors import InputError

ABSTAIN: int = -1
"""The rejection label ⊥, everywhere (tensors, rows, reports)."""


class Norm(str, Enum):
    """Threat-model norms; strings are converted once, at the boundary."""

    L2 = "l2"
    LINF = "linf"

    @classmethod
    def parse(cls, value: "str | Norm") -> "Norm":
        try:
            return cls(str(value.value if isinstance(value, Norm) else value).lower())
        except ValueError:
            raise InputError(f"unknown norm {value!r}; choose one of: l2, linf") from None


@dataclass
class Certificates:
    """Batched certification result.

    ``label[i]`` is the predicted label or :data:`ABSTAIN`; ``radius[i]`` the radius (in input
    space, in ``norm``) up to which ``label[i]`` is certified (0 where ABSTAIN). ``extras`` holds
    per-defense tensors of the same batch length (e.g. smoothing counts, Lipschitz margins).
    """

    label: torch.Tensor  # (B,) int64
    radius: torch.Tensor  # (B,) float
    norm: Norm
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def accept(self, eps: float) -> torch.Tensor:
        """Algorithm 2.1 on already computed certificates: label if radius >= eps, else ABSTAIN."""
        eps = check_eps(eps)
        keep = (self.label != ABSTAIN) & (self.radius >= eps)
        return torch.where(keep, self.label, torch.full_like(self.label, ABSTAIN))

    def certified_at(self, eps: float) -> torch.Tensor:
        """Boolean mask: cert(x, eps) of the paper."""
        return self.accept(eps) != ABSTAIN


class Defense(ABC):
    """A certified run-time defense around a model (a class: it holds the model and cached state)."""

    norm: Norm

    def __init__(self, model: torch.nn.Module, num_classes: int):
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(num_classes) < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.num_classes = int(num_classes)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")

    @abstractmethod
    def certify(self, x: torch.Tensor) -> Certificates:
        """Label and certified radius for every input of the batch."""

    def accept(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """Algorithm 2.1 (PredictWithDefense): label if certified at ``eps``, else ABSTAIN."""
        return self.certify(x).accept(eps)

    @abstractmethod
    def margin(self, x: torch.Tensor, eps: float, target: torch.Tensor) -> torch.Tensor:
        """Differentiable (B,) score, > 0 iff ``target`` would be certified at ``x`` with radius ``eps``."""


# Settings a defense *computes* from the model (e.g. Lipschitz bounds, whose last digits depend on the
# thread count): reported in summaries, but left out of result-file configuration hashes.
COMPUTED_SETTINGS = ("layers", "penultimate_lipschitz", "max_pairwise")


def stable_settings(settings: dict) -> dict:
    """``settings`` without the computed values of :data:`COMPUTED_SETTINGS` (what a resume must match)."""
    return {k: v for k, v in settings.items() if k not in COMPUTED_SETTINGS}


def check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate a batch of images: a float tensor (B, C, H, W), finite, in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise InputError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


def check_eps(eps: float, name: str = "eps") -> float:
    """A radius must be a finite number > 0."""
    try:
        v = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {eps!r}") from None
    if not (v > 0) or math.isinf(v):
        raise InputError(f"{name} must be a finite number > 0, got {eps!r}")
    return v


def check_labels(y: torch.Tensor, batch: int, num_classes: int, name: str = "target") -> torch.Tensor:
    """Validate (B,) integer labels in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() == 0:
        y = y.expand(batch)
    if y.dim() != 1 or y.shape[0] != batch:
        raise InputError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"{name} must be integer labels, got dtype {y.dtype}")
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"{name} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y.long()
