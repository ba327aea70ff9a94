"""Interval (IBP) and linear-relaxation (CROWN, CROWN-IBP) bounds for ℓ∞ balls, batched over images.

For inputs ``x`` (B, C, H, W) in [0, 1], a radius ``ε`` and a specification matrix ``C`` (B, S, K)
(rows ``e_y − e_j`` for logit margins), the functions here return lower bounds of ``C f(x')`` over
the box ``B(x, ε) = {x' : ‖x' − x‖∞ ≤ ε} ∩ [0, 1]^d`` (so the input interval is
``[max(x − ε, 0), min(x + ε, 1)]``):

* **IBP** (Gowal et al. 2018): intervals pushed through every layer in centre/radius form; the
  specification is folded into the last linear layer (``C W``, ``C b``: the "elision" of the last
  layer), which is tighter than subtracting logit intervals.
* **CROWN** (Zhang et al. 2018): a backward pass of linear coefficients ``Λ`` through the network,
  each ReLU ``z = max(y, 0)`` with pre-activation bounds ``l < 0 < u`` relaxed by the upper line
  ``z ≤ u (y − l)/(u − l)`` and the adaptive lower line ``z ≥ α y`` (``α = 1`` if ``u ≥ −l``
  else 0); pre-activation bounds are themselves computed layer by layer with the same backward
  pass (for the neurons IBP leaves unstable; the result is intersected with IBP's, and IBP is
  re-propagated from the tightened layer).
  The final ``crown`` bound is the larger of the backward pass and the interval bound pushed
  through the folded last layer from the CROWN-tightened intervals (both sound; the second wins on
  some IBP-trained networks), so CROWN never certifies less than IBP.
* **CROWN-IBP** (Zhang et al. 2020): the CROWN backward pass for the specification only, with the
  IBP pre-activation bounds: the training bound.

``lower_slope="parallel"`` uses ``α = u/(u − l)`` (Fast-Lin; equal to the dual bound of Wong &
Kolter 2018), ``"zero"`` uses ``α = 0``; ``pure=True`` computes every neuron's bounds with the
backward pass, without IBP (the Wong–Kolter/Fast-Lin procedure, for comparison with their code).

Memory. The backward pass holds coefficient rows ``Λ`` of shape (rows, *layer shape): for
intermediate layers one row per unstable neuron (twice: lower and upper), for the specification
K − 1 rows per image. Rows are processed in blocks that fit ``budget_mb`` (default 32 MB on CPU:
blocks that stay in cache). Rows of intermediate neurons that start at a convolution are held
over their receptive field only (:mod:`.patches`: on the Fashion-MNIST 2C2F 256 instead of 3,136
entries at the first ReLU, 100 instead of 784 at the input), without padding images to the same
number of unstable neurons. Otherwise convolutions go backward with a transposed convolution (on
CPU as one stride-1 convolution over the output phases where that is faster); the rows of a
convolution for chosen output neurons are written straight from its kernel (:meth:`Conv.rows`), so
no dense Jacobian of a layer is ever built. Cost and memory of CROWN grow with (unstable neurons) ×
(receptive field or layer): fine for the small CNNs (2C2F/4C3F/6C2F at 28×28 or 32×32); deep or
wide nets need the IBP or CROWN-IBP bound. IBP alone runs in groups of images of the same budget.

Floating-point safety (``sound=True``). A bound must hold for the exact network *and* for its
float32 forward pass, and survive the rounding of its own computation. With ``u = 2⁻²⁴`` and
Higham's ``γ_n = n·u/(1 − n·u)`` (the error of any float sum of ``n`` products, in any order,
relative to the sum of their magnitudes; exact zeros among the products add no rounding, so ``n``
counts the products that can be non-zero):

* every IBP interval is widened by ``(2·γ_fan_in + 8u)/(1 − γ_fan_in)·M``, where ``M = |W|·max(|l|, |u|) + |b|``
  bounds the magnitudes a layer sums (computed, then divided by ``1 − γ_fan_in``: an upper bound of
  the exact value, which every later use of ``M`` as a magnitude relies on): one ``γ`` for our centre/radius products, one for the
  model's own forward pass (so intervals contain the float forward values too); after a ReLU (and
  for the input box) ``max(|l|, |u|) = u``; a per-channel map (Normalize, BatchNorm) maps ``l`` and
  ``u`` elementwise with the same widening (fan-in 2), and ``Normalize(0, 1)`` is the identity, exact
  in the model and here; IBP alone (no backward pass needs ``M``) folds the widening into the radius,
  ``|W|·(rad + rel'·max(|l|, |u|)) + rel'·|b|`` with ``rel' = (rel + 4u)/(1 − γ)`` (one product with ``|W|``
  instead of two; the two extra roundings of the sum are paid by the ``4u``, :func:`.ibp.ibp_affine`);
* each backward affine step subtracts ``(γ_fan_in + γ_fan_out + γ_(C + HW) + 8u)·Σ|Λ|·M``
  (the model's forward rounding seen as an additive perturbation of the layer output, our
  rounding of ``Λ W``, and the per-channel contraction ``Λ·b``); ``fan_out`` counts the products
  summed per input by ``Λ ↦ Λ W`` (a convolution: ``c_out/groups`` times ``⌈k/(s/gcd(s, d))⌉`` taps
  per axis); at the start of an intermediate row (one neuron) ``Λ W`` and ``Λ·b`` are single
  products, so only ``γ_fan_in + 8u``; ``M`` is recomputed from the CROWN-tightened intervals where
  smaller (they contain the exact and the float values alike);
* each ReLU step: the intercept contraction ``Σ min(Λ, 0)·t`` has products of one sign (``t ≥ 0``),
  so its rounding is at most ``γ_n/(1 − γ_n)·|computed sum|``; the rounding of the new coefficients
  ``Λ' = Λ·slope`` (one rounding each: ``≤ 2u·|Λ'|`` times ``|y|``) is charged as ``8u·Σ|Λ'|·M`` with
  the affine step below (``M ≥ |y|`` there), or with ``max(|l|, |u|)`` / ``x_hi`` where none is;
* the concretization is ``Σ Λ⁺·x_lo + Σ Λ⁻·x_hi`` (``x ∈ [0, 1]``: each dot has products of one
  sign), with rounding ``γ_d/(1 − γ_d)·(|dot⁺| + |dot⁻|)``;
* the slack total is multiplied by ``max(1.001, 1.0005/(1 − γ_w))`` (its own dots, of at most ``w``
  terms of one sign, the widest layer, are computed in float32) and the (rows,)-sized running sums
  are accumulated in float64;
* the ReLU upper line uses the rounded slope ``s`` with the intercept
  ``max(−s·l, u·(1 − s))·(1 + 4u)``, so it stays above ``max(y, 0)`` on ``[l, u]``; any lower
  slope in [0, 1] is valid as computed;
* the input box is ``nextafter(fl(x ∓ e), ∓∞)`` with ``e ≥ ε`` the float32 above ε, clipped to [0, 1];
* float64 results are rounded down (lower bounds) or up (upper bounds) to float32 (to the network's
  dtype: a float64 network keeps them).

Arithmetic. ``u`` is the unit roundoff of the network's dtype (:func:`.ibp.arithmetic`, set by
:func:`spec_bounds`): a float64 network (:func:`compile_network64`) with float64 inputs is bounded
with ``u = 2⁻⁵³`` and ε as given, for the real network and its float64 forward pass. The running
sums of the bias are float64 in both modes: against float32's ``u`` their rounding is negligible (inside
the slack factor's margin); with float64's it is charged explicitly, as up to ``ops + 6`` times the
slack (:func:`.crown.slack_factor`, which gives the argument);
:func:`spec_bounds_real` gives the real-network claim at float32 speed (docs/interval.md, "Which
network a bound is about").

On the published Fashion-MNIST model the slack costs 0.012 on average (at most 0.034) on CROWN
margins of order 1 (first 256 test images, ε = 0.1; 0.039 before the one-sign contractions, the
tightened magnitudes and the tap counts), and 0.018 on CROWN-IBP's. ``sound=False`` (training) skips all of it. The
analysis assumes convolutions and matrix products sum float32 products (GEMM, im2col, direct: any
order; the phase form of a transposed convolution and the matrix of a patch sum the same products,
the extra ones exact zeros); FFT or Winograd convolutions (which cuDNN may choose; the phase form is
used on CPU only) and TF32 are not covered: on CUDA the bound computation switches TF32 off (see
:func:`no_tf32`).

Layout. This module holds the drivers (:func:`spec_bounds` and the margin / logit / layer
wrappers), :func:`compile_network` and :func:`specification`; IBP and the shared rounding helpers
are in :mod:`.ibp`, the CROWN backward pass and its row blocking in :mod:`.crown` (over receptive
fields: :mod:`.patches`). Names used
elsewhere (``down32``, ``input_box``, ``Spec``, ``State``, ...) are re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from certaudit.defenses.interval.crown import (
    DEFAULT_BUDGET_MB, State, backward, box_exact, budget_elements, crown_layer, repropagate, spec_backward,
)
from certaudit.defenses.interval.ibp import (
    U32, U64, Spec, arithmetic, down32, down_to, gamma, ibp_step, input_box, nonneg_after, rel_ibp, unit, up32, up_to,
)
from certaudit.defenses.interval.ops import Affine, Channel, Dense, Op, ReLU, _version, compile_model, to_device
from certaudit.errors import InputError

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
LOWER_SLOPES = ("adaptive", "parallel", "zero")


def parse_method(method: str) -> str:
    key = str(method).strip().lower().replace("_", "-")
    key = {"crownibp": "crown-ibp", "interval": "ibp", "alphacrown": "alpha-crown", "α-crown": "alpha-crown",
           "crown-optimized": "alpha-crown"}.get(key, key)
    if key not in METHODS:
        raise InputError(f"unknown bound method {method!r}; choose one of: {', '.join(METHODS)}")
    return key


@contextlib.contextmanager
def no_tf32(device: torch.device) -> Iterator[None]:
    """Switch TF32 off for convolutions and matmuls on CUDA while bounds are computed."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------ drivers

@dataclass
class Network:
    """A compiled model: body ops and the last linear layer (for folding the specification)."""

    body: list[Op]
    last: Dense
    num_classes: int
    input_shape: tuple[int, ...]


def compile_network(model: torch.nn.Module, input_shape: Sequence[int]) -> Network:
    ops = compile_model(model, input_shape)
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    dt = p.dtype if p is not None else torch.float32
    to_device(ops, dev, dt)
    out = ops[-1].out_shape
    if len(out) != 1:
        raise InputError(f"the model must output flat logits (K,), its last layer gives {out}")
    if isinstance(ops[-1], Dense):
        return Network(ops[:-1], ops[-1], out[0], tuple(input_shape))
    k = out[0]
    eye = torch.eye(k, dtype=dt, device=dev)
    return Network(ops, Dense(eye, None, "specification"), k, tuple(input_shape))


def specification(target: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``e_target − e_j`` for all ``j ≠ target``: C (B, K−1, K) and the classes j (B, K−1)."""
    b = target.shape[0]
    classes = torch.arange(k, device=target.device).expand(b, k)
    others = classes[classes != target.view(b, 1)].view(b, k - 1)
    c = torch.zeros(b, k - 1, k, dtype=dtype, device=target.device)
    c.scatter_(2, target.view(b, 1, 1).expand(b, k - 1, 1), 1.0)
    c.scatter_(2, others.unsqueeze(2), -1.0)
    return c, others


def spec_bounds(net: Network, x: torch.Tensor, eps: float | torch.Tensor, c: torch.Tensor, method: str = "crown", *,
                sound: bool = True, lower_slope: str = "adaptive", pure: bool = False, beta: float | None = None,
                budget_mb: float | None = None, return_state: bool = False, alpha=None, norm: str = "linf"):
    """Lower bounds (B, S) of ``C f(x')`` over the clipped ℓ∞ ball (float64 when sound); with
    ``norm="l2"`` over the clipped ℓ2 ball ``B₂(x, ε) ∩ [0, 1]^d`` (IBP from the ℓ∞ box of radius ε,
    which contains it; CROWN concretizes over the ball by the dual norm and over the box, keeping the
    better: docs/degradation.md, "Proofs over the ℓ2 ball").

    ``method``: ``ibp``, ``crown-ibp`` or ``crown``. ``beta`` (CROWN-IBP training): return
    ``β·CROWN-IBP + (1 − β)·IBP`` (both computed only when needed). ``alpha-crown``: CROWN with
    optimized lower slopes (:mod:`.alpha_crown`; ``alpha``: its options), never below ``crown``.

    Arithmetic: a float32 network (the default) is bounded with float32 rounding charged for both the
    bound and the model's forward pass; a float64 network (``model.double()``, with float64 ``x``)
    with float64's: its bound holds for the real-arithmetic network and its float64 forward pass.
    """
    method = parse_method(method)
    dtype = net.last.weight.dtype
    if not isinstance(x, torch.Tensor) or x.dtype != dtype:
        raise InputError(f"x must be a {dtype} tensor for this {dtype} network (compile_network64 for float64), "
                         f"got {getattr(x, 'dtype', type(x).__name__)}")
    with arithmetic(dtype):  # rounding charged at the network's unit roundoff
        return _spec_bounds(net, x, eps, c, method, sound=sound, lower_slope=lower_slope, pure=pure, beta=beta,
                            budget_mb=budget_mb, return_state=return_state, alpha=alpha, norm=norm)


def _spec_bounds(net: Network, x: torch.Tensor, eps, c: torch.Tensor, method: str, *, sound: bool, lower_slope: str,
                 pure: bool, beta: float | None, budget_mb: float | None, return_state: bool, alpha, norm: str):
    if norm not in ("linf", "l2"):
        raise InputError(f"unknown norm {norm!r}; choose linf or l2")
    if norm == "l2" and (method == "alpha-crown" or pure):
        raise InputError("ℓ2 input sets are supported by ibp, crown-ibp and crown (not alpha-crown, not pure)")
    if method == "alpha-crown":
        if pure or beta is not None or lower_slope != "adaptive":
            raise InputError("alpha-crown starts from CROWN's adaptive slopes: no pure, beta or lower_slope")
        from certaudit.defenses.interval.alpha_crown import alpha_spec_bounds  # it calls back for CROWN

        return alpha_spec_bounds(net, x, eps, c, alpha=alpha, sound=sound, budget_mb=budget_mb,
                                 return_state=return_state)
    if lower_slope not in LOWER_SLOPES:
        raise InputError(f"unknown lower slope {lower_slope!r}; choose one of: {', '.join(LOWER_SLOPES)}")
    step = _ibp_images(net, x, budget_mb)
    if method == "ibp" and not return_state:  # IBP alone: images in cache-sized groups, no state kept
        return _ibp_alone(net, x, eps, c, sound, step)
    x_lo, x_hi = input_box(x, eps, sound)
    ops = net.body
    # IBP first, for every method: its intervals seed CROWN (which then tightens them) and its
    # magnitudes bound the rounding slack even of pure backward bounds
    lo, hi, mag = [x_lo], [x_hi], [None]
    nonneg = True  # the input box lies in [0, 1]
    for op in ops:
        l, u, mg = ibp_step(op, lo[-1], hi[-1], sound, nonneg)
        nonneg = nonneg_after(op, nonneg)
        lo.append(l)
        hi.append(u)
        mag.append(mg)
    spec = Spec.fold(net.last, c)
    plain_last = (lo[-1], hi[-1])  # IBP's own last-layer interval (CROWN tightens copies in st)
    st = State(ops, lo, hi, mag, x_lo, x_hi, sound, lower_slope, {})
    if norm == "l2":
        e = eps.to(x.device, torch.float64) if isinstance(eps, torch.Tensor) else torch.tensor(float(eps), device=x.device,
                                                                                                dtype=torch.float64)
        e = e.expand(x.shape[0]).contiguous()
        st.l2_center, st.l2_eps = x.detach(), e * (1 + 2.0 ** -50) if sound else e
    ibp_bound = None
    if method == "ibp" or (beta is not None and beta < 1):
        ibp_bound = spec.ibp(lo[-1], hi[-1], sound)
        if method == "ibp" or beta == 0:
            if return_state and sound:
                st.spec_slack = spec.ibp_slack(lo[-1], hi[-1]) + _ibp_gap(st, spec)
            return (ibp_bound, st) if return_state else ibp_bound
    budget = budget_elements(x.device, budget_mb)
    if method == "crown":
        for k, op in enumerate(ops):
            if not isinstance(op, ReLU):
                continue
            if pure or norm == "l2" or not box_exact(ops, k):  # a ball is not a box: IBP is loose there
                crown_layer(st, k, pure, budget)
                if not pure:
                    repropagate(st, k, sound)
            st.relax.pop(k, None)
    crown = spec_backward(st, spec, budget)
    if method == "crown" and not pure and beta is None:
        # Both are sound lower bounds: keep the better one per row. The interval bound from the
        # CROWN-tightened last-layer interval beats CROWN's backward pass on some IBP-trained
        # networks (the adaptive lower slopes are loose there), and is never worse than plain IBP.
        crown = torch.maximum(crown, spec.ibp(st.lo[-1], st.hi[-1], sound).to(crown.dtype))
        if st.lo[-1] is not plain_last[0] or st.hi[-1] is not plain_last[1]:
            # and never below plain IBP's computed bound on the same box, exactly (not only up to the
            # rounding of spec.ibp on the tightened interval): the degradation proof relies on it
            crown = torch.maximum(crown, spec.ibp(plain_last[0], plain_last[1], sound).to(crown.dtype))
    if beta is not None and ibp_bound is not None:
        crown = beta * crown + (1 - beta) * ibp_bound
    return (crown, st) if return_state else crown


REDO_FACTOR = 2.0  # spec_bounds_real: rows within this many times their rounding slack of 0 are redone


def compile_network64(model: torch.nn.Module, input_shape: Sequence[int]) -> Network:
    """A float64 copy of ``model`` compiled for bounds in float64 arithmetic (the model is not changed)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"compile_network64 needs a torch.nn.Module, got {type(model).__name__}")
    return compile_network(copy.deepcopy(model).double(), input_shape)


def spec_bounds_real(net: Network, net64: Network, x: torch.Tensor, eps: float | torch.Tensor, c: torch.Tensor,
                     method: str = "crown", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bounds (B, S) of ``C f(x')`` over the ℓ∞ ball for the **real-arithmetic** network (the claim
    auto_LiRPA and the papers' verified errors make), and the mask (B,) of the images bounded twice.

    The float32-sound bound of :func:`spec_bounds` holds for the real network too (and for its float32
    forward pass); an image it may leave undecided only by its own rounding (some row ≤ 0, every row > 0
    with twice a selection measure added back: the backward pass's subtracted slack, for IBP the
    widening of every layer, :func:`_ibp_gap`; the tightness, not the soundness, rests on it) is
    bounded again by the same method on ``net64`` (:func:`compile_network64`) in float64 arithmetic,
    where the slack is ~10⁻⁸ of float32's, and each
    row keeps the larger of the two sound bounds. The second bound holds for the real network and its
    float64 forward pass, **not** for the float32 one: use :func:`spec_bounds` for the deployed model.
    """
    method = parse_method(method)
    if method == "alpha-crown" or kw.get("norm", "linf") != "linf" or not kw.get("sound", True):
        raise InputError("real-network bounds: ibp, crown-ibp or crown over the ℓ∞ ball, sound")
    if not (isinstance(net, Network) and isinstance(net64, Network)) or net.last.weight.dtype != torch.float32 \
            or net64.last.weight.dtype != torch.float64 or not _same_network(net, net64):
        raise InputError("spec_bounds_real needs a float32 network and its float64 copy (compile_network64 of the "
                         "same model)")
    per = _check_real_inputs(net, x, eps, c)
    kw.pop("return_state", None)
    if method == "ibp" and kw.get("beta") is None:
        # in cache-sized image groups, no state kept; the measure is an upper bound of the widening's
        # effect (coarse: 3-11x the per-neuron one of _ibp_gap, which is 6-13x the measured gap on the
        # KW models), so it selects without a factor
        with arithmetic(torch.float32):
            low, slack = _ibp_alone(net, x, eps, c, True, _ibp_images(net, x, kw.get("budget_mb")), gap=True)
        factor = 1.0
        maybe = (low.min(1).values <= 0) & ((low + slack) > 0).all(1)
        if bool(maybe.any()):  # the images the coarse measure cannot rule out: the per-neuron one
            idx = maybe.nonzero().flatten()
            _, st = spec_bounds(net, x[idx], eps[idx] if per else eps, c[idx], "ibp", return_state=True, **kw)
            slack = slack.clone()
            slack[idx] = torch.minimum(slack[idx], st.spec_slack)
            del st
    else:
        low, st = spec_bounds(net, x, eps, c, method, return_state=True, **kw)
        slack, factor = st.spec_slack, REDO_FACTOR
        del st
    if slack is None:
        redo = low.min(1).values <= 0
    else:
        # CROWN-IBP / CROWN: the widened intervals loosen the relaxations as well (not part of the
        # subtracted slack: 1.3x the slack in all on image 237 of the KW Fashion-MNIST model); twice
        # the slack selects the candidates
        redo = (low.min(1).values <= 0) & ((low + factor * slack) > 0).all(1)
    if bool(redo.any()):
        idx = redo.nonzero().flatten()
        e = eps[idx] if per else eps
        again = spec_bounds(net64, x[idx].double(), e, c[idx].double(), method, **kw)
        low = low.clone()
        low[idx] = torch.maximum(low[idx], again.to(low.dtype))
    return low, redo


def _ibp_alone(net: Network, x: torch.Tensor, eps, c: torch.Tensor, sound: bool, step: int, gap: bool = False):
    """IBP's specification bound (B, S) in groups of ``step`` images, keeping only the current interval
    and no magnitudes (one product with ``|W|`` per layer, :func:`.ibp.ibp_affine`). ``gap=True``
    (sound): also a coarse upper bound (B, S) of :func:`_ibp_gap` plus the last layer's slack, from
    scalars per image: ``G ← R·(G + rel'·max|z|) + rel'·max|b|`` with ``R`` the largest row sum of
    ``|W|`` (it bounds the per-neuron propagation of :func:`_gap_step` from above)."""
    per = isinstance(eps, torch.Tensor) and eps.dim() > 0
    spec = Spec.fold(net.last, c)
    outs, gaps = [], []
    for i in range(0, x.shape[0], step):
        sl = slice(i, i + step)
        l, u = input_box(x[sl], eps[sl] if per else eps, sound)
        nonneg = True
        g = torch.full((l.shape[0],), 4 * unit(), dtype=torch.float64, device=l.device) if gap else None
        for op in net.body:
            if gap and isinstance(op, Affine) and not (isinstance(op, Channel) and op.identity):
                zm = u.flatten(1).amax(1) if nonneg else torch.maximum(u.flatten(1).amax(1), -l.flatten(1).amin(1))
                zm = zm.double().clamp(min=0)
                r, bmax = _abs_row_max(op)
                rel = rel_ibp(op) + 8 * unit()  # the folded widening: (rel + 4u)·M and 4u·|W|·rad
                g = r * (g + rel * zm) + rel * bmax
            l, u, _ = ibp_step(op, l, u, sound, nonneg, need_mag=False)
            nonneg = nonneg_after(op, nonneg)
        s = spec.rows(sl)
        outs.append(s.ibp(l, u, sound))
        if gap:
            gaps.append(s.ibp_slack(l, u) + g.view(-1, 1) * s.abs_weight.sum(2).double())
    low = outs[0] if len(outs) == 1 else torch.cat(outs)
    if not gap:
        return low
    return low, (gaps[0] if len(gaps) == 1 else torch.cat(gaps))


def _abs_rowsum(op: Affine, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``|W|·1`` per output neuron (1, *out), cached on the op while its weight is unchanged in place."""
    w = getattr(op, "weight", None)
    key = (dtype, device, None if w is None else (id(w), _version(w)))
    cached = getattr(op, "_abs_rowsum", None)
    if cached is None or cached[0] != key:
        cached = (key, op.forward_abs(torch.ones((1, *op.in_shape), dtype=dtype, device=device)))
        op._abs_rowsum = cached
    return cached[1]


def _abs_row_max(op: Affine) -> tuple[float, float]:
    """The largest row sum of ``|W|`` and the largest ``|b|`` (a Channel: ``|scale|`` and its magnitudes)."""
    dtype, device = (op.weight.dtype, op.weight.device) if isinstance(getattr(op, "weight", None), torch.Tensor) \
        else (op.scale.dtype, op.scale.device)
    ab = op.abs_bias()
    return float(_abs_rowsum(op, dtype, device).max()), 0.0 if ab is None else float(ab.abs().max())


def _gap_step(op: Affine, g: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """One affine op of :func:`_ibp_gap`'s propagation: ``max(g)·(|W|·1) + (rel + 8u)·M`` (B, *out): the
    folded widening is ``(rel + 4u)·M`` plus the ``4u·|W|·rad`` of the rounded-up radius."""
    rows = _abs_rowsum(op, mag.dtype, mag.device)
    gmax = g.flatten(1).amax(1) if g.dim() > 1 else g
    return torch.addcmul((rel_ibp(op) + 8 * unit()) * mag, gmax.view(-1, *([1] * len(op.out_shape))), rows)


def _same_network(net: Network, net64: Network) -> bool:
    """Whether ``net64`` holds exactly ``net``'s ops and parameters (in float64); remembered on ``net64``
    together with the in-place version of every parameter of both, so a weight changed in place since
    (``net`` reads the model's parameters live, ``net64`` is a copy) is compared again."""
    key = (id(net), _versions(net), _versions(net64))
    if getattr(net64, "_checked", None) == key:
        return True
    if _compare_networks(net, net64):
        net64._checked = key
        return True
    return False


def _versions(net: Network) -> tuple:
    out = []
    for op in net.body + [net.last]:
        for name in ("weight", "bias", "scale", "shift"):
            t = getattr(op, name, None)
            if isinstance(t, torch.Tensor):
                out.append((id(t), _version(t)))
    return tuple(out)


def _compare_networks(net: Network, net64: Network) -> bool:
    ops, ops64 = net.body + [net.last], net64.body + [net64.last]
    if len(ops) != len(ops64) or net.input_shape != net64.input_shape:
        return False
    for a, b in zip(ops, ops64):
        if type(a) is not type(b) or a.in_shape != b.in_shape or a.out_shape != b.out_shape:
            return False
        for name in ("weight", "bias", "scale", "shift"):
            ta, tb = getattr(a, name, None), getattr(b, name, None)
            if (ta is None) != (tb is None):
                return False
            if ta is None:
                continue
            ta, tb = ta.detach().double(), tb.detach()
            if ta.shape != tb.shape:
                return False
            # weights are the same numbers; a per-channel map's scale and shift are computed from the
            # statistics (1/std, −mean/std) in each dtype: equal up to float32 rounding
            same = torch.equal(ta, tb) if name in ("weight", "bias") else torch.allclose(ta, tb, rtol=1e-6, atol=1e-7)
            if not same:
                return False
    return True


def _check_real_inputs(net: Network, x, eps, c) -> bool:
    """Clear errors for :func:`spec_bounds_real`'s inputs; whether ε is per image."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or tuple(x.shape[1:]) != net.input_shape \
            or x.shape[0] == 0:
        raise InputError(f"x must be a non-empty float32 batch of shape (B, {', '.join(map(str, net.input_shape))}), "
                         f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    lo, hi = torch.aminmax(x)  # one pass; NaN fails both comparisons
    if not (bool(lo >= 0) and bool(hi <= 1)):
        raise InputError("x must be finite and in [0, 1]")
    if not isinstance(c, torch.Tensor) or c.dtype != torch.float32 or c.dim() != 3 or c.shape[0] != x.shape[0] \
            or c.shape[2] != net.num_classes or not bool(torch.isfinite(c).all()):
        raise InputError(f"C must be a finite float32 (B, S, {net.num_classes}) specification for the {x.shape[0]} "
                         f"images, got {getattr(c, 'dtype', type(c).__name__)} {tuple(getattr(c, 'shape', ()))}")
    e = eps if isinstance(eps, torch.Tensor) else torch.tensor(float(eps), dtype=torch.float64)
    per = e.dim() > 0
    if per and tuple(e.shape) != (x.shape[0],):
        raise InputError(f"a per-image ε must have shape ({x.shape[0]},), got {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e <= 0).any()):
        raise InputError("ε must be finite and > 0")
    return per


def _ibp_gap(st: State, spec: Spec) -> torch.Tensor:
    """How far (B, S), at most, the widening of sound IBP's intervals moves the specification's bound
    (in exact arithmetic; :func:`spec_bounds_real` selects images by it, soundness never rests on it).

    ``g`` bounds ``max(|Δl|, |Δu|)`` per image: each affine op adds its widening ``(rel + 8u)·M`` to
    ``|W|·g ≤ max(g)·(|W|·1)``; a ReLU and a reshape pass it on; the input box starts it at ``4u``
    (the outward rounding). A scalar per image in the propagation keeps it to elementwise work."""
    g = torch.full((st.x_lo.shape[0],), 4 * unit(), dtype=st.x_lo.dtype, device=st.x_lo.device)
    for i, op in enumerate(st.ops):
        if st.mag[i + 1] is not None and isinstance(op, Affine) and not (isinstance(op, Channel) and op.identity):
            g = _gap_step(op, g, st.mag[i + 1])
    g = g if g.dim() > 1 else g.view(-1, 1).expand(-1, st.lo[-1][0].numel())
    return torch.einsum("bsn,bn->bs", spec.abs_weight, g.flatten(1)).double()


def _ibp_images(net: Network, x: torch.Tensor, budget_mb: float | None) -> int:
    """Images per group for IBP alone: a quarter of the row budget's elements per image's widest layer
    (64 of the Fashion-MNIST 2C2F at the default budget), groups of equal size."""
    width = max([math.prod(net.input_shape)] + [op.out_size for op in net.body])
    cap = max(1, budget_elements(x.device, budget_mb) // (4 * width))
    groups = -(-x.shape[0] // cap)
    return -(-x.shape[0] // max(1, groups))


# ---------------------------------------------------------------------------- convenience API

def margin_bounds(net: Network, x: torch.Tensor, eps: float | torch.Tensor, target: torch.Tensor,
                  method: str = "crown", **kw) -> torch.Tensor:
    """(B, K) lower bounds of ``f_target − f_j`` over the ball; ``+inf`` in the target's column."""
    k = net.num_classes
    c, others = specification(target, k, x.dtype)
    low = spec_bounds(net, x, eps, c, method, **kw)
    full = torch.full((x.shape[0], k), math.inf, dtype=low.dtype, device=x.device)
    return full.scatter(1, others, low)


def logit_bounds(net: Network, x: torch.Tensor, eps: float | torch.Tensor, method: str = "crown",
                 **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds (B, K) of every logit over the ball (specification ``±e_k``)."""
    k = net.num_classes
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    c = torch.cat([eye, -eye]).expand(x.shape[0], 2 * k, k)
    low = spec_bounds(net, x, eps, c, method, **kw)
    lower, upper = low[:, :k], -low[:, k:]
    if kw.get("sound", True):
        return down_to(lower, x.dtype), up_to(upper, x.dtype)
    return lower, upper


def layer_bounds(net: Network, x: torch.Tensor, eps: float | torch.Tensor, method: str = "crown",
                 **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds (lower, upper) at every ReLU input, as the method computes them."""
    k = net.num_classes
    c, _ = specification(torch.zeros(x.shape[0], dtype=torch.long, device=x.device), k, x.dtype)
    _, st = spec_bounds(net, x, eps, c, method, return_state=True, **kw)
    return [(st.lo[i], st.hi[i]) for i, op in enumerate(st.ops) if isinstance(op, ReLU)]


__all__ = [
    "METHODS", "LOWER_SLOPES", "Network", "compile_network", "specification", "spec_bounds", "margin_bounds",
    "logit_bounds", "layer_bounds", "compile_network64", "spec_bounds_real", "parse_method", "no_tf32",
    # re-exported from .ibp and .crown
    "U32", "U64", "unit", "arithmetic", "gamma", "down32", "up32", "input_box", "ibp_step", "Spec", "State", "backward",
    "DEFAULT_BUDGET_MB",
]
