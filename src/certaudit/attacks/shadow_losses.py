"""The spoofing losses ``L`` of Eq. 3 that the Shadow Attack minimizes.

:class:`SpoofLoss` is the interface :func:`~certaudit.attacks.shadow.shadow_attack` calls: a value
and an input gradient per (image, target) pair. :class:`SmoothedCrossEntropy` is the paper's loss
for randomized smoothing (Ghiasi, Shafahi & Goldstein, ICLR 2020, Section 3): the mean
cross-entropy toward the target over Gaussian copies, cut into memory-sized chunks.
:class:`DefenseMargin` makes any defense's differentiable ``margin(x, r, t)`` a loss, so Lipschitz
and interval (IBP / CROWN-IBP) defenses are attacked with the same loop.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from certaudit import validate
from certaudit.attacks.shadow_config import ROLE_MARGIN, ROLE_STEP, mix_seed
from certaudit.defenses.base import Defense
from certaudit.errors import InputError

NOISE_MODES = ("fixed", "fresh")

CPU_CHUNK_BYTES = 96 * 2**20  # activations kept for backward by one (pair × copy) chunk on CPU
CUDA_CHUNK_FRACTION = 0.35  # of the free device memory for one chunk
CPU_NOISE_BYTES = 256 * 2**20  # Gaussian copies held for one group of images on CPU
CUDA_NOISE_FRACTION = 0.2
MAX_CHUNK_ROWS = 65536


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
        self.sigma = validate.nonnegative(sigma, "sigma")
        self.samples = validate.count(samples, "samples")
        if noise not in NOISE_MODES:
            raise InputError(f"unknown noise mode {noise!r}; choose one of: {', '.join(NOISE_MODES)}")
        self.noise = noise
        self.chunk_rows = None if chunk_rows is None else validate.count(chunk_rows, "chunk_rows")
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
        return out.normal_(0.0, 1.0, generator=gen.manual_seed(mix_seed(int(key), ROLE_STEP, tag)))

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
        if not isinstance(defense, Defense):
            raise InputError(f"{type(defense).__name__} is not a certaudit Defense (no margin(x, eps, target) to attack)")
        self.defense = defense
        self.radius = validate.nonnegative(radius, "radius")
        self.chunk = None if chunk is None else validate.count(chunk, "chunk")
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
                    kwargs["generator"] = g.manual_seed(mix_seed(int(keys[lo]), ROLE_MARGIN, step, lo))
                m = self.defense.margin(xa, self.radius, target[lo:lo + chunk], **kwargs)  # (c,)
                (g_x,) = torch.autograd.grad(-m.sum(), xa)
                values.append(-m.detach().float())
                grads.append(g_x)
        return torch.cat(values), torch.cat(grads)


# ----------------------------------------------------------------------------------- model memory

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
    "SpoofLoss", "SmoothedCrossEntropy", "DefenseMargin", "NOISE_MODES", "CPU_CHUNK_BYTES",
    "CUDA_CHUNK_FRACTION", "CPU_NOISE_BYTES", "CUDA_NOISE_FRACTION", "MAX_CHUNK_ROWS",
]
