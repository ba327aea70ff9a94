"""Certified upper bounds on the ℓ2 operator norm (spectral norm) of network layers.

A Lipschitz certificate is only as sound as the *upper* bound on every layer's norm. Power iteration
converges from below (0.95 of the exact norm after 10 iterations on a trained 2C2F convolution),
so it may drive training (:class:`PowerIterationEstimator`, differentiable, as GloRo does) but never
a certificate. Two certified bounds are computed here, both in float64, and the smaller is used:

1. **Circulant Gram bound** (:func:`conv_circulant_bound`, always available, fast). A zero-padded,
   possibly strided, dilated or grouped convolution on an ``H×W`` input is a *compression*
   ``A = S ∘ C ∘ E`` of a circular multichannel convolution ``C`` on a grid ``Z_N × Z_N`` large
   enough that nothing wraps onto the input (``E`` embeds the input into the grid, ``S`` selects the
   output positions; both are partial isometries, so ``‖A‖ ≤ ‖C‖``). The stride is handled exactly by
   the polyphase (space-to-depth) decomposition: the stride-``s`` circulant on ``Z_N`` equals a
   stride-1 circulant on ``Z_{N/s}`` with ``s²`` times more input channels (a permutation of the
   input, which preserves norms). A circulant is block-diagonalised by the 2-D DFT, so
   ``‖C‖ = max_ω ‖K̂(ω)‖₂`` over the ``(N/s)²`` frequencies, with ``K̂(ω)`` a ``C_out × C_in·s²``
   matrix. Each ``‖K̂(ω)‖₂`` is bounded from above by the **Gram iteration** of Delattre et al.
   (ICML 2023): ``‖G‖₂^{2^t} ≤ ‖(GᴴG)^{2^{t-1}}‖_F``, iterated with rescaling until the bound and a
   lower bound agree to 1e-6 (:func:`gram_bound`). The gap to the exact norm of the zero-padded
   operator shrinks like ``1/n²`` in the input size (measured: +0.4% at 28×28, +3.5% at 14×14 and
   +10% at 8×8 for a trained 4×4 stride-2 layer), which is why (2) exists.

2. **Lanczos closed by a Cholesky certificate** (:func:`conv_exact_bound`, :func:`linear_bound`):
   tight to ~1e-6. The Gram matrix ``M = AᵀA`` (or ``AAᵀ``, the smaller side) of a convolution is
   *banded* in channel-minor order (two pixels interact only within the receptive field), so it is
   assembled exactly from a few structured probes through ``conv2d`` / ``conv_transpose2d``. Lanczos
   (ARPACK) gives ``θ ≈ λ_max(M)``; then ``μ = θ(1 + δ)`` is *proven* to exceed ``λ_max(M)`` when the
   (banded) Cholesky factorisation of ``μI − M`` succeeds: by Higham's Theorem 10.3 a completed
   floating-point Cholesky gives ``R̂ᵀR̂ = B + ΔB`` with ``|ΔB| ≤ γ_{n+1}|R̂ᵀ||R̂|``, hence
   ``λ_min(B) ≥ −γ_{n+1}/(1 − γ_{n+1})·tr(B)`` (since ``‖R̂‖_F² ≤ tr(B)/(1 − γ)``). We add that term,
   the rounding of forming ``μ − M_ii``, and the rounding of assembling ``M`` (each entry is one dot
   product of length ``K``: ``‖M̂ − M‖ ≤ γ_K ‖|A|‖²``, with ``‖|A|‖`` bounded by Schur's test). The
   Gram matrix of a layer must fit in :data:`EXACT_LIMIT` banded entries (all layers of 2C2F/4C3F
   on 28×28 and all but two of 6C2F on 32×32 do); otherwise bound (1) is used alone.

Rounding: every ``γ`` uses ``SAFETY·n·u`` (u = 2⁻⁵³) with ``SAFETY = 4`` to cover blocked/FMA
LAPACK variants, and the Gram iteration's result is inflated by ``1 + 1e-9`` (its float64 error is
below ``4·SAFETY·(m+n)·√d·u``, used when it exceeds 1e-9; derivation in ``docs/lipschitz.md``).

Layout. This module holds the convolution bounds (circulant embedding, Lanczos + banded Cholesky,
and :func:`conv_bound` choosing between them); the rounding constants, Gram iteration, the batched
Cholesky certificate and the ``Linear`` / ``Normalize`` bounds are in :mod:`.dense`; the convolution
operator, its geometry and power iteration in :mod:`.conv`. All of them are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.linalg import LinAlgError, cholesky_banded
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from certaudit.defenses.lipschitz.conv import ConvGeometry, ConvOperator, full_kernel, power_iteration
from certaudit.defenses.lipschitz.dense import (
    DENSE_LIMIT, GRAM_INFLATION, SAFETY, SLACK_INFLATION, U32, U64, abs_schur_sq, gamma, gram_bound, linear_bound,
    normalize_bound, psd_batch_bound,
)

EXACT_LIMIT = 2 ** 24
"""Largest banded Gram matrix (entries, float64: 128 MiB) assembled for the Cholesky certificate."""
POWER_CHECK_ITERS = 200
"""Power-iteration steps of the lower estimate reported next to a circulant-only bound."""


# ------------------------------------------------------------------ circulant embedding (FFT)

def _grid(n_in: int, lo: int, keff: int, s: int, n_out: int) -> int:
    """Smallest circular grid length (a multiple of the stride) on which the zero-padded
    correlation is a compression of the circular one (no wrap-around reaches the input)."""
    top = (n_out - 1) * s + keff - 1 - lo  # largest input index read (may be in the bottom padding)
    need = max(n_in + lo, top + 1, n_in, n_out * s)
    return -(-need // s) * s


def polyphase_symbols(weight: torch.Tensor, geom: ConvGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """(M_h·M_w, C_out, C_in·s_h·s_w) complex128 frequency matrices of the strided circulant on ``grid``.

    Output ``o`` of the zero-padded correlation reads input ``o·s + t − lo`` for tap offset ``t``;
    writing ``t − lo = q·s + r`` (``0 ≤ r < s``) turns it into a stride-1 circular correlation on
    ``Z_{N/s}`` over the ``s²`` polyphase components ``x_r[m] = x[m·s + r]`` of the input.
    """
    w = full_kernel(weight.detach().to(torch.float64), geom)  # (Co, Ci, kh', kw')
    co, ci, kh, kw = w.shape
    sh, sw = geom.stride
    mh, mw = grid[0] // sh, grid[1] // sw
    ker = w.new_zeros(co, ci, sh, sw, mh, mw)
    for a in range(kh):
        qa, ra = divmod(a - geom.pad_lo[0], sh)
        for b in range(kw):
            qb, rb = divmod(b - geom.pad_lo[1], sw)
            ker[:, :, ra, rb, qa % mh, qb % mw] += w[:, :, a, b]
    sym = torch.fft.fft2(ker)  # (Co, Ci, sh, sw, Mh, Mw)
    return sym.permute(4, 5, 0, 1, 2, 3).reshape(mh * mw, co, ci * sh * sw).contiguous()


def conv_circulant_bound(weight: torch.Tensor, geom: ConvGeometry, extra_grids: int = 2,
                         use_gram_iteration: bool = False) -> tuple[float, dict]:
    """Certified bound on ‖conv‖₂ from the polyphase circulant embedding.

    ``max_ω ‖K̂(ω)‖₂`` is bounded per frequency by eigvalsh closed with a Cholesky certificate
    (:func:`psd_batch_bound`), or by :func:`gram_bound` (Delattre et al.'s Gram iteration) with
    ``use_gram_iteration``. Every grid at least :func:`_grid` long gives a valid bound; the minimum
    over the smallest one and ``extra_grids`` larger ones (in steps of the stride) is returned.
    The FFT's own rounding is added: ``‖ΔK̂‖ ≤ 5·SAFETY·log₂(M)·u·√M·‖w‖_F`` over all M frequencies.
    """
    g = geom
    ke = g.effective_kernel
    base = (_grid(g.in_shape[1], g.pad_lo[0], ke[0], g.stride[0], g.out_shape[1]),
            _grid(g.in_shape[2], g.pad_lo[1], ke[1], g.stride[1], g.out_shape[2]))
    w_fro = float(weight.detach().to(torch.float64).norm())
    best, best_grid = math.inf, base
    for e in range(extra_grids + 1):
        grid = (base[0] + e * g.stride[0], base[1] + e * g.stride[1])
        sym = polyphase_symbols(weight, g, grid)  # (F, Co, Ci·s²)
        nfreq = sym.shape[0]
        err_fft = 5.0 * SAFETY * math.log2(nfreq + 1) * U64 * math.sqrt(nfreq) * w_fro
        if use_gram_iteration:
            b = gram_bound(sym) + err_fft
        else:
            rows, cols = sym.shape[-2], sym.shape[-1]
            gm = sym.mH @ sym if cols <= rows else sym @ sym.mH
            k_len = max(rows, cols)
            err = gamma(k_len) * torch.linalg.matrix_norm(sym, ord="fro").real.pow(2)  # ‖|K̂|ᴴ|K̂|‖ ≤ ‖K̂‖_F²
            b = math.sqrt(float(psd_batch_bound(gm, err).max())) + err_fft
        if b < best:
            best, best_grid = b, grid
    return best, {"method": "circulant-gram" if use_gram_iteration else "circulant-cholesky", "grid": list(best_grid)}


# ------------------------------------------------------------- Lanczos + Cholesky certificates

def _lanczos_top(matvec: Callable[[np.ndarray], np.ndarray], n: int, seed: int = 0) -> float:
    """λ_max of a symmetric PSD operator by ARPACK's Lanczos (an estimate, certified later)."""
    v0 = np.random.RandomState(seed).standard_normal(n)
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    try:
        vals = eigsh(op, k=1, which="LA", v0=v0, tol=1e-10, ncv=min(n - 1, 40), maxiter=20 * n,
                     return_eigenvectors=False)
        return float(vals[-1])
    except ArpackNoConvergence as exc:
        if len(exc.eigenvalues):
            return float(np.max(exc.eigenvalues))
        raise


def _certify_banded(ab: np.ndarray, theta: float, err_gram: float) -> float | None:
    """Smallest ``μ = θ(1+δ)`` whose banded Cholesky of ``μI − M`` succeeds, turned into a proven
    bound on ``λ_max`` (see the module docstring); ``None`` if no δ ≤ 1e-2 works."""
    n = ab.shape[1]
    alpha = gamma(n + 1) / (1.0 - gamma(n + 1))
    diag_max = float(ab[0].max()) if n else 0.0
    for delta in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        mu = max(theta, diag_max) * (1.0 + delta) + 1e-300
        b = np.asfortranarray(-ab)
        b[0] += mu
        try:
            cholesky_banded(b, lower=True, overwrite_ab=True, check_finite=False)
        except LinAlgError:
            continue
        trace_b = n * mu - float(ab[0].sum())
        return mu * (1.0 + SAFETY * U64) + alpha * trace_b + err_gram
    return None


@dataclass(frozen=True)
class _Side:
    shape: tuple[int, int, int]  # (C, H, W) of the space the Gram matrix acts on
    radius: tuple[int, int]  # interaction radius in pixels
    gram_input: bool  # True: M = AᵀA; False: M = AAᵀ

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def band(self) -> int:
        c, _, w = self.shape
        return (self.radius[0] * w + self.radius[1]) * c + c - 1


def _sides(geom: ConvGeometry) -> list[_Side]:
    ke = geom.effective_kernel
    ci, h, w = geom.in_shape
    co, oh, ow = geom.out_shape
    rin = (min(ke[0] - 1, h - 1), min(ke[1] - 1, w - 1))
    rout = (min((ke[0] - 1) // geom.stride[0], oh - 1), min((ke[1] - 1) // geom.stride[1], ow - 1))
    return [_Side((ci, h, w), rin, True), _Side((co, oh, ow), rout, False)]


def banded_gram(op: ConvOperator, side: _Side, probe_batch: int = 64) -> np.ndarray:
    """Lower banded storage (``ab[d, j] = M[j + d, j]``, LAPACK ``pbtrf`` layout) of the Gram matrix,
    index ``(y·W + x)·C + c`` (channel-minor), assembled exactly from structured probes: all basis
    vectors of one channel on a lattice of spacing ``2r+1`` go through ``M`` at once, their
    responses do not overlap."""
    c, h, w = side.shape
    n, bw = side.n, side.band
    ph, pw = min(2 * side.radius[0] + 1, h), min(2 * side.radius[1] + 1, w)
    probes = []
    for ch in range(c):
        for py in range(ph):
            for px in range(pw):
                probes.append((ch, py, px))
    dev = op.weight.device
    resp = torch.empty(len(probes), c * h * w, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for a in range(0, len(probes), probe_batch):
            chunk = probes[a:a + probe_batch]
            p = torch.zeros(len(chunk), c, h, w, dtype=torch.float64, device=dev)
            for i, (ch, py, px) in enumerate(chunk):
                p[i, ch, py::ph, px::pw] = 1.0
            r = op.adjoint(op.apply(p)) if side.gram_input else op.apply(op.adjoint(p))
            resp[a:a + len(chunk)] = r.reshape(len(chunk), -1)
    resp_flat = resp.reshape(-1)
    ab = np.zeros((bw + 1, n), dtype=np.float64, order="F")
    d = torch.arange(bw + 1, device=dev)
    chunk_cols = max(1, (1 << 22) // (bw + 1))
    for j0 in range(0, n, chunk_cols):
        j = torch.arange(j0, min(n, j0 + chunk_cols), device=dev)  # (J,)
        cj, pos_j = j % c, j // c
        yj, xj = pos_j // w, pos_j % w
        probe = (cj * ph + yj % ph) * pw + xj % pw  # (J,)
        i = j.view(-1, 1) + d.view(1, -1)  # (J, D)
        ci_, pos_i = i % c, i // c
        yi, xi = pos_i // w, pos_i % w
        valid = (i < n) & ((yi - yj.view(-1, 1)).abs() <= side.radius[0]) & ((xi - xj.view(-1, 1)).abs() <= side.radius[1])
        off = (ci_ * h + yi) * w + xi  # NCHW offset of row i within one response
        flat = probe.view(-1, 1) * (c * h * w) + off.clamp(max=c * h * w - 1)
        vals = torch.where(valid, resp_flat[flat.clamp(max=resp_flat.numel() - 1)], torch.zeros((), dtype=torch.float64, device=dev))
        ab[:, j0:j0 + len(j)] = vals.T.cpu().numpy()
    return ab


def conv_exact_bound(weight: torch.Tensor, geom: ConvGeometry, limit: int = EXACT_LIMIT) -> tuple[float, dict] | None:
    """Certified, near-exact bound on ‖conv‖₂ (Lanczos + banded Cholesky); ``None`` when the
    banded Gram matrix would exceed ``limit`` entries or no certificate is found."""
    sides = [s for s in _sides(geom) if s.n * (s.band + 1) <= limit]
    if not sides:
        return None
    side = min(sides, key=lambda s: (s.n * (s.band + 1) ** 2, s.n))
    w64 = weight.detach().to(torch.float64).cpu()
    op = ConvOperator(full_kernel(w64, geom), geom.undilated())  # float64 dilated/grouped convs are slow
    ab = banded_gram(op, side)
    n = side.n
    if n <= 1024:
        dense = np.zeros((n, n))
        for dd in range(ab.shape[0]):
            idx = np.arange(n - dd)
            dense[idx + dd, idx] = ab[dd, :n - dd]
            dense[idx, idx + dd] = ab[dd, :n - dd]
        theta = float(np.linalg.eigvalsh(dense)[-1])
    else:
        shape = (1, *side.shape)

        def matvec(v: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).view(shape)
            r = op.adjoint(op.apply(t)) if side.gram_input else op.apply(op.adjoint(t))
            return r.reshape(-1).numpy()

        theta = _lanczos_top(matvec, n)
    # rounding of the assembled Gram matrix: one dot product of length K per entry
    wa = full_kernel(w64, geom).abs()  # (Co, Ci, kh', kw')
    k_len = (wa.shape[1] * wa.shape[2] * wa.shape[3]) if not side.gram_input else (wa.shape[0] * wa.shape[2] * wa.shape[3])
    abs_sq = abs_schur_sq(wa.sum(dim=(1, 2, 3)).max(), wa.sum(dim=(0, 2, 3)).max())
    err_gram = gamma(k_len + 1) * abs_sq
    lam = _certify_banded(ab, theta, err_gram)
    if lam is None:
        return None
    return math.sqrt(lam), {"method": "lanczos-cholesky", "side": "input" if side.gram_input else "output",
                            "n": n, "band": side.band, "estimate": math.sqrt(max(theta, 0.0))}


def conv_bound(weight: torch.Tensor, geom: ConvGeometry, limit: int = EXACT_LIMIT) -> tuple[float, dict]:
    """The certified bound used for a convolution: min(circulant Gram, Lanczos-Cholesky)."""
    circ, info = conv_circulant_bound(weight, geom)
    exact = conv_exact_bound(weight, geom, limit) if limit > 0 else None
    info = dict(info, circulant=circ)
    if exact is not None and exact[0] < circ:
        return exact[0], dict(exact[1], circulant=circ)
    # no near-exact certificate: report how far the bound can be from the exact norm at most, with a
    # power-iteration *lower* estimate (informational only; the certificate is ``circ``)
    w64 = weight.detach().to(torch.float64).cpu()
    op = ConvOperator(full_kernel(w64, geom), geom.undilated())
    gen = torch.Generator().manual_seed(0)
    lower, _ = power_iteration(op.apply, op.adjoint, torch.randn(1, *geom.in_shape, generator=gen, dtype=torch.float64),
                               POWER_CHECK_ITERS)
    return circ, dict(info, lower_estimate=lower, max_gap=circ / lower - 1.0 if lower > 0 else math.inf)


__all__ = [
    "ConvGeometry", "ConvOperator", "gram_bound", "psd_batch_bound", "conv_circulant_bound", "conv_exact_bound", "conv_bound",
    "linear_bound", "normalize_bound", "power_iteration", "polyphase_symbols", "full_kernel", "banded_gram",
    "EXACT_LIMIT", "DENSE_LIMIT", "SAFETY", "SLACK_INFLATION", "U32", "U64", "gamma", "GRAM_INFLATION", "POWER_CHECK_ITERS",
]
