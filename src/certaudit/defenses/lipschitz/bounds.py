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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certaudit.errors import InputError

U64 = 2.0 ** -53
"""Unit roundoff of float64."""
U32 = 2.0 ** -24
"""Unit roundoff of float32."""
SAFETY = 4.0
"""Multiplier on every rounding constant γ_n (blocked algorithms, FMA, library variants)."""
GRAM_INFLATION = 1e-9
"""Smallest relative inflation of Gram-iteration results for their float64 rounding (the size-dependent
term ``4·SAFETY·(m+n)·√min(m,n)·u`` is used when larger)."""
EXACT_LIMIT = 2 ** 24
"""Largest banded Gram matrix (entries, float64: 128 MiB) assembled for the Cholesky certificate."""
DENSE_LIMIT = 4096
"""Largest side of a dense (Linear) Gram matrix certified by Cholesky; Gram iteration beyond."""
POWER_CHECK_ITERS = 200
"""Power-iteration steps of the lower estimate reported next to a circulant-only bound."""


def gamma(n: int, u: float = U64) -> float:
    """``γ_n = n·u/(1 − n·u)`` with the :data:`SAFETY` factor (Higham's rounding constant)."""
    nu = SAFETY * max(1, int(n)) * u
    if nu >= 0.5:
        raise InputError(f"layer too large for a rounding-error bound (n = {n})")
    return nu / (1.0 - nu)


# ----------------------------------------------------------------------------- Gram iteration

def gram_bound(mats: torch.Tensor, tol: float = 1e-6, max_iter: int = 40) -> float:
    """Certified upper bound on ``max_b ‖mats[b]‖₂`` by Gram iteration (Delattre et al. 2023).

    ``mats`` is a (B, m, n) real or complex batch. With ``G₁ = AᴴA`` (or ``AAᴴ``, the smaller) and
    ``H_t = G₁^{2^t}`` (by repeated squaring, rescaled to stay finite), ``σ_max(A)² = λ_max(G₁) ≤
    ‖H_t‖_F^{1/2^t}`` for every ``t``: a bound that tightens quadratically. It stops once the bound
    is within ``tol`` (relative, on σ) of a lower bound (a column norm of ``H_t``) for the maximum over
    the batch, or after ``max_iter`` squarings; the result is a valid upper bound either way.
    """
    a = mats.detach().to(torch.complex128 if mats.is_complex() else torch.float64)
    if a.dim() == 2:
        a = a.unsqueeze(0)
    if a.numel() == 0:
        return 0.0
    m, n = a.shape[-2], a.shape[-1]
    g = a.mH @ a if n <= m else a @ a.mH  # (B, d, d) Hermitian PSD
    logs = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    best = math.inf
    for t in range(max_iter + 1):
        fro = torch.linalg.matrix_norm(g, ord="fro").real  # (B,)
        zero = fro <= 0
        fro = torch.where(zero, torch.ones_like(fro), fro)
        g = g / fro.to(g.dtype).view(-1, 1, 1)
        logs = torch.where(zero, torch.full_like(logs, -math.inf), logs + torch.log(fro))
        scale = float(2 ** t)
        upper = logs / scale  # log λ_max(G₁) bound, per matrix
        col = torch.linalg.vector_norm(g, dim=-2).amax(dim=-1).real.clamp_min(1e-300)  # max column norm
        lower = (logs + torch.log(col)) / scale
        top_upper = float(upper.max())
        best = min(best, top_upper)
        if top_upper == -math.inf:
            return 0.0
        if best - float(lower.max()) <= 2.0 * math.log1p(tol):
            break
        g = g.mH @ g
        logs = 2.0 * logs
    # rounding: each product's error is γ·‖H‖_F² ≤ γ·√d·‖H²‖_F (relative), and the 2^t-th roots
    # shrink the later ones geometrically (docs/lipschitz.md); floor at GRAM_INFLATION
    infl = max(GRAM_INFLATION, 4.0 * SAFETY * (m + n) * math.sqrt(min(m, n)) * U64)
    return math.exp(0.5 * best) * (1.0 + infl)


# ------------------------------------------------------------------------- convolution geometry

def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes and hyper-parameters of a zero-padded ``Conv2d`` on a fixed input size."""

    in_shape: tuple[int, int, int]  # (C_in, H, W)
    out_shape: tuple[int, int, int]  # (C_out, H', W')
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_lo: tuple[int, int]  # top, left
    pad_hi: tuple[int, int]  # bottom, right
    dilation: tuple[int, int]
    groups: int

    @property
    def effective_kernel(self) -> tuple[int, int]:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel))  # type: ignore[return-value]

    def undilated(self) -> "ConvGeometry":
        """The same operator with the kernel of :func:`full_kernel` (no dilation, one group)."""
        return ConvGeometry(self.in_shape, self.out_shape, self.effective_kernel, self.stride, self.pad_lo,
                            self.pad_hi, (1, 1), 1)

    @classmethod
    def of(cls, conv: nn.Conv2d, in_shape: tuple[int, int, int]) -> "ConvGeometry":
        """Geometry of ``conv`` on inputs of shape ``in_shape``; refuses non-zero padding modes."""
        if conv.padding_mode != "zeros":
            raise InputError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported (only zero padding)")
        c, h, w = (int(s) for s in in_shape)
        if c != conv.in_channels:
            raise InputError(f"Conv2d expects {conv.in_channels} input channels, the network gives it {c}")
        k = _pair(conv.kernel_size)
        s = _pair(conv.stride)
        d = _pair(conv.dilation)
        keff = tuple(di * (ki - 1) + 1 for di, ki in zip(d, k))
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                lo, hi = (0, 0), (0, 0)
            else:  # "same", as torch pads: the extra pixel of an even total goes to the end
                tot = tuple(ke - 1 for ke in keff)
                lo = tuple(t // 2 for t in tot)
                hi = tuple(t - t // 2 for t in tot)
        else:
            lo = hi = _pair(conv.padding)
        oh = (h + lo[0] + hi[0] - keff[0]) // s[0] + 1
        ow = (w + lo[1] + hi[1] - keff[1]) // s[1] + 1
        if oh < 1 or ow < 1:
            raise InputError(f"Conv2d input {tuple(in_shape)} is smaller than its kernel")
        return cls((c, h, w), (conv.out_channels, oh, ow), k, s, tuple(lo), tuple(hi), d, int(conv.groups))  # type: ignore[arg-type]


class ConvOperator:
    """The linear part of a zero-padded ``Conv2d`` as a map R^{C×H×W} → R^{C'×H'×W'}, with its
    exact adjoint (``conv_transpose2d`` with the ``output_padding`` that restores the padded size,
    then a crop: the adjoint of zero padding)."""

    def __init__(self, weight: torch.Tensor, geom: ConvGeometry):
        self.weight = weight
        self.geom = geom
        g = geom
        hp = g.in_shape[1] + g.pad_lo[0] + g.pad_hi[0]
        wp = g.in_shape[2] + g.pad_lo[1] + g.pad_hi[1]
        ke = g.effective_kernel
        self._out_pad = (hp - ((g.out_shape[1] - 1) * g.stride[0] + ke[0]),
                         wp - ((g.out_shape[2] - 1) * g.stride[1] + ke[1]))
        self._pad = (g.pad_lo[1], g.pad_hi[1], g.pad_lo[0], g.pad_hi[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geom
        xp = F.pad(x, self._pad) if any(self._pad) else x
        return F.conv2d(xp, self.weight, None, g.stride, 0, g.dilation, g.groups)  # (B, C', H', W')

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        g = self.geom
        z = F.conv_transpose2d(y, self.weight, None, g.stride, 0, self._out_pad, g.groups, g.dilation)
        return z[:, :, g.pad_lo[0]:g.pad_lo[0] + g.in_shape[1], g.pad_lo[1]:g.pad_lo[1] + g.in_shape[2]]

    def dense(self) -> torch.Tensor:
        """The (out_dim, in_dim) matrix (small layers only: tests and benchmarks)."""
        c, h, w = self.geom.in_shape
        n = c * h * w
        eye = torch.eye(n, dtype=self.weight.dtype, device=self.weight.device).view(n, c, h, w)
        return self.apply(eye).reshape(n, -1).T


def full_kernel(weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """(C_out, C_in, kh', kw'): groups expanded to a block-diagonal kernel, dilation to zeros."""
    co, cig, kh, kw = weight.shape
    g = geom.groups
    ci = cig * g
    dh, dw = geom.dilation
    ke = geom.effective_kernel
    out = weight.new_zeros(co, ci, ke[0], ke[1])
    per = co // g
    for i in range(g):
        out[i * per:(i + 1) * per, i * cig:(i + 1) * cig, ::dh, ::dw] = weight[i * per:(i + 1) * per]
    return out


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


def psd_batch_bound(gmat: torch.Tensor, err: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Certified bounds on ``λ_max`` of a batch of Hermitian PSD matrices (B, d, d): ``eigvalsh``
    estimates ``θ``, then a successful Cholesky of ``θ(1+δ)I − G`` proves ``λ_max ≤ θ(1+δ) + α·tr``
    (module docstring); ``err`` (B,) bounds ``‖Ĝ − G‖₂`` from forming ``G``. Returns (B,) float64."""
    b, d, _ = gmat.shape
    theta = torch.linalg.eigvalsh(gmat)[..., -1].real.to(torch.float64)  # (B,)
    diag = gmat.diagonal(dim1=-2, dim2=-1).real.to(torch.float64)  # (B, d)
    alpha = gamma(d + 1) / (1.0 - gamma(d + 1))
    out = torch.full((b,), math.inf, dtype=torch.float64, device=gmat.device)
    todo = torch.ones(b, dtype=torch.bool, device=gmat.device)
    eye = torch.eye(d, dtype=gmat.dtype, device=gmat.device)
    for delta in (1e-9, 1e-7, 1e-5, 1e-3, 1e-1):
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            break
        mu = torch.maximum(theta[idx], diag[idx].amax(-1)).clamp_min(1e-300) * (1.0 + delta)  # (b',)
        _, info = torch.linalg.cholesky_ex(mu.to(gmat.dtype).view(-1, 1, 1) * eye - gmat[idx])
        ok = info == 0
        trace_b = d * mu - diag[idx].sum(-1)
        out[idx[ok]] = (mu * (1.0 + SAFETY * U64) + alpha * trace_b)[ok]
        todo[idx[ok]] = False
    err_t = torch.as_tensor(err, dtype=torch.float64, device=gmat.device)
    return out + err_t


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

def _abs_schur_sq(rows_abs_max: float, cols_abs_max: float) -> float:
    """Schur's test: ‖|A|‖₂² ≤ (max row sum of |A|)·(max column sum of |A|)."""
    return float(rows_abs_max) * float(cols_abs_max)


def _lanczos_top(matvec: Callable[[np.ndarray], np.ndarray], n: int, seed: int = 0) -> float:
    """λ_max of a symmetric PSD operator by ARPACK's Lanczos (an estimate, certified later)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

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
    from scipy.linalg import LinAlgError, cholesky_banded

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
    abs_sq = _abs_schur_sq(wa.sum(dim=(1, 2, 3)).max(), wa.sum(dim=(0, 2, 3)).max())
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


def linear_bound(weight: torch.Tensor, dense_limit: int = DENSE_LIMIT) -> tuple[float, dict]:
    """Certified bound on ‖W‖₂: dense Gram (smaller side) + eigvalsh estimate + Cholesky
    certificate; Gram iteration when the Gram matrix would be larger than ``dense_limit``."""
    w = weight.detach().to(torch.float64).cpu()
    out_f, in_f = w.shape
    if min(out_f, in_f) > dense_limit:
        return gram_bound(w), {"method": "gram"}
    gmat = w @ w.T if out_f <= in_f else w.T @ w
    d = gmat.shape[0]
    k_len = max(out_f, in_f)
    wa = w.abs()
    abs_sq = min(_abs_schur_sq(wa.sum(1).max(), wa.sum(0).max()), float((w * w).sum()))
    err_gram = gamma(k_len) * abs_sq
    theta = float(torch.linalg.eigvalsh(gmat)[-1])
    alpha = gamma(d + 1) / (1.0 - gamma(d + 1))
    eye = torch.eye(d, dtype=torch.float64)
    diag_max = float(gmat.diagonal().max())
    for delta in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        mu = max(theta, diag_max) * (1.0 + delta) + 1e-300
        _, info = torch.linalg.cholesky_ex(mu * eye - gmat)
        if int(info) == 0:
            trace_b = d * mu - float(gmat.diagonal().sum())
            lam = mu * (1.0 + SAFETY * U64) + alpha * trace_b + err_gram
            return math.sqrt(lam), {"method": "eigvalsh-cholesky", "estimate": math.sqrt(max(theta, 0.0))}
    return gram_bound(w), {"method": "gram"}


def normalize_bound(std: torch.Tensor) -> tuple[float, dict]:
    """``(x − mean)/std`` per channel is diagonal: its norm is exactly ``max 1/std``."""
    s = std.detach().to(torch.float64).cpu().flatten()
    return float((1.0 / s).max()) * (1.0 + SAFETY * U64), {"method": "exact"}


# --------------------------------------------------------------------- power iteration (estimate)

def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor], adjoint: Callable[[torch.Tensor], torch.Tensor],
                    v: torch.Tensor, iters: int) -> tuple[float, torch.Tensor]:
    """``iters`` steps of ``v ← AᵀA v / ‖·‖``; returns ``‖A v‖`` (a *lower* bound) and ``v``."""
    with torch.no_grad():
        v = v / v.norm().clamp_min(1e-30)
        for _ in range(int(iters)):
            v = adjoint(apply(v))
            v = v / v.norm().clamp_min(1e-30)
        return float(apply(v).norm()), v


__all__ = [
    "ConvGeometry", "ConvOperator", "gram_bound", "psd_batch_bound", "conv_circulant_bound", "conv_exact_bound", "conv_bound",
    "linear_bound", "normalize_bound", "power_iteration", "polyphase_symbols", "full_kernel", "banded_gram",
    "EXACT_LIMIT", "DENSE_LIMIT", "SAFETY", "U32", "U64", "gamma",
]
