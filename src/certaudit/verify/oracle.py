"""Exact degradability and exact certificates for small networks (``docs/degradation.md``, "The
exact oracle").

* :func:`exact_certified`: is the certified label y kept on the whole ball (min over x' of every
  ``f_y − f_j`` > 0)? The check of the certificates themselves: a sound defense never certifies an
  input for which this finds a counterexample.
* :func:`lipschitz_degradable` (GloRo, ℓ2): x, certified at ε with label y, is degradable iff some x'
  in B₂(x, ε) ∩ [0,1]^d has ``f_y(x') − f_j(x') ≤ ε·K_{y,j} + slack_j`` for some j ≠ y (the run-time
  check is that margin at x'; K is global, so only the network varies with x'). Exact.
* :func:`interval_degradable` (ℓ∞): for IBP the defense's own bound as a function of x' is encoded
  (:mod:`.ibp_milp`): exact. CROWN re-fits its relaxation to every box, which no MILP encodes;
  there the oracle decides only from two sides: *degradable* if the exact network margin drops to
  ≤ 0 somewhere in the clipped 2ε box (the midpoint x' is then rejected by every sound ℓ∞ check),
  *not degradable* if the IBP bound stays positive (with its rounding slack) at every x' (CROWN's
  computed bound is never below IBP's on the same box); else undecided.

Every "degradable" verdict carries a witness x' (float32, in the ball) that the defense's own
run-time check (``accept``) rejected; every "not degradable" rests on the solver's dual bound
exceeding the threshold by more than the tie tolerance ``TOL``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from certaudit.defenses.base import ABSTAIN, Defense, Norm, check_eps, check_images
from certaudit.defenses.interval.bounds import margin_bounds
from certaudit.defenses.interval.defense import IntervalDefense
from certaudit.defenses.lipschitz.defense import LipschitzDefense
from certaudit.errors import InputError
from certaudit.verify.ibp_milp import IBPProblem
from certaudit.verify.milp import TOL, ExactNet, MarginProblem, MarginResult, as_flat, exact_network, local_search

DELTAS = (1e-3, 1e-5)  # ℓ2 outer polytopes tried in turn on a margin still undecided


@dataclass
class Options:
    """The oracle's knobs. ``time_limit``: seconds per input. ``screen``: skip the rivals a sound bound
    already settles (the defense's own proof; faster, the same answers). ``search``: a local search
    (PGD on the float64 network) for a witness before the MILPs (faster on the degradable side, the
    same answers: a point is a point). ``bounds``: the big-M bounds (``crown`` or ``ibp``)."""

    time_limit: float = 60.0
    screen: bool = True
    search: bool = True
    bounds: str = "crown"


@dataclass
class Verdict:
    """One input's exact answer.

    ``decided``: True (degradable / certificate broken: ``witness`` is a point of the ball where it
    happens, float32, checked), False (proven impossible), None (a tie within the solver's
    tolerance, or the time budget ran out). ``slack``: the smallest value − threshold found over the
    rivals (an upper bound of the exact minimum's distance to the threshold), ``bound``: a proven
    lower bound of it; ``rival``: the class j where ``slack`` is attained; ``method``: what decided
    (``milp-l2`` / ``milp-linf`` / ``milp-ibp``, ``local search`` for a witness it found, ``screen``
    where the sound bound settled every rival).
    """

    label: int
    decided: bool | None
    slack: float = math.inf
    bound: float = math.inf
    rival: int | None = None
    witness: torch.Tensor | None = None
    method: str = ""
    status: str = ""
    seconds: float = 0.0
    solves: int = 0


def _labels(defense: Defense, x: torch.Tensor, eps: float) -> torch.Tensor:
    cert = defense.certify_checks(x, [eps], full_radius=False)
    return cert.accept(eps).cpu()


def _points(x: np.ndarray, w: np.ndarray, eps: float, norm: Norm, shape: tuple[int, ...]):
    """float32 images in [0,1]^d within ε of x (in ``norm``) at or just inside the float64 witness w:
    pulled toward x by 1e-6, 1e-5, ... of its offset (float32 rounding must not leave the ball; ℓ∞:
    a coordinate still outside moves one float32 step toward x, which is itself float32)."""
    x32 = x.astype(np.float32)
    for shrink in (1e-6, 1e-5, 1e-4, 1e-3):
        z32 = np.clip((x + (w - x) * (1 - shrink)).astype(np.float32), np.float32(0), np.float32(1))
        if norm is Norm.LINF:
            bad = np.abs(z32.astype(np.float64) - x) > eps
            z32[bad] = np.nextafter(z32[bad], x32[bad])
        d = z32.astype(np.float64) - x
        if float(np.abs(d).max() if norm is Norm.LINF else np.linalg.norm(d)) <= eps:
            yield torch.from_numpy(z32).reshape(1, *shape)


def _rejected_point(defense: Defense, x: np.ndarray, w: np.ndarray | None, eps: float, norm: Norm,
                    shape: tuple[int, ...]) -> torch.Tensor | None:
    """The first of :func:`_points` that the defense's own run-time check rejects at ε (C, H, W), or None."""
    if w is None:
        return None
    for point in _points(x, w, eps, norm, shape):
        if int(defense.accept(point.to(defense.device), eps)[0]) == ABSTAIN:
            return point[0]
    return None


def _finish(v: Verdict, t0: float, why: str) -> Verdict:
    v.status = {True: "witness", False: "proven"}.get(v.decided, why)  # type: ignore[arg-type]
    if v.decided is False and v.solves == 0:
        v.method = "screen"
    v.seconds = time.perf_counter() - t0
    return v


def _fold(v: Verdict, res: MarginResult, j: int, threshold: float, solve: bool = True) -> None:
    """Record one answer for rival j: its value (a point's) always, its bound if it was a solve."""
    if res.value - threshold < v.slack:
        v.slack, v.rival = res.value - threshold, j
    if solve:
        v.solves += 1
        v.bound = min(v.bound, res.bound - threshold)


class _Margins:
    """The margins of one input over one ball, decided against thresholds: a local search first (if
    asked; it can only find points), then one MILP for ℓ∞, or for ℓ2 the outer polytopes of
    :data:`DELTAS` in turn, a finer one only where a coarser one left a tie."""

    def __init__(self, enet: ExactNet, x: np.ndarray, eps: float, norm: Norm, opts: Options, deadline: float):
        self.enet, self.x, self.eps, self.norm, self.opts, self.deadline = enet, x, eps, norm, opts, deadline
        self.problems: dict[float, MarginProblem] = {}

    def decide(self, v: Verdict, y: int, j: int, threshold: float) -> tuple[bool | None, MarginResult | None]:
        """``min f_y − f_j ≤ threshold`` over the ball? (True, with ``res.witness``), False or None."""
        below, res = None, None
        if self.opts.search:
            c = np.zeros(self.enet.num_classes)
            c[y], c[j] = 1.0, -1.0
            val, z = local_search(self.enet, self.x, self.eps, self.norm, c)
            res = MarginResult(val, -math.inf, "local search", z, 0.0)
            _fold(v, res, j, threshold, solve=False)  # a point: an upper bound either way
            if res.below(threshold):
                v.method, v.bound = "local search", -math.inf  # a point, no lower bound for this rival
                return True, res
        v.method = f"milp-{self.norm.value}"
        for delta in (DELTAS if self.norm is Norm.L2 else DELTAS[:1]):
            left = self.deadline - time.perf_counter()
            if left <= 0:
                break
            if delta not in self.problems:
                self.problems[delta] = MarginProblem(self.enet, self.x, self.eps, self.norm, bounds=self.opts.bounds,
                                                     delta=delta)
            res = self.problems[delta].solve(y, j, threshold=threshold, time_limit=left)
            _fold(v, res, j, threshold)
            below = res.below(threshold)
            if below is not None:
                break
        return below, res


# ------------------------------------------------------------------------------ certificates

def exact_certified(net: ExactNet | torch.nn.Module, x: torch.Tensor, eps: float, norm: Norm | str,
                    labels: torch.Tensor, **options) -> list[Verdict]:
    """Per input with a label (not ABSTAIN): ``decided`` True where some x' in B(x, ε) ∩ [0,1]^d has
    ``f_j(x') ≥ f_y(x')`` for a j ≠ y (a counterexample to a certificate of y at ε: ``witness``),
    False where ``min_x' f_y − f_j > 0`` is proven for every j (exactly certified), None if undecided.
    ``options``: :class:`Options` (``screen``: the project's CROWN bound on the clipped ℓ∞ box, which
    holds either ball)."""
    check_images(x)
    eps, norm, opts = check_eps(eps), Norm.parse(norm), Options(**options)
    enet = net if isinstance(net, ExactNet) else exact_network(net, tuple(x.shape[1:]))
    out = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ABSTAIN:
            out.append(Verdict(ABSTAIN, None, status="not certified"))
            continue
        t0 = time.perf_counter()
        v = Verdict(y, False)
        proven = np.full(enet.num_classes, -math.inf)
        if opts.screen:
            with torch.no_grad():
                xd, t = x[i:i + 1].float().to(enet.device), torch.tensor([y], device=enet.device)
                proven = margin_bounds(enet.network, xd, eps, t, "crown")[0].double().cpu().numpy()
        margins = _Margins(enet, as_flat(x[i]), eps, norm, opts, t0 + opts.time_limit)
        for j in range(enet.num_classes):
            if j == y or proven[j] > 0:
                continue
            below, res = margins.decide(v, y, j, 0.0)
            if below:
                v.decided, v.witness = True, torch.from_numpy(res.witness).float().reshape(*enet.input_shape)
                break
            if below is None:
                v.decided = None
        out.append(_finish(v, t0, "a tie within the tolerance, or the time limit"))
    return out


# ------------------------------------------------------------------------------ Lipschitz (ℓ2)

def lipschitz_degradable(defense: LipschitzDefense, x: torch.Tensor, eps: float, **options) -> list[Verdict]:
    """Exact degradability of each input under the GloRo defense at ε (``decided`` None for inputs
    not certified at ε: ``label`` ABSTAIN). ``options``: :class:`Options` (``screen``: the global
    Lipschitz bound ``f_y − f_j − ε·K_{y,j}`` at x, per rival: the defense's proof)."""
    check_images(x)
    eps, opts = check_eps(eps), Options(**options)
    if not isinstance(defense, LipschitzDefense):
        raise InputError("lipschitz_degradable needs a LipschitzDefense")
    shape = tuple(int(s) for s in x.shape[1:])
    enet = exact_network(defense.model, shape)
    labels = _labels(defense, x, eps)
    pairwise = defense.lipschitz_constants(shape).pairwise.cpu().numpy()
    out = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ABSTAIN:
            out.append(Verdict(ABSTAIN, None, status="not certified"))
            continue
        out.append(_lipschitz_one(defense, enet, x[i:i + 1], eps, y, pairwise[y], opts))
    return out


def _lipschitz_one(defense: LipschitzDefense, enet: ExactNet, xi: torch.Tensor, eps: float, y: int, k: np.ndarray,
                   opts: Options) -> Verdict:
    t0 = time.perf_counter()
    v = Verdict(y, False)
    x = as_flat(xi)
    f = enet.forward(x)[0]
    # the run-time thresholds: ε·K_{y,j} plus the check's float64 rounding slack 2(e_y + e_j) (at x)
    slack = (f[y] - f) - defense.rival_margins(xi, 0.0, torch.tensor([y]))[0].detach().double().cpu().numpy()
    theta = eps * k + np.where(np.isfinite(slack), slack, 0.0)
    rivals = sorted((j for j in range(enet.num_classes) if j != y), key=lambda j: f[y] - f[j] - theta[j])
    margins = _Margins(enet, x, eps, Norm.L2, opts, t0 + opts.time_limit)
    for j in rivals:
        lip = f[y] - f[j] - eps * k[j] - theta[j]  # a sound lower bound of min over the ball − θ_j
        if opts.screen and lip > TOL * (1 + abs(theta[j])):
            v.bound = min(v.bound, lip)
            continue
        below, res = margins.decide(v, y, j, float(theta[j]))
        if below:
            point = _rejected_point(defense, x, res.witness, eps, Norm.L2, enet.input_shape)
            if point is not None:
                v.decided, v.witness, v.rival = True, point, j
                break
            below = None  # the witness is a tie after rounding to float32
        if below is None:
            v.decided = None
    return _finish(v, t0, "a tie within the tolerance, or the time limit")


# ------------------------------------------------------------------------------ interval (ℓ∞)

def interval_degradable(defense: IntervalDefense, x: torch.Tensor, eps: float, **options) -> list[Verdict]:
    """Degradability of each input under the interval defense at ε (ℓ∞): exact for IBP, the two-sided
    decision of the module docstring for CROWN / α-CROWN (only the degradable side for CROWN-IBP).
    ``options``: :class:`Options` (``screen``: the defense's own proof, IBP on the 2ε box)."""
    check_images(x)
    eps, opts = check_eps(eps), Options(**options)
    if not isinstance(defense, IntervalDefense):
        raise InputError("interval_degradable needs an IntervalDefense")
    shape = tuple(int(s) for s in x.shape[1:])
    enet = exact_network(defense.model, shape)
    labels = _labels(defense, x, eps)
    out = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ABSTAIN:
            out.append(Verdict(ABSTAIN, None, status="not certified"))
            continue
        out.append(_interval_one(defense, enet, x[i:i + 1], eps, y, opts))
    return out


def _rounding(enet: ExactNet, xi: torch.Tensor, eps: float, y: int) -> tuple[np.ndarray, np.ndarray]:
    """(K,) sound IBP margins on the clipped 2ε box and twice their rounding slack (as the proof)."""
    t, xd = torch.tensor([y], device=enet.device), xi.float().to(enet.device)
    with torch.no_grad():
        sound = margin_bounds(enet.network, xd, 2 * eps, t, "ibp")[0].double().cpu().numpy()
        plain = margin_bounds(enet.network, xd, 2 * eps, t, "ibp", sound=False)[0].double().cpu().numpy()
    fin = np.isfinite(sound)
    gap = np.where(fin, plain, 0.0) - np.where(fin, sound, 0.0)
    return sound, 2.0 * np.clip(gap, 0.0, None)


def _interval_one(defense: IntervalDefense, enet: ExactNet, xi: torch.Tensor, eps: float, y: int,
                  opts: Options) -> Verdict:
    t0 = time.perf_counter()
    exact_ibp, has_proof = defense.method == "ibp", defense.proof_name is not None
    v = Verdict(y, False if has_proof else None, method="milp-ibp" if exact_ibp else "milp-2eps/ibp")
    x = as_flat(xi)
    sound, twice_slack = _rounding(enet, xi, eps, y)
    ibp = IBPProblem(enet, x, eps) if has_proof else None
    net2 = None if exact_ibp else _Margins(enet, x, 2 * eps, Norm.LINF, opts, t0 + opts.time_limit)
    for j in (int(j) for j in np.argsort(sound)):
        if j == y or (opts.screen and has_proof and sound[j] - twice_slack[j] > 0):
            continue
        cands = []
        if ibp is not None:
            res = ibp.solve(y, j, time_limit=max(opts.time_limit - (time.perf_counter() - t0), 0.0))
            _fold(v, res, j, float(twice_slack[j]))
            if res.below(float(twice_slack[j])) is False:
                continue  # the IBP bound (minus its slack) stays positive at every x': accepted
            cands.append(res.witness)
        if net2 is not None:  # a point of the 2ε box where the network's margin is <= 0: its midpoint with x
            scratch = Verdict(y, None)
            below, res = net2.decide(scratch, y, j, 0.0)
            v.solves += scratch.solves
            if below:
                cands.append((x + res.witness) / 2)
        for cand in cands:
            point = _rejected_point(defense, x, cand, eps, Norm.LINF, enet.input_shape)
            if point is not None:
                v.decided, v.witness, v.rival = True, point, j
                break
        if v.decided:
            break
        v.decided = None
    v.method = "milp-ibp" if exact_ibp else "milp-2eps/ibp"
    return _finish(v, t0, "a tie, the rounding slack or (CROWN) between the two sufficient conditions")


def exact_degradable(defense: Defense, x: torch.Tensor, eps: float, **options) -> list[Verdict]:
    """:func:`lipschitz_degradable` or :func:`interval_degradable` by the defense's class; randomized
    smoothing has no exact oracle (its run-time check is a random test)."""
    if isinstance(defense, LipschitzDefense):
        return lipschitz_degradable(defense, x, eps, **options)
    if isinstance(defense, IntervalDefense):
        return interval_degradable(defense, x, eps, **options)
    raise InputError(f"no exact degradability oracle for {type(defense).__name__} (Lipschitz and interval only)")


__all__ = ["Options", "Verdict", "exact_certified", "exact_degradable", "interval_degradable", "lipschitz_degradable",
           "DELTAS"]
