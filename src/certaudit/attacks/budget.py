"""Perceptual budgets of a spoof: SSIM (pytorch-msssim), the ℓ∞ box, and what "within budget" means.

A Shadow Attack spoof is only a spoof if the perturbed image still *is* the natural image to a human;
the paper judged that by eye. certaudit states a budget instead and holds the attack to it:

* ``max_linf`` τ: the largest change of any pixel (``‖x_adv − x‖∞ ≤ τ``, pixels in [0, 1]); the attack
  projects δ onto ``[−τ, τ] ∩ [−x, 1 − x]`` after every step;
* ``min_ssim`` s: ``SSIM(x, x_adv) ≥ s`` (structural similarity, Wang et al. 2004), a penalty during the
  attack and a check on the final image.

SSIM comes from ``pytorch_msssim.ssim`` (data range 1, K = (0.01, 0.03), Gaussian window, the mean of
the SSIM map, averaged over channels). The standard window is 11×11 with σ = 1.5; images smaller than
11 pixels on a side (the 8×8 digits) get a 5×5 window with σ = 1.0, i.e. 4×4 = 16 local windows on an
8×8 image, instead of the single 11-pixel window that would not fit (pytorch-msssim would then skip
the smoothing and compare pixels one by one). Sides below 5 use the largest odd window that fits.

A budget is :class:`Budget` (``None`` = no bound of that kind); ``Budget()`` is *unbounded*: the
paper's attack, whose "spoofs" may be any picture at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from pytorch_msssim import ssim as _msssim_ssim

from certaudit import validate
from certaudit.errors import InputError

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. (2004), pytorch-msssim's default
SMALL_WINDOW, SMALL_SIGMA = 5, 1.0  # images smaller than SSIM_WINDOW on a side
SSIM_K = (0.01, 0.03)
LINF_TOL = 1e-6  # float32 rounding of (x + δ) − x; a projected δ is within τ exactly
DEFAULT_SWEEP = (4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, None)  # None: unbounded


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """(window size, Gaussian σ) of the SSIM for an image of this size (see the module text)."""
    side = min(int(height), int(width))
    if side >= SSIM_WINDOW:
        return SSIM_WINDOW, SSIM_SIGMA
    win = min(SMALL_WINDOW, side if side % 2 else side - 1)
    return max(1, win), SMALL_SIGMA


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM(x[b], y[b]) per image, (B,) float32, differentiable; images (B, C, H, W) in [0, 1]."""
    if x.shape != y.shape or x.dim() != 4:
        raise InputError(f"ssim needs two image batches of one shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    win, sigma = ssim_window(x.shape[2], x.shape[3])
    return _msssim_ssim(x.float(), y.float(), data_range=1.0, size_average=False, win_size=win,
                        win_sigma=sigma, K=SSIM_K).reshape(x.shape[0])


def linf_text(tau: float | None) -> str:
    """τ as the reader thinks of it: ``16/255`` when it is a whole number of 8-bit steps, else ``0.05``."""
    if tau is None:
        return "∞"
    steps = tau * 255
    if abs(steps - round(steps)) < 1e-6 and round(steps) > 0:
        return f"{int(round(steps))}/255"
    return f"{tau:.4g}"


@dataclass(frozen=True)
class Budget:
    """A perceptual budget: ``max_linf`` τ (> 0) and ``min_ssim`` s in (0, 1]; ``None`` = no bound."""

    max_linf: float | None = None
    min_ssim: float | None = None

    def __post_init__(self) -> None:
        if self.max_linf is not None:
            object.__setattr__(self, "max_linf", validate.positive(self.max_linf, "max_linf"))
        if self.min_ssim is not None:
            object.__setattr__(self, "min_ssim", validate.number(self.min_ssim, "min_ssim", low=0.0, low_open=True,
                                                                 high=1.0))

    @property
    def unbounded(self) -> bool:
        return self.max_linf is None and self.min_ssim is None

    @property
    def label(self) -> str:
        """``ℓ∞ ≤ 16/255, SSIM ≥ 0.9``, or ``unbounded``."""
        if self.unbounded:
            return "unbounded"
        parts = [] if self.max_linf is None else [f"ℓ∞ ≤ {linf_text(self.max_linf)}"]
        if self.min_ssim is not None:
            parts.append(f"SSIM ≥ {self.min_ssim:g}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"max_linf": self.max_linf, "min_ssim": self.min_ssim}

    def sort_key(self) -> tuple[float, float]:
        return (math.inf if self.max_linf is None else self.max_linf,
                -math.inf if self.min_ssim is None else -self.min_ssim)

    def contains(self, other: "Budget") -> bool:
        """Is every perturbation within ``other`` within this budget? (τ' ≤ τ and s' ≥ s)"""
        linf_ok = self.max_linf is None or (other.max_linf is not None and other.max_linf <= self.max_linf)
        ssim_ok = self.min_ssim is None or (other.min_ssim is not None and other.min_ssim >= self.min_ssim)
        return linf_ok and ssim_ok

    def within(self, linf: float, ssim_value: float | None) -> bool:
        """Is a perturbation with these ℓ∞ and SSIM inside the budget? (ℓ∞ up to :data:`LINF_TOL`)."""
        if self.max_linf is not None and not linf <= self.max_linf + LINF_TOL:
            return False
        if self.min_ssim is not None and (ssim_value is None or not ssim_value >= self.min_ssim):
            return False
        return True


def sweep_budgets(linfs: Iterable[float | None], min_ssim: float | None) -> list[Budget]:
    """The budgets of a sweep over ℓ∞: each finite τ with ``min_ssim``; ``None`` is the unbounded
    attack (no ℓ∞ bound and no SSIM bound). Sorted by τ, unbounded last, duplicates dropped."""
    out = {Budget() if t is None else Budget(t, min_ssim) for t in linfs}
    return sorted(out, key=Budget.sort_key)


def parse_linf_list(text: str, name: str) -> list[float | None]:
    """A comma list of ℓ∞ budgets (``4/255,8/255,0.1,none``); ``none``/``unbounded``/``inf`` = no budget."""
    parts = [p for p in str(text).replace(" ", "").split(",")]
    if not parts or not all(parts):
        raise InputError(f"{name} must be a comma list like 4/255,8/255,16/255,none, got {text!r}")
    out: list[float | None] = []
    for p in parts:
        if p.lower() in ("none", "unbounded", "inf", "∞"):
            out.append(None)
        else:
            out.append(validate.positive(p, name))
    if len(set(out)) != len(out):
        raise InputError(f"{name} lists a budget twice: {text!r}")
    return out


def run_budgets(primary: Budget, sweep: Sequence[Budget] | None) -> list[Budget]:
    """Every budget one attack call optimizes: the primary one first, then the sweep's others."""
    out = [primary]
    for b in sweep or ():
        if b not in out:
            out.append(b)
    return out


__all__ = ["Budget", "DEFAULT_SWEEP", "LINF_TOL", "SSIM_WINDOW", "SSIM_SIGMA", "SMALL_WINDOW", "SMALL_SIGMA",
           "linf_text", "parse_linf_list", "run_budgets", "ssim", "ssim_window", "sweep_budgets"]
