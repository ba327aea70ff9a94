"""Perceptual budgets of a spoof: SSIM (pytorch-msssim), the ℓ∞ box, and what "within budget" means.

A Shadow Attack spoof is only a spoof if the perturbed image still *is* the natural image to a human;
the paper judged that by eye. certaudit states a budget instead and holds the attack to it:

* ``max_linf`` τ: the largest change of any pixel (``‖x_adv − x‖∞ ≤ τ``, pixels in [0, 1]); the attack
  caps each step at ℓ∞ norm τ/4 and projects δ onto ``[−τ, τ] ∩ [−x, 1 − x]`` after every step;
* ``min_ssim`` s: ``SSIM(x, x_adv) ≥ s`` (structural similarity, Wang et al. 2004): a feasible start, a
  penalty during the attack and a check on the final image.

SSIM comes from ``pytorch_msssim.ssim`` (data range 1, K = (0.01, 0.03), Gaussian window, the mean of
the SSIM map, averaged over channels). The standard window is 11×11 with σ = 1.5; images smaller than
11 pixels on a side (the 8×8 digits) get a 5×5 window with σ = 1.0, i.e. 4×4 = 16 local windows on an
8×8 image, instead of the single 11-pixel window that would not fit (pytorch-msssim would then skip
the smoothing and compare pixels one by one). Sides below 5 use the largest odd window that fits.

A budget is :class:`Budget` (``None`` = no bound of that kind); ``Budget()`` is *unbounded*: the
paper's attack, whose "spoofs" may be any picture at all.

Bounds: τ must lie in [1e-6, 1] (pixels live in [0, 1], so τ = 1 already bounds nothing; below
:data:`LINF_TOL` the bound would be smaller than the judge's rounding tolerance), s in (0, 1] and not
0 once rounded to float32. Both checks name the flag (:func:`check_linf`, :func:`check_ssim`), and their
messages state these same ranges, so the command line refuses a bad budget before anything is loaded.

One comparison rule (:func:`ssim_at_least`): SSIM is computed in float32, so "SSIM ≥ s" compares in
float32, SSIM against s rounded to float32, both while the attack keeps its feasible iterates and when
the judge decides ``within_budget`` (float32(0.9) = 0.89999998: comparing the float32 SSIM with the
float64 0.9 would refuse an iterate at exactly float32(0.9) that the attack took as feasible).

One SSIM value per candidate: pytorch-msssim's SSIM of the same pair of images differs in the last bits
(up to about 2e-7) with the size of the batch it is computed in, and the penalty drives iterates to the
bound, so a second computation could put a kept iterate just below s. The attack therefore computes the
SSIM of each candidate once, when it accepts the iterate as feasible (in the batch it optimizes), returns
it (``ShadowResult.ssim``), and the selection, the judge (``within_budget``) and the rows all use that
value; nobody recomputes it. No tolerance is added to s. The ℓ∞ bound is judged with the tolerance
:data:`LINF_TOL` (the projection holds δ within τ exactly; the tolerance covers the float32 rounding of
``(x + δ) − x``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pytorch_msssim import ssim as _msssim_ssim

from certaudit import validate
from certaudit.errors import InputError

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. (2004), pytorch-msssim's default
SMALL_WINDOW, SMALL_SIGMA = 5, 1.0  # images smaller than SSIM_WINDOW on a side
SSIM_K = (0.01, 0.03)
LINF_TOL = 1e-6  # float32 rounding of (x + δ) − x; a projected δ is within τ exactly
MIN_LINF = LINF_TOL  # smaller τ would be below the judge's tolerance
LINF_RANGE = "[1e-6, 1]"  # the range of τ, as the help, the docs and every message state it
SSIM_RANGE = "(0, 1]"  # the range of s (and not 0 once rounded to float32)
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


def check_linf(value: Any, name: str) -> float:
    """An ℓ∞ budget τ in [1e-6, 1] (``name``: the flag or field named in the error)."""
    tau = validate.number(value, name)
    if not MIN_LINF <= tau <= 1.0:
        raise InputError(f"{name} must lie in {LINF_RANGE} (pixels are in [0, 1]; a bound below 1e-6 would be "
                         f"below the judge's rounding tolerance), got {validate.shown(value)}")
    return tau


def check_ssim(value: Any, name: str) -> float:
    """An SSIM bound s in (0, 1], not 0 in float32 (``name``: the flag or field named in the error)."""
    s = validate.number(value, name)
    if not 0.0 < s <= 1.0:
        raise InputError(f"{name} must lie in {SSIM_RANGE}, got {validate.shown(value)}")
    if float(np.float32(s)) <= 0.0:
        raise InputError(f"{name} must lie in {SSIM_RANGE} and rounds to 0 in float32 (SSIM is compared in "
                         f"float32), got {validate.shown(value)}")
    return s


def ssim_at_least(value: Any, bound: Any) -> Any:
    """``SSIM ≥ s`` under the one rule of this module: both rounded to float32, then compared.

    Tensors give a bool tensor (``bound`` −inf: no bound, always true), numbers a bool."""
    if isinstance(value, torch.Tensor):
        b = torch.as_tensor(bound, device=value.device)
        return value.to(torch.float32) >= b.to(torch.float32)
    return bool(np.float32(value) >= np.float32(bound))


def linf_text(tau: float | None) -> str:
    """τ as the reader thinks of it: ``16/255`` when it is a whole number of 8-bit steps, else ``0.05``."""
    if tau is None:
        return "∞"
    if not math.isfinite(tau) or abs(tau) > 1e6:
        return f"{tau:.4g}"
    steps = tau * 255
    if abs(steps - round(steps)) < 1e-6 and round(steps) > 0:
        return f"{int(round(steps))}/255"
    return f"{tau:.4g}"


@dataclass(frozen=True)
class Budget:
    """A perceptual budget: ``max_linf`` τ in [1e-6, 1] and ``min_ssim`` s in (0, 1]; ``None`` = no bound."""

    max_linf: float | None = None
    min_ssim: float | None = None

    def __post_init__(self) -> None:
        if self.max_linf is not None:
            object.__setattr__(self, "max_linf", check_linf(self.max_linf, "max_linf"))
        if self.min_ssim is not None:
            object.__setattr__(self, "min_ssim", check_ssim(self.min_ssim, "min_ssim"))

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
        """Tighter first: by τ (none last), then by s (higher first, none last); unbounded is last."""
        return (math.inf if self.max_linf is None else self.max_linf,
                math.inf if self.min_ssim is None else -self.min_ssim)

    def within(self, linf: float, ssim_value: float | None) -> bool:
        """Is a perturbation with these ℓ∞ and SSIM inside the budget? (ℓ∞ up to :data:`LINF_TOL`, SSIM by
        :func:`ssim_at_least`)."""
        if self.max_linf is not None and not linf <= self.max_linf + LINF_TOL:
            return False
        if self.min_ssim is not None and (ssim_value is None or not ssim_at_least(ssim_value, self.min_ssim)):
            return False
        return True


def sweep_budgets(linfs: Iterable[float | None], min_ssim: float | None, primary: Budget | None = None, *,
                  name: str = "the budget sweep") -> list[Budget]:
    """The budgets of a sweep over ℓ∞: each finite τ with ``min_ssim``; ``None`` is the unbounded
    attack (no ℓ∞ bound and no SSIM bound). Sorted by τ, unbounded last. Two entries with one label
    (equal, or equal once printed: ``0.0156862745`` and ``4/255``) are refused (``name`` in the message).

    ``primary``: the run's own budget (the headline's). A sweep entry with the primary's label *is* the
    primary budget and is replaced by it (``--max-linf 0.0627451 --sweep-linf 16/255`` attacks 16/255
    once, under the primary's exact τ): a run never lists two budgets that print alike."""
    linfs = list(linfs)
    out = [Budget() if t is None else Budget(t, min_ssim) for t in linfs]
    _refuse_same_labels(out, name, linfs)
    if primary is not None:
        out = [primary if b.label == primary.label else b for b in out]
    return sorted(out, key=Budget.sort_key)


def parse_linf_list(text: str, name: str) -> list[float | None]:
    """A comma list of ℓ∞ budgets (``4/255,8/255,0.1,none``); ``none``/``unbounded``/``inf`` = no budget.

    Each τ must lie in [1e-6, 1] (:func:`check_linf`); two entries with the same label are refused."""
    parts = [p for p in str(text).replace(" ", "").split(",")]
    if not parts or not all(parts):
        raise InputError(f"{name} must be a comma list like 4/255,8/255,16/255,none, got {validate.shown(text)}")
    out: list[float | None] = []
    for p in parts:
        if p.lower() in ("none", "unbounded", "inf", "∞"):
            out.append(None)
        else:
            out.append(check_linf(p, name))
    _refuse_same_labels([Budget(t) for t in out], name, text)
    return out


def _refuse_same_labels(budgets: Sequence[Budget], name: str, given: Any) -> None:
    labels = [b.label for b in budgets]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise InputError(f"{name} lists a budget twice ({', '.join(twice)}): {validate.shown(given, 80)}")


def run_budgets(primary: Budget, sweep: Sequence[Budget] | None) -> list[Budget]:
    """Every budget one attack call optimizes: the primary one first, then the sweep's others."""
    out = [primary]
    for b in sweep or ():
        if b not in out:
            out.append(b)
    return out


__all__ = ["Budget", "DEFAULT_SWEEP", "LINF_RANGE", "LINF_TOL", "MIN_LINF", "SSIM_RANGE",
           "SSIM_WINDOW", "SSIM_SIGMA", "SMALL_WINDOW",
           "SMALL_SIGMA", "check_linf", "check_ssim", "linf_text", "parse_linf_list", "run_budgets", "ssim",
           "ssim_at_least", "ssim_window", "sweep_budgets"]
