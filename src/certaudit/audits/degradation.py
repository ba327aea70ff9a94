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
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from certaudit.audits.logs import (  # noqa: F401 (the log readers are re-exported here)
    COHEN_COLUMNS, cert_arrays, read_certification_log, upper_from_log,
)
from certaudit.attacks.degradation import (
    AttackConfig, attacks_for, is_randomized, run_attack, verify_candidates,
)
from certaudit.defenses.base import Defense, check_eps, radius_key
from certaudit.errors import InputError

RECHECK_SEED_OFFSET = 0x5EED_0000_D1CE  # re-check noise for candidates: seed + offset + attack number
ROW_FORMAT = 2  # rows with checks at exactly ε / 2ε, proofs, one judging CERTIFY (resume refuses format 1)
JUDGE_SEED_OFFSET = 0x5EED_0000_1D6E  # smoothing: the one judging CERTIFY of each input's chosen candidate


def monotone_certifier(defense: Any) -> bool:
    """Whether Appendix A's monotonicity holds exactly (the protocol's ``monotone``): Lipschitz
    (Lemma A.5) and IBP bounds yes; CROWN-style bounds adapt their relaxation to ε and need not be;
    randomized smoothing only with high probability."""
    return bool(defense.monotone) and not is_randomized(defense)


def _clean_checks(defense: Defense, x: torch.Tensor, eps: float, seed: int, indices: Sequence[int],
                  full_radius: bool = True):
    """Label, radius and the ε / 2ε verdicts of Algorithm 2.1 on the clean batch: the defense's own
    checks at exactly ε and 2ε (one CERTIFY draw for smoothing), never a radius compared with ε."""
    with torch.no_grad():
        cert = defense.certify_checks(x, [eps, 2 * eps], full_radius=full_radius, seed=seed, indices=list(indices))
    label = cert.label.cpu()
    return (label, cert.radius.detach().double().cpu(), cert.certified_at(eps).cpu(),
            cert.certified_at(2 * eps).cpu(), cert.radius_tol)


def degrade_batch(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float, *, attack: str = "all",
                  seed: int = 0, indices: Sequence[int] | None = None, exhaustive: bool = False,
                  prune: bool = False, full_radius: bool = True, **attack_options: Any) -> list[dict[str, Any]]:
    """Audit one batch: certify, attack the inputs certified at ε, re-check every candidate.

    ``attack`` is one of ``pgd``, ``pgd-2eps``, ``spgd`` (smoothing), ``margin`` or ``all`` (each in
    that order on the inputs not yet degraded; the row records which attack found x'). With
    ``exhaustive`` every attack runs on every certified input, and ``attacks`` in the row holds each
    one's verdict (per-attack lower bounds from one run). ``prune`` skips the inputs the defense
    *proves* non-degradable (:meth:`Defense.prove_nondegradable`; faster; the lower ⊆ upper check
    then has nothing to check on them). ``attack_options``: see
    :class:`~certaudit.attacks.degradation.AttackConfig` (steps, restarts, step_size, schedule,
    samples, check_every, targeted, tol). ``full_radius=False`` lets a defense whose radius is a
    search (interval bisection) skip it: rows then carry ``radius`` null (the figures at ε and 2ε
    come from the checks either way).

    Randomized smoothing: each attack's candidate is first re-checked with its own *selection*
    CERTIFY (stream ``seed + RECHECK_SEED_OFFSET + k``; the verdicts in ``attacks``); per input the
    best candidate (rejected by its selection CERTIFY, else the smallest certified radius of the
    label; the earlier attack on ties) is then judged by **one** fresh CERTIFY (stream ``seed +
    JUDGE_SEED_OFFSET``), which alone decides ``degraded_by``. So every input gets exactly one
    judging draw, whatever the number of attacks, and the ``identity`` control goes through the same
    path: the lower bound is never inflated by re-drawing the noise. Deterministic defenses judge
    every candidate by the same (deterministic) check.

    Returns one row per image: ``index``, ``label``, ``prediction``, ``radius`` (NaN-free: 0 where
    ABSTAIN), ``correct``, ``certified`` and ``certified_2eps`` (the defense's own checks at exactly
    ε and 2ε), ``proven_nondegradable`` (True/False from the defense's proof, None where it has
    none), ``degraded_by``, ``distance`` (of the counted x', else None), ``attacks`` ({name: bool}
    for attacks run), ``judged`` (smoothing: the attack whose candidate was judged), ``label_changed``
    (attack names whose x' was accepted with another label: broken certificate), ``radius_after``
    (certified radius of the label at the candidates, where the re-check computes radii in closed
    form: Lipschitz and smoothing; 0 where x' gets another label or ⊥), ``seconds``.
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
    if prune and defense.proof_name is None:
        raise InputError("prune needs a defense that proves non-degradability (Lipschitz, interval IBP or CROWN): "
                         "randomized smoothing and CROWN-IBP have no such proof")
    t0 = time.perf_counter()
    x = x.to(defense.device)
    label, radius, cert1, cert2, radius_tol = _clean_checks(defense, x, eps, seed, idx, full_radius)
    b = x.shape[0]
    proven: list[bool | None] = [None] * b
    sure = cert1.nonzero().flatten()
    if sure.numel() and defense.proof_name is not None:
        with torch.no_grad():  # over the ball the success check admits: ‖x' − x‖ ≤ ε·(1 + tol)
            proof = defense.prove_nondegradable(x[sure.to(x.device)], eps * (1.0 + float(cfg.tol)), label[sure])
        if proof is not None:
            for j, i in enumerate(sure.tolist()):
                proven[i] = bool(proof[j])
    degraded_by: list[str | None] = [None] * b
    distance: list[float | None] = [None] * b
    verdicts: list[dict[str, bool]] = [{} for _ in range(b)]
    changed: list[list[str]] = [[] for _ in range(b)]
    radius_after: list[float | None] = [None] * b  # smallest certified radius of the label reached
    judged: list[str | None] = [None] * b
    skip = torch.tensor([bool(prune and p) for p in proven], dtype=torch.bool)
    attackable = cert1 & ~skip
    pending = attackable.nonzero().flatten()  # attack only what the defense accepts
    randomized = is_randomized(defense)
    best_cand = x.detach().clone() if randomized else None
    best_score = [math.inf] * b  # smoothing selection: 0 = rejected by its selection CERTIFY, else radius
    best_name: list[str | None] = [None] * b
    hit = [False] * b  # an attack already succeeded (deterministic: degraded; smoothing: selection-rejected)
    for k, name in enumerate(names):
        if exhaustive or pending.numel() == 0:
            todo = pending
        else:
            todo = pending[torch.tensor([not hit[int(i)] for i in pending.tolist()], dtype=torch.bool)]
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
            hit[i] = hit[i] or ok
            if bool(verdict.label_changed[j]):
                changed[i].append(name)
            if randomized:
                if bool(verdict.in_ball[j]) and bool(verdict.in_box[j]):
                    score = 0.0 if ok else (float(verdict.radius[j]) if verdict.radius is not None else 1.0)
                    if score < best_score[i]:
                        best_score[i], best_name[i] = score, name
                        best_cand[i] = cand[j]  # type: ignore[index]
                continue
            if ok and degraded_by[i] is None:
                degraded_by[i] = name
                distance[i] = float(verdict.distance[j])
            if verdict.radius is not None:
                r_after = float(verdict.radius[j])
                radius_after[i] = r_after if radius_after[i] is None else min(radius_after[i], r_after)
    if randomized:  # one judging CERTIFY per attacked input, on its chosen candidate
        chosen = [i for i in range(b) if best_name[i] is not None]
        if chosen:
            sel = torch.tensor(chosen, dtype=torch.long)
            verdict = verify_candidates(defense, x[sel.to(x.device)], best_cand[sel.to(x.device)],  # type: ignore[index]
                                        label[sel], eps, tol=cfg.tol, seed=seed + JUDGE_SEED_OFFSET,
                                        indices=[idx[i] for i in chosen])
            for j, i in enumerate(chosen):
                judged[i] = best_name[i]
                if bool(verdict.success[j]):
                    degraded_by[i] = best_name[i]
                    distance[i] = float(verdict.distance[j])
                if bool(verdict.label_changed[j]) and best_name[i] not in changed[i]:
                    changed[i].append(best_name[i])  # type: ignore[arg-type]
                if verdict.radius is not None:
                    radius_after[i] = float(verdict.radius[j])
    seconds = (time.perf_counter() - t0) / max(1, b)
    mono = monotone_certifier(defense)
    rows = []
    for i in range(b):
        pred = int(label[i])
        row = {
            "index": idx[i], "label": int(y[i]), "prediction": pred, "radius": _finite_or_none(float(radius[i])),
            "correct": pred == int(y[i]), "certified": bool(cert1[i]), "certified_2eps": bool(cert2[i]),
            "certified_at": {radius_key(eps): bool(cert1[i]), radius_key(2 * eps): bool(cert2[i])},
            "proven_nondegradable": proven[i],
            "degraded_by": degraded_by[i], "distance": distance[i], "attacks": verdicts[i],
            "label_changed": changed[i], "radius_after": radius_after[i], "monotone": mono,
            "pruned": bool(skip[i] and cert1[i]),
            "seconds": round(seconds, 6),
        }
        if randomized:
            row["judged"] = judged[i]
        if radius_tol > 0:
            row["radius_tol"] = radius_tol  # a bisection radius: figures at ε come from certified / certified_2eps
        rows.append(row)
    return rows


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _attack_seed(seed: int, first_index: int, k: int) -> int:
    return (int(seed) * 1_000_003 + int(first_index) * 97 + k) & ((1 << 62) - 1)


# ------------------------------------------------------------------------------ summaries

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


def summarize_degradation(rows: Sequence[dict[str, Any]], eps: float, *, monotone: bool | None = None,
                          proof: str | None = None) -> dict[str, Any]:
    """§3.3 quantities from degrade rows: testR, testA lower/upper, FPR and utility-reduction bounds.

    Two figures from above, each named for what it is (docs/degradation.md):

    * ``testA_upper`` / ``fpr_upper``: the **proven** upper bound, the members of testR that the
      defense did *not prove* non-degradable (``proven_nondegradable``: the 2ε check for a monotone
      certifier, IBP on B(x, 2ε) for CROWN-style bounds). None when the defense has no proof
      (randomized smoothing): then nothing bounds the FPR from above but the trivial 1;
    * ``testA_2eps_check`` / ``fpr_2eps_check``: the members of testR not accepted at 2ε by the
      run-time check itself (§3.3.2). An upper bound only for monotone certifiers, where it equals
      the proven one.

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
    correct = np.array([_flag(r, "correct") for r in rows], dtype=bool)
    c1 = np.array([_flag(r, "certified") for r in rows], dtype=bool)
    c2 = np.array([_flag(r, "certified_2eps") for r in rows], dtype=bool)
    lower = np.array([r.get("degraded_by") is not None for r in rows], dtype=bool)
    proofs = [_proof(r, monotone) for r in rows]
    test_r = c1 & correct
    certified_proofs = [p for p, c in zip(proofs, c1) if c]
    # decided by the rows where any input was certified, else by the defense's declared proof
    has_proof = all(p is not None for p in certified_proofs) if certified_proofs else proof is not None
    proven = np.array([bool(p) for p in proofs], dtype=bool)
    a_low = test_r & lower
    a_check = test_r & ~c2
    a_up = test_r & ~proven if has_proof else None
    violations = [int(r["index"]) for r, bad in zip(rows, c1 & lower & proven) if bad]
    outside = [int(r["index"]) for r, bad in zip(rows, c1 & lower & c2) if bad]
    broken = [int(r["index"]) for r in rows if r.get("label_changed")]

    def ratio(a: int | None, b: int) -> float | None:
        return a / b if (b and a is not None) else None

    k_r = int(test_r.sum())
    k_up = None if a_up is None else int(a_up.sum())
    out: dict[str, Any] = {
        "eps": eps, "test": n, "certified": int(c1.sum()), "testR": k_r,
        "testA_lower": int(a_low.sum()), "testA_upper": k_up, "testA_2eps_check": int(a_check.sum()),
        "fpr_lower": ratio(int(a_low.sum()), k_r),
        "fpr_upper": ratio(k_up, k_r), "fpr_2eps_check": ratio(int(a_check.sum()), k_r),
        "utility_reduction_lower": ratio(int(a_low.sum()), n),
        "utility_reduction_upper": ratio(k_up, n),
        "utility_reduction_2eps_check": ratio(int(a_check.sum()), n),
        "vra_eps": ratio(k_r, n), "vra_2eps": ratio(int((c2 & correct).sum()), n),
        "clean_accuracy": ratio(int(correct.sum()), n),
        "lower_over_upper": ratio(int(a_low.sum()), k_up) if k_up else None,
        "upper_bound": _upper_kind(has_proof, monotone, proof),
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
        d["fpr_lower"] = ratio(d["succeeded"], k_r)
        d["utility_reduction_lower"] = ratio(d["succeeded"], n)
        d["lower_over_upper"] = ratio(d["succeeded"], k_up) if k_up else None
    out["per_attack"] = per
    if any(r.get("judged") for r in rows):
        out["per_attack_note"] = ("smoothing: per-attack verdicts are each attack's own selection CERTIFY (one draw "
                                  "per attack); the combined lower bound is one judging CERTIFY per input")
    # How far the attacks moved the certified radius, relative to ε, on the 2ε-check set: the
    # 2ε check assumes a drop of ε is possible (the global Lipschitz rate); the real rate is lower
    drops = [(float(r["radius"]) - float(r["radius_after"])) / eps for r, up in zip(rows, a_check)
             if up and r.get("radius_after") is not None and r.get("radius") is not None]
    if drops:
        q = np.quantile(np.asarray(drops), [0.1, 0.5, 0.9])
        out["radius_drop_over_eps"] = {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2]),
                                       "images": len(drops)}
    out["invariant"] = {
        "lower_subset_upper": not violations if has_proof else None, "violations": violations,
        "outside_2eps_check": outside,
        "monotone_certifier": monotone,
        "bug": bool(violations),
        "note": ("degraded inputs the defense had proven non-degradable: a bug of the defense, its proof or the attack"
                 if violations else
                 "no proof for this defense: nothing to check the attacks against" if not has_proof else
                 "degraded inputs accepted by the run-time check at 2ε: possible for a non-monotone check"
                 if outside else ""),
    }
    out["label_changed"] = broken
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
    from certaudit.audits.certified import certified_mask

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


__all__ = ["degrade_batch", "summarize_degradation", "fpr_curve", "plot_fpr_curves", "read_certification_log",
           "upper_from_log", "monotone_certifier", "default_curve_radii", "COHEN_COLUMNS"]
