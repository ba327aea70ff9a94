"""The degradation audit (§3.3 of the degradation-attacks paper): how often can an ε-bounded
adversary force a certified run-time defense to reject an input it certifies?

Per test image (rows, one dict each, see :func:`degrade_batch`):

* ``certified``       -- cert(x, ε): Algorithm 2.1 accepts the clean input (with its label);
* ``certified_2eps``  -- cert(x, 2ε): the stronger check of §3.3.2;
* ``degraded_by``     -- the first attack whose candidate x' passed :func:`verify_candidates`
  (‖x' − x‖ ≤ ε, x' ∈ [0,1], ``accept(x', ε) == ⊥``), or None.

Summaries (:func:`summarize_degradation`) follow the paper's sets: ``testR`` = the test inputs
certified *and correct* at ε (so ``|testR|/|test|`` is the baseline VRA and the utility reduction
is ``VRA × FPR``, as in Tables 1–2); ``testA_lower`` = the members of testR an attack degraded
(§3.3.1); ``testA_upper`` = the members of testR *not* certified at 2ε (§3.3.2). For a monotone
certifier (Appendix A: Lipschitz/GloRo, IBP, exact methods) ``testA_lower ⊆ testA_upper``: a
degraded input certified at 2ε is a bug of the defense or the attack and is reported as such.
Randomized smoothing is monotone only with high probability (a fresh CERTIFY at x' can fail
because of the confidence bound), so there such cases are counted, not called bugs.

:func:`fpr_curve` gives the upper bound against the radius (Figures 2 and 3) from any rows with
``label``, ``prediction`` and ``radius``: our certify rows, degrade rows, or Cohen et al.'s logs
(:func:`read_certification_log`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from certaudit.attacks.degradation import (
    AttackConfig, attacks_for, is_randomized, run_attack, verify_candidates,
)
from certaudit.defenses.base import ABSTAIN, Defense, check_eps
from certaudit.errors import InputError

RECHECK_SEED_OFFSET = 0x5EED_0000_D1CE  # fresh CERTIFY noise for candidates: seed + offset + attack number


def monotone_certifier(defense: Any) -> bool:
    """Whether Appendix A's monotonicity holds exactly (so lower ⊆ upper must hold without exception).

    Lipschitz (GloRo) bounds: yes (Lemma A.5). Interval bounds: IBP yes; CROWN-style bounds adapt
    their relaxation to ε and need not be. Randomized smoothing: only with high probability.
    """
    if is_randomized(defense):
        return False
    method = getattr(defense, "method", None)
    if method is not None and str(method).lower() != "ibp":
        return False
    return True


def _clean_checks(defense: Defense, x: torch.Tensor, eps: float, seed: int, indices: Sequence[int]):
    """Label, radius and the ε / 2ε verdicts of Algorithm 2.1 on the clean batch."""
    if is_randomized(defense):
        cert = defense.certify(x, seed=seed, indices=list(indices))  # type: ignore[call-arg]
        label, radius = cert.label.cpu(), cert.radius.detach().double().cpu()
        ok = label != ABSTAIN
        return label, radius, ok & (radius >= eps), ok & (radius >= 2 * eps)
    with torch.no_grad():
        cert = defense.certify(x)
        a1 = defense.accept(x, eps).cpu()
        a2 = defense.accept(x, 2 * eps).cpu()
    label = cert.label.cpu()
    # The ε / 2ε verdicts are Algorithm 2.1 itself (for bisection-based radii the radius is only
    # a lower bound); the label is the prediction whenever something is certified.
    label = torch.where(a1 != ABSTAIN, a1, label)
    return label, cert.radius.detach().double().cpu(), a1 != ABSTAIN, a2 != ABSTAIN


def degrade_batch(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float, *, attack: str = "all",
                  seed: int = 0, indices: Sequence[int] | None = None, exhaustive: bool = False,
                  prune: bool = False, **attack_options: Any) -> list[dict[str, Any]]:
    """Audit one batch: certify, attack the inputs certified at ε, re-check every candidate.

    ``attack`` is one of ``pgd``, ``pgd-2eps``, ``spgd`` (smoothing), ``margin`` or ``all`` (each in
    that order on the inputs not yet degraded; the row records which attack found x'). With
    ``exhaustive`` every attack runs on every certified input, and ``attacks`` in the row holds each
    one's verdict (per-attack lower bounds from one run). ``prune`` (monotone certifiers only)
    skips the inputs certified at 2ε, which Appendix A proves cannot be degraded (faster; the
    lower ⊆ upper check then has nothing to check on them). ``attack_options``: see
    :class:`~certaudit.attacks.degradation.AttackConfig` (steps, restarts, step_size, schedule,
    samples, check_every, targeted, tol). Returns one row per image: ``index``, ``label``,
    ``prediction``, ``radius``, ``correct``, ``certified``, ``certified_2eps``, ``degraded_by``,
    ``distance`` (of the counted x', else None), ``attacks`` ({name: bool} for attacks run),
    ``label_changed`` (attack names whose x' was accepted with another label: broken certificate),
    ``radius_after`` (smallest certified radius of the label at the candidates, where the re-check
    computes radii: Lipschitz and smoothing; 0 where x' gets another label or ⊥),
    ``seconds`` (the batch's wall time per image).
    """
    eps = check_eps(eps)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InputError("x must be a (B, C, H, W) tensor of images in [0, 1]")
    y = torch.as_tensor(y).long().cpu()
    if y.shape != (x.shape[0],):
        raise InputError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    idx = list(range(x.shape[0])) if indices is None else [int(i) for i in indices]
    if len(idx) != x.shape[0]:
        raise InputError(f"indices must have one entry per image ({x.shape[0]}), got {len(idx)}")
    names = attacks_for(defense, attack)
    cfg = AttackConfig.from_options(attack_options)
    t0 = time.perf_counter()
    x = x.to(defense.device)
    label, radius, cert1, cert2 = _clean_checks(defense, x, eps, seed, idx)
    b = x.shape[0]
    degraded_by: list[str | None] = [None] * b
    distance: list[float | None] = [None] * b
    verdicts: list[dict[str, bool]] = [{} for _ in range(b)]
    changed: list[list[str]] = [[] for _ in range(b)]
    radius_after: list[float | None] = [None] * b  # smallest certified radius of the label reached
    if prune and not monotone_certifier(defense):
        raise InputError("prune needs a monotone certifier (Lipschitz or IBP): for smoothing or CROWN bounds an "
                         "input certified at 2ε can still be degraded")
    attackable = cert1 & ~cert2 if prune else cert1
    pending = attackable.nonzero().flatten()  # attack only what the defense accepts
    for k, name in enumerate(names):
        if exhaustive or pending.numel() == 0:
            todo = pending
        else:
            todo = pending[torch.tensor([degraded_by[int(i)] is None for i in pending.tolist()], dtype=torch.bool)]
        if todo.numel() == 0:
            continue
        sub = todo.tolist()
        xs, ls = x[todo.to(x.device)], label[todo]
        cand = run_attack(name, defense, xs, ls, eps, cfg, seed=_attack_seed(seed, idx[sub[0]], k))
        verdict = verify_candidates(defense, xs, cand, ls, eps, tol=cfg.tol, seed=seed + RECHECK_SEED_OFFSET + k,
                                    indices=[idx[i] for i in sub])
        for j, i in enumerate(sub):
            ok = bool(verdict.success[j])
            verdicts[i][name] = ok
            if ok and degraded_by[i] is None:
                degraded_by[i] = name
                distance[i] = float(verdict.distance[j])
            if bool(verdict.label_changed[j]):
                changed[i].append(name)
            if verdict.radius is not None and ok is not None:
                r_after = float(verdict.radius[j])
                radius_after[i] = r_after if radius_after[i] is None else min(radius_after[i], r_after)
    seconds = (time.perf_counter() - t0) / max(1, b)
    mono = monotone_certifier(defense)
    rows = []
    for i in range(b):
        pred = int(label[i])
        rows.append({
            "index": idx[i], "label": int(y[i]), "prediction": pred, "radius": float(radius[i]),
            "correct": pred == int(y[i]), "certified": bool(cert1[i]), "certified_2eps": bool(cert2[i]),
            "degraded_by": degraded_by[i], "distance": distance[i], "attacks": verdicts[i],
            "label_changed": changed[i], "radius_after": radius_after[i], "monotone": mono,
            "pruned": bool(prune and cert1[i] and cert2[i]),
            "seconds": round(seconds, 6),
        })
    return rows


def _attack_seed(seed: int, first_index: int, k: int) -> int:
    return (int(seed) * 1_000_003 + int(first_index) * 97 + k) & ((1 << 62) - 1)


# ------------------------------------------------------------------------------ summaries

def _flag(row: dict[str, Any], key: str) -> bool:
    v = row.get(key)
    return bool(v) if v is not None else False


def summarize_degradation(rows: Sequence[dict[str, Any]], eps: float, *, monotone: bool | None = None) -> dict[str, Any]:
    """§3.3 quantities from degrade rows: testR, testA lower/upper, FPR and utility-reduction bounds.

    ``monotone`` (default: the rows' ``monotone`` field, else unknown) decides whether a degraded input that is
    certified at 2ε is a ``bug`` (monotone certifier) or a statistical event (smoothing).
    """
    eps = check_eps(eps)
    n = len(rows)
    if monotone is None and rows and all("monotone" in r for r in rows):
        monotone = all(bool(r["monotone"]) for r in rows)
    correct = np.array([_flag(r, "correct") for r in rows], dtype=bool)
    c1 = np.array([_flag(r, "certified") for r in rows], dtype=bool)
    c2 = np.array([_flag(r, "certified_2eps") for r in rows], dtype=bool)
    lower = np.array([r.get("degraded_by") is not None for r in rows], dtype=bool)
    test_r = c1 & correct
    a_low = test_r & lower
    a_up = test_r & ~c2
    # Appendix A: for every certified input, degraded ⇒ not certified at 2ε
    violations = [int(r["index"]) for r, bad in zip(rows, c1 & lower & c2) if bad]
    broken = [int(r["index"]) for r in rows if r.get("label_changed")]

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    out: dict[str, Any] = {
        "eps": eps, "test": n, "certified": int(c1.sum()), "testR": int(test_r.sum()),
        "testA_lower": int(a_low.sum()), "testA_upper": int(a_up.sum()),
        "fpr_lower": ratio(int(a_low.sum()), int(test_r.sum())),
        "fpr_upper": ratio(int(a_up.sum()), int(test_r.sum())),
        "utility_reduction_lower": ratio(int(a_low.sum()), n),
        "utility_reduction_upper": ratio(int(a_up.sum()), n),
        "vra_eps": ratio(int(test_r.sum()), n), "vra_2eps": ratio(int((c2 & correct).sum()), n),
        "clean_accuracy": ratio(int(correct.sum()), n),
        "lower_over_upper": ratio(int(a_low.sum()), int(a_up.sum())),
    }
    per: dict[str, dict[str, Any]] = {}
    for r, in_r in zip(rows, test_r):
        for name, ok in (r.get("attacks") or {}).items():
            d = per.setdefault(name, {"tried": 0, "succeeded": 0, "first": 0})
            if in_r:
                d["tried"] += 1
                d["succeeded"] += int(bool(ok))
        if in_r and r.get("degraded_by"):
            per.setdefault(r["degraded_by"], {"tried": 0, "succeeded": 0, "first": 0})["first"] += 1
    for name, d in per.items():
        d["fpr_lower"] = ratio(d["succeeded"], int(test_r.sum()))
        d["utility_reduction_lower"] = ratio(d["succeeded"], n)
        d["lower_over_upper"] = ratio(d["succeeded"], int(a_up.sum()))
    out["per_attack"] = per
    # How far the attacks moved the certified radius, relative to ε, on the upper-bound set: the
    # 2ε check assumes a drop of ε is possible (the global Lipschitz rate); the real rate is lower
    drops = [(float(r["radius"]) - float(r["radius_after"])) / eps for r, up in zip(rows, a_up)
             if up and r.get("radius_after") is not None]
    if drops:
        q = np.quantile(np.asarray(drops), [0.1, 0.5, 0.9])
        out["radius_drop_over_eps"] = {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]),
                                       "images": len(drops)}
    out["invariant"] = {
        "lower_subset_upper": not violations, "violations": violations,
        "monotone_certifier": monotone,
        "bug": bool(violations) and monotone is not False,
        "note": ("degraded inputs certified at 2ε contradict Appendix A for a monotone certifier"
                 if violations and monotone is not False else
                 "randomized smoothing is monotone only with high probability" if violations else ""),
    }
    out["label_changed"] = broken
    secs = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if secs and len(secs) == n:
        out["seconds"] = float(sum(secs))
    return out


def _cert_arrays(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    try:
        correct = np.array([int(r["prediction"]) == int(r["label"]) and int(r["prediction"]) != ABSTAIN
                            for r in rows], dtype=bool)
        radius = np.array([float(r["radius"]) for r in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"rows need label, prediction and radius ({exc})") from None
    return correct, radius


def fpr_curve(rows: Sequence[dict[str, Any]], radii: Iterable[float]) -> list[dict[str, Any]]:
    """Upper bound of the false-positive rate against the radius (Figures 2–3 of the paper).

    At radius r: testR(r) = correct with radius ≥ r; testA_upper(r) = those with radius < 2r;
    ``fpr_upper = |testA_upper| / |testR|`` (None when testR is empty), with VRA at r and 2r and
    the utility-reduction upper bound ``|testA_upper| / |test|``. Works on certify rows, degrade
    rows and parsed Cohen et al. logs (any rows with label, prediction, radius).
    """
    radii = [float(r) for r in radii]
    if any(not math.isfinite(r) or r <= 0 for r in radii):
        raise InputError("radii must be finite numbers > 0")
    correct, radius = _cert_arrays(rows)
    n = len(correct)
    out = []
    for r in radii:
        test_r = correct & (radius >= r)
        upper = test_r & (radius < 2 * r)
        k = int(test_r.sum())
        out.append({"radius": r, "testR": k, "testA_upper": int(upper.sum()),
                    "fpr_upper": (int(upper.sum()) / k) if k else None,
                    "vra": (k / n) if n else None, "vra_2r": (int((correct & (radius >= 2 * r)).sum()) / n) if n else None,
                    "utility_reduction_upper": (int(upper.sum()) / n) if n else None})
    return out


def default_curve_radii(rows: Sequence[dict[str, Any]], points: int = 40) -> list[float]:
    """An even grid from a small radius to the largest certified radius of the rows."""
    _, radius = _cert_arrays(rows)
    top = float(radius.max()) if len(radius) else 1.0
    top = top if top > 0 else 1.0
    return [float(v) for v in np.linspace(top / points, top, points)]


def plot_fpr_curves(curves: dict[str, Sequence[dict[str, Any]]], path: Any, *, radii: Sequence[float] | None = None,
                    eps: float | None = None, norm: str = "l2", title: str | None = None) -> None:
    """PNG in the style of Figures 2/3: FPR upper bound (left) and VRA (right) against the radius,
    one line per named set of rows; ε marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    try:
        for name, rows in curves.items():
            grid = list(radii) if radii is not None else default_curve_radii(rows)
            pts = fpr_curve(rows, grid)
            xs = [p["radius"] for p in pts]
            ax1.plot(xs, [np.nan if p["fpr_upper"] is None else p["fpr_upper"] for p in pts], label=name)
            ax2.plot(xs, [np.nan if p["vra"] is None else p["vra"] for p in pts], label=name)
        for ax, ylabel in ((ax1, "false-positive rate (upper bound)"), (ax2, "VRA")):
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


# ------------------------------------------------------------------------------ logs

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


def read_certification_log(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Certification rows from a file: our JSONL rows (certify or degrade) or Cohen et al.'s
    tab-separated log (header ``idx label predict radius correct time``; ``predict`` = -1 abstains).

    Returns ``(format, rows)`` with rows holding ``index``, ``label``, ``prediction``, ``radius``,
    ``correct`` (and ``seconds`` when the log has times).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"log file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith("{"):
        from certaudit.results import read_rows

        _, rows = read_rows(p)
        need = ("label", "prediction", "radius")
        good = [r for r in rows if all(k in r for k in need)]
        if rows and not good:
            raise InputError(f"{p}: rows have no label/prediction/radius (not certification rows)")
        return "certaudit", good
    cols = first.strip().split("\t") if "\t" in first else first.split()
    if [c.strip().lower() for c in cols[:5]] != list(COHEN_COLUMNS[:5]):
        raise InputError(f"{p}: not a certaudit JSONL file nor a Cohen et al. log "
                         f"(expected header 'idx\\tlabel\\tpredict\\tradius\\tcorrect\\ttime', got {first[:80]!r})")
    rows = []
    for lineno, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 5:
            raise InputError(f"{p}:{lineno}: expected at least 5 columns, got {len(parts)}")
        try:
            row: dict[str, Any] = {"index": int(parts[0]), "label": int(parts[1]), "prediction": int(parts[2]),
                                   "radius": float(parts[3]), "correct": bool(int(parts[4]))}
        except ValueError:
            raise InputError(f"{p}:{lineno}: cannot parse {line.strip()!r}") from None
        if not math.isfinite(row["radius"]):
            raise InputError(f"{p}:{lineno}: radius is not finite")
        if row["prediction"] == ABSTAIN:
            row["radius"] = 0.0
        if len(parts) > 5:
            sec = _parse_time(parts[5])
            if sec is not None:
                row["seconds"] = sec
        rows.append(row)
    return "cohen", rows


def _parse_time(text: str) -> float | None:
    """Cohen et al. write ``str(datetime.timedelta)``: ``H:MM:SS.ffffff`` (or plain seconds)."""
    s = text.strip()
    try:
        if ":" in s:
            parts = [float(v) for v in s.split(":")]
            total = 0.0
            for v in parts:
                total = total * 60 + v
            return total
        return float(s)
    except ValueError:
        return None


def upper_from_log(rows: Sequence[dict[str, Any]], eps: float) -> dict[str, Any]:
    """The §3.3.2 upper bound at ε from certification rows alone (no model run)."""
    eps = check_eps(eps)
    correct, radius = _cert_arrays(rows)
    n = len(correct)
    test_r = correct & (radius >= eps)
    up = test_r & (radius < 2 * eps)
    k = int(test_r.sum())
    return {"eps": eps, "test": n, "testR": k, "testA_upper": int(up.sum()),
            "fpr_upper": int(up.sum()) / k if k else None,
            "utility_reduction_upper": int(up.sum()) / n if n else None,
            "vra_eps": k / n if n else None,
            "vra_2eps": int((correct & (radius >= 2 * eps)).sum()) / n if n else None}


__all__ = ["degrade_batch", "summarize_degradation", "fpr_curve", "plot_fpr_curves", "read_certification_log",
           "upper_from_log", "monotone_certifier", "default_curve_radii", "COHEN_COLUMNS"]
