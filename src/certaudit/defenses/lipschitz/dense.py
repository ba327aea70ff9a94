"""Rounding constants and the certified ℓ2 norm bounds of dense matrices.

* :data:`U64`, :data:`U32`, :data:`SAFETY` and :func:`gamma` (Higham's ``γ_n`` with a safety factor);
* :func:`gram_bound` -- Gram iteration (Delattre et al., ICML 2023) for a batch of real or complex
  matrices;
* :func:`psd_batch_bound` -- ``eigvalsh`` closed by a Cholesky certificate, for a batch of Hermitian
  PSD matrices;
* :func:`linear_bound` and :func:`normalize_bound` -- the bounds of ``Linear`` and ``Normalize`` layers.

The rounding analysis is in :mod:`certaudit.defenses.lipschitz.bounds` (and ``docs/lipschitz.md``).
"""

from __future__ import annotations

import math

import torch

from certaudit.errors import InputError

U64 = 2.0 ** -53
"""Unit roundoff of float64."""
U32 = 2.0 ** -24
"""Unit roundoff of float32."""
SAFETY = 4.0
"""Multiplier on every rounding constant γ_n (blocked algorithms, FMA, library variants)."""
SLACK_INFLATION = 1.01
"""On the float64 reference's magnitude pass (the defense's logit slack ``e``)."""
GRAM_INFLATION = 1e-9
"""Smallest relative inflation of Gram-iteration results for their float64 rounding (the size-dependent
term ``4·SAFETY·(m+n)·√min(m,n)·u`` is used when larger)."""
DENSE_LIMIT = 4096
"""Largest side of a dense (Linear) Gram matrix certified by Cholesky; Gram iteration beyond."""


def gamma(n: int, u: float = U64) -> float:
    """``γ_n = n·u/(1 − n·u)`` with the :data:`SAFETY` factor (Higham's rounding constant)."""
    nu = SAFETY * max(1, int(n)) * u
    if nu >= 0.5:
        raise InputError(f"layer too large for a rounding-error bound (n = {n})")
    return nu / (1.0 - nu)


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


def psd_batch_bound(gmat: torch.Tensor, err: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Certified bounds on ``λ_max`` of a batch of Hermitian PSD matrices (B, d, d): ``eigvalsh``
    estimates ``θ``, then a successful Cholesky of ``θ(1+δ)I − G`` proves ``λ_max ≤ θ(1+δ) + α·tr``
    (the argument in :mod:`certaudit.defenses.lipschitz.bounds`); ``err`` (B,) bounds ``‖Ĝ − G‖₂``
    from forming ``G``. Returns (B,) float64."""
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


def abs_schur_sq(rows_abs_max: float, cols_abs_max: float) -> float:
    """Schur's test: ‖|A|‖₂² ≤ (max row sum of |A|)·(max column sum of |A|)."""
    return float(rows_abs_max) * float(cols_abs_max)


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
    abs_sq = min(abs_schur_sq(wa.sum(1).max(), wa.sum(0).max()), float((w * w).sum()))
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
