"""Shadow Attack (Ghiasi, Shafahi & Goldstein, ICLR 2020): large, smooth perturbations that make a
certified defense issue a *spoofed* certificate for a wrong label.

For every (image ``x``, target ``t``) pair the attack maximizes, over an unbounded perturbation δ,

    −L(clip(x + δ, 0, 1), t) − λc·C(δ) − λtv·TV(δ) − λs·Dissim(δ)          (Eq. 3; Eq. 4 over t ≠ y)

with the paper's penalties (Section 3), computed on the perturbation as applied to the image (a
1-channel δ is broadcast to every channel first, as the authors' code does):

* ``C(δ) = ‖(mean|δ_R|, mean|δ_G|, mean|δ_B|)‖₂`` (:func:`color_penalty`; the CROWN-IBP setting of
  Section 5 uses ``C(δ) = ‖δ‖₂`` instead: ``color="l2"``);
* ``TV(δ)`` = the anisotropic total variation squared, ``Σ (δ_{i+1,j} − δ_{i,j})² + (δ_{i,j+1} − δ_{i,j})²``
  summed over channels (:func:`tv_penalty`);
* ``Dissim(δ) = ‖((δ_R − δ_G)², (δ_R − δ_B)², (δ_G − δ_B)²)‖₂`` for a 3-channel δ
  (:func:`dissim_penalty`), or 0 for the *1-channel* attack whose single δ is copied to all channels.

The spoofing loss ``L`` is pluggable (:class:`SpoofLoss`): :class:`SmoothedCrossEntropy` is the
paper's loss for randomized smoothing (mean cross-entropy toward ``t`` over ``n`` Gaussian copies),
and :class:`DefenseMargin` turns any defense's differentiable ``margin(x, r, t)`` (the protocol of
:mod:`certaudit.defenses.base`) into a loss, so Lipschitz and interval (IBP / CROWN-IBP) defenses
are attacked with the same code.

Batching: :func:`shadow_attack` optimizes *all* (image, target) pairs of a call at once; the
untargeted attack of Eq. 4 is every wrong class of every image in one batch
(:func:`wrong_class_pairs`). The objective is a *sum over pairs* of per-pair objectives, so the
gradient each pair receives is exactly the gradient of its own single-pair objective (the
classification term is the mean over that pair's noise copies, never divided again by the number
of copies). Big (pair × copy) batches are cut into memory-sized chunks whose gradients are added,
which gives the unchunked gradient.

Randomness: every draw comes from generators seeded by a hash of (base seed, role, image index,
target or step): the random start of pair (i, t), and the Gaussian copies of image i (shared by
all targets of the image, fixed for the whole run as in the authors' code, or fresh at every step).
Results therefore depend on the seed and the image indices, not on batch composition or chunking.

What counts as *success* is not decided here: a spoof succeeds only when the real defense's
CERTIFY, run afresh on ``x + δ``, returns a wrong label (see :mod:`certaudit.audits.spoofing`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.errors import InputError

COLOR_MODES = ("mean_abs", "l2")
OPTIMIZERS = ("sgd", "adam")
NOISE_MODES = ("fixed", "fresh")
CHANNEL_MODES = (1, 3)

CPU_CHUNK_BYTES = 96 * 2**20  # activations kept for backward by one (pair × copy) chunk on CPU
CUDA_CHUNK_FRACTION = 0.35  # of the free device memory for one chunk
CPU_NOISE_BYTES = 256 * 2**20  # Gaussian copies held for one group of images on CPU
CUDA_NOISE_FRACTION = 0.2
MAX_CHUNK_ROWS = 65536

_SEED_MASK = (1 << 63) - 1
_ROLE_INIT, _ROLE_NOISE, _ROLE_STEP, _ROLE_MARGIN = 1, 2, 3, 4


# --------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class ShadowConfig:
    """Hyper-parameters of the Shadow Attack; the defaults are the paper's for randomized smoothing.

    Section 3: 300 SGD steps with learning rate 0.1, ``λtv = 0.3``, ``λc = 1.0``, ``λs = 0.5`` (the
    authors' smoothing runs used the 1-channel attack). ``init``: half-width of the uniform random
    start ``δ0 ~ U(−init, init)`` (the authors' code: 0.5; 0 starts at δ = 0). ``color``:
    ``"mean_abs"`` (the paper's C) or ``"l2"`` (``‖δ‖₂``, the CROWN-IBP setting, see :meth:`crown_ibp`).
    ``optimizer``: ``"sgd"`` (plain gradient ascent ``δ ← δ + lr·∇``, as the authors) or ``"adam"``.
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

    def __post_init__(self) -> None:
        _integer("steps", self.steps, minimum=1)
        if isinstance(self.channels, bool) or self.channels not in CHANNEL_MODES:
            raise InputError(f"channels must be 1 or 3, got {self.channels!r}")
        _number("lr", self.lr, strictly_positive=True)
        for name in ("lambda_tv", "lambda_c", "lambda_s", "init"):
            _number(name, getattr(self, name))
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

    def with_(self, **changes: Any) -> "ShadowConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _integer(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, strictly_positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (strictly_positive and v == 0):
        bound = "> 0" if strictly_positive else ">= 0"
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


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


# ----------------------------------------------------------------------------------- spoof losses

class SpoofLoss(Protocol):
    """The spoofing loss ``L`` of Eq. 3 (lower is a stronger certificate for the target).

    ``loss(x_adv, target, keys, step) -> (value (P,), grad (P, C, H, W))``: ``x_adv`` are the
    clipped adversarial images of P pairs (no autograd graph), ``target`` their target classes,
    ``keys`` (P,) int64 noise keys (equal for pairs that share an image: they share noise copies),
    ``step`` the optimization step. ``grad[p]`` must be the gradient of ``value[p]`` with respect to
    ``x_adv[p]`` alone (per-pair losses are independent).
    """

    def __call__(self, x_adv: torch.Tensor, target: torch.Tensor, keys: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def settings(self) -> dict[str, Any]:
        """What determines the loss (for result headers)."""
        ...

    def max_images(self, sample_shape: tuple[int, ...]) -> int:
        """How many images the attack may optimize as one group (memory)."""
        ...


class SmoothedCrossEntropy:
    """The paper's spoofing loss for randomized smoothing (Section 3):

        L(x, t) = (1/n) Σ_k CE(f(x + σ·ε_k), t),   ε_k ~ N(0, I),

    the mean cross-entropy toward ``t`` over ``n = samples`` Gaussian copies. ``noise="fixed"``
    draws the copies of an image once for the whole run (as the authors' code did: an expectation
    over *these* copies is optimized, like a universal perturbation); ``"fresh"`` draws new copies
    at every step (a stochastic-gradient estimate of the true expectation).

    The (pair × copy) batch is cut into chunks of ``chunk_rows`` rows (default: from memory, see
    :meth:`rows_per_chunk`); each chunk's gradient is added, so the result equals the unchunked
    objective's. Model parameters receive no gradient. The model is put in eval mode.
    """

    def __init__(self, model: nn.Module, sigma: float, samples: int = 400, noise: str = "fixed",
                 chunk_rows: int | None = None, noise_budget_bytes: int | None = None):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model.eval()
        self.sigma = _number("sigma", sigma)
        self.samples = _integer("samples", samples, minimum=1)
        if noise not in NOISE_MODES:
            raise InputError(f"unknown noise mode {noise!r}; choose one of: {', '.join(NOISE_MODES)}")
        self.noise = noise
        self.chunk_rows = None if chunk_rows is None else _integer("chunk_rows", chunk_rows, minimum=1)
        self.noise_budget_bytes = noise_budget_bytes
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (unique keys, step tag, noise)
        self._rows: dict[tuple, int] = {}

    def settings(self) -> dict[str, Any]:
        return {"loss": "ce", "sigma": self.sigma, "samples": self.samples, "noise": self.noise}

    @property
    def device(self) -> torch.device:
        return _module_device(self.model)

    def __call__(self, x_adv: torch.Tensor, target: torch.Tensor, keys: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        p_count, s = x_adv.shape[0], self.samples
        uniq, inv = torch.unique(keys, return_inverse=True)  # pairs of one image share its copies
        noise = self._noise_for(uniq, step, tuple(x_adv.shape[1:]), x_adv.device)  # (U, S, C, H, W)
        xa = x_adv.detach().requires_grad_(True)  # (P, C, H, W)
        grad = torch.zeros_like(xa)
        value = torch.zeros(p_count, dtype=torch.float32, device=xa.device)
        rows = self.rows_per_chunk(tuple(x_adv.shape[1:]))
        total = p_count * s
        with torch.enable_grad():
            for lo in range(0, total, rows):
                r = torch.arange(lo, min(total, lo + rows), device=xa.device)  # flat (pair, copy) rows
                p, k = r // s, r % s  # (R,) pair and copy of each row
                noisy = xa[p] + self.sigma * noise[inv[p], k]  # (R, C, H, W)
                ce = F.cross_entropy(self.model(noisy).float(), target[p], reduction="none")  # (R,)
                # Σ over pairs of (1/S)·Σ over the pair's copies: each pair's gradient is its own mean's.
                (g,) = torch.autograd.grad(ce.sum() / s, xa)
                grad += g
                value.index_add_(0, p, ce.detach() / s)
        return value, grad

    def _noise_for(self, uniq: torch.Tensor, step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        tag = 0 if self.noise == "fixed" else int(step) + 1
        if self._cache is not None:
            keys, cached_tag, noise = self._cache
            if (cached_tag == tag and keys.shape == uniq.shape and noise.shape[2:] == shape
                    and noise.device == device and bool(torch.equal(keys, uniq.to(keys.device)))):
                return noise
        self._cache = None  # free the old copies before drawing new ones
        noise = torch.empty((uniq.shape[0], self.samples, *shape), device=device)
        gen = torch.Generator(device=device)
        for u, key in enumerate(uniq.tolist()):  # one generator per image, never per sample
            self.copies(int(key), step, shape, device, out=noise[u], generator=gen)
        self._cache = (uniq.clone(), tag, noise)
        return noise

    def copies(self, key: int, step: int, shape: tuple[int, ...], device: torch.device | str = "cpu", *,
               out: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The standard-normal copies ε (S, C, H, W) of the image with noise key ``key`` at ``step``.

        Drawn with ``normal_`` from a generator seeded by ``mix_seed(key, 3, tag)``, ``tag = 0`` for
        fixed noise and ``step + 1`` for fresh noise; the noisy inputs are ``x_adv + σ·ε``.
        """
        tag = 0 if self.noise == "fixed" else int(step) + 1
        dev = torch.device(device)
        if out is None:
            out = torch.empty((self.samples, *shape), device=dev)
        gen = generator if generator is not None else torch.Generator(device=dev)
        return out.normal_(0.0, 1.0, generator=gen.manual_seed(mix_seed(int(key), _ROLE_STEP, tag)))

    def rows_per_chunk(self, sample_shape: tuple[int, ...]) -> int:
        """(pair × copy) rows per forward/backward: the user's ``chunk_rows``, else from memory.

        CPU: rows whose saved activations (summed over layers, measured once with forward hooks)
        fill :data:`CPU_CHUNK_BYTES`; CUDA: :data:`CUDA_CHUNK_FRACTION` of the free memory.
        """
        if self.chunk_rows is not None:
            return self.chunk_rows
        dev = self.device
        key = (dev.type, dev.index, tuple(sample_shape))
        if key not in self._rows:
            per_row = 3.0 * _activation_bytes(self.model, tuple(sample_shape), dev)  # forward + backward
            if dev.type == "cuda":
                free, _ = torch.cuda.mem_get_info(dev)
                budget = CUDA_CHUNK_FRACTION * free
            else:
                budget = CPU_CHUNK_BYTES
            self._rows[key] = int(max(1, min(MAX_CHUNK_ROWS, budget // max(per_row, 1.0))))
        return self._rows[key]

    def max_images(self, sample_shape: tuple[int, ...]) -> int:
        """Images whose noise copies fit the noise budget (the attack optimizes them as one group)."""
        per_image = 4.0 * self.samples * math.prod(sample_shape)
        if self.noise_budget_bytes is not None:
            budget = float(self.noise_budget_bytes)
        elif self.device.type == "cuda":
            budget = CUDA_NOISE_FRACTION * torch.cuda.mem_get_info(self.device)[0]
        else:
            budget = CPU_NOISE_BYTES
        return int(max(1, budget // per_image))


class DefenseMargin:
    """``L(x, t) = −defense.margin(x, radius, t)``: any defense's certificate surrogate as spoofing loss.

    The margin is positive iff the defense would certify ``t`` at radius ``radius`` (Lipschitz:
    logit margin minus radius·K; IBP/CROWN-IBP: worst-case lower bound of the margin, the loss term
    of IBP training that Section 5 attacks; smoothing: a Monte-Carlo soft estimate). Pairs are
    independent, so they are processed in chunks of ``chunk`` pairs. Extra keyword arguments go to
    ``margin`` (e.g. ``n_samples`` for smoothing); a defense whose margin takes a ``generator`` gets
    one seeded from the pairs' keys and the step.
    """

    def __init__(self, defense: Any, radius: float, chunk: int | None = None, **margin_kwargs: Any):
        from certaudit.defenses.base import Defense

        if not isinstance(defense, Defense):
            raise InputError(f"{type(defense).__name__} is not a certaudit Defense (no margin(x, eps, target) to attack)")
        self.defense = defense
        self.radius = _number("radius", radius)
        self.chunk = None if chunk is None else _integer("chunk", chunk, minimum=1)
        self.margin_kwargs = dict(margin_kwargs)
        self._takes_generator = bool(defense.randomized)  # a Monte-Carlo margin takes a seeded generator

    def settings(self) -> dict[str, Any]:
        return {"loss": "margin", "radius": self.radius, **{k: v for k, v in self.margin_kwargs.items()}}

    def max_images(self, sample_shape: tuple[int, ...]) -> int:
        """Images per group (and the spoof verb's images per chunk): the margin holds no noise copies,
        so memory is the bound propagation's; 64 images × (K − 1) targets per group."""
        return 64

    def __call__(self, x_adv: torch.Tensor, target: torch.Tensor, keys: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        p_count = x_adv.shape[0]
        chunk = self.chunk or p_count
        values, grads = [], []
        with torch.enable_grad():
            for lo in range(0, p_count, chunk):
                xa = x_adv[lo:lo + chunk].detach().requires_grad_(True)  # (c, C, H, W)
                kwargs = dict(self.margin_kwargs)
                if self._takes_generator:
                    g = torch.Generator(device=xa.device)
                    kwargs["generator"] = g.manual_seed(mix_seed(int(keys[lo]), _ROLE_MARGIN, step, lo))
                m = self.defense.margin(xa, self.radius, target[lo:lo + chunk], **kwargs)  # (c,)
                (g_x,) = torch.autograd.grad(-m.sum(), xa)
                values.append(-m.detach().float())
                grads.append(g_x)
        return torch.cat(values), torch.cat(grads)


# --------------------------------------------------------------------------------------- attack

@dataclass
class ShadowResult:
    """Outcome of :func:`shadow_attack`, one entry per (image, target) pair.

    ``delta`` is the optimized δ as applied to the image (a 1-channel δ copied to every channel);
    ``x_adv = clip(x + delta, 0, 1)`` is the image to certify; ``loss`` the spoofing loss ``L`` and
    ``objective`` the objective of Eq. 3 at the last evaluated step; ``color``, ``tv``, ``dissim``
    the penalties of the returned δ. ``image`` indexes the batch ``x``; ``target`` the target class.
    """

    delta: torch.Tensor  # (P, C, H, W)
    x_adv: torch.Tensor  # (P, C, H, W)
    image: torch.Tensor  # (P,) int64
    target: torch.Tensor  # (P,) int64
    loss: torch.Tensor  # (P,)
    objective: torch.Tensor  # (P,)
    color: torch.Tensor  # (P,)
    tv: torch.Tensor  # (P,)
    dissim: torch.Tensor  # (P,)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.target.shape[0])


def wrong_class_pairs(y: torch.Tensor, num_classes: int, candidates: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, target) pairs of the untargeted attack (Eq. 4): every class ≠ the true label.

    ``candidates`` restricts the targets (the paper's ImageNet runs used 10 class ids); the true
    label is always left out. Returns ``image`` (P,) and ``target`` (P,), grouped by image.
    """
    y = torch.as_tensor(y).long().flatten()
    k = int(num_classes)
    classes = torch.arange(k, device=y.device) if candidates is None else torch.as_tensor(
        sorted(set(int(c) for c in candidates)), dtype=torch.long, device=y.device)
    if classes.numel() == 0 or int(classes.min()) < 0 or int(classes.max()) >= k:
        raise InputError(f"target classes must lie in [0, {k}), got {classes.tolist()}")
    keep = classes[None, :] != y[:, None]  # (B, T)
    image = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(keep)[keep]
    target = classes[None, :].expand_as(keep)[keep]
    return image, target


def mix_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (base seed, role, index, ...)."""
    text = "certaudit-shadow-v1:" + ":".join(str(int(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _SEED_MASK


def noise_key(base: int, index: int) -> int:
    """Noise key of the image with data-set index ``index``: all its targets share its copies."""
    return mix_seed(base, _ROLE_NOISE, index)


def base_seed(seed: int | None = None, generator: torch.Generator | None = None) -> int:
    """The run's base seed: ``seed``, else one drawn from ``generator``, else 0 (never the global RNG)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer, got {seed!r}")
        return int(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return 0


def shadow_objective(loss: SpoofLoss, x_pair: torch.Tensor, delta: torch.Tensor, target: torch.Tensor,
                     keys: torch.Tensor, config: ShadowConfig, step: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 3 for P pairs: objective (P,), its gradient with respect to ``delta``, and its parts.

    ``x_pair`` (P, C, H, W) are the pairs' natural images, ``delta`` (P, 1 or C, H, W) the
    variables. The objective is ``−L(clip(x + δ)) − λc·C − λtv·TV − λs·Dissim``; the batched
    objective is the sum over pairs, so ``grad[p]`` is the gradient of pair p's own objective.
    """
    d = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        eff = expand_delta(d, x_pair.shape[1])  # (P, C, H, W)
        x_adv = (x_pair + eff).clamp(0.0, 1.0)  # the image optimized is the image certified
        value, g_x = loss(x_adv.detach(), target, keys, step)  # (P,), (P, C, H, W)
        terms = penalty_terms(eff, config)
        penalty = config.lambda_c * terms["color"] + config.lambda_tv * terms["tv"] + config.lambda_s * terms["dissim"]
        # d/dδ of Σ_p (−L_p − penalty_p): the chain rule through the clip for L, autograd for the penalties.
        (grad,) = torch.autograd.grad([x_adv, penalty.sum()], [d], grad_outputs=[-g_x, torch.ones_like(penalty.sum()).neg()])
    objective = (-value.detach() - penalty.detach()).float()
    parts = {"loss": value.detach(), **{k: v.detach() for k, v in terms.items()}, "x_adv": x_adv.detach()}
    return objective, grad, parts


def shadow_attack(loss: SpoofLoss, x: torch.Tensor, target: torch.Tensor, config: ShadowConfig | None = None, *,
                  image: torch.Tensor | None = None, indices: Sequence[int] | torch.Tensor | None = None,
                  seed: int | None = None, generator: torch.Generator | None = None,
                  images_per_group: int | None = None,
                  on_step: Callable[[int], None] | None = None) -> ShadowResult:
    """Run the Shadow Attack on every (image, target) pair at once.

    ``x`` (B, C, H, W) natural images in [0, 1]; ``target`` (P,) target classes; ``image`` (P,)
    which image of ``x`` each pair attacks (default: pair b attacks image b, P = B). For the
    untargeted attack pass the pairs of :func:`wrong_class_pairs`. ``indices`` (B,) are the images'
    data-set indices (default 0..B−1); seeds derive from (``seed`` or a draw from ``generator``,
    index), so a pair's result does not depend on which other pairs share the call.

    Images are processed in groups (all pairs of an image in the same group) of
    ``images_per_group`` (default: what the loss's memory budget allows, ``loss.max_images``);
    ``on_step(k)`` is called after each step of each group with the number of pairs stepped.
    """
    config = config or ShadowConfig()
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.numel() == 0 or not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise InputError("x must be non-empty, finite and in [0, 1]")
    b_count, c, h, w = x.shape
    target = torch.as_tensor(target, device=x.device).long().flatten()
    image = torch.arange(b_count, device=x.device) if image is None else torch.as_tensor(image, device=x.device).long().flatten()
    if image.shape != target.shape:
        raise InputError(f"image and target must have one entry per pair, got {tuple(image.shape)} and {tuple(target.shape)}")
    if image.numel() == 0:
        raise InputError("no (image, target) pairs to attack")
    if int(image.min()) < 0 or int(image.max()) >= b_count:
        raise InputError(f"image positions must lie in [0, {b_count})")
    idx = list(range(b_count)) if indices is None else [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if len(idx) != b_count:
        raise InputError(f"indices must have one entry per image ({b_count}), got {len(idx)}")
    base = base_seed(seed, generator)
    cd = delta_channels(config, c)

    # Groups of whole images: the attack on one image never depends on the group it lands in.
    per_group = images_per_group
    if per_group is None:
        per_group = min(b_count, int(loss.max_images((c, h, w))))
    per_group = max(1, int(per_group))
    image_cpu = image.cpu()
    order = torch.argsort(image_cpu, stable=True)  # pairs grouped by image
    p_count = int(target.shape[0])
    out_delta = torch.empty((p_count, c, h, w), device=x.device)
    out_x = torch.empty_like(out_delta)
    out = {k: torch.empty(p_count, device=x.device) for k in ("loss", "objective", "color", "tv", "dissim")}
    t0 = time.perf_counter()
    uniq_images = torch.unique(image_cpu).tolist()
    for g0 in range(0, len(uniq_images), per_group):
        members = uniq_images[g0:g0 + per_group]
        sel = order[torch.isin(image_cpu[order], torch.tensor(members, dtype=torch.long))]  # (Pg,) pair ids
        sel_dev = sel.to(x.device)
        img, tgt = image[sel_dev], target[sel_dev]  # (Pg,)
        x_pair = x[img]  # (Pg, C, H, W)
        keys = torch.tensor([noise_key(base, idx[i]) for i in img.tolist()], dtype=torch.long, device=x.device)
        delta = _random_start(config, base, [idx[i] for i in img.tolist()], tgt.tolist(), (cd, h, w), x.device)
        delta.requires_grad_(True)
        opt: torch.optim.Optimizer
        if config.optimizer == "adam":
            opt = torch.optim.Adam([delta], lr=config.lr, maximize=True)
        else:
            opt = torch.optim.SGD([delta], lr=config.lr, maximize=True)
        objective = value = None
        for step in range(config.steps):
            objective, grad, parts = shadow_objective(loss, x_pair, delta, tgt, keys, config, step)
            value = parts["loss"]
            delta.grad = grad
            opt.step()
            if on_step is not None:
                on_step(int(sel.shape[0]))
        with torch.no_grad():
            eff = expand_delta(delta.detach(), c)
            terms = penalty_terms(eff, config)
            out_delta[sel_dev] = eff
            out_x[sel_dev] = (x_pair + eff).clamp(0.0, 1.0)
            out["loss"][sel_dev] = value.float()
            out["objective"][sel_dev] = objective
            for k in ("color", "tv", "dissim"):
                out[k][sel_dev] = terms[k].float()
    return ShadowResult(delta=out_delta, x_adv=out_x, image=image, target=target, loss=out["loss"],
                        objective=out["objective"], color=out["color"], tv=out["tv"], dissim=out["dissim"],
                        seconds=time.perf_counter() - t0)


def _random_start(config: ShadowConfig, base: int, indices: list[int], targets: list[int],
                  shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """δ0 ~ U(−init, init) per pair, seeded by (base, image index, target)."""
    delta = torch.zeros((len(indices), *shape), device=device)
    if config.init > 0:
        gen = torch.Generator(device=device)
        for p, (i, t) in enumerate(zip(indices, targets)):
            delta[p].uniform_(-config.init, config.init, generator=gen.manual_seed(mix_seed(base, _ROLE_INIT, i, t)))
    return delta


def _module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _activation_bytes(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Bytes of all leaf-module outputs for one sample (what backward keeps), measured with hooks."""
    total = [4.0 * math.prod(shape)]

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += float(out[0].numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device))
    finally:
        for hd in handles:
            hd.remove()
    return total[0]


__all__ = [
    "ShadowConfig", "ShadowResult", "SpoofLoss", "SmoothedCrossEntropy", "DefenseMargin", "shadow_attack",
    "shadow_objective", "wrong_class_pairs", "color_penalty", "tv_penalty", "dissim_penalty", "penalty_terms",
    "expand_delta", "delta_channels", "mix_seed", "noise_key", "base_seed", "COLOR_MODES", "OPTIMIZERS", "NOISE_MODES",
]
