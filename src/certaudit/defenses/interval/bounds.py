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
K − 1 rows per image. Rows are processed in blocks that fit ``budget_mb``. Convolutions go
backward with ``conv_transpose2d``; the rows of a convolution for chosen output neurons are
written straight from its kernel (:meth:`Conv.rows`), so no dense Jacobian is ever built. Cost
and memory of CROWN grow with (unstable neurons) × (largest layer): fine for the small CNNs
(2C2F/4C3F/6C2F at 28×28 or 32×32); deep or wide nets need the IBP or CROWN-IBP bound.

Floating-point safety (``sound=True``). A bound must hold for the exact network *and* for its
float32 forward pass, and survive the rounding of its own computation. With ``u = 2⁻²⁴`` and
Higham's ``γ_n = n·u/(1 − n·u)`` (the error of any float sum of ``n`` products, in any order,
relative to the sum of their magnitudes):

* every IBP interval is widened by ``(2·γ_fan_in + 8u)·M``, where ``M = |W|·max(|l|, |u|) + |b|``
  bounds the magnitudes a layer sums: one ``γ`` for our centre/radius products, one for the
  model's own forward pass (so intervals contain the float forward values too);
* each backward affine step subtracts ``(γ_fan_in + γ_fan_out + γ_(C + HW) + 8u)·Σ|Λ|·M``
  (the model's forward rounding seen as an additive perturbation of the layer output, our
  rounding of ``Λ W``, and the per-channel contraction ``Λ·b``); each ReLU step
  ``(γ_n + 8u)·Σ|Λ|·max(|l|, |u|)`` (the contraction with the intercepts over the ``n`` neurons);
  the concretization ``(γ_d + 8u)·Σ|Λ|·x_hi``; the slack total is multiplied by 1.001 (it is
  itself computed in float32) and the (rows,)-sized running sums are accumulated in float64;
* the ReLU upper line uses the rounded slope ``s`` with the intercept
  ``max(−s·l, u·(1 − s))·(1 + 4u)``, so it stays above ``max(y, 0)`` on ``[l, u]``; any lower
  slope in [0, 1] is valid as computed;
* the input box is rounded outward (``nextafter``) before clipping to [0, 1];
* float64 results are rounded down (lower bounds) or up (upper bounds) to float32.

On the published Fashion-MNIST model the slack costs about 0.016 on margins of order 1 (CROWN).
``sound=False`` (training) skips all of it. The analysis assumes convolutions and matrix
products sum float32 products (GEMM, im2col, direct: any order); FFT or Winograd convolutions
(which cuDNN may choose) and TF32 are not covered: on CUDA the bound computation switches TF32 off
(see :func:`no_tf32`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from certaudit.defenses.interval.ops import Affine, Channel, Dense, Op, ReLU, Reshape, compile_model, to_device
from certaudit.errors import InputError

METHODS = ("ibp", "crown-ibp", "crown")
LOWER_SLOPES = ("adaptive", "parallel", "zero")

U32 = 2.0 ** -24  # unit roundoff of float32
EXTRA = 8  # a few more roundings per step (bias, subtraction, constants of Normalize / BatchNorm)
SLACK_FACTOR = 1.001  # the slack is itself computed in float32
TINY = 1e-30  # absolute slack per step (underflow)
DEFAULT_BUDGET_MB = 256  # CPU; on CUDA a quarter of the free memory


def gamma(n: int) -> float:
    """Higham's γ_n = n·u/(1 − n·u): |fl(Σ of n products) − Σ| ≤ γ_n·Σ|products|, any order."""
    nu = n * U32
    return nu / (1 - nu)


def rel_ibp(op: Affine) -> float:
    """Interval widening per unit of magnitude: our centre and radius (γ_fan_in), the model's own
    forward pass (γ_fan_in), and the few roundings of mid/rad/constants."""
    return 2 * gamma(op.fan_in) + EXTRA * U32


def rel_back(op: Affine) -> float:
    """Backward affine step: ``Λ W`` (γ_fan_out), the model's forward (γ_fan_in), ``Λ·b``."""
    c = op.out_shape[0]
    return gamma(op.fan_in) + gamma(op.fan_out) + gamma(c + op.out_size // c) + EXTRA * U32


def rel_sum(n: int) -> float:
    """A float32 contraction of length ``n`` (ReLU intercepts, concretization) plus elementwise roundings."""
    return gamma(n) + EXTRA * U32


def parse_method(method: str) -> str:
    key = str(method).strip().lower().replace("_", "-")
    key = {"crownibp": "crown-ibp", "interval": "ibp"}.get(key, key)
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


def down32(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 not above it."""
    f = v.float()
    return torch.where(f.double() > v, torch.nextafter(f, torch.full_like(f, -math.inf)), f)


def up32(v: torch.Tensor) -> torch.Tensor:
    f = v.float()
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def input_box(x: torch.Tensor, eps: float | torch.Tensor, sound: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max(x − ε, 0), min(x + ε, 1)]``, rounded outward when ``sound``; ε a float or (B,)."""
    if isinstance(eps, torch.Tensor):
        e = eps.to(device=x.device, dtype=torch.float64).view(-1, *([1] * (x.dim() - 1)))
    else:
        e = float(eps)
    if not sound:
        e32 = e.to(x.dtype) if isinstance(e, torch.Tensor) else e
        return (x - e32).clamp(0.0, 1.0), (x + e32).clamp(0.0, 1.0)
    with torch.no_grad():
        xd = x.detach().double()
        lo = (xd - e).to(x.dtype)
        hi = (xd + e).to(x.dtype)
        lo = torch.nextafter(lo, torch.full_like(lo, -math.inf)).clamp(0.0, 1.0)
        hi = torch.nextafter(hi, torch.full_like(hi, math.inf)).clamp(0.0, 1.0)
    if x.requires_grad:  # the value stays the rounded one; the gradient is that of clamp(x ± ε)
        shift = x - x.detach()  # exactly zero, carries d/dx
        lo = lo + shift * (lo > 0).to(x.dtype)
        hi = hi + shift * (hi < 1).to(x.dtype)
    return lo, hi


# ------------------------------------------------------------------------------------------- IBP

def ibp_affine(op: Affine, l: torch.Tensor, u: torch.Tensor, sound: bool):
    """One affine layer in centre/radius form; returns (lower, upper, magnitude bound or None)."""
    mid = (u + l) / 2
    if sound:
        rad = torch.maximum(u - mid, mid - l) * (1 + 4 * U32)
        zmax = torch.maximum(l.abs(), u.abs())
        n = rad.shape[0]
        both = op.forward_abs(torch.cat([rad, zmax]))
        r, mag = both[:n], both[n:]
        ab = op.abs_bias()
        if ab is not None:
            mag = mag + ab
        c = op.forward(mid)
        s = rel_ibp(op) * mag + TINY
        return c - r - s, c + r + s, mag.detach()
    rad = (u - l) / 2
    c, r = op.forward(mid), op.forward_abs(rad)
    return c - r, c + r, None


def ibp_step(op: Op, l: torch.Tensor, u: torch.Tensor, sound: bool):
    if isinstance(op, ReLU):
        return l.clamp(min=0), u.clamp(min=0), None
    if isinstance(op, Reshape):
        return op.forward(l), op.forward(u), None
    return ibp_affine(op, l, u, sound)


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
                   rel=2 * gamma(last.fan_in) + gamma(w.shape[0]) + EXTRA * U32)

    def ibp(self, l: torch.Tensor, u: torch.Tensor, sound: bool) -> torch.Tensor:
        """Lower bound of the specification from the interval of the last layer's input (B, n)."""
        mid = (u + l) / 2
        rad = (u - l) / 2
        if sound:
            rad = torch.maximum(u - mid, mid - l) * (1 + 4 * U32)
        c = torch.einsum("bsn,bn->bs", self.weight, mid) + self.bias
        r = torch.einsum("bsn,bn->bs", self.weight.abs(), rad)
        if not sound:
            return c - r
        zmax = torch.maximum(l.abs(), u.abs())
        mag = torch.einsum("bsn,bn->bs", self.abs_weight, zmax) + self.abs_bias
        return (c - r).double() - (self.rel * mag.detach().double() + TINY)


# ------------------------------------------------------------------------------ backward (CROWN)

@dataclass
class State:
    """Per-image bounds at every position (position p = input of op p) and ReLU relaxations."""

    ops: list[Op]
    lo: list[torch.Tensor]
    hi: list[torch.Tensor]
    mag: list[torch.Tensor | None]  # |values| bound at affine outputs (sound mode)
    x_lo: torch.Tensor
    x_hi: torch.Tensor
    sound: bool
    lower_slope: str
    relax: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    x_mid: torch.Tensor | None = None
    x_rad: torch.Tensor | None = None

    def __post_init__(self):
        # the box as centre ± radius, the radius rounded up so that it still covers [x_lo, x_hi]
        self.x_mid = (self.x_lo + self.x_hi) / 2
        rad = torch.maximum(self.x_hi - self.x_mid, self.x_mid - self.x_lo)
        self.x_rad = rad * (1 + 4 * U32) if self.sound else rad

    def relaxation(self, i: int):
        """(lower slope, upper slope, upper intercept) of ReLU op ``i``, from bounds at position ``i``."""
        if i not in self.relax:
            self.relax[i] = _relax(self.lo[i], self.hi[i], self.lower_slope, self.sound)
        return self.relax[i]


def _relax(l: torch.Tensor, u: torch.Tensor, lower_slope: str, sound: bool):
    unstable = (l < 0) & (u > 0)
    active = (l >= 0).to(l.dtype)
    width = torch.where(unstable, u - l, torch.ones_like(l))
    s = torch.where(unstable, u / width, active)
    if sound:
        t = torch.maximum(-s * l, u * (1 - s)) * (1 + 4 * U32)
    else:
        t = -s * l
    t = torch.where(unstable, t, torch.zeros_like(t))
    if lower_slope == "adaptive":
        a = torch.where(unstable, (u >= -l).to(l.dtype), active)
    elif lower_slope == "parallel":
        a = s
    else:
        a = torch.where(unstable, torch.zeros_like(l), active)
    return a, s, t


def _dot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ over the trailing dims of ``a`` (G, S, *shape) times ``v`` (G, *shape): (G, S), one bmm."""
    g, s = a.shape[0], a.shape[1]
    return torch.bmm(a.reshape(g, s, -1), v.reshape(v.shape[0], -1, 1).expand(g, -1, 1)).squeeze(2)


def _channel_bias(op: Affine) -> tuple[torch.Tensor | None, int]:
    """The bias as one value per output channel (C,) and the neurons per channel."""
    b = op.bias_full()
    if b is None:
        return None, 1
    c = op.out_shape[0]
    return b.reshape(c), op.out_size // c


def backward(st: State, k: int, a: torch.Tensor, g: slice, bias: torch.Tensor,
             slack: torch.Tensor | None) -> torch.Tensor:
    """Lower bound of ``Λ·z_k + bias`` over the input box, ``Λ = a`` (G, S, *shape_k) for images ``g``.

    Walks ops ``k−1 … 0`` backward (CROWN), then concretizes over the box. Returns (G, S) in the
    dtype of ``bias`` (float64 when sound), minus the floating-point slack when ``slack`` is given.
    Contractions over a layer are float32 batched matmuls; their sum length enters the slack.
    """
    gn, sn = a.shape[0], a.shape[1]
    acc = bias.dtype
    for i in range(k - 1, -1, -1):
        op = st.ops[i]
        if isinstance(op, ReLU):
            lo_s, up_s, icpt = st.relaxation(i)
            if slack is not None:
                ymax = torch.maximum(st.lo[i][g].abs(), st.hi[i][g].abs())
                slack = slack + rel_sum(op.out_size) * _dot(a.detach().abs(), ymax).double()
            bias = bias + _dot(a.clamp(max=0), icpt[g]).to(acc)
            a = a * torch.where(a < 0, up_s[g].unsqueeze(1), lo_s[g].unsqueeze(1))
        elif isinstance(op, Reshape):
            a = a.reshape(gn, sn, *op.in_shape)
        else:
            assert isinstance(op, Affine)
            b, per = _channel_bias(op)
            if slack is not None:
                slack = slack + rel_back(op) * _dot(a.detach().abs(), st.mag[i + 1][g]).double()
            if b is not None:
                bias = bias + (a.reshape(gn * sn, b.shape[0], per).sum(2) @ b).view(gn, sn).to(acc)
            a = op.backward(a.reshape(gn * sn, *op.out_shape)).reshape(gn, sn, *op.in_shape)
    mid, rad = st.x_mid[g], st.x_rad[g]
    a_abs = a.abs()
    bound = bias + (_dot(a, mid) - _dot(a_abs, rad)).to(acc)
    if slack is not None:
        slack = slack + rel_sum(math.prod(a.shape[2:])) * _dot(a_abs.detach(), (mid + rad).detach()).double() + TINY
        bound = bound - SLACK_FACTOR * slack
    return bound


def _max_width(ops: Sequence[Op], k: int) -> int:
    sizes = [ops[0].in_size] + [op.out_size for op in ops[:k]]
    return max(sizes)


def _blocks(n_img: int, n_rows: int, width: int, budget_elems: int) -> list[tuple[slice, slice]]:
    """(image slice, row slice) blocks with images × rows × width ≤ budget (at least one row):
    whole images when one fits, else row blocks of one image at a time (image-major order)."""
    per_img = max(1, n_rows * width)
    if per_img <= budget_elems:
        g = max(1, budget_elems // per_img)
        return [(slice(g0, min(n_img, g0 + g)), slice(0, n_rows)) for g0 in range(0, n_img, g)]
    r = max(1, budget_elems // max(1, width))
    return [(slice(g0, g0 + 1), slice(r0, min(n_rows, r0 + r))) for g0 in range(n_img) for r0 in range(0, n_rows, r)]


def _assemble(parts: list[torch.Tensor], blocks: list[tuple[slice, slice]]) -> torch.Tensor:
    """Reassemble block results (image-major, as :func:`_blocks` yields them) into (B, rows)."""
    if len(parts) == 1:
        return parts[0]
    if all(r.start == 0 for _, r in blocks) and len({r.stop for _, r in blocks}) == 1:
        return torch.cat(parts, dim=0)
    per_img: list[list[torch.Tensor]] = []
    last = None
    for (g, _), p in zip(blocks, parts):
        if g.start != last:
            per_img.append([])
            last = g.start
        per_img[-1].append(p)
    return torch.cat([torch.cat(ps, dim=1) for ps in per_img], dim=0)


def _start_rows(st: State, k: int, idx: torch.Tensor, coef: torch.Tensor, g: slice, acc: torch.dtype):
    """Coefficients of the neurons ``idx`` (G, m) at position ``k``, walked down through the diagonal
    ops and the first affine op: returns (position q, Λ (G, m, *shape_q), bias, slack)."""
    gn, m = idx.shape
    bias = torch.zeros(gn, m, dtype=acc, device=idx.device)
    slack = torch.zeros(gn, m, dtype=torch.float64, device=idx.device) if st.sound else None
    i = k - 1
    while i >= 0:
        op = st.ops[i]
        if isinstance(op, Reshape):
            i -= 1
            continue
        if isinstance(op, ReLU):
            break
        mag = None
        if slack is not None:
            mag = st.mag[i + 1][g].flatten(1).gather(1, idx)
            slack = slack + rel_back(op) * (coef.detach().abs() * mag).double()
        if isinstance(op, Channel):
            ch = op.channel_of(idx)
            bias = bias + (coef * op.shift.flatten()[ch]).to(acc)
            coef = coef * op.scale.flatten()[ch]
            i -= 1
            continue
        rows, b = op.rows(idx.flatten())
        if b is not None:
            bias = bias + (coef * b.view(gn, m)).to(acc)
        a = rows.reshape(gn, m, *op.in_shape) * coef.view(gn, m, *([1] * len(op.in_shape)))
        return i, a, bias, slack
    pos = i + 1  # one-hot rows at position pos (only diagonal ops between pos and k)
    n = math.prod(st.lo[pos].shape[1:])
    a = torch.zeros(gn, m, n, dtype=coef.dtype, device=idx.device)
    a = a.scatter(2, idx.unsqueeze(2), coef.unsqueeze(2))
    return pos, a.reshape(gn, m, *st.lo[pos].shape[1:]), bias, slack


def _box_exact(ops: Sequence[Op], k: int) -> bool:
    """IBP is already tight at position ``k`` when the ops before it are diagonal maps plus at most
    one general affine map (a box maps to the exact bounding box)."""
    general = 0
    for op in ops[:k]:
        if isinstance(op, ReLU):
            return False
        if isinstance(op, Affine) and not op.diagonal:
            general += 1
    return general <= 1


def _crown_layer(st: State, k: int, pure: bool, budget_elems: int) -> None:
    """Tighten the bounds at position ``k`` (a ReLU input) with the backward pass."""
    lo, hi = st.lo[k], st.hi[k]
    bsz = lo.shape[0]
    shape = lo.shape[1:]
    n = math.prod(shape)
    lf, hf = lo.flatten(1), hi.flatten(1)
    if pure:
        idx_all = torch.arange(n, device=lo.device).expand(bsz, n)
        valid_all = torch.ones(bsz, n, dtype=torch.bool, device=lo.device)
    else:
        mask = (lf < 0) & (hf > 0)
        counts = mask.sum(1)
        m = int(counts.max()) if bsz else 0
        if m == 0:
            return
        order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
        valid_all = torch.arange(m, device=lo.device).view(1, m) < counts.view(bsz, 1)
        idx_all = torch.where(valid_all, order, torch.zeros_like(order))
    m = idx_all.shape[1]
    width = _max_width(st.ops, k)
    acc = torch.float64 if st.sound else lo.dtype
    blocks = _blocks(bsz, m, 2 * width, budget_elems)
    parts_lo, parts_hi = [], []
    for g, r in blocks:
        idx = idx_all[g, r]
        coef = valid_all[g, r].to(lo.dtype)
        q, a, bias, slack = _start_rows(st, k, idx, coef, g, acc)
        a2 = torch.cat([a, -a], dim=1)  # lower bounds of +z_j and of -z_j
        bias2 = torch.cat([bias, -bias], dim=1)
        slack2 = None if slack is None else torch.cat([slack, slack], dim=1)
        out = backward(st, q, a2, g, bias2, slack2)
        mm = idx.shape[1]
        parts_lo.append(out[:, :mm])
        parts_hi.append(-out[:, mm:])
    new_lo, new_hi = _assemble(parts_lo, blocks), _assemble(parts_hi, blocks)
    if st.sound:
        new_lo, new_hi = down32(new_lo), up32(new_hi)
    else:
        new_lo, new_hi = new_lo.to(lo.dtype), new_hi.to(lo.dtype)
    if pure:
        st.lo[k], st.hi[k] = new_lo.reshape(bsz, *shape), new_hi.reshape(bsz, *shape)
        return
    # scatter into a dummy column for padded rows, then intersect with the current bounds
    dummy = torch.full_like(idx_all, n)
    sidx = torch.where(valid_all, idx_all, dummy)
    pad = torch.zeros(bsz, 1, dtype=lo.dtype, device=lo.device)
    cur_lo = torch.cat([lf, pad], 1).gather(1, sidx)
    cur_hi = torch.cat([hf, pad], 1).gather(1, sidx)
    lf2 = torch.cat([lf, pad], 1).scatter(1, sidx, torch.maximum(cur_lo, new_lo))[:, :n]
    hf2 = torch.cat([hf, pad], 1).scatter(1, sidx, torch.minimum(cur_hi, new_hi))[:, :n]
    hf2 = torch.maximum(hf2, lf2)  # rounding can only cross them on an exactly-known neuron
    st.lo[k], st.hi[k] = lf2.reshape(bsz, *shape), hf2.reshape(bsz, *shape)


def _budget_elems(device: torch.device, budget_mb: float | None) -> int:
    if budget_mb is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free / 4
        else:
            budget = DEFAULT_BUDGET_MB * 2**20
    else:
        budget = float(budget_mb) * 2**20
    return max(1, int(budget // (4 * 8)))  # Λ, its parts, gathered relaxations, float64 partial sums


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
                budget_mb: float | None = None, return_state: bool = False):
    """Lower bounds (B, S) of ``C f(x')`` over the clipped ℓ∞ ball (float64 when sound).

    ``method``: ``ibp``, ``crown-ibp`` or ``crown``. ``beta`` (CROWN-IBP training): return
    ``β·CROWN-IBP + (1 − β)·IBP`` (both computed only when needed).
    """
    method = parse_method(method)
    if lower_slope not in LOWER_SLOPES:
        raise InputError(f"unknown lower slope {lower_slope!r}; choose one of: {', '.join(LOWER_SLOPES)}")
    x_lo, x_hi = input_box(x, eps, sound)
    ops = net.body
    # IBP first, for every method: its intervals seed CROWN (which then tightens them) and its
    # magnitudes bound the rounding slack even of pure backward bounds
    lo, hi, mag = [x_lo], [x_hi], [None]
    for op in ops:
        l, u, mg = ibp_step(op, lo[-1], hi[-1], sound)
        lo.append(l)
        hi.append(u)
        mag.append(mg)
    spec = Spec.fold(net.last, c)
    plain_last = (lo[-1], hi[-1])  # IBP's own last-layer interval (CROWN tightens copies in st)
    st = State(ops, lo, hi, mag, x_lo, x_hi, sound, lower_slope, {})
    ibp_bound = None
    if method == "ibp" or (beta is not None and beta < 1):
        ibp_bound = spec.ibp(lo[-1], hi[-1], sound)
        if method == "ibp" or beta == 0:
            return (ibp_bound, st) if return_state else ibp_bound
    budget = _budget_elems(x.device, budget_mb)
    if method == "crown":
        for k, op in enumerate(ops):
            if not isinstance(op, ReLU):
                continue
            if pure or not _box_exact(ops, k):
                _crown_layer(st, k, pure, budget)
                if not pure:
                    _repropagate(st, k, sound)
            st.relax.pop(k, None)
    crown = _spec_backward(st, spec, budget)
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


def _repropagate(st: State, k: int, sound: bool) -> None:
    """IBP from the tightened position ``k`` up to the next ReLU input, intersected with the old bounds."""
    l, u = st.lo[k], st.hi[k]
    for i in range(k, len(st.ops)):
        l, u, _ = ibp_step(st.ops[i], l, u, sound)
        l, u = torch.maximum(l, st.lo[i + 1]), torch.minimum(u, st.hi[i + 1])
        u = torch.maximum(u, l)
        st.lo[i + 1], st.hi[i + 1] = l, u
        if i + 1 < len(st.ops) and isinstance(st.ops[i + 1], ReLU):
            break


def _spec_backward(st: State, spec: Spec, budget_elems: int) -> torch.Tensor:
    bsz, s, n = spec.weight.shape
    k = len(st.ops)
    shape = st.lo[k].shape[1:]
    acc = torch.float64 if st.sound else spec.weight.dtype
    width = _max_width(st.ops, k)
    outs = []
    blocks = _blocks(bsz, s, width, budget_elems)
    for g, r in blocks:
        a = spec.weight[g, r].reshape(-1, r.stop - r.start, *shape)
        bias = spec.bias[g, r].to(acc)
        slack = None
        if st.sound:
            zmax = torch.maximum(st.lo[k][g].abs(), st.hi[k][g].abs()).flatten(1)
            mag = torch.einsum("bsn,bn->bs", spec.abs_weight[g, r], zmax.detach()) + spec.abs_bias[g, r]
            slack = spec.rel * mag.double()
        outs.append(backward(st, k, a, g, bias, slack))
    return _assemble(outs, blocks)


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
        return down32(lower), up32(upper)
    return lower, upper


def layer_bounds(net: Network, x: torch.Tensor, eps: float | torch.Tensor, method: str = "crown",
                 **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds (lower, upper) at every ReLU input, as the method computes them."""
    k = net.num_classes
    c, _ = specification(torch.zeros(x.shape[0], dtype=torch.long, device=x.device), k, x.dtype)
    _, st = spec_bounds(net, x, eps, c, method, return_state=True, **kw)
    return [(st.lo[i], st.hi[i]) for i, op in enumerate(st.ops) if isinstance(op, ReLU)]
