"""Certified accuracy against radius, from certification rows (any defense).

A row holds at least ``label`` (true class), ``prediction`` (the certified label, or ABSTAIN = -1)
and ``radius`` (0 where ABSTAIN; null where the defense only checked given radii); optionally
``certified_at`` ({radius key: bool}, the defense's own check at exactly that radius) and
``radius_tol`` (> 0: the radius is a bisection point, so ``radius >= r`` is not the check at r). An input counts as *certified correct at r* when the prediction
is its label and ``radius ≥ r``: this is the certified (verified robust) accuracy, VRA, at r, and at
r = 0 it is the clean accuracy of the certified classifier (Cohen et al.'s convention for the
smoothed classifier: CERTIFY's label, abstentions counted as errors). Algorithm 2.1 of the
degradation paper *rejects* a clean input at ε when the prediction is ABSTAIN or ``radius < ε``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from certaudit.defenses.base import ABSTAIN, radius_key
from certaudit.defenses.sequential import DECISIONS
from certaudit.errors import InputError

L2_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
LINF_RADII = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1, 0.2, 0.3)


def default_radii(norm: str) -> tuple[float, ...]:
    """A radius grid for the certified-accuracy table (ℓ2: multiples of 1/4; ℓ∞: k/255 and tenths)."""
    return LINF_RADII if str(norm).lower() == "linf" else L2_RADII


def _arrays(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label, prediction and radius (NaN where the row carries none: check-only rows); the optional
    ``radius_tol`` and ``certified_at`` fields are validated too (a bad log is refused, not misread)."""
    try:
        label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        pred = np.array([int(r["prediction"]) for r in rows], dtype=np.int64)
        radius = np.array([math.nan if r.get("radius") is None else float(r["radius"]) for r in rows],
                          dtype=np.float64)
        if any("radius" not in r for r in rows):
            raise KeyError("radius")
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"certification rows need label, prediction and radius ({exc})") from None
    for i, r in enumerate(rows):
        where = f"row {r.get('index', i)}"
        rad = radius[i]
        if r.get("radius") is not None and np.isnan(rad):
            raise InputError(f"{where}: radius is NaN (a missing radius is written null)")
        if np.isinf(rad) or rad < 0:
            raise InputError(f"{where}: radius {r['radius']!r} is not a finite number >= 0")
        tol = r.get("radius_tol")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                                or not math.isfinite(tol) or tol < 0):
            raise InputError(f"{where}: radius_tol {tol!r} is not a finite number >= 0")
        at = r.get("certified_at")
        if at is not None and (not isinstance(at, dict) or not all(isinstance(v, bool) for v in at.values())):
            raise InputError(f"{where}: certified_at must map radii to true/false, got {at!r}"[:200])
    return label, pred, radius


def _sequential(rows: Sequence[dict[str, Any]]) -> bool:
    """Rows of a sequential accept-at-ε test (a ``decision``, no radius): ⊥ there means "not
    certified at ε", so they say nothing about clean accuracy or abstention at radius 0."""
    return any("decision" in r and r.get("radius") is None for r in rows)


def radius_tolerance(rows: Sequence[dict[str, Any]]) -> float:
    """The largest ``radius_tol`` of the rows: 0 when every radius is closed-form (``radius >= r`` is
    the defense's own check at r), > 0 when radii are bisection points within that tolerance."""
    return max((float(r.get("radius_tol") or 0.0) for r in rows), default=0.0)


def certified_mask(rows: Sequence[dict[str, Any]], r: float, *, allow_bisection: bool = False
                   ) -> tuple[np.ndarray | None, str]:
    """Per row, certified (not ABSTAIN) at radius ``r``, and where that comes from.

    From the row's own check at exactly r (``certified_at``, written by the defense's
    Algorithm 2.1) where every row has one: ``"check"``; else from closed-form radii
    (``radius >= r``): ``"radius"``; from bisection radii only with ``allow_bisection``
    (``"bisection radius (tol …)"``: certified at a point >= r, but not the run-time check at r).
    ``(None, reason)`` when the rows cannot answer (no radius, or bisection radii not allowed).
    """
    key = radius_key(r) if r > 0 else None
    _, pred, rad = _arrays(rows)
    ok = pred != ABSTAIN
    if r == 0 and _sequential(rows):
        return None, "sequential rows decide certification at ε only (⊥ = not certified at ε, not an abstention)"
    if key is not None and rows and all(key in (row.get("certified_at") or {}) for row in rows):
        return ok & np.array([bool(row["certified_at"][key]) for row in rows], dtype=bool), "check"
    if r == 0:
        return ok, "prediction"  # certified at radius 0 = a label (the clean accuracy of the certified classifier)
    if np.isnan(rad).any():
        return None, "rows without a radius (check-only or sequential rows) and no check at this radius"
    tol = radius_tolerance(rows)
    if tol > 0 and not allow_bisection:
        return None, f"radii are bisection points (tol {tol:g}) and the rows hold no check at this radius"
    return ok & (rad >= r), ("radius" if tol == 0 else f"bisection radius (tol {tol:g})")


def certification_rows(defense: Any, x: Any, y: Any, indices: Sequence[int], radii: Sequence[float] = (), *,
                       full_radius: bool = True, device: Any = None) -> list[dict[str, Any]]:
    """One certification row per image of ``indices`` (the row schema of ``certify`` and of the
    audit's certify stage): ``index``, ``label``, ``prediction`` (ABSTAIN = -1), ``radius`` (null
    where not computed), ``correct``, ``seconds``, ``certified_at`` (the defense's own check at
    exactly each of ``radii``), ``radius_tol`` (bisection radii) and the defense's extras (smoothing:
    counts, ``p_lower``; the sequential test: ``samples``, ``decision`` by name)."""

    idx = [int(i) for i in indices]
    xc = x[idx] if device is None else x[idx].to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        cert = defense.certify_checks(xc, list(radii), full_radius=full_radius, indices=idx)
    label = cert.label.cpu()  # one transfer per call
    radius = cert.radius.detach().cpu().double()
    extras = {k: v.detach().cpu() for k, v in cert.extras.items()}
    checks = {k: v.detach().cpu() for k, v in cert.checks.items()}
    seconds = (time.perf_counter() - t0) / max(1, len(idx))
    rows = []
    for b, i in enumerate(idx):
        pred, rad = int(label[b]), float(radius[b])
        row: dict[str, Any] = {"index": i, "label": int(y[i]), "prediction": pred,
                               "radius": rad if rad == rad else None,  # null: not computed (checks only)
                               "correct": pred == int(y[i]), "seconds": round(seconds, 6)}
        if checks:
            row["certified_at"] = {k: bool(v[b]) and pred != ABSTAIN for k, v in checks.items()}
        if cert.radius_tol > 0:
            row["radius_tol"] = cert.radius_tol
        for key, val in extras.items():
            row[key] = val[b].tolist()
        if "decision" in extras:  # the sequential test's decision, by name
            row["decision"] = DECISIONS[int(row["decision"])]
        rows.append(row)
    return rows


def certified_accuracy(rows: Sequence[dict[str, Any]], radius: float) -> float:
    """VRA at ``radius``: fraction of rows whose prediction is correct and certified at ``radius``
    (the rows' checks at exactly that radius, or closed-form radii; see :func:`certified_mask`)."""
    label, pred, _ = _arrays(rows)
    if len(label) == 0:
        return float("nan")
    mask, why = certified_mask(rows, radius)
    if mask is None:
        raise InputError(f"no certified accuracy at {radius:g}: {why}")
    return float(np.mean((pred == label) & mask))


def rejection_rate(rows: Sequence[dict[str, Any]], eps: float) -> float:
    """Fraction of (clean) inputs that Algorithm 2.1 rejects at ``eps`` (ABSTAIN or not certified at eps)."""
    _, pred, _ = _arrays(rows)
    if len(pred) == 0:
        return float("nan")
    mask, why = certified_mask(rows, eps)
    if mask is None:
        raise InputError(f"no rejection rate at {eps:g}: {why}")
    return float(np.mean(~mask))


def summarize(rows: Sequence[dict[str, Any]], radii: Iterable[float], eps: float | None = None) -> dict[str, Any]:
    """Certified accuracy at each radius, abstention, clean accuracy, speed, and VRA/rejection at ε.

    Every table entry says where it comes from (``source``): the defense's own check at exactly
    that radius (``check``), closed-form radii (``radius``: the same thing), or bisection radii
    (``bisection radius (tol t)``: certified up to a point >= r found by bisection; stated, never
    used at ε). VRA at ε and 2ε and the rejection rate at ε come from checks or closed-form radii
    only; where the rows have neither they are None with a ``note``. ``radius_tolerance`` is 0 for
    closed-form radii. ``images_per_second`` uses the rows' ``seconds`` when present.
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
    if _sequential(rows):  # ⊥ means "not certified at ε" here: no clean accuracy, no abstention rate
        out["clean_accuracy"] = out["abstain_rate"] = None
        out["clean_note"] = ("sequential accept-at-ε rows: a ⊥ means not certified at ε, so clean accuracy and "
                             "abstention are not measured (certify without --sequential)")
    else:
        out["clean_accuracy"] = float(correct.mean())
        out["abstain_rate"] = float(np.mean(pred == ABSTAIN))
    out["radius_tolerance"] = radius_tolerance(rows)
    table = []
    for r in radii:
        mask, why = certified_mask(rows, r, allow_bisection=True)
        if mask is None:
            table.append({"radius": r, "accuracy": None, "source": why})
        else:
            table.append({"radius": r, "accuracy": float(np.mean(correct & mask)), "source": why})
    out["certified_accuracy"] = table
    has_rad = ~np.isnan(rad)
    certified = (pred != ABSTAIN) & has_rad
    if has_rad.all():
        out["median_radius_correct"] = float(np.median(rad[correct])) if correct.any() else 0.0
        out["mean_radius_certified"] = float(np.mean(rad[certified])) if certified.any() else 0.0
    else:
        out["median_radius_correct"] = out["mean_radius_certified"] = None
        out["radius_note"] = "rows carry no radius (checks at given radii only): radius statistics skipped"
    if eps is not None:
        eps = float(eps)
        out["eps"] = eps
        notes = []
        for key, r in (("vra_eps", eps), ("vra_2eps", 2 * eps)):
            mask, why = certified_mask(rows, r)
            out[key] = None if mask is None else float(np.mean(correct & mask))
            if mask is None:
                notes.append(f"{key}: {why}")
        mask, why = certified_mask(rows, eps)
        out["rejection_rate_eps"] = None if mask is None else float(np.mean(~mask))
        if notes:
            out["eps_note"] = "; ".join(notes)
    seconds = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if seconds and len(seconds) == n:
        total = float(sum(seconds))
        out["seconds"] = total
        out["images_per_second"] = n / total if total > 0 else None
    return out


def accuracy_curve(rows: Sequence[dict[str, Any]], points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy as a step function of the radius: (radii, accuracy), radii from 0 to past the largest."""
    label, pred, rad = _arrays(rows)
    if np.isnan(rad).any():
        raise InputError("rows without a radius (checks at given radii only) have no certified-accuracy curve; "
                         "certify the full radius (interval: --full-radius)")
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


__all__ = ["certification_rows", "certified_accuracy", "certified_mask", "radius_tolerance", "rejection_rate", "summarize", "default_radii", "accuracy_curve",
           "plot_certified_accuracy", "L2_RADII", "LINF_RADII"]
