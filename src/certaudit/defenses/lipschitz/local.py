"""Local bounds over an ℓ2 ball for the Lipschitz defense's proof of non-degradability (issue 18).

The 2ε check proves that no x' in B₂(x, ε) is rejected by charging every ε-step the *global* rate
``K_{y,j}``. Over a small ball most ReLUs are stable, and the margin moves much more slowly. Two
local bounds, both over the domain ``D = B₂(x, ε) ∩ [0, 1]^d`` (docs/degradation.md, "Proofs over
the ℓ2 ball"):

* :func:`preactivation_bounds` -- sound bounds ``[l, u]`` of every ReLU input over D, from CROWN over
  the ℓ2 ball (the interval code with ``norm="l2"``);
* :func:`local_lipschitz` -- a bound ``L_{y,j}`` of ``sup_{x'∈D} ‖∇(f_y − f_j)(x')‖₂`` by interval
  arithmetic on the Jacobian (Fast-Lip, Weng et al. 2018): ``∇ = (w_y − w_j) Δ_L W_L ⋯ Δ_1 W_1 S``
  with ``Δ_l`` the diagonal ReLU derivative, 1 where ``l ≥ 0``, 0 where ``u ≤ 0``, anything in
  ``[0, 1]`` elsewhere. D is convex, so ``f_y − f_j`` changes by at most ``L_{y,j}·‖x' − x‖₂``
  between x and any x' in D (the mean-value inequality along the segment, which stays in D);
* :func:`magnitudes` -- upper bounds of ``|h|`` at every layer input over D, which bound the
  float64 rounding slack of the run-time check at any x' in D.

Everything is float64; the interval products carry ``γ_n`` of float64 (relative 1e-13 on these
sizes) into their radii.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from certaudit.defenses.lipschitz.bounds import U64, gamma
from certaudit.defenses.lipschitz.network import Layer


def _conv_t(layer: Layer, weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` (B, *out_shape) through the transpose of the convolution ``layer`` with ``weight``."""
    m = layer.module
    return torch.nn.grad.conv2d_input((g.shape[0], *layer.in_shape), weight, g, m.stride, m.padding,  # type: ignore[arg-type]
                                      m.dilation, m.groups)


def _back_affine(layer: Layer, wabs: torch.Tensor, mid: torch.Tensor, rad: torch.Tensor):
    """``[mid ± rad]·W`` (the rows of a Jacobian through a conv / linear layer): centre exactly as
    float64 computes it, radius ``|W|·(rad + γ(|mid| + rad))`` with ``γ`` of the fan-out, rounded up."""
    m = layer.module
    w = m.weight  # type: ignore[union-attr]
    if layer.kind == "linear":
        g = gamma(w.shape[0] + 2, U64)  # type: ignore[index]
        return mid @ w, ((rad + g * (mid.abs() + rad)) @ wabs) * (1 + g)
    g = gamma(w.shape[0] * w.shape[2] * w.shape[3] + 2, U64)  # type: ignore[index]
    shape = (mid.shape[0], *layer.out_shape)
    mid4, rad4 = mid.reshape(shape), rad.reshape(shape)
    new_mid = _conv_t(layer, w, mid4)  # type: ignore[arg-type]
    new_rad = _conv_t(layer, wabs, rad4 + g * (mid4.abs() + rad4)) * (1 + g)
    return new_mid.flatten(1), new_rad.flatten(1)


def local_lipschitz(layers: Sequence[Layer], abs_weights: Sequence[torch.Tensor | None],
                    relu_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
    """(B, S) float64 upper bounds of ``sup_{x'∈D} ‖∇(rows · f)(x')‖₂`` for ``rows`` (B, S, C) (e.g.
    ``e_y − e_j``), from the ReLU input bounds ``relu_bounds`` over D (one (lo, hi) per ReLU, in order,
    each (B, *shape)). ``layers``: the float64 network (:func:`.network.walk`)."""
    b, s, c = rows.shape
    relus = [i for i, layer in enumerate(layers) if layer.kind == "relu"]
    if len(relus) != len(relu_bounds):
        raise ValueError(f"{len(relu_bounds)} ReLU bounds for {len(relus)} ReLUs")
    dlo: dict[int, torch.Tensor] = {}
    dhi: dict[int, torch.Tensor] = {}
    for i, (lo, hi) in zip(relus, relu_bounds):
        lo, hi = lo.double().flatten(1), hi.double().flatten(1)
        dlo[i] = (lo >= 0).double()  # the derivative of max(z, 0) on [lo, hi]: 1 if active, 0 if dead
        dhi[i] = (hi > 0).double()  # (anything in [0, 1] where lo < 0 < hi; exactly 0 at z = 0 is inside)
    mid = rows.double().reshape(b * s, c)
    rad = torch.zeros_like(mid)
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if layer.kind in ("linear", "conv"):
            mid, rad = _back_affine(layer, abs_weights[i], mid, rad)  # type: ignore[arg-type]
        elif layer.kind == "relu":
            lo_d = dlo[i].repeat_interleave(s, dim=0)
            hi_d = dhi[i].repeat_interleave(s, dim=0)
            gl, gu = mid - rad, mid + rad
            # [gl, gu]·[lo_d, hi_d] with 0 ≤ lo_d ≤ hi_d ≤ 1: products are exact in float64 (×0 or ×1)
            new_lo = torch.minimum(gl * lo_d, gl * hi_d)
            new_hi = torch.maximum(gu * lo_d, gu * hi_d)
            mid, rad = (new_lo + new_hi) / 2, (new_hi - new_lo) / 2
            rad = rad + 4 * U64 * (mid.abs() + rad)  # the halving and sums above
        elif layer.kind == "normalize":
            std = layer.module.std.double().view(1, -1, 1, 1)  # type: ignore[union-attr]
            shape = (mid.shape[0], *layer.in_shape)
            mid4 = mid.reshape(shape) / std
            rad4 = rad.reshape(shape) / std * (1 + 4 * U64) + 4 * U64 * mid4.abs()
            mid, rad = mid4.flatten(1), rad4.flatten(1)
        # flatten / identity: nothing (rows are kept flat)
    top = torch.maximum((mid - rad).abs(), (mid + rad).abs())
    d = top.shape[1]
    norm = (top.square().sum(1) * (1 + gamma(d + 2, U64))).sqrt() * (1 + 4 * U64)
    return norm.view(b, s)


def magnitudes(layers: Sequence[Layer], x_lo: torch.Tensor, x_hi: torch.Tensor,
               relu_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """Per layer, an upper bound (B, *in_shape) of ``|h|`` at that layer's input over D ⊆ [x_lo, x_hi]:
    interval arithmetic in float64 (radii rounded up), intersected at every ReLU input with
    ``relu_bounds`` where given (bounds valid on D). Only its order of magnitude matters (it scales a
    ~1e-13 relative slack)."""
    lo, hi = x_lo.double(), x_hi.double()
    out: list[torch.Tensor] = []
    bounds = iter(relu_bounds) if relu_bounds is not None else None
    for layer in layers:
        out.append(torch.maximum(lo.abs(), hi.abs()) * (1 + 1e-9) + 1e-300)  # float64 rounding of the intervals
        m = layer.module
        if layer.kind in ("conv", "linear"):
            mid, rad = (lo + hi) / 2, (hi - lo) / 2
            wabs = m.weight.abs()  # type: ignore[union-attr]
            if layer.kind == "conv":
                c = F.conv2d(mid, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)  # type: ignore[arg-type]
                r = F.conv2d(rad + mid.abs() * 1e-12, wabs, None, m.stride, m.padding, m.dilation, m.groups)  # type: ignore[arg-type]
            else:
                c = F.linear(mid, m.weight, m.bias)  # type: ignore[arg-type]
                r = F.linear(rad + mid.abs() * 1e-12, wabs)
            r = r * (1 + 1e-9) + 1e-12 * c.abs()
            lo, hi = c - r, c + r
        elif layer.kind == "relu":
            if bounds is not None:
                blo, bhi = next(bounds)
                lo = torch.maximum(lo, blo.double().reshape(lo.shape))
                hi = torch.minimum(hi, bhi.double().reshape(hi.shape))
                hi = torch.maximum(hi, lo)
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        elif layer.kind == "normalize":  # (h − mean)/std, std > 0: monotone
            lo, hi = m(lo), m(hi)
        elif layer.kind == "flatten":
            lo, hi = lo.flatten(1), hi.flatten(1)
    return out


__all__ = ["local_lipschitz", "magnitudes"]
