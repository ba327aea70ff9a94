"""The MILP under construction and its hand-over to HiGHS (``highspy``, the optional extra
``certaudit[exact]``): columns, rows, the exact big-M encoding of a ReLU and one solve."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from certaudit.errors import InputError

try:
    import highspy
except ImportError:  # the optional extra: pip install 'certaudit[exact]'
    highspy = None

GAP = 1e-6  # absolute optimality gap asked of HiGHS (and of the ℓ2 cutting-plane loop)
# Exact gap; deterministic; no restarts, no RINS/RENS sub-MIPs and no strong branching: on the digits
# networks these cost 3-10x the time of the search itself (witnesses come from the oracle's local
# search and from the cutoff in decision mode). An option an older HiGHS lacks is skipped.
SOLVER_OPTIONS = {"mip_rel_gap": 0.0, "mip_abs_gap": GAP, "random_seed": 0, "mip_allow_restart": False,
                  "mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False, "mip_pscost_minreliable": 0}


def available() -> bool:
    """Whether HiGHS (``highspy``) is installed: ``pip install 'certaudit[exact]'``."""
    return highspy is not None


def require_highs() -> None:
    if highspy is None:
        raise InputError("the exact oracle needs HiGHS: pip install 'certaudit[exact]' (highspy>=1.7)")


# ------------------------------------------------------------------------------ the encoding

@dataclass
class Expr:
    """A vector of affine functions ``A·v + c`` of the MILP's variables ``v`` (A: CSR, n × columns)."""

    a: sp.csr_matrix
    c: np.ndarray

    def affine(self, w: np.ndarray, b: np.ndarray | float = 0.0) -> "Expr":
        return Expr(sp.csr_matrix(sp.csr_matrix(w) @ self.a), w @ self.c + b)

    def __add__(self, other: "Expr") -> "Expr":
        n = max(self.a.shape[1], other.a.shape[1])
        return Expr(cols(self.a, n) + cols(other.a, n), self.c + other.c)

    def __sub__(self, other: "Expr") -> "Expr":
        n = max(self.a.shape[1], other.a.shape[1])
        return Expr(cols(self.a, n) - cols(other.a, n), self.c - other.c)

    def shift(self, v: np.ndarray | float) -> "Expr":
        return Expr(self.a, self.c + v)


def cols(a: sp.spmatrix, n: int) -> sp.csr_matrix:
    a = sp.csr_matrix(a, copy=True)
    a.resize((a.shape[0], n))
    return a


@contextlib.contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr for the duration (C code writing to stdout must not break a
    ``--json`` report on stdout); Python's own stdout buffer is flushed first."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (e.g. captured): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class Encoder:
    """Columns and rows of a MILP under construction, then handed to HiGHS (:meth:`highs`)."""

    def __init__(self) -> None:
        self.n = 0
        self.lb: list[np.ndarray] = []
        self.ub: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.rows: list[tuple[sp.csr_matrix, np.ndarray, np.ndarray]] = []

    @property
    def binaries(self) -> int:
        return int(sum(int(i.sum()) for i in self.integer))

    def add_vars(self, lb: np.ndarray, ub: np.ndarray, integer: bool = False) -> np.ndarray:
        lb, ub = np.asarray(lb, dtype=np.float64).ravel(), np.asarray(ub, dtype=np.float64).ravel()
        idx = np.arange(self.n, self.n + lb.size)
        self.n += lb.size
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(np.full(lb.size, bool(integer)))
        return idx

    def inputs(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, Expr]:
        """Continuous variables in [lo, hi]: their columns and the identity expression of them."""
        v = self.add_vars(lo, hi)
        return v, Expr(sp.csr_matrix((np.ones(v.size), (np.arange(v.size), v)), shape=(v.size, self.n)),
                       np.zeros(v.size))

    def add_rows(self, a: sp.spmatrix, lo: np.ndarray, hi: np.ndarray) -> None:
        if a.shape[0]:
            self.rows.append((sp.csr_matrix(a), np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)))

    def relu(self, e: Expr, l: np.ndarray, u: np.ndarray) -> Expr:
        """``max(e, 0)`` for ``l ≤ e ≤ u``: exact; a binary per neuron with ``l < 0 < u``."""
        active, unstable = l >= 0, (l < 0) & (u > 0)
        k = int(unstable.sum())
        z = self.add_vars(np.zeros(k), u[unstable])
        a = self.add_vars(np.zeros(k), np.ones(k), integer=True)
        n, r = self.n, np.arange(k)
        au, cu, lu, uu = cols(e.a[unstable], n), e.c[unstable], l[unstable], u[unstable]
        zm = sp.csr_matrix((np.ones(k), (r, z)), shape=(k, n))
        am = sp.csr_matrix((np.ones(k), (r, a)), shape=(k, n))
        self.add_rows(zm - au, cu, np.full(k, np.inf))  # z ≥ y
        self.add_rows(zm - sp.diags(uu) @ am, np.full(k, -np.inf), np.zeros(k))  # z ≤ u·a
        self.add_rows(zm - au - sp.diags(lu) @ am, np.full(k, -np.inf), cu - lu)  # z ≤ y − l·(1 − a)
        place = sp.csr_matrix((np.ones(k), (np.flatnonzero(unstable), z)), shape=(l.size, n))
        keep = sp.diags(active.astype(np.float64)) @ cols(e.a, n)
        return Expr(sp.csr_matrix(keep + place), np.where(active, e.c, 0.0))

    def highs(self):
        """A ``highspy.Highs`` holding this model (objective zero; quiet)."""
        require_highs()
        with _stdout_to_stderr():  # HiGHS prints its banner on the C-level stdout before any option is set
            h = highspy.Highs()
            h.setOptionValue("output_flag", False)
        h.addVars(self.n, np.concatenate(self.lb), np.concatenate(self.ub))
        ints = np.flatnonzero(np.concatenate(self.integer)).astype(np.int32)
        if ints.size:
            h.changeColsIntegrality(ints.size, ints, np.full(ints.size, highspy.HighsVarType.kInteger))
        if self.rows:
            a = sp.vstack([cols(m, self.n) for m, _, _ in self.rows]).tocsr()
            a.sort_indices()
            lo = np.concatenate([r[1] for r in self.rows])
            hi = np.concatenate([r[2] for r in self.rows])
            h.addRows(a.shape[0], lo, hi, a.nnz, a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32),
                      a.data.astype(np.float64))
        for key, value in SOLVER_OPTIONS.items():
            h.setOptionValue(key, value)
        return h


def run_highs(h, seconds: float, integer: bool) -> tuple[str, float, np.ndarray | None, int]:
    """Solve; (status, dual bound or −inf, column values or None, nodes). Statuses: ``optimal``,
    ``infeasible`` (under an ``objective_bound`` cutoff: nothing below it), ``solution_limit``,
    ``time_limit``. Without integer variables HiGHS solves an LP, whose optimum is its own bound."""
    h.setOptionValue("time_limit", max(float(seconds), 1e-3))
    h.run()
    ms = h.getModelStatus()
    info = h.getInfo()
    has_sol = int(info.primal_solution_status) == 2
    sol = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_sol else None
    if ms == highspy.HighsModelStatus.kOptimal:
        bound = float(info.mip_dual_bound) if integer and math.isfinite(info.mip_dual_bound) \
            else float(info.objective_function_value)
        return "optimal", bound, sol, max(int(info.mip_node_count), 0)
    if ms in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kObjectiveBound):
        return "infeasible", math.inf, None, max(int(info.mip_node_count), 0)  # (nothing below a cutoff)
    bound = float(info.mip_dual_bound) if integer and math.isfinite(info.mip_dual_bound) else -math.inf
    why = "solution_limit" if ms == highspy.HighsModelStatus.kSolutionLimit else "time_limit"
    return why, bound, sol, max(int(info.mip_node_count), 0)


