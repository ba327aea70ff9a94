"""The ℓ2 ball as linear constraints for the MILP: an outer polytope within a factor ``1 + δ``.

HiGHS solves neither MIQPs nor quadratic constraints, so ``‖x' − x‖₂ ≤ ε`` enters the MILP as the
polyhedral approximation of the second-order cone of Ben-Tal & Nemirovski (2001): the coordinates
of ``v = x' − x`` are paired in a binary tree; each node bounds the norm of its two children by a
three-dimensional cone ``r ≥ ‖(a, b)‖₂``, written with ``ν`` rotations by ``π/2^(k+1)``:

    ξ₀ ≥ |a|,  η₀ ≥ |b|,
    ξ_k = cos(θ_k)·ξ_{k−1} + sin(θ_k)·η_{k−1},  η_k ≥ |cos(θ_k)·η_{k−1} − sin(θ_k)·ξ_{k−1}|,  θ_k = π/2^(k+1),
    η_ν ≤ tan(θ_ν)·ξ_ν,   and the node's value is r = ξ_ν.

Every point of the cone extends to a solution (take ξ₀ = |a|, η₀ = |b| and equalities: each rotation
halves the angle and keeps the norm, so ξ_ν ≤ ‖(a, b)‖), and every solution has
``‖(a, b)‖ ≤ ξ_ν / cos(θ_ν)`` (the norm never shrinks along the chain). With the root ``≤ ε``:

    B₂(x, ε) ⊆ P ⊆ B₂(x, ε·(1 + δ)),    1 + δ = cos(θ_ν)^(−depth),  depth = ⌈log₂ d⌉.

So the MILP's minimum over P is a lower bound of the minimum over the ball, and its minimizer is at
most ``δ·ε`` outside the ball (the caller pulls it in for a point, hence an upper bound, and adds
Kelley's tangent cut at it when the bracket is still open).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from certaudit.verify.encoding import Encoder

DEFAULT_DELTA = 1e-4


def rotations_for(delta: float, d: int) -> int:
    """The ν that makes ``cos(π/2^(ν+1))^(−⌈log₂ d⌉) ≤ 1 + δ``."""
    depth = max(1, math.ceil(math.log2(max(d, 2))))
    nu = 1
    while math.cos(math.pi / 2 ** (nu + 1)) ** (-depth) > 1 + delta and nu < 30:
        nu += 1
    return nu


def outer_factor(nu: int, d: int) -> float:
    """``1 + δ`` of :func:`add_l2_ball` with ``ν`` rotations in dimension ``d``."""
    depth = max(1, math.ceil(math.log2(max(d, 2))))
    return math.cos(math.pi / 2 ** (nu + 1)) ** (-depth)


class _Rows:
    """Rows collected as COO triplets over variables added to an :class:`Encoder`."""

    def __init__(self) -> None:
        self.r: list[int] = []
        self.c: list[int] = []
        self.v: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        k = len(self.lo)
        for col, val in terms:
            self.r.append(k)
            self.c.append(int(col))
            self.v.append(float(val))
        self.lo.append(lo)
        self.hi.append(hi)

    def abs_geq(self, t: int, terms: list[tuple[int, float]], const: float = 0.0) -> None:
        """``t ≥ |Σ terms + const|``."""
        self.add([(t, 1.0)] + [(c, -v) for c, v in terms], const, math.inf)
        self.add([(t, 1.0)] + terms, -const, math.inf)

    def flush(self, enc: Encoder) -> None:
        a = sp.csr_matrix((self.v, (self.r, self.c)), shape=(len(self.lo), enc.n))
        enc.add_rows(a, np.array(self.lo), np.array(self.hi))


def add_l2_ball(enc: Encoder, x_cols: np.ndarray, center: np.ndarray, eps: float, nu: int) -> int:
    """Constrain the variables ``x_cols`` to the outer polytope of ``B₂(center, ε)`` (see the module
    docstring) with ``ν`` rotations per cone; returns the number of variables added."""
    n0 = enc.n
    rows = _Rows()
    theta = [math.pi / 2 ** (k + 1) for k in range(1, nu + 1)]
    # level 0: |x'_i − x_i| as terms (column, coefficient) with a constant
    nodes: list[tuple[list[tuple[int, float]], float]] = [([(int(c), 1.0)], -float(x)) for c, x in zip(x_cols, center)]
    while len(nodes) > 1:
        nxt = []
        for i in range(0, len(nodes) - 1, 2):
            nxt.append(_cone(enc, rows, nodes[i], nodes[i + 1], theta))
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    (terms, const), = nodes
    if len(x_cols) == 1:  # a single coordinate: |x' − x| ≤ ε
        rows.add(terms, -eps - const, eps - const)
    else:
        rows.add(terms, -math.inf, eps - const)
    rows.flush(enc)
    return enc.n - n0


def _cone(enc: Encoder, rows: _Rows, a: tuple[list[tuple[int, float]], float], b: tuple[list[tuple[int, float]], float],
          theta: list[float]) -> tuple[list[tuple[int, float]], float]:
    """One cone ``r ≥ ‖(a, b)‖`` (a, b affine in the variables); returns r as an affine term."""
    nu = len(theta)
    big = np.full(2 * (nu + 1), np.inf)
    cols = enc.add_vars(np.zeros(2 * (nu + 1)), big)
    xi, eta = cols[: nu + 1], cols[nu + 1:]
    rows.abs_geq(int(xi[0]), a[0], a[1])
    rows.abs_geq(int(eta[0]), b[0], b[1])
    for k in range(1, nu + 1):
        c, s = math.cos(theta[k - 1]), math.sin(theta[k - 1])
        rows.add([(int(xi[k]), 1.0), (int(xi[k - 1]), -c), (int(eta[k - 1]), -s)], 0.0, 0.0)
        rows.abs_geq(int(eta[k]), [(int(eta[k - 1]), c), (int(xi[k - 1]), -s)])
    rows.add([(int(eta[nu]), 1.0), (int(xi[nu]), -math.tan(theta[-1]))], -math.inf, 0.0)
    return [(int(xi[nu]), 1.0)], 0.0


__all__ = ["DEFAULT_DELTA", "add_l2_ball", "outer_factor", "rotations_for"]
