"""Shadow Attack settings and the pieces of Eq. 3 that do not involve the model.

:class:`ShadowConfig` holds the attack's hyper-parameters (the paper's defaults for randomized
smoothing, and :meth:`ShadowConfig.crown_ibp` for Section 5). The penalty functions compute
``C(δ)``, ``TV(δ)`` and ``Dissim(δ)`` per pair on the perturbation as applied to the image, and
:func:`mix_seed` turns (base seed, role, index, ...) into the 63-bit seeds of every random draw the
attack makes, so results depend on the seed and the image indices only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from certaudit import validate
from certaudit.attacks.budget import Budget
from certaudit.errors import InputError

COLOR_MODES = ("mean_abs", "l2")
OPTIMIZERS = ("sgd", "adam")
CHANNEL_MODES = (1, 3)

_SEED_MASK = (1 << 63) - 1
# Roles keep the seeds of different kinds of draws apart (see :func:`mix_seed`).
ROLE_INIT, ROLE_NOISE, ROLE_STEP, ROLE_MARGIN = 1, 2, 3, 4


# --------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class ShadowConfig:
    """Hyper-parameters of the Shadow Attack; the defaults are the paper's for randomized smoothing.

    Section 3: 300 SGD steps with learning rate 0.1, ``λtv = 0.3``, ``λc = 1.0``, ``λs = 0.5``. The
    paper ran both the 1-channel and the 3-channel attack against smoothing (3-channel: always
    successful; 1-channel: 98.5 %; Table 1 does not say which produced it); the default here is
    1-channel (``channels``), as in the paper's ablations and its CROWN-IBP runs. ``init``: half-width
    of the uniform random start ``δ0 ~ U(−init, init)`` (the authors' code: 0.5; 0 starts at δ = 0). ``color``:
    ``"mean_abs"`` (the paper's C) or ``"l2"`` (``‖δ‖₂``, the CROWN-IBP setting, see :meth:`crown_ibp`).
    ``optimizer``: ``"sgd"`` (plain gradient ascent ``δ ← δ + lr·∇``, as the authors) or ``"adam"``.

    Perceptual budget (:mod:`certaudit.attacks.budget`; ``None`` = none, the paper's unbounded attack):
    ``max_linf`` τ in [1e-6, 1] projects δ onto ``[−τ, τ] ∩ [−x, 1 − x]`` after every step, scales
    every step down (direction kept) to an ℓ∞ norm of at most ``τ/4`` so that ``lr`` cannot throw δ
    onto the corners of the box, and scales the random start to ``U(−min(init, τ), min(init, τ))``;
    ``min_ssim`` s in (0, 1] halves the random start until it is feasible (``SSIM ≥ s``; 8 halvings,
    then δ0 = 0), adds the penalty ``lambda_ssim · max(0, s − SSIM(x, x_adv))`` to Eq. 3 and returns,
    per pair, the iterate with the best objective among those with ``SSIM ≥ s`` (the last iterate
    where none is, which cannot happen when the start is feasible).

    Numbers may be given as anything :mod:`certaudit.validate` reads (``max_linf="16/255"``, ``steps=300.0``);
    the fields hold the checked values (floats, ``steps`` and ``channels`` ints), never the input as given.
    """

    steps: int = 300
    lr: float = 0.1
    lambda_tv: float = 0.3
    lambda_c: float = 1.0
    lambda_s: float = 0.5
    channels: int = 1
    optimizer: str = "sgd"
    init: float = 0.5
    color: str = "mean_abs"
    max_linf: float | None = None
    min_ssim: float | None = None
    lambda_ssim: float = 10.0

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {"steps": validate.count(self.steps, "steps"), "lr": validate.positive(self.lr, "lr")}
        if isinstance(self.channels, bool) or not isinstance(self.channels, (int, float)) or \
                self.channels not in CHANNEL_MODES:
            raise InputError(f"channels must be 1 or 3, got {validate.shown(self.channels)}")
        checked["channels"] = int(self.channels)
        for name in ("lambda_tv", "lambda_c", "lambda_s", "init", "lambda_ssim"):
            checked[name] = validate.nonnegative(getattr(self, name), name)
        budget = Budget(self.max_linf, self.min_ssim)  # raises InputError on a bad budget
        checked.update(max_linf=budget.max_linf, min_ssim=budget.min_ssim)
        for name, value in checked.items():  # frozen: store the checked values, not the input as given
            object.__setattr__(self, name, value)
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.color not in COLOR_MODES:
            raise InputError(f"unknown color penalty {self.color!r}; choose one of: {', '.join(COLOR_MODES)}")

    @classmethod
    def crown_ibp(cls, **overrides: Any) -> "ShadowConfig":
        """Section 5's setting against CROWN-IBP: ``λtv = 9e-6``, ``λc = 0.02`` with ``C = ‖δ‖₂``, lr 200, 1-channel."""
        base = dict(lambda_tv=9e-6, lambda_c=0.02, color="l2", lr=200.0, channels=1)
        base.update(overrides)
        return cls(**base)

    @property
    def budget(self) -> Budget:
        """The perceptual budget the attack is held to (``Budget()``: unbounded)."""
        return Budget(self.max_linf, self.min_ssim)

    def with_(self, **changes: Any) -> "ShadowConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ------------------------------------------------------------------------------------- penalties

def color_penalty(delta: torch.Tensor, mode: str = "mean_abs") -> torch.Tensor:
    """``C(δ)`` per example, (P,): ‖(mean|δ_c|)_c‖₂ over channels (``"mean_abs"``), or ‖δ‖₂ (``"l2"``)."""
    if mode == "mean_abs":
        return torch.linalg.vector_norm(delta.abs().mean(dim=(2, 3)), dim=1)  # (P, C) -> (P,)
    if mode == "l2":
        return torch.linalg.vector_norm(delta.flatten(1), dim=1)
    raise InputError(f"unknown color penalty {mode!r}; choose one of: {', '.join(COLOR_MODES)}")


def tv_penalty(delta: torch.Tensor) -> torch.Tensor:
    """``TV(δ)`` per example, (P,): squared vertical plus horizontal neighbour differences, all channels."""
    dv = delta[:, :, 1:, :] - delta[:, :, :-1, :]  # (P, C, H-1, W)
    dh = delta[:, :, :, 1:] - delta[:, :, :, :-1]  # (P, C, H, W-1)
    return dv.square().sum(dim=(1, 2, 3)) + dh.square().sum(dim=(1, 2, 3))


def dissim_penalty(delta: torch.Tensor) -> torch.Tensor:
    """``Dissim(δ)`` per example, (P,): ‖((δ_a − δ_b)²)_{a<b}‖₂ over channel pairs (0 for one channel).

    For RGB this is the paper's ‖((δR−δG)², (δR−δB)², (δG−δB)²)‖₂.
    """
    c = delta.shape[1]
    if c < 2:
        return delta.new_zeros(delta.shape[0])
    a, b = torch.triu_indices(c, c, offset=1, device=delta.device)
    sq = (delta[:, a] - delta[:, b]).square()  # (P, pairs, H, W)
    return torch.linalg.vector_norm(sq.flatten(1), dim=1)


def penalty_terms(delta: torch.Tensor, config: ShadowConfig) -> dict[str, torch.Tensor]:
    """The three penalties of Eq. 3 on a perturbation as applied to the image (P, C, H, W), each (P,)."""
    return {"color": color_penalty(delta, config.color), "tv": tv_penalty(delta), "dissim": dissim_penalty(delta)}


def delta_channels(config: ShadowConfig, image_channels: int) -> int:
    """Channels of the optimized δ: 1 for the 1-channel attack or grey images, else the image's."""
    return 1 if config.channels == 1 or image_channels == 1 else int(image_channels)


def expand_delta(delta: torch.Tensor, image_channels: int) -> torch.Tensor:
    """δ (P, 1 or C, H, W) as applied to a C-channel image: a 1-channel δ is copied to every channel."""
    return delta.expand(-1, image_channels, -1, -1) if delta.shape[1] == 1 else delta


# ----------------------------------------------------------------------------------------- seeds

def mix_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (base seed, role, index, ...)."""
    text = "certaudit-shadow-v1:" + ":".join(str(int(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _SEED_MASK


def noise_key(base: int, index: int) -> int:
    """Noise key of the image with data-set index ``index``: all its targets share its copies."""
    return mix_seed(base, ROLE_NOISE, index)


def base_seed(seed: int | None = None, generator: torch.Generator | None = None) -> int:
    """The run's base seed: ``seed``, else one drawn from ``generator``, else 0 (never the global RNG)."""
    drawn = validate.seed_or_draw(seed, generator)
    return 0 if drawn is None else drawn


__all__ = [
    "ShadowConfig", "color_penalty", "tv_penalty", "dissim_penalty", "penalty_terms", "expand_delta",
    "delta_channels", "mix_seed", "noise_key", "base_seed", "COLOR_MODES", "OPTIMIZERS", "CHANNEL_MODES",
]
