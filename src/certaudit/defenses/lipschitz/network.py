"""Walk a feed-forward network into layers whose Lipschitz constants we can bound.

Supported (exact types, so a subclass that changes ``forward`` is refused rather than trusted):
:class:`certaudit.models.Normalize`, ``nn.Conv2d`` (zero padding; any stride, dilation, groups),
``nn.Linear``, ``nn.ReLU``, ``nn.Flatten`` (from dim 1) and ``nn.Identity``, nested in
``nn.Sequential``; the last layer must be the ``nn.Linear`` producing the logits. Anything else
(pooling, BatchNorm, dropout, residual blocks, custom modules) raises
:class:`~certaudit.errors.InputError`: a layer we cannot bound is never assumed 1-Lipschitz
(the unsound default of GloRo's public package, its issue #8).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from certaudit.defenses.lipschitz.bounds import ConvGeometry
from certaudit.errors import InputError
from certaudit.models import Normalize

SUPPORTED = "Normalize, Conv2d (zero padding), Linear, ReLU, Flatten, Identity"

KIND = {Normalize: "normalize", nn.Conv2d: "conv", nn.Linear: "linear", nn.ReLU: "relu",
        nn.Flatten: "flatten", nn.Identity: "identity"}


@dataclass
class Layer:
    """One layer of the walked network with its input shape (per example, no batch dim)."""

    name: str
    kind: str  # normalize | conv | linear | relu | flatten | identity
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    geom: ConvGeometry | None = None


def flatten_modules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Leaves of nested ``nn.Sequential`` containers, in execution order, with dotted names."""
    if type(model) is nn.Sequential:
        out: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            out += flatten_modules(child, f"{prefix}{name}.")
        return out
    return [(prefix.rstrip(".") or type(model).__name__, model)]


def walk(model: nn.Module, input_shape: tuple[int, ...] | None, num_classes: int) -> list[Layer]:
    """Check every layer of ``model`` and propagate shapes from ``input_shape`` (C, H, W).

    With ``input_shape=None`` only the layer types are checked (shapes are left empty).
    """
    mods = flatten_modules(model)
    if not mods:
        raise InputError("the Lipschitz defense needs a non-empty nn.Sequential model")
    for name, m in mods:
        if type(m) not in KIND:
            raise InputError(f"layer {name!r} ({type(m).__name__}) is not supported by the Lipschitz defense; "
                             f"supported layers: {SUPPORTED}")
        if type(m) is nn.Flatten and (m.start_dim != 1 or m.end_dim != -1):
            raise InputError(f"layer {name!r}: only nn.Flatten(start_dim=1, end_dim=-1) is supported")
        if type(m) is nn.Conv2d and m.padding_mode != "zeros":
            raise InputError(f"layer {name!r}: Conv2d padding_mode={m.padding_mode!r} is not supported (only zeros)")
    last_name, last = mods[-1]
    if type(last) is not nn.Linear:
        raise InputError(f"the last layer must be the nn.Linear producing the logits, got {type(last).__name__} ({last_name!r})")
    if last.out_features != num_classes:
        raise InputError(f"the last layer has {last.out_features} outputs but num_classes is {num_classes}")
    layers: list[Layer] = []
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    for name, m in mods:
        kind = KIND[type(m)]
        geom = None
        out = shape
        if shape is not None:
            if kind == "normalize":
                if len(shape) != 3 or shape[0] != m.std.numel():
                    raise InputError(f"layer {name!r}: Normalize has {m.std.numel()} channels, input shape is {shape}")
            elif kind == "conv":
                if len(shape) != 3:
                    raise InputError(f"layer {name!r}: Conv2d needs (C, H, W) inputs, gets {shape}")
                geom = ConvGeometry.of(m, shape)  # type: ignore[arg-type]
                out = geom.out_shape
            elif kind == "flatten":
                n = 1
                for s in shape:
                    n *= s
                out = (n,)
            elif kind == "linear":
                if len(shape) != 1 or shape[0] != m.in_features:
                    raise InputError(f"layer {name!r}: Linear expects {m.in_features} features, gets shape {shape}")
                out = (m.out_features,)
        layers.append(Layer(name, kind, m, shape or (), out or (), geom))
        shape = out
    return layers


__all__ = ["Layer", "walk", "flatten_modules", "SUPPORTED"]
