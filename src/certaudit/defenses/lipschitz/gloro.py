"""GloRo training (Leino, Wang & Fredrikson, ICML 2021): the ⊥-logit loss with an ε warm-up.

During training the Lipschitz bound must be differentiable in the weights and cheap, so, as GloRo
does, each layer keeps a persistent power-iteration vector that takes ``power_iters`` steps per
batch without gradient; the layer's norm is then ``‖A v‖`` for the (detached) unit iterate ``v``,
whose gradient ``uᵀ(∂A)v`` is the gradient of ``σ_max`` at convergence. Power iteration
*under*-estimates the norm: the trained model is certified afterwards with the certified bounds of
:class:`~certaudit.defenses.lipschitz.LipschitzDefense`, never with these estimates.

Loss (``TrainConfig.extra``):

* default (GloRo's ``crossentropy``): cross-entropy of ``[f, f_⊥]`` with the true label ``y``, where
  ``f_⊥ = max_{i≠j} (f_i + ε_t·K_{j,i})`` for the predicted class ``j = argmax f`` (GloRo §3: the
  ⊥ logit of the GloRo net is defined from its own prediction) and ``K_{j,i} = L·‖w_j − w_i‖``;
* ``trades=λ`` (GloRo's ``trades_kl.λ``): ``CE(f, y) + λ·KL([softmax(f), 0] ‖ softmax([f, f_⊥]))``
  with ``f_⊥`` taken for the *predicted* class, so robustness is rewarded even where wrong;
* ``power_iters`` (default 5) power-iteration steps per batch.

``ε_t = ε·min(1, progress/eps_warmup)`` ramps linearly from 0 over the first ``eps_warmup``
fraction of training (``TrainConfig.eps_warmup``). Training with ``--eps 2ε`` and certifying at ε
is the double-radius defense of §4.1 of the degradation paper.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.defenses.lipschitz.bounds import ConvOperator
from certaudit.defenses.lipschitz.network import Layer, flatten_modules, walk
from certaudit.errors import InputError


class PowerIterationEstimator:
    """Differentiable power-iteration estimate of the penultimate Lipschitz constant (a lower
    estimate of the true bound; training only). Vectors persist across calls."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator | None = None):
        self.layers: list[Layer] = walk(model, input_shape, num_classes)
        self.vectors: dict[int, torch.Tensor] = {}
        dev = next(model.parameters()).device
        for i, layer in enumerate(self.layers[:-1]):
            if layer.kind in ("conv", "linear"):
                shape = (1, *layer.in_shape)
                gen_dev = generator.device if generator is not None else dev
                v = torch.randn(shape, generator=generator, device=gen_dev).to(dev)
                self.vectors[i] = v / v.norm()

    def _ops(self, layer: Layer):
        m = layer.module
        if layer.kind == "conv":
            op = ConvOperator(m.weight, layer.geom)  # type: ignore[arg-type]
            return op.apply, op.adjoint
        w = m.weight  # type: ignore[union-attr]
        return (lambda v: v @ w.T), (lambda u: u @ w)

    def __call__(self, iters: int = 5) -> torch.Tensor:
        """Penultimate estimate ``Π_l ‖A_l v_l‖`` (differentiable), after ``iters`` steps per layer."""
        lip = None
        for i, layer in enumerate(self.layers[:-1]):
            if layer.kind == "normalize":
                factor = (1.0 / layer.module.std).max()  # type: ignore[operator,union-attr]
            elif layer.kind in ("conv", "linear"):
                apply, adjoint = self._ops(layer)
                v = self.vectors[i]
                with torch.no_grad():
                    for _ in range(int(iters)):
                        v = adjoint(apply(v))
                        v = v / v.norm().clamp_min(1e-30)
                self.vectors[i] = v.detach()
                factor = apply(v.detach()).norm()
            else:
                continue
            lip = factor if lip is None else lip * factor
        if lip is None:
            return torch.ones((), device=next(self.layers[-1].module.parameters()).device)
        return lip


def pairwise_distances(w: torch.Tensor) -> torch.Tensor:
    """(C, C) ``‖w_i − w_j‖₂`` of the logit layer's rows, differentiable (zero diagonal)."""
    diff = w.unsqueeze(1) - w.unsqueeze(0)  # (C, C, d)
    return diff.pow(2).sum(-1).clamp_min(1e-12).sqrt() * (1 - torch.eye(w.shape[0], device=w.device, dtype=w.dtype))


def bottom_logit(logits: torch.Tensor, k_rows: torch.Tensor, cls: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``max_{j≠cls} (f_j + ε·K_{cls,j})`` (B,), the GloRo ⊥ logit for class ``cls``."""
    rival = logits + eps * k_rows
    rival = rival.masked_fill(F.one_hot(cls, logits.shape[1]).bool(), -math.inf)
    return rival.amax(dim=1)


def eps_at(eps: float, progress: float, warmup: float) -> float:
    """Linear ε warm-up from 0 over the first ``warmup`` fraction of training."""
    if warmup <= 0:
        return float(eps)
    return float(eps) * min(1.0, max(0.0, progress) / warmup)


class GloroMethod:
    """The ``gloro`` training method (see the module docstring)."""

    name = "gloro"
    needs: tuple[str, ...] = ("eps",)

    def __init__(self) -> None:
        self._estimators: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, PowerIterationEstimator]]" = weakref.WeakKeyDictionary()

    @staticmethod
    def options(config: Any) -> tuple[float, int]:
        extra = dict(getattr(config, "extra", None) or {})
        unknown = set(extra) - {"trades", "power_iters"}
        if unknown:
            raise InputError(f"unknown gloro option(s): {', '.join(sorted(unknown))} (known: trades, power_iters)")
        try:
            lam = float(extra.get("trades") or 0.0)
            iters = int(extra.get("power_iters", 5))
        except (TypeError, ValueError):
            raise InputError("gloro options: trades must be a number >= 0, power_iters an integer >= 1") from None
        if not (lam >= 0 and math.isfinite(lam)):
            raise InputError(f"gloro trades λ must be a finite number >= 0, got {extra.get('trades')!r}")
        if iters < 1:
            raise InputError(f"gloro power_iters must be >= 1, got {iters}")
        return lam, iters

    def setup(self, model: nn.Module, config: Any) -> None:
        mods = flatten_modules(model)
        last = mods[-1][1] if mods else None
        if not isinstance(last, nn.Linear):
            raise InputError("gloro training needs a feed-forward nn.Sequential ending in nn.Linear (2c2f, 4c3f, 6c2f)")
        walk(model, None, last.out_features)
        self.options(config)
        self._estimators.pop(model, None)

    def estimator(self, model: nn.Module, input_shape: tuple[int, ...], generator: torch.Generator | None = None) -> PowerIterationEstimator:
        hit = self._estimators.get(model)
        if hit is not None and hit[0] == input_shape:
            return hit[1]
        last = flatten_modules(model)[-1][1]
        est = PowerIterationEstimator(model, input_shape, last.out_features, generator)  # type: ignore[arg-type]
        self._estimators[model] = (input_shape, est)
        return est

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: Any, info: Any) -> tuple[torch.Tensor, torch.Tensor]:
        lam, iters = self.options(config)
        est = self.estimator(model, tuple(int(s) for s in x.shape[1:]), getattr(info, "generator", None))
        eps = eps_at(config.eps, float(getattr(info, "progress", 1.0)), float(config.eps_warmup))
        logits = model(x)  # (B, C)
        lip = est(iters)
        w = est.layers[-1].module.weight  # type: ignore[union-attr]
        k = lip * pairwise_distances(w)  # (C, C)
        if lam > 0:
            pred = logits.argmax(dim=1)
            aug = torch.cat([logits, bottom_logit(logits, k[pred], pred, eps).unsqueeze(1)], dim=1)
            p = F.pad(F.softmax(logits, dim=1), (0, 1))  # ⊥ gets probability 0
            kl = (torch.xlogy(p, p) - p * F.log_softmax(aug, dim=1)).sum(dim=1).mean()
            loss = F.cross_entropy(logits, y) + lam * kl
        else:  # GloRo: the ⊥ logit of the *predicted* class j = argmax f, cross-entropy with y
            pred = logits.detach().argmax(dim=1)
            aug = torch.cat([logits, bottom_logit(logits, k[pred], pred, eps).unsqueeze(1)], dim=1)
            loss = F.cross_entropy(aug, y)
        return loss, aug

    def meta(self, config: Any) -> dict[str, Any]:
        return {"eps": float(config.eps), "norm": "l2"}


GLORO_METHOD = GloroMethod()
"""The instance registered as ``gloro`` in :data:`certaudit.train.LAZY_METHODS`."""

__all__ = ["GloroMethod", "GLORO_METHOD", "PowerIterationEstimator", "eps_at", "bottom_logit", "pairwise_distances"]
