"""Sequential accept-at-ε for randomized smoothing: an anytime-valid test with early stopping.

A deployed smoothing defense answers one question per input: is the smoothed classifier certified
at radius ε? With the class ``ĉ_A`` chosen from ``n0`` *separate* selection samples, Theorem 1 of
Cohen et al. (2019) certifies ``ĉ_A`` at ε iff ``p_A > p* = Φ(ε/σ)`` (``p_A = P(f(x + δ) = ĉ_A)``).
Fixed-N CERTIFY answers with N = 100,000 samples on every input; most inputs are far from the
boundary and are decided after a few hundred. Stopping "as soon as the evidence suffices" is only
sound with a test whose guarantee holds at *every* time simultaneously (a fixed-n Clopper–Pearson
bound checked after each batch is not: see ``tests/test_sequential.py``).

The test (Robbins' method of mixtures; Ville's inequality). For one alternative ``q ≥ p*`` the
likelihood ratio of the estimation draws ``X_1, X_2, ... ∈ {0, 1}`` against ``p*``,
``L_t(q) = Π (q/p*)^{X_i} ((1−q)/(1−p*))^{1−X_i}``, has ``E[L_{t+1}/L_t] = p·q/p* + (1−p)(1−q)/(1−p*) ≤ 1``
for every true ``p ≤ p*``: a non-negative supermartingale starting at 1. So is its mixture over a
prior ``π`` on ``[p*, 1]`` (Fubini), here a Beta(a, b) prior truncated to ``[p*, 1]``, in closed form::

    M⁺_t = B(S+a, F+b) · P(Beta(S+a, F+b) > p*) / (p*^S (1−p*)^F · B(a, b) · P(Beta(a, b) > p*))

with ``S`` successes and ``F = t − S`` failures. Ville's inequality gives
``P(∃ t: M⁺_t ≥ 1/α) ≤ α`` whenever ``p_A ≤ p*``: declaring "certified" the first time
``M⁺_t ≥ 1/α`` is wrong with probability at most α, however the stopping time depends on the
data, at whatever times the statistic is looked at, and whether or not sampling stops early for
the other side. The abstain side is the mirror test (prior on ``[0, p*]``, level β): it only saves
samples (abstaining is always safe). When the budget N is reached undecided, or when even N − t
further successes could not reach ``1/α`` (futility), the answer is ABSTAIN.

Everything is computed in float64 with log-gamma/incomplete-beta functions: at t ≈ 10⁵ the terms
``S·log p*`` and ``log B(S+1, F+1)`` are ≈ 10⁴ and cancel to a few units, which float32 cannot
resolve (a pitfall pinned by a test).

Scheduling (:func:`run_sequential`): every input draws its estimation samples in blocks of
``block`` samples; it is checked at the block counts 1, 2, ..., 8, 10, 12, 15, ... (each round
adds a quarter of what it already has), a schedule that depends only on its own sample count.
Forward batches are filled first with the pending rounds of active inputs (oldest first), then with
new inputs: an input that finishes frees its slots for the next one, so batches stay full while
inputs stop at different times. Since noise block ``j`` of input ``i`` is seeded by
``(seed, i, stream, j)``, each input's decision and sample count do not depend on the batch size,
on the other inputs in the run, or on the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from certaudit.errors import InputError

CONTINUE = 0
CERTIFIED = 1
ABSTAINED = -1  # the abstain-side test decided p_A < p*
BUDGET = -2  # the budget N was spent without a decision
FUTILE = -3  # even all remaining samples succeeding could not certify within N

DECISIONS = {CONTINUE: "continue", CERTIFIED: "certified", ABSTAINED: "abstain", BUDGET: "budget", FUTILE: "futile"}

SEQ_BLOCK = 128
"""Estimation samples per noise block (the unit of seeding and of scheduling)."""
SEQ_GROWTH = 0.25
"""Each round adds ``max(1, floor(blocks · growth))`` blocks: at most 25% overshoot past the
stopping time, and about 30 checks up to N = 100,000."""


def threshold(eps: float, sigma: float) -> float:
    """``p* = Φ(ε/σ)``: the smoothed top-class probability above which ``ĉ_A`` is certified at ε (float64)."""
    from scipy.stats import norm

    return float(norm.cdf(float(eps) / float(sigma)))


def _log_tail_mass(a: float, b: float, p0: float, upper: bool) -> float:
    from scipy.special import betainc, betaincc, betaln

    mass = betaincc(a, b, p0) if upper else betainc(a, b, p0)
    return float(betaln(a, b) + np.log(mass))


def log_evidence(successes, trials, p0: float, side: str = "above", prior: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Log of the mixture martingale ``M_t`` against ``p ≤ p0`` (side "above") or ``p ≥ p0`` ("below").

    float64, vectorised over arrays of ``successes`` and ``trials`` (``0 ≤ S ≤ t``). ``M_0 = 1``
    (log 0). Under the null, ``P(∃ t: log M_t ≥ log(1/α)) ≤ α`` (Ville). The prior is Beta(a, b)
    truncated to ``[p0, 1]`` ("above") or ``[0, p0]`` ("below").
    """
    from scipy.special import betainc, betaincc, betaln

    p0 = float(p0)
    if not (0.0 < p0 < 1.0):
        raise InputError(f"the null proportion p0 must lie strictly between 0 and 1, got {p0!r}")
    if side not in ("above", "below"):
        raise InputError(f"side must be 'above' or 'below', got {side!r}")
    a, b = (float(v) for v in prior)
    s = np.asarray(successes, dtype=np.float64)
    t = np.asarray(trials, dtype=np.float64)
    s, t = np.broadcast_arrays(s, t)
    if np.any(s < 0) or np.any(s > t):
        raise InputError("successes must lie between 0 and trials")
    f = t - s
    upper = side == "above"
    with np.errstate(divide="ignore"):
        tail = betaincc(s + a, f + b, p0) if upper else betainc(s + a, f + b, p0)
        out = betaln(s + a, f + b) + np.log(tail) - s * math.log(p0) - f * math.log1p(-p0)
    gone = ~(tail > 1e-280)  # zero or subnormal: too few digits left
    if np.any(gone):
        # The tail underflows float64 (or loses its digits) only when the counts lie far on the null side of p0 (mode of
        # the posterior beyond p0), where the log-concave integrand peaks at p0 itself: an endpoint
        # Laplace expansion to second order, ∫ ≈ g(p0)·(1/|d| + h/|d|³) with d, h the first and
        # second derivatives of log g at p0, is accurate there, and M < 1 there: no decision changes.
        sg, fg = s[gone] + a - 1.0, f[gone] + b - 1.0
        slope = np.abs(sg / p0 - fg / (1.0 - p0))
        curv = -sg / p0**2 - fg / (1.0 - p0) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = np.log1p(np.maximum(curv / slope**2, -0.5))
            out[gone] = (a - 1.0) * math.log(p0) + (b - 1.0) * math.log1p(-p0) - np.log(slope) + corr
    return out - _log_tail_mass(a, b, p0, upper)


@dataclass(frozen=True)
class SequentialTest:
    """Anytime-valid test of ``p_A > p0`` at level ``alpha`` with budget ``max_samples``.

    ``beta`` is the level of the abstain-side test (default: ``alpha``; ``0`` disables it, then
    only the budget or futility abstains). ``block`` and ``growth`` set the check schedule.
    """

    p0: float
    alpha: float
    max_samples: int
    beta: float | None = None
    block: int = SEQ_BLOCK
    growth: float = SEQ_GROWTH
    prior: tuple[float, float] = (1.0, 1.0)
    _log_a: float = field(init=False, repr=False)
    _log_b: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (0.0 < float(self.p0) <= 1.0):
            raise InputError(f"the certification threshold p* must lie in (0, 1], got {self.p0!r}")
        if not (0.0 < float(self.alpha) < 1.0):
            raise InputError(f"alpha must lie strictly between 0 and 1, got {self.alpha!r}")
        beta = self.alpha if self.beta is None else float(self.beta)
        if not (0.0 <= beta < 1.0):
            raise InputError(f"beta must lie in [0, 1), got {self.beta!r}")
        if isinstance(self.max_samples, bool) or int(self.max_samples) < 1 or int(self.max_samples) != self.max_samples:
            raise InputError(f"the sample budget must be an integer >= 1, got {self.max_samples!r}")
        if int(self.block) < 1:
            raise InputError(f"block must be >= 1, got {self.block!r}")
        if not (0.0 <= float(self.growth) <= 4.0):
            raise InputError(f"growth must lie in [0, 4], got {self.growth!r}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "_log_a", math.log(1.0 / float(self.alpha)))
        object.__setattr__(self, "_log_b", math.log(1.0 / beta) if beta > 0 else math.inf)

    def next_target(self, t: np.ndarray) -> np.ndarray:
        """The sample count of the next check after ``t`` samples (a function of ``t`` only)."""
        t = np.asarray(t, dtype=np.int64)
        blocks = t // self.block
        step = np.maximum(1, np.floor(blocks * self.growth).astype(np.int64))
        return np.minimum(int(self.max_samples), (blocks + step) * self.block)

    def check_times(self) -> np.ndarray:
        """All sample counts at which an input may be checked, up to the budget."""
        out, t = [], np.zeros(1, dtype=np.int64)
        while t[0] < self.max_samples:
            t = self.next_target(t)
            out.append(int(t[0]))
        return np.asarray(out, dtype=np.int64)

    def decide(self, successes, trials) -> np.ndarray:
        """Decision codes (int8): CERTIFIED, ABSTAINED, BUDGET, FUTILE or CONTINUE, vectorised.

        CERTIFIED iff ``log M⁺_t ≥ log(1/α)``; else ABSTAINED iff ``log M⁻_t ≥ log(1/β)``; else
        BUDGET at ``t ≥ N``; else FUTILE iff ``log M⁺_N < log(1/α)`` even if all ``N − t`` remaining
        samples succeed (``M⁺`` grows with every success, so no later check could certify). Since
        ``M⁺`` increases and ``M⁻`` decreases in ``S`` at fixed ``t``, each rule is a threshold on
        the counts, found once per distinct ``t`` by bisection (exactly the same decisions, fast).
        """
        s = np.asarray(successes, dtype=np.int64)
        t = np.asarray(trials, dtype=np.int64)
        s, t = np.broadcast_arrays(s, t)
        if np.any(s < 0) or np.any(s > t):
            raise InputError("successes must lie between 0 and trials")
        if self.p0 >= 1.0:  # Φ(ε/σ) rounds to 1 in float64: no sample count can certify
            return np.full(s.shape, FUTILE, dtype=np.int8)
        uniq, inv = np.unique(t, return_inverse=True)
        s_cert, s_abst = self._thresholds(uniq)
        s_cert, s_abst = s_cert[inv.reshape(t.shape)], s_abst[inv.reshape(t.shape)]
        code = np.full(s.shape, CONTINUE, dtype=np.int8)
        code[(t >= self.max_samples) | (t - s > self._futile_failures())] = FUTILE
        code[t >= self.max_samples] = BUDGET
        code[s <= s_abst] = ABSTAINED
        code[s >= s_cert] = CERTIFIED
        return code

    def _thresholds(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per distinct sample count t: the least S that certifies (t + 1 if none) and the largest S
        that abstains (−1 if none or if β = 0)."""
        cache = self.__dict__.setdefault("_cache", {})
        missing = np.array([v for v in ts.tolist() if v not in cache], dtype=np.int64)
        if missing.size:
            cert = _least_true(lambda k: log_evidence(k, missing, self.p0, "above", self.prior) >= self._log_a, missing)
            if self.beta > 0:  # largest S with M⁻ ≥ 1/β = (least S with M⁻ < 1/β) − 1
                abst = _least_true(lambda k: log_evidence(k, missing, self.p0, "below", self.prior) < self._log_b,
                                   missing) - 1
            else:
                abst = np.full(missing.shape, -1, dtype=np.int64)
            cache.update(zip(missing.tolist(), zip(cert.tolist(), abst.tolist())))
        pairs = np.array([cache[v] for v in ts.tolist()], dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def _futile_failures(self) -> int:
        """The most failures after which certifying within the budget is still possible (−1: never)."""
        cache = self.__dict__.setdefault("_cache", {})
        if "futile" not in cache:
            n = np.array([int(self.max_samples)], dtype=np.int64)
            least = _least_true(lambda k: log_evidence(k, n, self.p0, "above", self.prior) >= self._log_a, n)
            cache["futile"] = int(n[0] - least[0])  # n + 1 successes needed (none suffice): −1
        return cache["futile"]

    def evidence(self, successes, trials) -> np.ndarray:
        """``log M⁺_t`` (float64): certified once it reaches ``log(1/alpha)``."""
        if self.p0 >= 1.0:  # nothing was sampled (FUTILE at t = 0): M_0 = 1
            return np.zeros(np.shape(successes))
        return log_evidence(successes, trials, self.p0, "above", self.prior)


def _least_true(pred: Callable[[np.ndarray], np.ndarray], t: np.ndarray) -> np.ndarray:
    """Least k in [0, t] with pred(k) true for a predicate monotone in k (t + 1 where none), by bisection."""
    lo = np.zeros(t.shape, dtype=np.int64)
    hi = t.astype(np.int64) + 1
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        ok = pred(np.minimum(mid, t))
        ok &= mid <= t
        hi = np.where(ok & (lo < hi), mid, hi)
        lo = np.where(~ok & (lo < hi), mid + 1, lo)
    return lo


@dataclass
class SequentialResult:
    """Per input: decision code, estimation samples used, successes, and run statistics."""

    decision: np.ndarray  # (B,) int8
    trials: np.ndarray  # (B,) int64
    successes: np.ndarray  # (B,) int64
    batches: int  # forward batches (draw calls)
    samples_drawn: int  # estimation samples in all

    @property
    def certified(self) -> np.ndarray:
        return self.decision == CERTIFIED


Draw = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def run_sequential(test: SequentialTest, n_items: int, draw: Draw, batch_samples: int) -> SequentialResult:
    """Run ``test`` on ``n_items`` inputs, refilling finished inputs' batch slots with new ones.

    ``draw(items, blocks, sizes)`` evaluates, for each request ``r``, block ``blocks[r]`` (of
    ``sizes[r]`` samples) of input ``items[r]`` and returns the number of successes (samples
    labelled ``ĉ_A``) per request. Each call holds at most ``max(1, batch_samples // block)``
    blocks. The schedule of one input depends only on its own counts, so results do not depend on
    ``batch_samples`` or on ``n_items``.
    """
    n_items = int(n_items)
    blk = int(test.block)
    cap = max(1, int(batch_samples) // blk)
    n_max = int(test.max_samples)
    t = np.zeros(n_items, dtype=np.int64)
    s = np.zeros(n_items, dtype=np.int64)
    target = np.zeros(n_items, dtype=np.int64)
    decision = np.zeros(n_items, dtype=np.int8)
    decision[:] = test.decide(s, t)  # at t = 0: only futility (ε too large for the budget) can fire
    todo = np.flatnonzero(decision == CONTINUE)  # inputs in admission order
    target[todo] = test.next_target(t[todo])
    active = np.zeros(0, dtype=np.int64)
    nxt = 0  # next position in todo to admit
    batches = drawn = 0
    while active.size or nxt < todo.size:
        need = -(-(target[active] - t[active]) // blk)  # (A,) blocks to the next check
        before = np.cumsum(need) - need
        take = np.clip(cap - before, 0, need)  # oldest inputs first
        room = cap - int(take.sum())
        new = todo[nxt:nxt + room]  # a new input's first round is one block
        nxt += new.size
        items = np.concatenate([active, new])
        take = np.concatenate([take, np.ones(new.size, dtype=np.int64)])
        active = items
        req_items = np.repeat(items, take)  # (R,)
        first = np.repeat(t[items] // blk, take)
        offs = np.arange(req_items.size) - np.repeat(np.cumsum(take) - take, take)
        req_blocks = first + offs
        req_sizes = np.minimum(blk, n_max - req_blocks * blk)
        got = np.asarray(draw(req_items, req_blocks, req_sizes), dtype=np.int64)
        batches += 1
        drawn += int(req_sizes.sum())
        np.add.at(t, req_items, req_sizes)
        np.add.at(s, req_items, got)
        due = items[t[items] >= target[items]]
        if due.size:
            code = test.decide(s[due], t[due])
            decision[due] = code
            going = due[code == CONTINUE]
            target[going] = test.next_target(t[going])
        active = items[decision[items] == CONTINUE]
    return SequentialResult(decision=decision, trials=t, successes=s, batches=batches, samples_drawn=drawn)


def bernoulli_draw(p: np.ndarray, rng: np.random.Generator) -> Draw:
    """A synthetic base classifier for simulations: block of input ``i`` has Binomial(size, p[i]) successes."""
    p = np.asarray(p, dtype=np.float64)

    def draw(items: np.ndarray, blocks: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        return rng.binomial(sizes, p[items])

    return draw


__all__ = [
    "SequentialTest", "SequentialResult", "run_sequential", "log_evidence", "threshold", "bernoulli_draw",
    "CONTINUE", "CERTIFIED", "ABSTAINED", "BUDGET", "FUTILE", "DECISIONS", "SEQ_BLOCK", "SEQ_GROWTH",
]
