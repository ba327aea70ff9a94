"""Certified accuracy against radius, from certification rows (any defense).

A row holds at least ``label`` (true class), ``prediction`` (the certified label, or ABSTAIN = -1)
and ``radius`` (0 where ABSTAIN). An input counts as *certified correct at r* when the prediction
is its label and ``radius ≥ r``: this is the certified (verified robust) accuracy, VRA, at r, and at
r = 0 it is the clean accuracy of the certified classifier (Cohen et al.'s convention for the
smoothed classifier: CERTIFY's label, abstentions counted as errors). Algorithm 2.1 of the
degradation paper *rejects* a clean input at ε when the prediction is ABSTAIN or ``radius < ε``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from certaudit.defenses.base import ABSTAIN
from certaudit.errors import InputError

L2_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
LINF_RADII = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1, 0.2, 0.3)


def default_radii(norm: str) -> tuple[float, ...]:
    """A radius grid for the certified-accuracy table (ℓ2: multiples of 1/4; ℓ∞: k/255 and tenths)."""
    return LINF_RADII if str(norm).lower() == "linf" else L2_RADII


def _arrays(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        pred = np.array([int(r["prediction"]) for r in rows], dtype=np.int64)
        radius = np.array([float(r["radius"]) for r in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"certification rows need label, prediction and radius ({exc})") from None
    return label, pred, radius


def certified_accuracy(rows: Sequence[dict[str, Any]], radius: float) -> float:
    """VRA at ``radius``: fraction of rows whose prediction is correct and certified at ``radius``."""
    label, pred, rad = _arrays(rows)
    if len(label) == 0:
        return float("nan")
    return float(np.mean((pred == label) & (pred != ABSTAIN) & (rad >= radius)))


def rejection_rate(rows: Sequence[dict[str, Any]], eps: float) -> float:
    """Fraction of (clean) inputs that Algorithm 2.1 rejects at ``eps`` (ABSTAIN or radius < eps)."""
    _, pred, rad = _arrays(rows)
    if len(pred) == 0:
        return float("nan")
    return float(np.mean((pred == ABSTAIN) | (rad < eps)))


def summarize(rows: Sequence[dict[str, Any]], radii: Iterable[float], eps: float | None = None) -> dict[str, Any]:
    """Certified accuracy at each radius, abstention, clean accuracy, speed, and VRA/rejection at ε.

    ``images_per_second`` uses the rows' ``seconds`` (time spent certifying each input) when present.
    """
    radii = sorted(float(r) for r in radii)
    if any(r < 0 or not math.isfinite(r) for r in radii):
        raise InputError("radii must be finite numbers >= 0")
    label, pred, rad = _arrays(rows)
    n = int(len(label))
    out: dict[str, Any] = {"images": n}
    if n == 0:
        out.update({"clean_accuracy": None, "abstain_rate": None, "certified_accuracy": []})
        return out
    correct = (pred == label) & (pred != ABSTAIN)
    out["clean_accuracy"] = float(correct.mean())
    out["abstain_rate"] = float(np.mean(pred == ABSTAIN))
    out["certified_accuracy"] = [{"radius": r, "accuracy": float(np.mean(correct & (rad >= r)))} for r in radii]
    certified = pred != ABSTAIN
    out["median_radius_correct"] = float(np.median(rad[correct])) if correct.any() else 0.0
    out["mean_radius_certified"] = float(np.mean(rad[certified])) if certified.any() else 0.0
    if eps is not None:
        eps = float(eps)
        out["eps"] = eps
        out["vra_eps"] = float(np.mean(correct & (rad >= eps)))
        out["vra_2eps"] = float(np.mean(correct & (rad >= 2 * eps)))
        out["rejection_rate_eps"] = float(np.mean(~certified | (rad < eps)))
    seconds = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if seconds and len(seconds) == n:
        total = float(sum(seconds))
        out["seconds"] = total
        out["images_per_second"] = n / total if total > 0 else None
    return out


def accuracy_curve(rows: Sequence[dict[str, Any]], points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy as a step function of the radius: (radii, accuracy), radii from 0 to past the largest."""
    label, pred, rad = _arrays(rows)
    correct = (pred == label) & (pred != ABSTAIN)
    top = float(rad[correct].max()) if correct.any() else 1.0
    grid = np.linspace(0.0, top * 1.05 if top > 0 else 1.0, points)
    if len(label) == 0:
        return grid, np.full_like(grid, np.nan)
    r_ok = np.sort(rad[correct])  # accuracy(r) = #{correct with radius >= r} / n, by binary search
    acc = (len(r_ok) - np.searchsorted(r_ok, grid, side="left")) / len(label)
    return grid, acc


def plot_certified_accuracy(curves: dict[str, Sequence[dict[str, Any]]], path: Any, *, norm: str = "l2",
                            eps: float | None = None, title: str | None = None) -> None:
    """Write a PNG of certified accuracy against radius, one line per named set of rows, ε and 2ε marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    try:
        for name, rows in curves.items():
            grid, acc = accuracy_curve(rows)
            ax.step(grid, acc, where="post", label=name)
        if eps is not None:
            for k, style in ((1, "--"), (2, ":")):
                ax.axvline(k * eps, color="grey", linestyle=style, linewidth=1)
                ax.text(k * eps, 1.0, f" {'2' if k == 2 else ''}ε", va="top", fontsize=8, color="grey")
        ax.set_xlabel(f"radius ({'ℓ∞' if str(norm).lower() == 'linf' else 'ℓ2'})")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


__all__ = ["certified_accuracy", "rejection_rate", "summarize", "default_radii", "accuracy_curve",
           "plot_certified_accuracy", "L2_RADII", "LINF_RADII"]
