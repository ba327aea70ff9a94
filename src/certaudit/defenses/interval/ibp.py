"""Interval bound propagation (IBP, Gowal et al. 2018) and the float32 rounding helpers it shares.

* the rounding constants (``U32``, ``U64``, ``EXTRA``, ``SLACK_FACTOR``, ``TINY``), the unit roundoff of
  the arithmetic in use (:func:`unit`, :func:`arithmetic`) and Higham's ``γ_n``;
* :func:`down32` / :func:`up32` (outward rounding of float64 results) and :func:`input_box`
  (the clipped ℓ∞ box, rounded outward when sound);
* :func:`ibp_step` (one op in centre/radius form, widened for rounding) and :class:`Spec` (the
  specification folded into the last linear layer, with its interval bound).

The floating-point analysis is described in :mod:`certaudit.defenses.interval.bounds`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from certaudit.defenses.interval.ops import Affine, Channel, Dense, Op, ReLU, Reshape
from certaudit.errors import InputError

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53  # unit roundoff of float64
_UNIT = contextvars.ContextVar("certaudit_unit_roundoff", default=U32)
EXTRA = 8  # a few more roundings per step (bias, subtraction, constants of Normalize / BatchNorm)
SLACK_FACTOR = 1.001  # the slack is itself computed in float32
TINY = 1e-30  # absolute slack per step (underflow)


def unit() -> float:
    """The unit roundoff ``u`` of the arithmetic the bounds are computed in and the model runs in:
    float32's ``2⁻²⁴`` unless :func:`arithmetic` says float64 (``2⁻⁵³``). float32's is the default
    everywhere: it is the larger, so a bound charged with it is sound for a float64 network too."""
    return _UNIT.get()


@contextlib.contextmanager
def arithmetic(dtype: torch.dtype) -> Iterator[None]:
    """Charge rounding at the unit roundoff of ``dtype`` (float32 or float64) inside the block: both the
    bound's own computation and the model's forward pass are in that dtype (a float64 network bounded
    with float64 inputs: the bound holds for the real-arithmetic network and for its float64 forward)."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"bounds are computed in float32 or float64, not {dtype}")
    token = _UNIT.set(U32 if dtype == torch.float32 else U64)
    try:
        yield
    finally:
        _UNIT.reset(token)


def gamma(n: int) -> float:
    """Higham's γ_n = n·u/(1 − n·u): |fl(Σ of n products) − Σ| ≤ γ_n·Σ|products|, any order."""
    nu = n * unit()
    return nu / (1 - nu)


def rel_ibp(op: Affine) -> float:
    """Interval widening per unit of magnitude: our centre and radius (γ_fan_in), the model's own
    forward pass (γ_fan_in), and the few roundings of mid/rad/constants; divided by ``1 − γ_fan_in``
    because the widening's own product with ``|W|`` may come out that much short (second order, but
    it grows with the fan-in: a 32,768-input layer needs it)."""
    g = gamma(op.fan_in)
    return (2 * g + EXTRA * unit()) / (1 - g)


def down32(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 not above it."""
    f = v.float()
    return torch.where(f.double() > v, torch.nextafter(f, torch.full_like(f, -math.inf)), f)


def up32(v: torch.Tensor) -> torch.Tensor:
    f = v.float()
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def down_to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 lower bounds as ``dtype`` (float32: rounded down; float64: as they are)."""
    return down32(v) if dtype == torch.float32 else v.to(dtype)


def up_to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return up32(v) if dtype == torch.float32 else v.to(dtype)


def input_box(x: torch.Tensor, eps: float | torch.Tensor, sound: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max(x − ε, 0), min(x + ε, 1)]``, rounded outward when ``sound``; ε a float or (B,).

    Sound: in float32 with ε rounded up to ``e`` (a float32 ≥ ε; float64 ``x``: ``e = ε`` as given, a
    float64), ``nextafter(fl(x − e), −∞) ≤ x − e``
    (the float below a rounded-to-nearest result lies below the exact value), and likewise above."""
    if isinstance(eps, torch.Tensor):
        e = eps.to(device=x.device, dtype=torch.float64).view(-1, *([1] * (x.dim() - 1)))
    else:
        e = float(eps)
    if not sound:
        e32 = e.to(x.dtype) if isinstance(e, torch.Tensor) else e
        return (x - e32).clamp(0.0, 1.0), (x + e32).clamp(0.0, 1.0)
    with torch.no_grad():
        e64 = e if isinstance(e, torch.Tensor) else torch.tensor(e, dtype=torch.float64, device=x.device)
        e_up = e64 if x.dtype == torch.float64 else up32(e64)  # ε as a number of x's dtype, not below it
        xd = x.detach()
        lo = torch.nextafter(xd - e_up, xd.new_full((), -math.inf)).clamp_(0.0, 1.0)
        hi = torch.nextafter(xd + e_up, xd.new_full((), math.inf)).clamp_(0.0, 1.0)
    if x.requires_grad:  # the value stays the rounded one; the gradient is that of clamp(x ± ε)
        shift = x - x.detach()  # exactly zero, carries d/dx
        lo = lo + shift * (lo > 0).to(x.dtype)
        hi = hi + shift * (hi < 1).to(x.dtype)
    return lo, hi


# ------------------------------------------------------------------------------------------- IBP

def _fresh(t: torch.Tensor) -> bool:
    """In-place updates are safe on a temporary unless autograd tracks it."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def ibp_affine(op: Affine, l: torch.Tensor, u: torch.Tensor, sound: bool, nonneg: bool = False,
               need_mag: bool = True):
    """One affine layer in centre/radius form; returns (lower, upper, magnitude bound or None).

    ``nonneg``: the caller knows ``l ≥ 0`` (a ReLU output or the input box), so ``max(|l|, |u|) = u``.
    Sound: ``[c − w, c + w]`` with ``w = |W|·rad + rel·M``, ``M = |W|·max(|l|, |u|) + |b| + TINY/rel``.
    ``need_mag=False`` (IBP alone, no backward pass to charge): ``w = |W|·(rad + rel'·max(|l|, |u|)) +
    rel'·|b| + TINY``, one product with ``|W|`` instead of two; ``rel' = (rel + 4u)/(1 − γ)`` pays for
    the two elementwise roundings of the sum (each ≤ u of it, so ≤ 2u·M through ``|W|``) and for the
    product's own shortfall (≤ γ of it); returns no magnitude.
    """
    if isinstance(op, Channel):
        return ibp_channel(op, l, u, sound, nonneg)
    mid = (u + l) / 2
    if not sound:
        rad = (u - l) / 2
        c, r = op.forward(mid), op.forward_abs(rad)
        return c - r, c + r, None
    rad = torch.maximum(u - mid, mid - l)
    rad = rad.mul_(1 + 4 * unit()) if _fresh(rad) else rad * (1 + 4 * unit())
    zmax = u if nonneg else torch.maximum(l.abs(), u.abs())
    if not need_mag:
        rel = (rel_ibp(op) + 4 * unit()) / (1 - gamma(op.fan_in))
        s = rad.add_(zmax.detach(), alpha=rel) if _fresh(rad) else rad + rel * zmax.detach()
        w = op.forward_abs(s)
        ab = op.abs_bias()
        extra = TINY if ab is None else rel * ab + TINY
        w = w.add_(extra) if _fresh(w) else w + extra
        c = op.forward(mid)
        hi = c + w
        return c.sub_(w) if _fresh(c) else c - w, hi, None
    r = op.forward_abs(rad)
    rel = rel_ibp(op)
    with torch.no_grad():
        mag = op.forward_abs(zmax)
        ab = op.abs_bias()
        mag.add_(TINY / rel if ab is None else ab + TINY / rel)  # TINY: the absolute slack (underflow)
        # an upper bound of the exact |W|·max(|l|, |u|) + |b|: the computed product may be γ short
        mag.mul_(1 / (1 - gamma(op.fan_in)))
    w = r.add_(mag, alpha=rel) if _fresh(r) else r + rel * mag
    c = op.forward(mid)
    hi = c + w
    return c.sub_(w) if _fresh(c) else c - w, hi, mag


def ibp_channel(op: Channel, l: torch.Tensor, u: torch.Tensor, sound: bool, nonneg: bool = False):
    """A per-channel affine map, elementwise: the images of ``l`` and ``u`` (swapped where the scale is
    negative), widened by ``rel·M``, ``M = |scale|·max(|l|, |u|) + mag_bias`` (our two roundings of
    ``l·scale + shift``, the model's own, as for any affine op with fan-in 2)."""
    if op.identity:
        return l, u, ((u if nonneg else torch.maximum(l.abs(), u.abs())).detach() if sound else None)
    a, b = torch.addcmul(op.shift, l, op.scale), torch.addcmul(op.shift, u, op.scale)
    if not op.positive:
        a, b = torch.minimum(a, b), torch.maximum(a, b)
    if not sound:
        return a, b, None
    rel = rel_ibp(op)
    with torch.no_grad():
        zmax = u if nonneg else torch.maximum(l.abs(), u.abs())
        mag = torch.addcmul(op.mag + TINY / rel, zmax, op.scale.abs())
    w = rel * mag
    return a - w, b + w, mag


def ibp_step(op: Op, l: torch.Tensor, u: torch.Tensor, sound: bool, nonneg: bool = False, need_mag: bool = True):
    """One op of IBP; ``nonneg``: the caller knows ``l ≥ 0`` (after a ReLU, or the input box);
    ``need_mag=False``: IBP alone, no magnitudes kept (:func:`ibp_affine`)."""
    if isinstance(op, ReLU):
        return l.clamp(min=0), u.clamp(min=0), None
    if isinstance(op, Reshape):
        return op.forward(l), op.forward(u), None
    return ibp_affine(op, l, u, sound, nonneg, need_mag)


def nonneg_after(op: Op, nonneg: bool) -> bool:
    """Whether the output of ``op`` is known to be ≥ 0 (given whether its input is)."""
    return isinstance(op, ReLU) or (nonneg and (isinstance(op, Reshape) or (isinstance(op, Channel) and op.identity)))


@dataclass
class Spec:
    """The specification folded into the last linear layer, per image: ``C W`` and ``C b``."""

    weight: torch.Tensor  # (B, S, n)
    bias: torch.Tensor  # (B, S)
    abs_weight: torch.Tensor  # (B, S, n): |C| |W|, for magnitudes
    abs_bias: torch.Tensor  # (B, S)
    rel: float

    @classmethod
    def fold(cls, last: Dense, c: torch.Tensor) -> "Spec":
        w, b = last.weight, last.bias
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        ca = c.abs()
        return cls(weight=c @ w, bias=c @ b, abs_weight=ca @ w.abs(), abs_bias=ca @ b.abs(),
                   rel=(2 * gamma(last.fan_in) + gamma(w.shape[0]) + EXTRA * unit()) / (1 - gamma(last.fan_in)))

    def rows(self, sl: slice) -> "Spec":
        """The specification of the images ``sl``."""
        return Spec(self.weight[sl], self.bias[sl], self.abs_weight[sl], self.abs_bias[sl], self.rel)

    def ibp(self, l: torch.Tensor, u: torch.Tensor, sound: bool) -> torch.Tensor:
        """Lower bound of the specification from the interval of the last layer's input (B, n)."""
        mid = (u + l) / 2
        rad = (u - l) / 2
        if sound:
            rad = torch.maximum(u - mid, mid - l) * (1 + 4 * unit())
        c = torch.einsum("bsn,bn->bs", self.weight, mid) + self.bias
        r = torch.einsum("bsn,bn->bs", self.weight.abs(), rad)
        if not sound:
            return c - r
        return (c - r).double() - self.ibp_slack(l, u)

    def ibp_slack(self, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The rounding slack (B, S) that the sound :meth:`ibp` subtracts."""
        zmax = torch.maximum(l.abs(), u.abs())
        mag = torch.einsum("bsn,bn->bs", self.abs_weight, zmax) + self.abs_bias
        return self.rel * mag.detach().double() + TINY
