"""Exact verification of small ReLU networks by mixed-integer linear programming (HiGHS).

For a feed-forward ReLU network ``f`` (the closed set of layers of
:mod:`certaudit.defenses.interval.ops`), an input ``x``, a radius ε and a logit difference
``f_y − f_j``, :func:`min_margin` computes

    min { f_y(x') − f_j(x') : x' ∈ B(x, ε) ∩ [0,1]^d }            (ℓ∞ or ℓ2 ball)

with a proven lower bound (the solver's dual bound) and a point that attains the reported value.

Encoding (``docs/degradation.md``, "The exact oracle"): the model is compiled by the interval code
(:func:`~certaudit.defenses.interval.bounds.compile_network`) from a float64 copy, and the affine
operators between two ReLUs (Normalize, Conv, Flatten, Linear, BatchNorm in eval mode, average
pooling) are folded into one dense matrix (tiny networks only: ``MAX_NEURONS`` hidden ReLUs). A
hidden neuron ``z = max(y, 0)`` with sound pre-activation bounds ``l ≤ y ≤ u`` is

* ``z = y`` when ``l ≥ 0`` and ``z = 0`` when ``u ≤ 0`` (no variable);
* else the big-M encoding with a binary ``a``: ``z ≥ y``, ``z ≥ 0``, ``z ≤ u·a``,
  ``z ≤ y − l·(1 − a)``, exact for ``a ∈ {0, 1}`` because ``l ≤ y ≤ u`` holds on the whole ball.

The bounds ``l, u`` come from the project's own sound IBP (or CROWN) on the clipped ℓ∞ box,
:func:`~certaudit.defenses.interval.bounds.layer_bounds`; that box holds the ℓ2 ball too, and for
ℓ2 they are intersected with ``y(x) ± ε·‖w_i‖₂·Π‖W_m‖₂`` (spectral norms of the earlier layers).

Input sets. ℓ∞: variable bounds ``[max(x − ε, 0), min(x + ε, 1)]``: exact. ℓ2: HiGHS solves no
MIQP and no quadratic constraint, so the ball enters as an outer polytope P with
``B₂(x, ε) ⊆ P ⊆ B₂(x, (1 + δ)ε)`` (:mod:`.balls`, δ = 1e-4) intersected with the box, refined by
Kelley's cutting planes: if the MILP's minimizer ``x*`` lies in the ball it is the minimizer over
the ball; else the cut ``⟨x* − x, x' − x⟩ ≤ ε·‖x* − x‖`` (valid on the ball) is added and the MILP
solved again. Every round's dual bound is a lower bound of the minimum over the ball, and ``x*``
pulled into the ball ∩ [0,1]^d gives a point, hence an upper bound.

What "exact" means here: the float64 network (the float32 weights, exact in float64) and HiGHS's
floating-point branch and bound with its tolerances (feasibility 1e-6 to 1e-7, absolute gap
``GAP``): values closer than ``TOL`` to a threshold are reported as ties, never decided.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from certaudit.defenses.base import Norm
from certaudit.defenses.interval.bounds import Network, compile_network, layer_bounds, no_tf32
from certaudit.defenses.interval.ops import ReLU
from certaudit.errors import InputError
from certaudit.verify.balls import DEFAULT_DELTA, add_l2_ball, outer_factor, rotations_for
from certaudit.verify.encoding import GAP, Encoder, Expr, cols, require_highs, run_highs

MAX_NEURONS = 4096  # hidden ReLUs: beyond this the MILP is out of reach anyway
TOL = 1e-5  # decisions: |value − threshold| <= TOL·(1 + |threshold|) is a tie (solver tolerances ~1e-6)
CUT_TOL = 1e-9  # ℓ2: a minimizer within ε·(1 + CUT_TOL) of x lies in the ball
WIDEN = 1e-7  # big-M bounds widened by WIDEN·(1 + |bound|) (float64 folding of the layers)
MAX_CUTS = 3  # ℓ2: Kelley rounds (each a MILP) after the first solve over the outer polytope
L2_DELTA = 1e-5  # ℓ2: the outer polytope of min_margin
MAX_SOLUTIONS = 2147483647  # HiGHS's default of mip_max_improving_sols


# ------------------------------------------------------------------------------ the network

@dataclass
class ExactNet:
    """``f(x) = W_L·relu(… relu(W_1 x + b_1) …) + b_L`` in float64 (``layers``: the (W, b)), with
    the project's compiled float32 network (``network``) for sound pre-activation bounds and the
    float64 operators one by one (``ops``: the interval defense's bound follows them)."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    network: Network
    input_shape: tuple[int, ...]
    ops: list  # the float64 compiled operators, one by one (body, then the last linear layer)

    @property
    def input_size(self) -> int:
        return int(math.prod(self.input_shape))

    @property
    def num_classes(self) -> int:
        return int(self.layers[-1][0].shape[0])

    @property
    def device(self) -> torch.device:
        """Where the project's compiled network (the bounds) lives: the model's device."""
        return self.network.last.weight.device

    @property
    def hidden(self) -> int:
        return int(sum(w.shape[0] for w, _ in self.layers[:-1]))

    def forward(self, z: np.ndarray) -> np.ndarray:
        """float64 logits (n, K) of flat inputs (n, d) or (d,): the network the MILP encodes."""
        h = np.atleast_2d(np.asarray(z, dtype=np.float64))
        for k, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if k < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h


def local_search(enet: ExactNet, x: np.ndarray, eps: float, norm: Norm | str, c: np.ndarray, *, steps: int = 50,
                 seed: int = 0) -> tuple[float, np.ndarray]:
    """A primal heuristic: PGD (the project's, from x, then one random restart) on ``c·f`` over the
    ball ∩ [0,1]^d with the float64 network; returns the smallest value found and its point. It
    only ever *finds* points (an upper bound), never proves anything."""
    from certaudit.attacks.pgd import pgd

    ws = [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in enet.layers]
    cv = torch.from_numpy(np.asarray(c, dtype=np.float64))

    def value(xs: torch.Tensor, _idx: torch.Tensor) -> torch.Tensor:
        h = xs.reshape(xs.shape[0], -1)
        for k, (w, b) in enumerate(ws):
            h = h @ w.T + b
            if k < len(ws) - 1:
                h = torch.relu(h)
        return h @ cv

    x0 = torch.from_numpy(np.asarray(x, dtype=np.float64)).reshape(1, -1)
    res = pgd(value, x0, float(eps), norm, steps=steps, restarts=2, seed=seed, maximize=False, random_start=False)
    z = res.x[0].numpy()
    return float(c @ enet.forward(z)[0]), z


def exact_network(model: nn.Module, input_shape: Sequence[int], max_neurons: int = MAX_NEURONS) -> ExactNet:
    """Compile ``model`` (an ``nn.Sequential`` the interval defense supports) for the MILP."""
    shape = tuple(int(s) for s in input_shape)
    net32 = compile_network(model, shape)
    net64 = compile_network(copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval(), shape)
    chains: list[list] = [[]]
    for op in [*net64.body, net64.last]:
        if isinstance(op, ReLU):
            chains.append([])
        else:
            chains[-1].append(op)
    layers, cur = [], shape
    for chain in chains:
        if not chain:
            raise InputError("the exact oracle needs an affine layer before and between ReLUs")
        layers.append(materialize(chain, cur))
        cur = chain[-1].out_shape
    out = ExactNet(layers, net32, shape, [*net64.body, net64.last])
    if out.hidden > max_neurons:
        raise InputError(f"the network has {out.hidden} hidden ReLUs; the exact oracle is for tiny networks "
                         f"(at most {max_neurons})")
    return out


def materialize(chain: list, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The affine operators of ``chain`` as one dense (W, b), by pushing the unit vectors through."""
    n = int(math.prod(in_shape))
    basis = torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)])
    with torch.no_grad():
        h = basis.view(n + 1, *in_shape)
        for op in chain:
            h = op.forward(h)
    h = h.reshape(n + 1, -1).numpy()
    b = h[0].copy()
    return np.ascontiguousarray((h[1:] - b).T), b


def as_flat(x: torch.Tensor | np.ndarray) -> np.ndarray:
    t = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return t.reshape(-1)


def preactivation_bounds(enet: ExactNet, x: torch.Tensor, eps: float, norm: Norm | str,
                         method: str = "ibp", l2_radius: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sound bounds (lower, upper) of every hidden pre-activation over B(x, ε) ∩ [0,1]^d: the
    project's ``method`` bounds on the clipped ℓ∞ box (which holds the ℓ2 ball), for ℓ2 also
    intersected with ``y(x) ± r·‖w_i‖₂·Π_{m<k}‖W_m‖₂`` (r = ``l2_radius``, default ε: the MILP passes
    the radius of its outer polytope, so the encoding is exact on all of it); widened by ``WIDEN``."""
    norm = Norm.parse(norm)
    xb = torch.as_tensor(x).detach().reshape(1, *enet.input_shape).float()
    dev = enet.device
    with torch.no_grad(), no_tf32(dev):
        got = layer_bounds(enet.network, xb.to(dev), float(eps), method)
    out = [(l.double().flatten().cpu().numpy(), u.double().flatten().cpu().numpy()) for l, u in got]
    if len(out) != len(enet.layers) - 1:
        raise InputError("the compiled network and its bounds disagree on the number of ReLU layers")
    if norm is Norm.L2:
        h, lip = as_flat(x), 1.0
        for k, (w, b) in enumerate(enet.layers[:-1]):
            y = w @ h + b
            r = float(eps if l2_radius is None else l2_radius) * np.linalg.norm(w, axis=1) * lip * (1 + 1e-9)
            out[k] = (np.maximum(out[k][0], y - r), np.minimum(out[k][1], y + r))
            lip *= float(np.linalg.norm(w, 2)) * (1 + 1e-9)
            h = np.maximum(y, 0.0)
    return [(lo - WIDEN * (1 + np.abs(lo)), hi + WIDEN * (1 + np.abs(hi))) for lo, hi in out]


def encode_network(enc: Encoder, enet: ExactNet, x_expr: Expr,
                   bounds: list[tuple[np.ndarray, np.ndarray]]) -> Expr:
    """The last hidden layer's output as an expression in the MILP's variables."""
    e = x_expr
    for (w, b), (l, u) in zip(enet.layers[:-1], bounds):
        e = enc.relu(e.affine(w, b), l, u)
    return e


# ------------------------------------------------------------------------------ solving

@dataclass
class MarginResult:
    """The minimum of ``f_y − f_j`` (or of an objective the caller chose) over the ball.

    ``value``: the objective at ``witness`` (a point of the ball ∩ [0,1]^d, flat, float64),
    recomputed with the float64 network: an upper bound of the minimum. ``bound``: a proven lower
    bound (HiGHS's dual bound; ℓ2: over the outer polytope, which contains the ball). ``status``:
    ``optimal`` (bound and value within ``GAP``, or ℓ2: the minimizer over the outer polytope lies in
    the ball), ``bracket`` (ℓ2: the cutting-plane rounds ended first; ``gap`` says how far apart),
    ``decided`` (stopped once a threshold was settled), ``time_limit`` or ``infeasible``."""

    value: float
    bound: float
    status: str
    witness: np.ndarray | None
    seconds: float
    nodes: int = 0
    cuts: int = 0
    binaries: int = 0

    @property
    def gap(self) -> float:
        return self.value - self.bound

    def below(self, threshold: float) -> bool | None:
        """True: the minimum is ≤ ``threshold`` (attained at the witness, by more than the tie
        tolerance); False: proven > ``threshold`` (by more than it); None: a tie or not settled."""
        tol = TOL * (1.0 + abs(threshold))
        if self.value < threshold - tol:
            return True
        if self.bound > threshold + tol:
            return False
        return None


class MarginProblem:
    """One input and one ball, encoded once; :meth:`solve` minimizes any logit difference over it.

    ``bounds``: the project's bound method for the big-M constants (``ibp`` or ``crown``; CROWN
    leaves fewer unstable ReLUs). ℓ2: ``delta`` sets the outer polytope (:mod:`.balls`); ``hints``
    are points (e.g. attack candidates) whose tangent cuts are added at once. ℓ2 cuts are kept
    across :meth:`solve` calls (all valid for the ball).
    """

    def __init__(self, enet: ExactNet, x: torch.Tensor | np.ndarray, eps: float, norm: Norm | str, *,
                 bounds: str = "ibp", delta: float = DEFAULT_DELTA, hints: Sequence[np.ndarray] = ()):
        require_highs()
        self.enet, self.norm, self.eps = enet, Norm.parse(norm), float(eps)
        self.x = as_flat(x)
        if self.x.size != enet.input_size:
            raise InputError(f"x has {self.x.size} values, the network takes {enet.input_size}")
        self.lo, self.hi = np.clip(self.x - self.eps, 0, 1), np.clip(self.x + self.eps, 0, 1)
        nu = rotations_for(delta, self.x.size)
        self.pre = preactivation_bounds(enet, torch.from_numpy(self.x), self.eps, self.norm, bounds,
                                        l2_radius=self.eps * outer_factor(nu, self.x.size))
        enc = Encoder()
        xcols, xe = enc.inputs(self.lo, self.hi)
        if self.norm is Norm.L2:
            add_l2_ball(enc, xcols, self.x, self.eps, nu)
        self.last = encode_network(enc, enet, xe, self.pre)
        self.binaries, self.ncols = enc.binaries, enc.n
        self.h = enc.highs()
        self.cuts = 0
        for p in hints:
            self.add_cut(as_flat(p))

    def add_cut(self, point: np.ndarray) -> bool:
        """ℓ2: the tangent cut ``⟨g, x'⟩ ≤ ε‖g‖ + ⟨g, x⟩`` with ``g = point − x`` (valid on the ball)."""
        g = point[: self.x.size] - self.x
        norm = float(np.linalg.norm(g))
        if self.norm is not Norm.L2 or norm <= self.eps * (1 + CUT_TOL):
            return False
        idx = np.flatnonzero(g).astype(np.int32)
        self.h.addRow(-math.inf, self.eps * norm + float(g @ self.x), idx.size, idx, g[idx])
        self.cuts += 1
        return True

    def set_objective(self, c: np.ndarray) -> None:
        """Minimize ``c·f(x')`` (c over the logits, e.g. ``e_y − e_j``)."""
        w, b = self.enet.layers[-1]
        cw = c @ w
        obj = cols(sp.csr_matrix(cw) @ self.last.a, self.ncols).toarray().ravel()
        self.h.changeColsCost(self.ncols, np.arange(self.ncols, dtype=np.int32), obj)
        self.h.changeObjectiveOffset(float(cw @ self.last.c + c @ b))

    def witness(self, sol: np.ndarray) -> np.ndarray:
        """The solver's x' pulled into the ball ∩ [0,1]^d (tolerances), float64."""
        z = np.clip(sol[: self.x.size], self.lo, self.hi)
        if self.norm is Norm.L2:
            from certaudit.attacks.pgd import project_l2

            t = project_l2(torch.from_numpy(z)[None], torch.from_numpy(self.x)[None], self.eps)
            z = t[0].numpy()
        return z

    def solve_objective(self, c: np.ndarray, *, threshold: float | None = None, time_limit: float = 60.0,
                        cuts: int = MAX_CUTS) -> MarginResult:
        """min ``c·f(x')`` over the ball ∩ [0,1]^d (see :class:`MarginResult`). ℓ2: at most ``cuts``
        Kelley rounds after the first solve; ``status`` ``bracket`` when they end with a gap > ``GAP``.
        With ``threshold``: only decide it (:meth:`decide`)."""
        t0 = time.perf_counter()
        c = np.asarray(c, dtype=np.float64)
        self.set_objective(c)
        if threshold is not None:
            return self.decide(c, float(threshold), time_limit)
        out = MarginResult(math.inf, -math.inf, "time_limit", None, 0.0, binaries=self.binaries)
        cuts0 = self.cuts
        while True:
            st, dual, sol, nodes = run_highs(self.h, time_limit - (time.perf_counter() - t0), self.binaries > 0)
            out.nodes += nodes
            out.bound = max(out.bound, dual)
            if sol is None:
                out.status = st
                break
            self._keep(out, c, sol)
            inside = float(np.linalg.norm(sol[: self.x.size] - self.x)) <= self.eps * (1 + CUT_TOL)
            if st != "optimal" or self.norm is Norm.LINF or inside or out.gap <= GAP:
                out.status = st
                break
            if self.cuts - cuts0 >= cuts or not self.add_cut(sol):
                out.status = "bracket"
                break
        out.bound = min(out.bound, out.value)
        out.cuts, out.seconds = self.cuts - cuts0, time.perf_counter() - t0
        return out

    def _keep(self, out: MarginResult, c: np.ndarray, sol: np.ndarray) -> None:
        w = self.witness(sol)
        val = float(c @ self.enet.forward(w)[0])
        if val < out.value:
            out.value, out.witness = val, w

    def decide(self, c: np.ndarray, threshold: float, time_limit: float) -> MarginResult:
        """Settle ``min c·f(x') ≤ threshold`` without solving to optimality (objective set): HiGHS
        with the cutoff ``θ + 2·tol`` stops at its first solution below it, or proves there is none
        (then the minimum is > θ + tol: ``bound`` = the cutoff, never more). A first solution that is only a tie
        is followed by a search below ``θ − tol``. ``status`` ``decided`` or why not."""
        t0 = time.perf_counter()
        tol = TOL * (1.0 + abs(threshold))
        out = MarginResult(math.inf, -math.inf, "time_limit", None, 0.0, binaries=self.binaries)
        for cutoff, first in ((threshold + 2 * tol, True), (threshold - tol, False)):
            self.h.setOptionValue("objective_bound", cutoff)
            self.h.setOptionValue("mip_max_improving_sols", 1 if first else MAX_SOLUTIONS)
            try:
                st, dual, sol, nodes = run_highs(self.h, time_limit - (time.perf_counter() - t0), self.binaries > 0)
            finally:
                self.h.setOptionValue("objective_bound", math.inf)
                self.h.setOptionValue("mip_max_improving_sols", MAX_SOLUTIONS)
            out.nodes += nodes
            # Under a cutoff HiGHS closes the tree as soon as every node is >= the cutoff and then
            # reports its incumbent (which may lie above the cutoff) as the dual bound: only
            # min(dual, cutoff) is proven.
            out.bound = max(out.bound, min(dual, cutoff))
            if sol is not None:
                self._keep(out, c, sol)
            out.status = st
            if out.below(threshold) is not None or st not in ("infeasible", "optimal", "solution_limit"):
                break
        if out.below(threshold) is not None:
            out.status = "decided"
        elif out.status in ("infeasible", "optimal", "solution_limit"):
            out.status = "tie"
        out.bound = min(out.bound, out.value)
        out.seconds = time.perf_counter() - t0
        return out

    def solve(self, y: int, j: int, **kw) -> MarginResult:
        """min ``f_y(x') − f_j(x')`` over the ball ∩ [0,1]^d."""
        c = np.zeros(self.enet.num_classes)
        c[int(y)] += 1.0
        c[int(j)] -= 1.0
        return self.solve_objective(c, **kw)


def min_margin(net: ExactNet | nn.Module, x: torch.Tensor, eps: float, norm: Norm | str, y: int, j: int, *,
               time_limit: float = 60.0, threshold: float | None = None, bounds: str = "ibp",
               delta: float = L2_DELTA, cuts: int = MAX_CUTS) -> MarginResult:
    """Exact ``min f_y(x') − f_j(x')`` over ``B(x, ε) ∩ [0,1]^d`` (ℓ∞ or ℓ2), with the solver's
    status, a proven lower bound and the point attaining the value (:class:`MarginResult`).
    ``net``: an :class:`ExactNet` or a model (compiled for ``x``'s per-image shape). ℓ2: ``delta``
    (outer polytope) and ``cuts`` (Kelley rounds) trade time for the width of the bracket."""
    enet = net if isinstance(net, ExactNet) else exact_network(net, tuple(x.shape[-3:]))
    prob = MarginProblem(enet, x, eps, norm, bounds=bounds, delta=delta)
    return prob.solve(y, j, threshold=threshold, time_limit=time_limit, cuts=cuts)


__all__ = ["ExactNet", "MarginProblem", "MarginResult", "as_flat", "exact_network", "encode_network", "local_search",
           "min_margin",
           "preactivation_bounds", "TOL", "MAX_NEURONS"]
