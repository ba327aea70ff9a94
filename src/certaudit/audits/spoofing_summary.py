"""Summaries of spoofing rows: the Shadow Attack paper's Table 1 and Table 2, at the rows' budget and
for each budget of a sweep (:func:`summarize`).

A row (one per image, :func:`certaudit.audits.spoofing.spoof_batch`) holds the judged spoof under its
budget (``max_linf``, ``min_ssim``; both ``None``: unbounded) and, with a sweep, one entry per budget
in ``sweep``. Rows written before budgets existed carry neither: they are unbounded spoofs.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from certaudit.attacks.budget import Budget
from certaudit.defenses.base import ABSTAIN
from certaudit.errors import InputError


def summarize(rows: Sequence[dict[str, Any]], eps: float | None = None) -> dict[str, Any]:
    """Table 1 (and, at ``eps``, Table 2) of the Shadow Attack paper from spoofing rows.

    * ``budget`` / ``budget_label``: the perceptual budget of the rows' spoofs (``unbounded``: none);
    * ``natural_radius_mean/std`` (the paper's Table 1 column), also as ``natural_radius_mean_certified``:
      over the rows' images whose natural CERTIFY does not abstain and certifies a radius > 0
      (``natural_certified`` of them). These are the images of the *spoof rows* (in an audit: the spoof
      stage's images, not every certified image of the audit);
    * ``natural_radius_mean_attacked``: the natural radius over the attacked images (0 where the
      natural image had no certificate), i.e. over the images behind ``success_rate``;
    * ``success_rate``: fraction of the attacked images whose fresh CERTIFY of ``x + δ`` gives a
      wrong label (not ABSTAIN) with a radius > 0, *and* whose ``x + δ`` is within the budget;
    * ``shadow_radius_mean/std``: the spoofed radius over the successful images
      (``shadow_radius_mean_all`` counts failures as radius 0, over all attacked images);
      ``natural_radius_mean_successes``: the natural radius of those same successful images, the
      figure to set ``shadow_radius_mean`` against (the successes differ from budget to budget);
    * ``spoofed_beats_natural``: fraction of attacked images with success and ``r_adv ≥ r_nat``;
    * ``successes_natural_wrong``: of the successes, images whose natural label was already wrong
      (the defense labelled them wrong before any attack; the paper counts them as successes, and so
      does ``success_rate``); ``attacked_natural_correct`` and ``success_rate_natural_correct``: the
      attacked images whose natural label was right, and the success rate over them only;
    * the perturbation of the judged images (all attacked): ``l2_mean``, ``linf_mean`` and ``linf_max``
      (ℓ∞ = the largest change of any pixel), ``tv_mean``, ``ssim_mean`` and ``ssim_min``
      (SSIM(x, x + δ)), ``within_budget_rate``;
    * at ``eps``: ``robust_error`` = fraction of all images not certified *correctly* at eps (wrong
      label, ABSTAIN or radius < eps); ``attack_error`` = fraction of all images whose shadow image
      is not certified with a *wrong* label at eps within the budget (correct label, ABSTAIN, radius
      < eps, outside the budget or not attacked). Lower attack error = stronger attack (Table 2);
    * ``sweep``: the same figures per budget of a sweep (:func:`summarize_sweep`; the rows' own budget is
      listed there too, ``primary: true``, even when the sweep did not name it); ``unbounded``:
      success rate and mean spoofed radius of the unbounded attack (from the sweep, or the rows' own
      figures when their budget is unbounded), else None.

    Standard deviations are population standard deviations (ddof = 0).
    """
    try:
        n = len(rows)
        nat_pred = np.array([int(r["natural_prediction"]) for r in rows], dtype=np.int64)
        nat_rad = np.array([float(r["natural_radius"]) for r in rows], dtype=np.float64)
        label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"spoofing rows need label, natural_prediction, natural_radius ({exc})") from None
    out: dict[str, Any] = {"images": n}
    if n == 0:
        return out
    budget = _rows_budget(rows)
    out.update({"budget": budget.as_dict(), "budget_label": budget.label})
    certified = (nat_pred != ABSTAIN) & (nat_rad > 0)  # radius 0: a label without a certificate
    out["natural_abstain_rate"] = float(np.mean(~certified))
    out["natural_accuracy"] = float(np.mean(nat_pred == label))
    attacked = [r for r in rows if r.get("attacked")]
    out["attacked"] = len(attacked)
    out["natural_certified"] = int(certified.sum())
    out["natural_radius_mean"] = _mean(nat_rad[certified])
    out["natural_radius_std"] = _std(nat_rad[certified])
    out["natural_radius_mean_certified"] = out["natural_radius_mean"]
    out["natural_radius_mean_attacked"] = _mean(np.array([float(r["natural_radius"]) for r in attacked]))
    out.update(spoof_stats(attacked, [float(r["natural_radius"]) for r in attacked], _natural_correct(attacked)))
    if eps is not None:
        out.update(_table2(rows, float(eps), nat_pred, nat_rad, label))
    sweep = summarize_sweep(rows)
    if sweep:
        out["sweep"] = sweep
    out["unbounded"] = _unbounded(out, budget, sweep)
    seconds = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if len(seconds) == n:
        total = float(sum(seconds))
        out["seconds"] = total
        out["images_per_second"] = n / total if total > 0 else None
    return out


def spoof_stats(entries: Sequence[dict[str, Any]], natural_radius: Sequence[float],
                natural_correct: Sequence[bool] | None = None) -> dict[str, Any]:
    """Success and perturbation figures of the judged spoofs ``entries`` (one per attacked image, with
    ``success``, ``spoofed_radius``, ``l2``, ``linf``, ``tv``, ``ssim``, ``within_budget``).
    ``natural_correct``: per entry, whether the natural image's label was correct; the successes on
    images the defense already labelled wrong (no attack needed) are counted apart, and the success
    rate over the others is given too."""
    m = len(entries)
    ok = np.array([bool(e.get("success")) for e in entries], dtype=bool)
    adv = np.array([float(e.get("spoofed_radius") or 0.0) for e in entries], dtype=np.float64)
    nat = np.asarray(natural_radius, dtype=np.float64)
    out: dict[str, Any] = {
        "successes": int(ok.sum()), "success_rate": float(ok.mean()) if m else None,
        "shadow_radius_mean": _mean(adv[ok]), "shadow_radius_std": _std(adv[ok]),
        "shadow_radius_mean_all": _mean(np.where(ok, adv, 0.0)),
        "natural_radius_mean_successes": _mean(nat[ok]),
        "spoofed_beats_natural": float(np.mean(ok & (adv >= nat))) if m else None,
    }
    if natural_correct is not None:
        right = np.asarray(natural_correct, dtype=bool)
        out["successes_natural_wrong"] = int((ok & ~right).sum())
        out["attacked_natural_correct"] = int(right.sum())
        out["success_rate_natural_correct"] = float(ok[right].mean()) if right.any() else None
    for key in ("l2", "linf", "tv", "ssim"):
        vals = [float(e[key]) for e in entries if e.get(key) is not None]
        out[f"{key}_mean"] = float(np.mean(vals)) if vals else None
        if key == "linf":
            out["linf_max"] = max(vals) if vals else None  # the largest change of any pixel of any image
        if key == "ssim":
            out["ssim_min"] = min(vals) if vals else None
    within = [e.get("within_budget") is not False for e in entries]  # rows without budgets: unbounded
    out["within_budget_rate"] = float(np.mean(within)) if m else None
    return out


def summarize_sweep(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget of the rows' sweep, tightest first (unbounded last): the budget, ``attacked``,
    ``primary`` (the rows' own budget, the headline's) and :func:`spoof_stats` over the attacked
    images. The rows' own budget is always listed (from the rows' own fields when the sweep did not
    name it). Each budget is an independent attack, so success need not grow along the list. Empty
    when the rows hold no sweep."""
    attacked = [r for r in rows if r.get("attacked") and r.get("sweep")]
    if not attacked:
        return []
    keys = [(e.get("max_linf"), e.get("min_ssim")) for e in attacked[0]["sweep"]]
    if any([(e.get("max_linf"), e.get("min_ssim")) for e in r["sweep"]] != keys for r in attacked):
        raise InputError("spoofing rows hold different budget sweeps: rerun them with one configuration")
    primary = _rows_budget(rows)
    listed: list[tuple[Budget, int | None]] = [(Budget(tau, s), j) for j, (tau, s) in enumerate(keys)]
    if primary not in [b for b, _ in listed]:
        listed.append((primary, None))  # None: the rows' own fields
    listed.sort(key=lambda bj: bj[0].sort_key())
    nat, correct = [float(r["natural_radius"]) for r in attacked], _natural_correct(attacked)
    out = []
    for budget, j in listed:
        entries = [r if j is None else r["sweep"][j] for r in attacked]
        out.append({**budget.as_dict(), "label": budget.label, "primary": budget == primary,
                    "attacked": len(attacked), **spoof_stats(entries, nat, correct)})
    return out


def _natural_correct(rows: Sequence[dict[str, Any]]) -> list[bool]:
    return [int(r["natural_prediction"]) == int(r["label"]) for r in rows]


def _rows_budget(rows: Sequence[dict[str, Any]]) -> Budget:
    budgets = {(r.get("max_linf"), r.get("min_ssim")) for r in rows}
    if len(budgets) > 1:
        raise InputError(f"spoofing rows under different budgets {sorted(budgets, key=str)}: do not mix them")
    tau, s = budgets.pop()
    return Budget(tau, s)


def _unbounded(out: dict[str, Any], budget: Budget, sweep: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unbounded attack's success rate and mean spoofed radius, where the rows hold it."""
    src = out if budget.unbounded else next((e for e in sweep if e["max_linf"] is None and e["min_ssim"] is None), None)
    if src is None:
        return None
    return {k: src.get(k) for k in ("successes", "success_rate", "successes_natural_wrong",
                                    "success_rate_natural_correct", "shadow_radius_mean", "shadow_radius_std",
                                    "natural_radius_mean_successes", "l2_mean", "linf_mean", "ssim_mean")}


def _table2(rows: Sequence[dict[str, Any]], eps: float, nat_pred: np.ndarray, nat_rad: np.ndarray,
            label: np.ndarray) -> dict[str, Any]:
    """Robust error (natural) and attack error (spoofs within the budget) at ``eps``."""
    n = len(rows)
    attacked = np.array([bool(r.get("attacked")) for r in rows], dtype=bool)
    adv_rad = np.array([float(r["spoofed_radius"]) if r.get("spoofed_radius") is not None else 0.0 for r in rows])
    adv_pred = np.array([int(r["spoofed_prediction"]) if r.get("spoofed_prediction") is not None else ABSTAIN
                         for r in rows])
    within = np.array([r.get("within_budget") is not False for r in rows], dtype=bool)
    out: dict[str, Any] = {"eps": eps}
    nat_at = _at_eps(rows, "natural_certified_eps", nat_rad, eps)
    adv_at = _at_eps([r for r in rows if r.get("attacked")], "spoofed_certified_eps", adv_rad[attacked], eps)
    if nat_at is None or adv_at is None:
        out["robust_error"] = out["attack_error"] = None
        out["table2_note"] = (f"rows hold no check at eps={eps:g} and their radii are bisection points: "
                              "rerun with this --eps to get the robust and attack errors")
        return out
    nat_ok = (nat_pred == label) & (nat_pred != ABSTAIN) & nat_at
    adv_cert = np.zeros(n, dtype=bool)
    adv_cert[attacked] = adv_at
    adv_ok = attacked & within & (adv_pred != label) & (adv_pred != ABSTAIN) & adv_cert
    out["robust_error"] = float(1.0 - nat_ok.mean())
    out["attack_error"] = float(1.0 - adv_ok.mean())
    return out


def _at_eps(rows: Sequence[dict[str, Any]], key: str, radius: np.ndarray, eps: float) -> np.ndarray | None:
    """Per row, certified at exactly ``eps`` by the defense's own check (``key``); rows without it fall
    back to ``radius >= eps`` only where the radius is closed-form (no ``radius_tol``); else None."""
    if all(r.get(key) is not None for r in rows):
        return np.array([bool(r[key]) for r in rows], dtype=bool)
    if any(r.get("radius_tol") for r in rows):
        return None
    return radius >= eps


def _mean(v: np.ndarray) -> float | None:
    return float(np.mean(v)) if v.size else None


def _std(v: np.ndarray) -> float | None:
    return float(np.std(v)) if v.size else None


__all__ = ["spoof_stats", "summarize", "summarize_sweep"]
