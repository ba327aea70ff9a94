"""Deciding GloRo certificates from a float32 evaluation with a proven rounding bound.

The reference (:meth:`LipschitzDefense._forward` + ``_radius``) evaluates a float64 copy of the
model and a float64 magnitude pass. :class:`FastCertifier` evaluates the model's own float32 layers
up to the first ``Linear`` and the dense head in float64, bounds in ℓ2 how far both its margins and
the reference's margins can be from the exact ones (Lemmas 1 and 2 of ``docs/lipschitz.md``,
"Deciding in float32"), and replays the reference's float64 radius formula on the end points of
those intervals (rounding is monotone) to get ``R_lo ≤ R₆₄ ≤ R_hi``. Images whose label or verdict at
a decision radius that interval does not settle get a second try with the float32 layers' errors
measured in float64 (:meth:`FastCertifier.residuals`); the rest are marked for the reference, whose
sub-batch verdicts :meth:`FastCertifier.reference_settled` checks against its batch-size noise.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.defenses.lipschitz.bounds import (
    EXACT_LIMIT, SAFETY, SLACK_INFLATION, U32, U64, conv_bound, gamma, linear_bound,
)
from certaudit.defenses.lipschitz.network import Layer

ETA32 = 2.0 ** -126
"""Largest error of one flushed (FTZ/DAZ) float32 operation or operand: the smallest normal."""
ETA64 = 2.0 ** -1022
OVERFLOW_GUARD = 2.0 ** 120
"""Lemma 1 is trusted only where ``(1 + γ)(‖|A|‖·‖x‖ + ‖b̄‖)`` is below this (no float32 overflow)."""
CONST_INFLATION = 1.0 + 1e-6
"""On constants computed once in float64 (norms of biases and rows, products of layer bounds)."""
BOUND_INFLATION = 1.0 + 1e-9
"""On every per-image bound: the float64 rounding of evaluating the bound itself (≲ 100 operations)."""
REF_INFLATION = 1.0 + 1e-6
"""On the reference's magnitude pass: its own float64 rounding (nonnegative sums, relative ≤ γ_n)."""


def gamma_exact(m: int, u: float) -> float:
    """Higham's ``γ_m = m·u/(1 − m·u)`` without a safety factor: Lemma 1 holds for every order."""
    mu = max(1, int(m)) * u
    return math.inf if mu >= 0.5 else mu / (1.0 - mu)


@dataclass
class Step:
    """One layer with the constants of its rounding bound (docs/lipschitz.md)."""

    kind: str
    module: nn.Module  # the model's own (float32) module
    head: bool  # evaluated in float64 (the dense head)
    norm: float  # certified ‖A‖₂ (the report's bound; 1 for ReLU/Flatten/Identity)
    after: float = 1.0  # P_l: product of the certified norms strictly between this layer and the logits
    n: int = 0  # products per output (weight[0].numel())
    d_out: int = 0
    abs_norm: float = 0.0  # certified ‖|A|‖₂
    bias_norm: float = 0.0  # ‖b̄‖₂, the bias broadcast to the output
    row_l1: float = 0.0  # largest ℓ1 norm of a row of A plus |b| (underflow term only)
    std_min: float = 1.0  # Normalize only
    weight64: torch.Tensor | None = None
    bias64: torch.Tensor | None = None
    weight64_t: torch.Tensor | None = None  # the transpose, contiguous (the head's addmm)


@dataclass
class Bounds:
    """Per image: ``e_fast``/``e_ref`` (B,) Σ_l P_l‖δ_l‖ of the fast evaluation / the reference below the
    logit layer; ``lam_fast``/``lam_ref`` (B, C) the logit layer's own ``|δ_{L,c}|``; ``ebar`` (B, C) ≥
    the reference's slack ``e``; ``ok`` (B,) the premises hold (finite, no overflow)."""

    e_fast: torch.Tensor
    e_ref: torch.Tensor
    lam_fast: torch.Tensor
    lam_ref: torch.Tensor
    ebar: torch.Tensor
    ok: torch.Tensor

    def rows(self, idx: torch.Tensor) -> "Bounds":
        return Bounds(*(t[idx] for t in (self.e_fast, self.e_ref, self.lam_fast, self.lam_ref, self.ebar, self.ok)))


@dataclass
class FastDecision:
    """Per image: label, radius (R_lo, or 0), binding rival, its logit gap, and ``todo``: not decided."""

    label: torch.Tensor
    radius: torch.Tensor
    runner: torch.Tensor
    gap: torch.Tensor
    todo: torch.Tensor
    bounds: Bounds
    checked: int = 0  # images whose layer residuals were measured in float64 (Lemma 1 did not settle them)


@contextlib.contextmanager
def strict_fp32():
    """IEEE float32 for the pass: no NNPACK (Winograd), no bf16/TF32 in oneDNN (Lemma 1's premise)."""
    mk = torch.backends.mkldnn
    saved = [(sub, sub.fp32_precision) for sub in (getattr(mk, "conv", None), getattr(mk, "matmul", None))
             if sub is not None and hasattr(sub, "fp32_precision")]
    old_mm = torch.get_float32_matmul_precision()
    try:
        if old_mm != "highest":
            torch.set_float32_matmul_precision("highest")
        for sub, _ in saved:
            sub.fp32_precision = "ieee"
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        for sub, old in saved:
            sub.fp32_precision = old
        if old_mm != "highest":
            torch.set_float32_matmul_precision(old_mm)


def decision_radii(eps: float | None, override: Sequence[float] | None, asked: Sequence[float]) -> tuple[float, ...]:
    """The radii at which the fast path gives the reference's verdict: ``asked`` (checks, ``accept``'s
    ε) plus ``override``, or by default ε/2, ε, 2ε and the ℓ2 radius table of the reports."""
    if override is not None:
        base = {float(r) for r in override}
    else:
        from certaudit.audits.certified import L2_RADII  # the table the reports print (kept in one place)

        base = set(L2_RADII) | ({eps / 2, eps, 2 * eps} if eps is not None else set())
    return tuple(sorted(r for r in base | {float(r) for r in asked} if r > 0))


def row_distances(w: torch.Tensor) -> torch.Tensor:
    """(C, C) ``‖w_i − w_j‖₂`` of the logit layer's float64 rows, inflated for their rounding, 0 on the
    diagonal. Explicit differences: cdist's ``‖a‖² + ‖b‖² − 2a·b`` form (used above 25 rows) cancels
    to 0 for nearly equal rows, which would certify unbounded radii."""
    dist = (w.unsqueeze(1) - w.unsqueeze(0)).norm(dim=2)
    dist = dist * (1.0 + SAFETY * w.shape[1] * U64)
    dist.fill_diagonal_(0.0)
    return dist


def _abs_norm(layer: Layer, exact_limit: int) -> float:
    """Certified ‖|A|‖₂: a convolution's |A| is the convolution with kernel |W| (one tap per entry)."""
    w = layer.module.weight.detach().abs()  # type: ignore[union-attr]
    if layer.kind == "conv":
        return conv_bound(w, layer.geom, exact_limit)[0]  # type: ignore[arg-type]
    return linear_bound(w)[0]


def _step(layer: Layer, bound: float, head: bool, exact_limit: int) -> Step:
    m = layer.module
    if layer.kind == "normalize":
        return Step("normalize", m, head, bound, d_out=math.prod(layer.out_shape),
                    std_min=float(m.std.detach().double().min()))  # type: ignore[union-attr,operator]
    if layer.kind not in ("conv", "linear"):
        return Step(layer.kind, m, head, 1.0)
    w = m.weight.detach().double()  # type: ignore[union-attr]
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)  # type: ignore[union-attr]
    positions = 1
    for s in layer.out_shape[1:]:
        positions *= int(s)
    d_out = w.shape[0] * positions
    rows = w.abs().flatten(1).sum(1) + b.abs()
    return Step(layer.kind, m, head, bound, n=int(w[0].numel()), d_out=d_out,
                abs_norm=_abs_norm(layer, exact_limit) * CONST_INFLATION,
                bias_norm=float(b.norm()) * math.sqrt(positions) * CONST_INFLATION,
                row_l1=float(rows.max()) * CONST_INFLATION,
                weight64=w.to(m.weight.device), bias64=b.to(m.weight.device),  # type: ignore[union-attr]
                weight64_t=w.t().contiguous().to(m.weight.device) if layer.kind == "linear" else None)  # type: ignore[union-attr]


class FastCertifier:
    """The float32 evaluation of one walked float32 model and the bounds of docs/lipschitz.md."""

    def __init__(self, layers: Sequence[Layer], bounds: Sequence[float], exact_limit: int = EXACT_LIMIT):
        """``layers``: ``walk`` of the float32 model; ``bounds``: the report's certified norm of every
        layer but the last (the logit layer)."""
        first_linear = next(i for i, layer in enumerate(layers) if layer.kind == "linear")
        self.steps = [_step(layer, b, i >= first_linear, exact_limit) for i, (layer, b) in enumerate(zip(layers[:-1], bounds))]
        after = 1.0
        for st in reversed(self.steps):
            st.after = after * (1.0 + 4 * len(layers) * U64)
            after *= st.norm
        last = layers[-1].module
        w = last.weight.detach().double().cpu()  # type: ignore[union-attr]
        b = last.bias.detach().double().cpu() if last.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)  # type: ignore[union-attr]
        self.last = _step(layers[-1], 1.0, True, exact_limit)
        self.dist = row_distances(w)
        self.row_norms = w.norm(dim=1) * CONST_INFLATION  # (C,) ‖w_c‖₂
        self.bias_abs = b.abs()  # (C,)

    # ------------------------------------------------------------------- evaluation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, ...]]]:
        """Float64 logits (B, C) of the float32 prefix + float64 head; per layer index the bound on the
        norm the bound needs (an affine layer's input; a Normalize's output), (B,) float64; and each
        float32 affine layer's input and output (for :meth:`residuals`)."""
        nus: dict[int, torch.Tensor] = {}
        acts: dict[int, tuple[torch.Tensor, ...]] = {}
        h, normed, at = x, None, -1
        with torch.no_grad(), strict_fp32():
            for i, st in enumerate(self.steps + [self.last]):
                if st.kind in ("conv", "linear"):
                    nus[i] = nus[at] if normed is h else _norm_bound(h)  # a Normalize's output: known
                if st.head and h.dtype != torch.float64:
                    h = h.to(torch.float64)  # exact
                h_in = h
                if st.head and st.kind == "linear":  # addmm on the stored transpose: MKL's fast float64 path
                    h = torch.addmm(st.bias64, h, st.weight64_t)  # type: ignore[arg-type]
                elif st.head and st.kind == "relu":
                    h = torch.relu(h)
                else:
                    h = st.module(h)
                if st.kind in ("conv", "linear") and not st.head:
                    acts[i] = (h_in, h)
                if st.kind == "normalize":
                    nus[i], normed, at = _norm_bound(h), h, i
        return h, nus, acts

    def residuals(self, acts: dict[int, tuple[torch.Tensor, ...]], nus: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """A posteriori ``‖δ_l‖₂`` of every float32 affine layer (rows of ``acts``): the computed output
        minus the layer recomputed in float64 from the same input, plus the float64 recomputation's
        own Lemma-1 bound and the rounding of the subtraction and norm. No assumption on how float32
        computed the layer."""
        out = {}
        with torch.no_grad():
            for i, (h_in, h_out) in acts.items():
                st = self.steps[i]
                m = st.module
                if st.kind == "conv":
                    z = F.conv2d(h_in.double(), st.weight64, st.bias64, m.stride, m.padding, m.dilation, m.groups)  # type: ignore[arg-type]
                else:
                    z = F.linear(h_in.double(), st.weight64, st.bias64)  # type: ignore[arg-type]
                diff = h_out.double() - z  # fl(a − b) = (a − b)(1 + θ), or a flushed (FTZ) result
                r = (_norm_bound(diff) + math.sqrt(diff[0].numel()) * ETA64) / (1.0 - U64)
                out[i] = r + _injected(st, nus[i], U64, ETA64)[0]
        return out

    def bounds(self, nus: dict[int, torch.Tensor], injected: dict[int, torch.Tensor] | None = None) -> Bounds:
        """Lemmas 1 and 2 for the fast evaluation and for the reference, per image, from the norms of
        :meth:`forward`; ``injected`` replaces Lemma 1's ``‖δ_l‖`` by measured ones (:meth:`residuals`)."""
        nu0 = next(iter(nus.values()))
        zero = torch.zeros_like(nu0)
        rho_f, rho_r, e_f, e_r, mag = zero, zero, zero, zero, zero
        ok = torch.ones_like(nu0, dtype=torch.bool)
        for i, st in enumerate(self.steps):
            if st.kind == "normalize":
                d_f, d_r, mag = self._normalize(st, nus[i], rho_f, rho_r, mag)
            elif st.kind in ("conv", "linear"):
                nu = nus[i]
                if injected is not None and i in injected:
                    d_f = injected[i]
                else:
                    d_f, good = _injected(st, nu, U64 if st.head else U32, ETA64 if st.head else ETA32)
                    ok &= good
                nu64 = nu + rho_f + rho_r  # ≥ ‖reference's activations‖
                d_r, _ = _injected(st, nu64, U64, ETA64)
                g = gamma(st.n + 1, U64)  # the reference's magnitude pass (SAFETY included)
                mag = REF_INFLATION * (st.abs_norm * (mag + g * nu64) + g * st.bias_norm)
            else:
                continue
            rho_f, rho_r = st.norm * rho_f + d_f, st.norm * rho_r + d_r
            e_f, e_r = e_f + st.after * d_f, e_r + st.after * d_r
        nu = nus[len(self.steps)]
        nu64 = nu + rho_f + rho_r
        n = self.last.n
        g_exact, g_ref = gamma_exact(n + 1, U64), gamma(n + 1, U64)

        def logit(v: torch.Tensor) -> torch.Tensor:  # |δ_{L,c}|: Lemma 1 per logit (float64), flushes
            under = 2.0 * ETA64 * (2 * n + 2 + self.last.row_l1 + n * v)
            return (g_exact * (self.row_norms * v.unsqueeze(1) + self.bias_abs) + under.unsqueeze(1)) * BOUND_INFLATION

        ebar = SLACK_INFLATION * REF_INFLATION * (self.row_norms * (mag + g_ref * nu64).unsqueeze(1) + g_ref * self.bias_abs)
        ok &= torch.isfinite(e_f + e_r) & torch.isfinite(nu64) & (nu64 < OVERFLOW_GUARD)
        return Bounds(e_f * BOUND_INFLATION, e_r * BOUND_INFLATION, logit(nu), logit(nu64), ebar * BOUND_INFLATION, ok)

    @staticmethod
    def _normalize(st: Step, nu_out: torch.Tensor, rho_f: torch.Tensor, rho_r: torch.Tensor,
                   mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``fl(fl(x − m)/s)``: two roundings, |δ| ≤ γ₂|z| (z exact); plus flushes of both operations
        and of a denormal input (≤ η/s). The reference's magnitude pass: ``err/s + 3·SAFETY·u·|h|``."""
        dim = float(max(st.d_out, 1))
        g32, g64 = gamma_exact(2, U32), gamma_exact(2, U64)
        d_f = g32 / (1.0 - g32) * nu_out + 2.0 * ETA32 * (2.0 + 2.0 / st.std_min) * math.sqrt(dim)
        true_out = nu_out + st.norm * rho_f + d_f  # ≥ ‖exact output‖
        d_r = g64 * (true_out + st.norm * rho_r) + 2.0 * ETA64 * (2.0 + 2.0 / st.std_min) * math.sqrt(dim)
        ref_out = true_out + st.norm * rho_r + d_r  # ≥ ‖reference's output‖
        mag = REF_INFLATION * (st.norm * mag + 3.0 * SAFETY * U64 * ref_out)
        return d_f, d_r, mag

    # --------------------------------------------------------------------- decision

    def decide(self, x: torch.Tensor, pairwise: torch.Tensor, radii: Sequence[float]) -> FastDecision:
        """The reference's label and verdicts ``R₆₄ ≥ t`` (t in ``radii``) where ``[R_lo, R_hi]`` settles
        them, first from Lemma 1, then, for the rest, from the measured residuals of the float32
        layers; ``todo`` marks the images neither settles (docs/lipschitz.md)."""
        f, nus, acts = self.forward(x)
        b = self.bounds(nus)
        d = self._interval(f, b.e_fast + b.e_ref, b.lam_fast + b.lam_ref, b, pairwise, radii)
        idx = d.todo.nonzero().flatten()
        d.checked = int(idx.numel())
        if idx.numel():
            sub = {i: v[idx] for i, v in nus.items()}
            b2 = self.bounds(sub, self.residuals({i: (a[idx], c[idx]) for i, (a, c) in acts.items()}, sub))
            d2 = self._interval(f[idx], b2.e_fast + b2.e_ref, b2.lam_fast + b2.lam_ref, b2, pairwise, radii)
            for name in ("label", "radius", "runner", "gap", "todo"):
                getattr(d, name)[idx] = getattr(d2, name)
        return d

    def reference_settled(self, f_ref: torch.Tensor, b: Bounds, pairwise: torch.Tensor, radii: Sequence[float]) -> torch.Tensor:
        """(B,) bool: the reference evaluated on these rows alone (logits ``f_ref``) gives the verdicts
        the reference evaluated in any other batch would (float64 kernels round differently with the
        batch size: both lie within D⁶⁴ of the exact margins)."""
        return ~self._interval(f_ref, 2.0 * b.e_ref, 2.0 * b.lam_ref, b, pairwise, radii).todo

    def _interval(self, f: torch.Tensor, e_sum: torch.Tensor, lam: torch.Tensor, b: Bounds, pairwise: torch.Tensor,
                  radii: Sequence[float]) -> FastDecision:
        """Replay the reference's float64 radius on the end points of its logit differences' interval
        ``A_j ± (dist·e_sum + lam_y + lam_j)``, its slack in ``[0, ē_y + ē_j]``."""
        pred = f.argmax(dim=1)
        col = pred.view(-1, 1)
        fp = f.gather(1, col)
        a = fp - f  # A_j = fl(f̂_y − f̂_j), as the reference computes its own
        delta = (self.dist.to(f.device)[pred] * e_sum.view(-1, 1) + lam.gather(1, col) + lam) * (1.0 + 4 * U64)
        delta = delta + 3.0 * U64 * a.abs() + 2.0 ** -1000
        lo, hi = a - delta, a + delta
        mine = F.one_hot(pred, f.shape[1]).bool()
        slack = b.ebar.gather(1, col) + b.ebar  # ≥ fl(e_y + e_j)
        r_lo = _ratio(lo - 2.0 * slack, pairwise[pred]).masked_fill(mine, math.inf)
        r_hi = _ratio(hi, pairwise[pred]).masked_fill(mine, math.inf)
        rad_lo, runner = r_lo.min(dim=1)
        rad_hi = r_hi.min(dim=1).values
        settled = b.ok & torch.isfinite(f).all(dim=1) & lo.masked_fill(mine, math.inf).gt(0).all(dim=1)
        settled &= (rad_lo > 0) | (rad_hi <= 0)
        for t in radii:
            settled &= (rad_lo >= t) | (rad_hi < t)
        cert = rad_lo > 0
        label = torch.where(cert, pred, torch.full_like(pred, -1))
        radius = torch.where(cert, rad_lo, torch.zeros_like(rad_lo))
        gap = fp.squeeze(1) - f.gather(1, runner.view(-1, 1)).squeeze(1)
        return FastDecision(label, radius, runner, gap, ~settled, b)


def _ratio(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The reference's ``r = m/K`` (±inf where K = 0), monotone in m."""
    return torch.where(k > 0, m / k.clamp_min(1e-300), torch.where(m > 0, math.inf, -math.inf))


def _norm_bound(h: torch.Tensor) -> torch.Tensor:
    """(B,) float64 upper bound on ``‖h_b‖₂`` from ``torch.linalg.vector_norm`` in h's precision. It
    sums the squares (unscaled: a norm above the range overflows to inf) in some order, takes a
    square root and may convert once: relative error of ``ν²`` within γ_{d+8} for any order (also if
    it rescaled: four more roundings), plus ``2dη`` for flushed squares and sums."""
    hf = h.flatten(1)
    d = hf.shape[1]
    u, eta = (U64, ETA64) if h.dtype == torch.float64 else (U32, ETA32)
    nu = torch.linalg.vector_norm(hf, dim=1).to(torch.float64)
    return torch.sqrt((nu * nu + 2.0 * d * eta) / (1.0 - gamma_exact(d + 8, u)))


def _injected(st: Step, nu: torch.Tensor, u: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lemma 1 in ℓ2: ``‖δ‖ ≤ γ_{n+1}(‖|A|‖ν + ‖b̄‖) + τ`` for an input of norm ≤ ``nu``, and whether
    the no-overflow premise holds."""
    g = gamma_exact(st.n + 1, u)
    mag = st.abs_norm * nu + st.bias_norm
    under = 2.0 * eta * (2 * st.n + 2 + st.row_l1 + st.n * nu) * math.sqrt(st.d_out)
    guard = OVERFLOW_GUARD if u == U32 else 2.0 ** 1000
    return g * mag + under, (1.0 + g) * mag < guard


__all__ = ["FastCertifier", "FastDecision", "Bounds", "decision_radii", "Step", "strict_fp32", "row_distances", "gamma_exact"]
