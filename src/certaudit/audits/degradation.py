"""The degradation audit (§3.3 of the degradation-attacks paper): how often can an ε-bounded
adversary force a certified run-time defense to reject an input it certifies?

Per test image (rows, one dict each, see :func:`degrade_batch`):

* ``certified``       -- cert(x, ε): Algorithm 2.1 accepts the clean input (with its label);
* ``certified_2eps``  -- cert(x, 2ε): the stronger check of §3.3.2;
* ``degraded_by``     -- the first attack whose candidate x' passed :func:`verify_candidates`
  (‖x' − x‖ ≤ ε, x' ∈ [0,1], ``accept(x', ε) == ⊥``), or None.

Summaries (:func:`summarize_degradation`, in :mod:`certaudit.audits.degradation_summary` and
re-exported here with the curve functions) follow the paper's sets: ``testR`` = the test inputs
certified *and correct* at ε (so ``|testR|/|test|`` is the baseline VRA and the utility reduction
is ``VRA × FPR``, as in Tables 1–2); ``testA_lower`` = the members of testR an attack degraded
(§3.3.1); ``testA_upper`` = the members of testR the defense did *not prove* non-degradable (the 2ε
check of §3.3.2 for a monotone certifier, then the costlier proofs; ``testA_2eps_check``: the plain 2ε
check). For a monotone certifier (Appendix A: Lipschitz/GloRo, IBP, exact methods) ``testA_lower ⊆
testA_upper``: a degraded input proven non-degradable is a bug of the defense, the proof or the attack
and is reported as such.
Randomized smoothing is monotone only with high probability (a fresh CERTIFY at x' can fail
because of the confidence bound), so there such cases are counted, not called bugs.

:func:`fpr_curve` gives the upper bound against the radius (Figures 2 and 3) from any rows with
``label``, ``prediction`` and ``radius``: our certify rows, degrade rows, or Cohen et al.'s logs
(:func:`read_certification_log`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

from certaudit.attacks.degradation import (
    AttackConfig, CandidateCheck, attacks_for, is_randomized, run_attack, verify_candidates,
)
from certaudit.audits.degradation_summary import (  # noqa: F401 (re-exported: callers import them from here)
    default_curve_radii, fpr_curve, plot_fpr_curves, summarize_degradation,
)
from certaudit.audits.logs import (  # noqa: F401 (the log readers are re-exported here)
    COHEN_COLUMNS, read_certification_log, upper_from_log,
)
from certaudit.defenses.base import Defense, check_eps, radius_key
from certaudit.errors import InputError
from certaudit.validate import positive

RECHECK_SEED_OFFSET = 0x5EED_0000_D1CE  # re-check noise for candidates: seed + offset + attack number
ROW_FORMAT = 3  # + proven_by and radius_floor (the costlier proofs); 2: checks at exactly ε / 2ε, one judging CERTIFY
JUDGE_SEED_OFFSET = 0x5EED_0000_1D6E  # smoothing: the one judging CERTIFY of each input's chosen candidate
UPPER_SEED_OFFSET = 0x5EED_0000_2E95  # smoothing: the sequential 2ε check of testR


def monotone_certifier(defense: Any) -> bool:
    """Whether Appendix A's monotonicity holds exactly (the protocol's ``monotone``): Lipschitz
    (Lemma A.5) and IBP bounds yes; CROWN-style bounds adapt their relaxation to ε and need not be;
    randomized smoothing only with high probability."""
    return bool(defense.monotone) and not is_randomized(defense)


class _CleanChecks(NamedTuple):
    """The defense's verdicts on the clean batch (see :func:`_clean_checks`)."""

    label: torch.Tensor  # (B,) on the CPU
    radius: torch.Tensor  # (B,) float64
    cert1: torch.Tensor  # (B,) bool: accepted at ε
    cert2: torch.Tensor  # (B,) bool: accepted at 2ε
    radius_tol: float


def _clean_checks(defense: Defense, x: torch.Tensor, eps: float, seed: int, indices: Sequence[int],
                  full_radius: bool = True) -> _CleanChecks:
    """Label, radius and the ε / 2ε verdicts of Algorithm 2.1 on the clean batch: the defense's own
    checks at exactly ε and 2ε (one CERTIFY draw for smoothing), never a radius compared with ε."""
    with torch.no_grad():
        cert = defense.certify_checks(x, [eps, 2 * eps], full_radius=full_radius, seed=seed, indices=list(indices))
    label = cert.label.cpu()
    return _CleanChecks(label, cert.radius.detach().double().cpu(), cert.certified_at(eps).cpu(),
                        cert.certified_at(2 * eps).cpu(), cert.radius_tol)


def degrade_batch(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float, *, attack: str = "all",
                  seed: int = 0, indices: Sequence[int] | None = None, exhaustive: bool = False,
                  prune: bool = False, full_radius: bool = True, proofs: Sequence[str] | None = None,
                  upper: Defense | None = None, proof_budget: float | None = None,
                  **attack_options: Any) -> list[dict[str, Any]]:
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
    come from the checks either way). ``proofs``: the defense's proofs of non-degradability to run
    (names from :attr:`Defense.proof_methods`, default :attr:`Defense.default_proofs`: all but the
    searches): the first on every input accepted at ε before the attacks, the costlier ones afterwards
    on the inputs of testR no attack degraded and the first did not prove, so every input of testR ends degraded, proven or undecided; ``proof_budget``: seconds
    per input for a proof that searches (``milp``: branch and bound), whose x' the check rejects counts
    as degraded (``degraded_by`` "milp", re-checked like every candidate). ``upper`` (randomized
    smoothing): the same defense answering with its sequential test (``sequential=True``, its ``n`` the
    budget per input), run at 2ε on testR (correct and accepted at ε): rows get
    ``certified_2eps_sequential`` and ``samples_2eps_sequential`` (docs/degradation.md, "Informative
    smoothing upper bounds").

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
    ε and 2ε), ``proven_nondegradable`` (True/False from the defense's proofs, None where it has
    none), ``proven_by`` (the proof that succeeded), ``radius_floor`` (where the defense gives one: a
    proven lower bound of the certified radius of the label over the ball, from the best proof run
    on the input), ``degraded_by``, ``distance`` (of the counted x', else None), ``attacks`` ({name: bool}
    for attacks run), ``judged`` (smoothing: the attack whose candidate was judged), ``label_changed``
    (attack names whose x' was accepted with another label: broken certificate), ``radius_after``
    (certified radius of the label at the candidates, where the re-check computes radii in closed
    form: Lipschitz and smoothing; 0 where x' gets another label or ⊥), ``seconds``.
    """
    eps = check_eps(eps)
    y, idx = _batch_labels(x, y, indices)
    names = attacks_for(defense, attack)
    cfg = AttackConfig.from_options(attack_options)
    if prune and defense.proof_name is None:
        raise InputError("prune needs a defense that proves non-degradability (Lipschitz, interval IBP or CROWN): "
                         "randomized smoothing and CROWN-IBP have no such proof")
    t0 = time.perf_counter()
    x = x.to(defense.device)
    methods = check_proofs(defense, proofs)
    if proof_budget is not None:
        proof_budget = positive(proof_budget, "proof_budget")
    clean = _clean_checks(defense, x, eps, seed, idx, full_radius)
    proof = _Proofs.start(x.shape[0])
    proof.run(defense, x, clean, clean.cert1, eps, cfg.tol, methods[:1])
    skip = torch.tensor([bool(prune and p) for p in proof.proven], dtype=torch.bool)
    tally = _Tally.start(x, is_randomized(defense))
    _attack(defense, names, x, clean.label, clean.cert1 & ~skip, eps, cfg, seed, idx, exhaustive, tally)
    if tally.randomized:
        _judge_chosen(defense, x, clean.label, eps, cfg, seed, idx, tally)
    if len(methods) > 1:  # the costlier proofs: only on testR where the attacks and the cheap proof left it open
        correct = (clean.label == y).tolist()
        open_ = torch.tensor([bool(c) and ok and p is False and d is None
                              for c, ok, p, d in zip(clean.cert1.tolist(), correct, proof.proven, tally.degraded_by)])
        proof.run(defense, x, clean, open_, eps, cfg.tol, methods[1:], proof_budget)
        _count_witnesses(defense, x, clean, proof, eps, cfg.tol, tally)
    seq = _sequential_upper(upper, x, y, clean, eps, seed, idx)
    seconds = (time.perf_counter() - t0) / max(1, x.shape[0])
    rows = _rows(idx, y, eps, clean, proof, skip, tally, seconds, monotone_certifier(defense))
    if seq is not None:
        for row, (ok, n) in zip(rows, seq):
            row["certified_2eps_sequential"], row["samples_2eps_sequential"] = ok, n
    return rows


def _sequential_upper(upper: Defense | None, x: torch.Tensor, y: torch.Tensor, clean: _CleanChecks, eps: float,
                      seed: int, idx: list[int]) -> list[tuple[bool | None, int | None]] | None:
    """The 2ε check through the sequential test on testR (correct and accepted at ε), one fresh stream;
    (verdict, samples) per image, (None, None) outside testR; None without ``upper``."""
    if upper is None:
        return None
    out: list[tuple[bool | None, int | None]] = [(None, None)] * x.shape[0]
    sel = (clean.cert1 & (clean.label == y)).nonzero().flatten()
    if not sel.numel():
        return out
    with torch.no_grad():
        cert = upper.certify_checks(x[sel.to(x.device)], [2 * eps], full_radius=False, seed=seed + UPPER_SEED_OFFSET,
                                    indices=[idx[i] for i in sel.tolist()])
    # certified at 2ε *with the input's label* (the sequential run picks its class from its own selection noise)
    ok = cert.certified_at(2 * eps).cpu() & (cert.label.cpu() == clean.label[sel])
    samples = cert.extras.get("samples")
    for j, i in enumerate(sel.tolist()):
        out[i] = (bool(ok[j]), None if samples is None else int(samples[j]))
    return out


def _count_witnesses(defense: Defense, x: torch.Tensor, clean: _CleanChecks, proof: "_Proofs", eps: float, tol: float,
                     tally: "_Tally") -> None:
    """A search proof's x' that the check rejects counts as degraded (``degraded_by`` "milp") once re-checked
    exactly like an attack's candidate; it is not an attack, so it adds no per-attack verdict."""
    found = [i for i, w in enumerate(proof.witness) if w is not None and tally.degraded_by[i] is None]
    if not found:
        return
    sel = torch.tensor(found, dtype=torch.long)
    cand = torch.stack([proof.witness[i] for i in found]).to(x.device, x.dtype)
    verdict = verify_candidates(defense, x[sel.to(x.device)], cand, clean.label[sel], eps, tol=tol)
    for j, i in enumerate(found):
        if bool(verdict.success[j]):
            tally.degraded_by[i], tally.distance[i] = "milp", float(verdict.distance[j])
            tally.hit[i] = True


def check_proofs(defense: Defense, proofs: Sequence[str] | None) -> list[str]:
    """The proofs to run, in the defense's order (cheapest first); default :attr:`Defense.default_proofs`
    (all but the searches), ``all`` for every one. The cheapest is always run where the defense has one
    (it decides pruning and the lower ⊆ upper check)."""
    have = list(defense.proof_methods)
    if proofs is None:
        return list(defense.default_proofs)
    want = [str(p).strip().lower() for p in proofs]
    if not want or any(not p for p in want):
        raise InputError("--proofs must be a comma list of proof names (or all), without empty entries")
    unknown = [p for p in want if p not in have and p != "all"]
    if unknown:
        raise InputError(f"unknown proof {unknown[0]!r}; this defense has: {', '.join(have) or 'none'} (or all)")
    if "all" in want:
        return have
    return [p for p in have if p in want or p == have[0]]


def _batch_labels(x: torch.Tensor, y: torch.Tensor, indices: Sequence[int] | None) -> tuple[torch.Tensor, list[int]]:
    """The labels (a (B,) CPU long tensor) and data-set indices of a batch, checked against ``x``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InputError("x must be a (B, C, H, W) tensor of images in [0, 1]")
    y = torch.as_tensor(y).long().cpu()
    if y.shape != (x.shape[0],):
        raise InputError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    idx = list(range(x.shape[0])) if indices is None else [int(i) for i in indices]
    if len(idx) != x.shape[0]:
        raise InputError(f"indices must have one entry per image ({x.shape[0]}), got {len(idx)}")
    return y, idx


@dataclass
class _Proofs:
    """Per image: proven (None: no proof ran or the defense has none), by which proof, radius floor."""

    proven: list[bool | None]
    by: list[str | None]
    floor: list[float | None]
    witness: list[torch.Tensor | None]

    @classmethod
    def start(cls, b: int) -> "_Proofs":
        return cls([None] * b, [None] * b, [None] * b, [None] * b)

    def run(self, defense: Defense, x: torch.Tensor, clean: _CleanChecks, which: torch.Tensor, eps: float,
            tol: float, methods: Sequence[str], budget: float | None = None) -> None:
        """Run ``methods`` (:meth:`Defense.prove`) on the images ``which`` accepted at ε, over the ball
        the success check admits (‖x' − x‖ ≤ ε·(1 + tol)); keep the best radius floor."""
        sure = (which & clean.cert1).nonzero().flatten()
        if not sure.numel() or not methods or defense.proof_name is None:
            return
        with torch.no_grad():
            res = defense.prove(x[sure.to(x.device)], eps * (1.0 + float(tol)), clean.label[sure], list(methods),
                                budget=budget)
        if res is None:
            return
        for j, i in enumerate(sure.tolist()):
            ok = bool(res.proven[j])
            self.proven[i] = ok or bool(self.proven[i])
            if ok and self.by[i] is None:
                self.by[i] = res.method[j]
            if j < len(res.witness) and res.witness[j] is not None:
                self.witness[i] = res.witness[j]
            f = float(res.radius_floor[j])
            if math.isfinite(f):
                self.floor[i] = f if self.floor[i] is None else max(self.floor[i], f)


@dataclass
class _Tally:
    """What the attacks of one batch found, per image (lists indexed by the position in the batch).

    Deterministic defenses fill ``degraded_by`` as the attacks go. Randomized ones keep, per image,
    the best candidate so far (``best_*``: score 0 = rejected by its selection CERTIFY, else its
    certified radius), which :func:`_judge_chosen` then judges once.
    """

    randomized: bool
    size: int
    best_cand: torch.Tensor | None = None
    degraded_by: list[str | None] = field(default_factory=list)
    distance: list[float | None] = field(default_factory=list)
    verdicts: list[dict[str, bool]] = field(default_factory=list)
    changed: list[list[str]] = field(default_factory=list)
    radius_after: list[float | None] = field(default_factory=list)  # smallest certified radius of the label reached
    judged: list[str | None] = field(default_factory=list)
    hit: list[bool] = field(default_factory=list)  # deterministic: degraded; smoothing: selection-rejected
    best_score: list[float] = field(default_factory=list)
    best_name: list[str | None] = field(default_factory=list)

    @classmethod
    def start(cls, x: torch.Tensor, randomized: bool) -> "_Tally":
        b = x.shape[0]
        return cls(randomized, b, best_cand=x.detach().clone() if randomized else None,
                   degraded_by=[None] * b, distance=[None] * b, verdicts=[{} for _ in range(b)],
                   changed=[[] for _ in range(b)], radius_after=[None] * b, judged=[None] * b,
                   hit=[False] * b, best_score=[math.inf] * b, best_name=[None] * b)

    def record(self, i: int, name: str, verdict: CandidateCheck, j: int, cand: torch.Tensor) -> None:
        """Candidate ``j`` of attack ``name`` (for image ``i``) and its re-check."""
        ok = bool(verdict.success[j])
        self.verdicts[i][name] = ok
        self.hit[i] = self.hit[i] or ok
        if bool(verdict.label_changed[j]):
            self.changed[i].append(name)
        if self.randomized:
            if bool(verdict.in_ball[j]) and bool(verdict.in_box[j]):
                score = 0.0 if ok else (float(verdict.radius[j]) if verdict.radius is not None else 1.0)
                if score < self.best_score[i]:
                    self.best_score[i], self.best_name[i] = score, name
                    self.best_cand[i] = cand[j]  # type: ignore[index]
            return
        if ok and self.degraded_by[i] is None:
            self.degraded_by[i] = name
            self.distance[i] = float(verdict.distance[j])
        if verdict.radius is not None:
            r_after = float(verdict.radius[j])
            self.radius_after[i] = r_after if self.radius_after[i] is None else min(self.radius_after[i], r_after)


def _attack(defense: Defense, names: Sequence[str], x: torch.Tensor, label: torch.Tensor, attackable: torch.Tensor,
            eps: float, cfg: AttackConfig, seed: int, idx: list[int], exhaustive: bool, tally: _Tally) -> None:
    """Run the attacks in order on the ``attackable`` images (without ``exhaustive``: only on those no
    earlier attack hit) and re-check every candidate."""
    pending = attackable.nonzero().flatten()  # attack only what the defense accepts
    for k, name in enumerate(names):
        if exhaustive or pending.numel() == 0:
            todo = pending
        else:
            todo = pending[torch.tensor([not tally.hit[int(i)] for i in pending.tolist()], dtype=torch.bool)]
        if todo.numel() == 0:
            continue
        sub = todo.tolist()
        xs, ls = x[todo.to(x.device)], label[todo]
        cand = run_attack(name, defense, xs, ls, eps, cfg, seed=_attack_seed(seed, idx[sub[0]], k))
        verdict = verify_candidates(defense, xs, cand, ls, eps, tol=cfg.tol, seed=seed + RECHECK_SEED_OFFSET + k,
                                    indices=[idx[i] for i in sub])
        for j, i in enumerate(sub):
            tally.record(i, name, verdict, j, cand)


def _judge_chosen(defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float, cfg: AttackConfig, seed: int,
                  idx: list[int], tally: _Tally) -> None:
    """Randomized defenses: one judging CERTIFY per attacked input, on its chosen candidate; it alone
    decides ``degraded_by``."""
    chosen = [i for i in range(tally.size) if tally.best_name[i] is not None]
    if not chosen:
        return
    sel = torch.tensor(chosen, dtype=torch.long)
    verdict = verify_candidates(defense, x[sel.to(x.device)], tally.best_cand[sel.to(x.device)],  # type: ignore[index]
                                label[sel], eps, tol=cfg.tol, seed=seed + JUDGE_SEED_OFFSET,
                                indices=[idx[i] for i in chosen])
    for j, i in enumerate(chosen):
        name = tally.best_name[i]
        tally.judged[i] = name
        if bool(verdict.success[j]):
            tally.degraded_by[i] = name
            tally.distance[i] = float(verdict.distance[j])
        if bool(verdict.label_changed[j]) and name not in tally.changed[i]:
            tally.changed[i].append(name)  # type: ignore[arg-type]
        if verdict.radius is not None:
            tally.radius_after[i] = float(verdict.radius[j])


def _rows(idx: list[int], y: torch.Tensor, eps: float, clean: _CleanChecks, proof: _Proofs,
          skip: torch.Tensor, tally: _Tally, seconds: float, mono: bool) -> list[dict[str, Any]]:
    """One row per image (the schema of :func:`degrade_batch`)."""
    label, cert1, cert2 = clean.label, clean.cert1, clean.cert2
    rows = []
    for i in range(tally.size):
        pred = int(label[i])
        row = {
            "index": idx[i], "label": int(y[i]), "prediction": pred,
            "radius": _finite_or_none(float(clean.radius[i])),
            "correct": pred == int(y[i]), "certified": bool(cert1[i]), "certified_2eps": bool(cert2[i]),
            "certified_at": {radius_key(eps): bool(cert1[i]), radius_key(2 * eps): bool(cert2[i])},
            "proven_nondegradable": proof.proven[i], "proven_by": proof.by[i], "radius_floor": proof.floor[i],
            "degraded_by": tally.degraded_by[i], "distance": tally.distance[i], "attacks": tally.verdicts[i],
            "label_changed": tally.changed[i], "radius_after": tally.radius_after[i], "monotone": mono,
            "pruned": bool(skip[i] and cert1[i]),
            "seconds": round(seconds, 6),
        }
        if tally.randomized:
            row["judged"] = tally.judged[i]
        if clean.radius_tol > 0:
            row["radius_tol"] = clean.radius_tol  # a bisection radius: figures at ε come from certified / certified_2eps
        rows.append(row)
    return rows


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _attack_seed(seed: int, first_index: int, k: int) -> int:
    return (int(seed) * 1_000_003 + int(first_index) * 97 + k) & ((1 << 62) - 1)


__all__ = ["degrade_batch", "summarize_degradation", "fpr_curve", "plot_fpr_curves", "read_certification_log",
           "upper_from_log", "monotone_certifier", "default_curve_radii", "COHEN_COLUMNS"]
