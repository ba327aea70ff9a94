"""What the degradation rows add up to: the §3.3 summary (testR, testA lower / proven upper / 2ε
check, the lower ⊆ upper invariant) and the FPR's 2r check against the radius (Figures 2 and 3).

Split out of :mod:`certaudit.audits.degradation`, which produces the rows and re-exports every
public name of this module; both work on rows alone, so they also read rows written earlier.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from certaudit.audits.certified import certified_mask
from certaudit.audits.logs import cert_arrays
from certaudit.defenses.base import check_eps
from certaudit.errors import InputError


def _flag(row: dict[str, Any], key: str) -> bool:
    v = row.get(key)
    return bool(v) if v is not None else False


def _proof(row: dict[str, Any], monotone: bool | None) -> bool | None:
    """The row's proof of non-degradability: ``proven_nondegradable``, or for rows without it, the 2ε
    check of a monotone certifier (Appendix A; the row's ``monotone`` or the caller's); else None."""
    if "proven_nondegradable" in row:
        v = row["proven_nondegradable"]
        return None if v is None else bool(v)
    mono = row.get("monotone", monotone)
    return bool(row.get("certified_2eps")) if mono else None


def _ratio(a: int | None, b: int) -> float | None:
    return a / b if (b and a is not None) else None


class _Sets(NamedTuple):
    """The §3.3 sets of a list of rows, as boolean masks over the rows."""

    correct: np.ndarray
    certified: np.ndarray  # at ε
    certified_2eps: np.ndarray
    degraded: np.ndarray  # an attack found x'
    proven: np.ndarray  # proven non-degradable (False where there is no proof)
    test_r: np.ndarray  # certified and correct at ε
    has_proof: bool


def _sets(rows: Sequence[dict[str, Any]], monotone: bool | None, proof: str | None) -> _Sets:
    correct = np.array([_flag(r, "correct") for r in rows], dtype=bool)
    c1 = np.array([_flag(r, "certified") for r in rows], dtype=bool)
    c2 = np.array([_flag(r, "certified_2eps") for r in rows], dtype=bool)
    lower = np.array([r.get("degraded_by") is not None for r in rows], dtype=bool)
    proofs = [_proof(r, monotone) for r in rows]
    certified_proofs = [p for p, c in zip(proofs, c1) if c]
    # decided by the rows where any input was certified, else by the defense's declared proof
    has_proof = all(p is not None for p in certified_proofs) if certified_proofs else proof is not None
    proven = np.array([bool(p) for p in proofs], dtype=bool)
    return _Sets(correct, c1, c2, lower, proven, c1 & correct, has_proof)


def _bounds(s: _Sets, n: int, eps: float, monotone: bool | None, proof: str | None) -> dict[str, Any]:
    """The figures of the summary: the attacks' lower side, the proven upper bound and the 2ε check."""
    a_low = int((s.test_r & s.degraded).sum())
    a_check = int((s.test_r & ~s.certified_2eps).sum())
    k_r = int(s.test_r.sum())
    k_up = int((s.test_r & ~s.proven).sum()) if s.has_proof else None
    return {
        "eps": eps, "test": n, "certified": int(s.certified.sum()), "testR": k_r,
        "testA_lower": a_low, "testA_upper": k_up, "testA_2eps_check": a_check,
        "fpr_lower": _ratio(a_low, k_r),
        "fpr_upper": _ratio(k_up, k_r), "fpr_2eps_check": _ratio(a_check, k_r),
        "utility_reduction_lower": _ratio(a_low, n),
        "utility_reduction_upper": _ratio(k_up, n),
        "utility_reduction_2eps_check": _ratio(a_check, n),
        "vra_eps": _ratio(k_r, n), "vra_2eps": _ratio(int((s.certified_2eps & s.correct).sum()), n),
        "clean_accuracy": _ratio(int(s.correct.sum()), n),
        "lower_over_upper": _ratio(a_low, k_up) if k_up else None,
        "upper_bound": _upper_kind(s.has_proof, monotone, proof),
    }


def _per_attack(rows: Sequence[dict[str, Any]], test_r: np.ndarray, k_r: int, k_up: int | None,
                n: int) -> dict[str, dict[str, Any]]:
    """Each attack's own lower bound over testR, and how often it was the first to succeed."""
    per: dict[str, dict[str, Any]] = {}
    for r, in_r in zip(rows, test_r):
        for name, ok in (r.get("attacks") or {}).items():
            d = per.setdefault(name, {"tried": 0, "succeeded": 0, "first": 0})
            if in_r:
                d["tried"] += 1
                d["succeeded"] += int(bool(ok))
        if in_r and r.get("degraded_by"):
            per.setdefault(r["degraded_by"], {"tried": 0, "succeeded": 0, "first": 0})["first"] += 1
    for d in per.values():
        d["fpr_lower"] = _ratio(d["succeeded"], k_r)
        d["utility_reduction_lower"] = _ratio(d["succeeded"], n)
        d["lower_over_upper"] = _ratio(d["succeeded"], k_up) if k_up else None
    return per


def _radius_drop(rows: Sequence[dict[str, Any]], a_check: np.ndarray, eps: float) -> dict[str, Any] | None:
    """How far the attacks moved the certified radius, relative to ε, on the 2ε-check set: the 2ε
    check assumes a drop of ε is possible (the global Lipschitz rate); the real rate is lower."""
    drops = [(float(r["radius"]) - float(r["radius_after"])) / eps for r, up in zip(rows, a_check)
             if up and r.get("radius_after") is not None and r.get("radius") is not None]
    if not drops:
        return None
    q = np.quantile(np.asarray(drops), [0.1, 0.5, 0.9])
    return {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]), "images": len(drops)}


def _split(rows: Sequence[dict[str, Any]], s: _Sets, eps: float) -> dict[str, Any]:
    """testR in three: degraded (an attack's x' was rejected), proven non-degradable (and by which
    proof), undecided (neither); for the undecided, how far apart the two sides stand where the rows
    say it: the proof's radius floor and the attacks' smallest certified radius, both against ε."""
    degraded = s.test_r & s.degraded
    proven = s.test_r & s.proven & ~s.degraded
    undecided = s.test_r & ~s.proven & ~s.degraded
    k_r = int(s.test_r.sum())
    by: dict[str, int] = {}
    for r, p in zip(rows, proven):
        if p:
            name = str(r.get("proven_by") or "proof")
            by[name] = by.get(name, 0) + 1
    out: dict[str, Any] = {
        "degraded": int(degraded.sum()), "proven": int(proven.sum()), "undecided": int(undecided.sum()),
        "degraded_share": _ratio(int(degraded.sum()), k_r), "proven_share": _ratio(int(proven.sum()), k_r),
        "undecided_share": _ratio(int(undecided.sum()), k_r), "proven_by": by,
    }
    floors = [float(r["radius_floor"]) - eps for r, u in zip(rows, undecided)
              if u and isinstance(r.get("radius_floor"), (int, float))]
    afters = [float(r["radius_after"]) - eps for r, u in zip(rows, undecided)
              if u and isinstance(r.get("radius_after"), (int, float))]
    if floors:
        out["undecided_proof_floor_minus_eps"] = _quantiles(floors)
    if afters:
        out["undecided_attack_radius_minus_eps"] = _quantiles(afters)
    return out


def _sequential_upper(rows: Sequence[dict[str, Any]], s: _Sets) -> dict[str, Any] | None:
    """Smoothing: the 2ε check of testR through the sequential test (rows' ``certified_2eps_sequential``);
    testR inputs without a verdict count as not shown safe."""
    vals = [(r.get("certified_2eps_sequential"), r.get("samples_2eps_sequential"), bool(d))
            for r, t, d in zip(rows, s.test_r, s.degraded) if t]
    judged = [v for v in vals if v[0] is not None]
    if not judged:
        return None
    k_r = len(vals)
    safe = sum(1 for v in judged if v[0])
    samples = [int(v[1]) for v in judged if v[1] is not None]
    out: dict[str, Any] = {
        "judged": len(judged), "certified_2eps": safe, "testA_upper": k_r - safe, "fpr_upper": _ratio(k_r - safe, k_r),
        "degraded_although_certified_2eps": sum(1 for v in judged if v[0] and v[2]),
        "meaning": ("upper bound for the smoothed classifier itself (exact p_A): an input counted safe has "
                    "p_A > Φ(2ε/σ) by the anytime-valid sequential test at level α, so with probability ≥ 1 − α "
                    "every x' within ε has p_A(x') > Φ(ε/σ) (Cohen et al., Theorem 1); in expectation at most "
                    "α·|testR| of these claims are wrong. The deployed CERTIFY (n samples, level α) can still "
                    "abstain at such an x' by chance: a degraded input counted safe is such a chance rejection"),
    }
    if samples:
        q = np.quantile(np.asarray(samples, dtype=float), [0.5, 0.9, 1.0])
        out["samples"] = {"median": float(q[0]), "q90": float(q[1]), "max": float(q[2]), "total": int(sum(samples))}
    return out


def _quantiles(v: Sequence[float]) -> dict[str, Any]:
    q = np.quantile(np.asarray(v, dtype=float), [0.1, 0.5, 0.9])
    return {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]), "images": len(v)}


def _invariant(rows: Sequence[dict[str, Any]], s: _Sets, monotone: bool | None) -> dict[str, Any]:
    """lower ⊆ proven upper: a degraded input proven non-degradable is a bug; one accepted at 2ε by
    a check that is not monotone is only counted."""
    violations = [int(r["index"]) for r, bad in zip(rows, s.certified & s.degraded & s.proven) if bad]
    outside = [int(r["index"]) for r, bad in zip(rows, s.certified & s.degraded & s.certified_2eps) if bad]
    return {
        "lower_subset_upper": not violations if s.has_proof else None, "violations": violations,
        "outside_2eps_check": outside,
        "monotone_certifier": monotone,
        "bug": bool(violations),
        "note": ("degraded inputs the defense had proven non-degradable: a bug of the defense, its proof or the attack"
                 if violations else
                 "no proof for this defense: nothing to check the attacks against" if not s.has_proof else
                 "degraded inputs accepted by the run-time check at 2ε: possible for a non-monotone check"
                 if outside else ""),
    }


def summarize_degradation(rows: Sequence[dict[str, Any]], eps: float, *, monotone: bool | None = None,
                          proof: str | None = None) -> dict[str, Any]:
    """§3.3 quantities from degrade rows: testR, testA lower/upper, FPR and utility-reduction bounds.

    Two figures from above, each named for what it is (docs/degradation.md):

    * ``testA_upper`` / ``fpr_upper``: the **proven** upper bound, the members of testR that the
      defense did *not prove* non-degradable (``proven_nondegradable``: the 2ε proof for a monotone
      certifier, IBP on B(x, 2ε) for CROWN-style bounds, then the costlier proofs run). None when the
      defense has no proof (randomized smoothing): then nothing bounds the FPR from above but the
      trivial 1, or the sequential 2ε check of the smoothed classifier (``sequential_2eps``);
    * ``testA_2eps_check`` / ``fpr_2eps_check``: the members of testR not accepted at 2ε by the
      run-time check itself (§3.3.2). An upper bound only for monotone certifiers, where it is at
      least the proven one (equal up to the rounding margin when the 2ε proof is the only one run).

    ``bracket``: testR in three, degraded / proven / undecided; an input both degraded and proven
    (an invariant violation, flagged below) counts as degraded there.

    ``invariant``: the attacks' set must lie inside the proven upper set (a degraded input that was
    proven non-degradable is a bug of the defense, the proof or the attack). A degraded input
    accepted at 2ε by a *non-monotone* check is counted (``outside_2eps_check``), not called a bug.
    ``monotone`` (default: the rows' ``monotone`` field) is reported; ``proof`` is the defense's
    :attr:`~certaudit.defenses.base.Defense.proof_name` (what ``upper_bound`` says proves it).
    """
    eps = check_eps(eps)
    n = len(rows)
    if monotone is None and rows and all("monotone" in r for r in rows):
        monotone = all(bool(r["monotone"]) for r in rows)
    s = _sets(rows, monotone, proof)
    out = _bounds(s, n, eps, monotone, proof)
    out["per_attack"] = _per_attack(rows, s.test_r, out["testR"], out["testA_upper"], n)
    if any(r.get("judged") for r in rows):
        out["per_attack_note"] = ("smoothing: per-attack verdicts are each attack's own selection CERTIFY (one draw "
                                  "per attack); the combined lower bound is one judging CERTIFY per input")
    drop = _radius_drop(rows, s.test_r & ~s.certified_2eps, eps)
    if drop is not None:
        out["radius_drop_over_eps"] = drop
    out["invariant"] = _invariant(rows, s, monotone)
    if s.has_proof:
        out["bracket"] = _split(rows, s, eps)
    seq = _sequential_upper(rows, s)
    if seq is not None:
        out["sequential_2eps"] = seq
    out["label_changed"] = [int(r["index"]) for r in rows if r.get("label_changed")]
    secs = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if secs and len(secs) == n:
        out["seconds"] = float(sum(secs))
    return out


def _upper_kind(has_proof: bool, monotone: bool | None, proof: str | None) -> str:
    if not has_proof:
        return ("none proven: this defense has no proof of non-degradability (randomized smoothing: a fresh CERTIFY "
                "at x' can abstain whatever the 2ε check says; CROWN-IBP: neither monotone in ε nor bounded below by "
                "IBP); fpr_2eps_check is the §3.3.2 heuristic, not a bound")
    if proof:
        return f"proven: {proof}"
    return ("proven: the rows' proven_nondegradable" if not monotone else
            "proven: the 2ε check of a monotone certifier (Appendix A; rows written without a proof field)")


# ------------------------------------------------------------------------------ FPR curve

def fpr_curve(rows: Sequence[dict[str, Any]], radii: Iterable[float]) -> list[dict[str, Any]]:
    """The 2r check of the false-positive rate against the radius (Figures 2–3 of the paper).

    At radius r: testR(r) = correct and certified at r; testA(r) = those not certified at 2r;
    ``fpr_2r_check = |testA| / |testR|`` (None when testR is empty), with VRA at r and 2r and
    ``utility_reduction_2r_check = |testA| / |test|``. "Certified at r" is the rows' own check at
    exactly r where they hold one (``certified_at``), else ``radius >= r``; ``source`` says which
    (bisection radii are named with their tolerance). The 2r check is the paper's curve; it is a
    proven upper bound of the FPR only for monotone certifiers, and even then only up to the
    rounding slack that the proof at ε accounts for (``summarize_degradation``'s ``fpr_upper``), so
    it is never called one here. Works on certify rows, degrade rows and parsed Cohen et al. logs.
    """
    radii = [float(r) for r in radii]
    if any(not math.isfinite(r) or r <= 0 for r in radii):
        raise InputError("radii must be finite numbers > 0")
    correct, radius = cert_arrays(rows)
    if np.isnan(radius).any():
        raise InputError("rows without a radius (sequential accept-at-ε decisions, or checks at given radii "
                         "only) have no FPR curve: certify the radius itself (drop --sequential; interval: "
                         "--full-radius)")
    n = len(correct)
    out = []
    for r in radii:
        m1, src1 = certified_mask(rows, r, allow_bisection=True)
        m2, src2 = certified_mask(rows, 2 * r, allow_bisection=True)
        assert m1 is not None and m2 is not None  # every row has a radius (checked above)
        test_r = correct & m1
        upper = test_r & ~m2
        k = int(test_r.sum())
        out.append({"radius": r, "testR": k, "testA_2r_check": int(upper.sum()),
                    "fpr_2r_check": (int(upper.sum()) / k) if k else None,
                    "vra": (k / n) if n else None, "vra_2r": (int((correct & m2).sum()) / n) if n else None,
                    "utility_reduction_2r_check": (int(upper.sum()) / n) if n else None,
                    "source": src1 if src1 == src2 else f"{src1} / {src2}"})
    return out


def default_curve_radii(rows: Sequence[dict[str, Any]], points: int = 40) -> list[float]:
    """An even grid from a small radius to the largest certified radius of the rows."""
    _, radius = cert_arrays(rows)
    radius = radius[~np.isnan(radius)]
    top = float(radius.max()) if len(radius) else 1.0
    top = top if top > 0 else 1.0
    return [float(v) for v in np.linspace(top / points, top, points)]


def plot_fpr_curves(curves: dict[str, Sequence[dict[str, Any]]], path: Any, *, radii: Sequence[float] | None = None,
                    eps: float | None = None, norm: str = "l2", title: str | None = None) -> None:
    """PNG in the style of Figures 2/3: the FPR's 2r check (left; a proven upper bound for monotone
    certifiers only) and VRA (right) against the radius, one line per named set of rows; ε marked."""
    # Imported here on purpose: the backend is chosen only when a figure is drawn, before pyplot
    # loads, so importing this module never switches the backend of an interactive session.
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    try:
        for name, rows in curves.items():
            grid = list(radii) if radii is not None else default_curve_radii(rows)
            pts = fpr_curve(rows, grid)
            xs = [p["radius"] for p in pts]
            ax1.plot(xs, [np.nan if p["fpr_2r_check"] is None else p["fpr_2r_check"] for p in pts], label=name)
            ax2.plot(xs, [np.nan if p["vra"] is None else p["vra"] for p in pts], label=name)
        for ax, ylabel in ((ax1, "FPR by the 2r check"), (ax2, "VRA")):
            if eps is not None:
                ax.axvline(eps, color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel(f"radius ε ({'ℓ∞' if str(norm).lower() == 'linf' else 'ℓ2'})")
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax1.legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


__all__ = ["summarize_degradation", "fpr_curve", "default_curve_radii", "plot_fpr_curves"]
