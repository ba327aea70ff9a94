"""Certified training for ℓ∞: CROWN-IBP (Zhang et al. 2020) and IBP (Gowal et al. 2018).

Loss at training progress ``p`` (fraction of all steps), with the ramp ``r = clamp((p − ramp_start) /
eps_warmup, 0, 1)`` (``TrainConfig.eps_warmup``, ``extra["ramp_start"]``, default 0):

    ε_t = r·ε,   κ_t = κ_start + r·(κ_end − κ_start),   β_t = β_start + r·(β_end − β_start)
    m   = β_t·m_CROWN-IBP(x, ε_t) + (1 − β_t)·m_IBP(x, ε_t)       (lower bounds of f_y − f_j)
    L   = κ_t·CE(f(x), y) + (1 − κ_t)·CE(−m, y)                     (m_y = 0)

(Zhang et al. 2020, eq. (5) and §4: ε ramped linearly, β from 1 to 0 across the ramp, κ from 1 to
κ_end). Methods and their defaults (``TrainConfig.extra`` overrides ``kappa_start``,
``kappa_end``, ``beta_start``, ``beta_end``, ``ramp_start``):

* ``crown-ibp``: β 1 → 0, κ 1 → 0 (Zhang et al.'s CROWN-IBP);
* ``ibp``: β 0 → 0, κ 1 → 0.5 (Gowal et al.'s IBP; pure interval bounds).

The bounds are the unsound (plain float32) training bounds of :mod:`.bounds`, differentiable in
the parameters; certification afterwards uses the sound ones. Models must be an ``nn.Sequential``
of supported layers without BatchNorm (BatchNorm in training mode is refused).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.defenses.interval.bounds import compile_network, spec_bounds, specification
from certaudit.defenses.interval.ops import check_supported
from certaudit.errors import InputError

_KNOBS = ("kappa_start", "kappa_end", "beta_start", "beta_end", "ramp_start")


class IntervalTraining:
    """A :class:`certaudit.train.Method` for CROWN-IBP / IBP training."""

    needs: tuple[str, ...] = ("eps",)

    def __init__(self, name: str, *, beta_start: float, beta_end: float, kappa_start: float, kappa_end: float):
        self.name = name
        self.defaults = {"beta_start": beta_start, "beta_end": beta_end, "kappa_start": kappa_start,
                         "kappa_end": kappa_end, "ramp_start": 0.0}

    def options(self, config) -> dict[str, float]:
        extra = dict(getattr(config, "extra", None) or {})
        unknown = sorted(set(extra) - set(_KNOBS))
        if unknown:
            raise InputError(f"unknown option(s) for training method {self.name!r}: {', '.join(unknown)}; "
                             f"known: {', '.join(_KNOBS)}")
        out = dict(self.defaults)
        for k, v in extra.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise InputError(f"{k} must be a number in [0, 1], got {v!r}") from None
            if not 0.0 <= fv <= 1.0:
                raise InputError(f"{k} must be a number in [0, 1], got {v!r}")
            out[k] = fv
        return out

    def setup(self, model: nn.Module, config) -> None:
        check_supported(model)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise InputError(f"training method {self.name!r} does not support BatchNorm layers "
                                 "(interval bounds fold BatchNorm in eval mode only)")
        self.options(config)

    def schedule(self, config, progress: float) -> tuple[float, float, float]:
        """(ε_t, κ_t, β_t) at a training progress in [0, 1]."""
        o = self.options(config)
        warm = float(config.eps_warmup)
        p = float(progress) - o["ramp_start"]
        r = 1.0 if warm <= 0 and p >= 0 else (0.0 if p <= 0 else min(1.0, p / warm))
        eps = float(config.eps) * r
        kappa = o["kappa_start"] + r * (o["kappa_end"] - o["kappa_start"])
        beta = o["beta_start"] + r * (o["beta_end"] - o["beta_start"])
        return eps, kappa, beta

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config, info) -> tuple[torch.Tensor, torch.Tensor]:
        eps, kappa, beta = self.schedule(config, info.progress)
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        if eps <= 0 or kappa >= 1:
            return natural, logits
        robust = F.cross_entropy(robust_logits(model, x, y, eps, beta), y)
        return kappa * natural + (1 - kappa) * robust, logits

    def meta(self, config) -> dict[str, Any]:
        return {"eps": float(config.eps), "norm": "linf"}


def robust_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float) -> torch.Tensor:
    """``−m`` (B, K): minus the lower bounds of ``f_y − f_j`` (0 at ``y``), for the robust cross-entropy."""
    net = compile_network(model, tuple(x.shape[1:]))
    k = net.num_classes
    c, others = specification(y, k, x.dtype)
    low = spec_bounds(net, x, eps, c, "crown-ibp", sound=False, beta=beta)
    z = torch.zeros(x.shape[0], k, dtype=low.dtype, device=x.device)
    return z.scatter(1, others, -low)


CROWN_IBP = IntervalTraining("crown-ibp", beta_start=1.0, beta_end=0.0, kappa_start=1.0, kappa_end=0.0)
IBP = IntervalTraining("ibp", beta_start=0.0, beta_end=0.0, kappa_start=1.0, kappa_end=0.5)
