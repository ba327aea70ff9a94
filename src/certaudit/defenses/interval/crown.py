"""The CROWN backward pass (Zhang et al. 2018): linear coefficients walked back through the network.

* :class:`State` -- per-position bounds, IBP magnitudes and the cached ReLU relaxations;
* :func:`backward` -- the lower bound of ``Λ·z_k + bias`` over the input box, with its rounding slack;
* :func:`crown_layer` / :func:`repropagate` -- tighten the bounds at one ReLU input, then push IBP
  from there to the next one;
* :func:`spec_backward` -- the specification's bound (CROWN, or CROWN-IBP on IBP's intervals);
* row blocking to a memory budget (:func:`budget_elements`).

Driven by :func:`certaudit.defenses.interval.bounds.spec_bounds`, whose module docstring gives the
relaxations and the floating-point analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from certaudit.defenses.interval.ibp import (
    EXTRA, SLACK_FACTOR, TINY, U32, Spec, down_to, gamma, ibp_step, nonneg_after, unit, up_to,
)
from certaudit.defenses.interval.ops import Affine, Channel, Op, ReLU, Reshape

DEFAULT_BUDGET_MB = 32  # CPU (blocks that stay in cache); on CUDA a quarter of the free memory
USE_PATCHES = True  # intermediate rows that start at a convolution go over receptive fields (tests compare)


def rel_back(op: Affine) -> float:
    """Backward affine step: ``Λ W`` (γ_fan_out), the model's forward (γ_fan_in), ``Λ·b``."""
    c = op.out_shape[0]
    return gamma(op.fan_in) + gamma(op.fan_out) + gamma(c + op.out_size // c) + EXTRA * unit()


def rel_start(op: Affine) -> float:
    """An affine op walked from a single neuron (the start of an intermediate row): ``Λ W`` and ``Λ·b`` are
    single products there (one rounding each), so only the model's forward pass sums (γ_fan_in)."""
    return gamma(op.fan_in) + EXTRA * unit()


def rel_sum(n: int) -> float:
    """A float32 contraction of length ``n`` (ReLU intercepts, concretization) plus elementwise roundings."""
    return gamma(n) + EXTRA * unit()


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
    # optional lower slopes of unstable ReLUs per ReLU position (B, *shape), e.g. α-CROWN's: any value
    # in [0, 1] is a valid lower line, and they are clamped to it; None: ``lower_slope`` everywhere
    slopes: dict[int, torch.Tensor] | None = None
    # ℓ2 input set: the domain is B₂(l2_center, l2_eps) ∩ [x_lo, x_hi] (the box is the ℓ∞ ball of the
    # same radius, clipped to [0, 1]); concretization keeps the better of the box and the ball bound
    l2_center: torch.Tensor | None = None
    l2_eps: torch.Tensor | None = None  # (B,) float64, rounded up
    # sound mode: the rounding slack (B, S) subtracted from the specification's bound (set by
    # :func:`spec_backward`, or by IBP alone): how far the float bound stands below the plain one
    spec_slack: torch.Tensor | None = None
    slack_out: list | None = None  # collects it block by block while the specification is bounded

    def __post_init__(self):
        # the box as centre ± radius, the radius rounded up so that it still covers [x_lo, x_hi]
        self.x_mid = (self.x_lo + self.x_hi) / 2
        rad = torch.maximum(self.x_hi - self.x_mid, self.x_mid - self.x_lo)
        self.x_rad = rad * (1 + 4 * unit()) if self.sound else rad

    @property
    def width(self) -> int:
        """The largest layer (neurons per image): the longest contraction of a backward pass."""
        return max(math.prod(t.shape[1:]) for t in self.lo)

    def relaxation(self, i: int):
        """(lower slope, upper slope, upper intercept) of ReLU op ``i``, from bounds at position ``i``."""
        if i not in self.relax:
            alpha = None if self.slopes is None else self.slopes.get(i)
            self.relax[i] = _relax(self.lo[i], self.hi[i], self.lower_slope, self.sound, alpha)
        return self.relax[i]


def _relax(l: torch.Tensor, u: torch.Tensor, lower_slope: str, sound: bool, alpha: torch.Tensor | None = None):
    """(lower slope, upper slope, upper intercept) per neuron. With ``l⁻ = min(l, 0)``, ``u⁺ = max(u, 0)``
    one formula serves all: ``s = u⁺/(u⁺ − l⁻)`` is exactly 1 on active and 0 on inactive neurons (where
    the intercept is 0), ``u/(u − l)`` on unstable ones."""
    lc, uc = l.clamp(max=0), u.clamp(min=0)
    s = uc / (uc - lc).clamp(min=torch.finfo(l.dtype).tiny)  # 0/tiny = 0 where l = u = 0
    if sound:  # the intercept for the rounded slope: the line stays above max(y, 0) at y = l and y = u
        t = torch.maximum(-s * lc, uc * (1 - s)) * (1 + 4 * unit())
    else:
        t = -s * lc
    if lower_slope == "adaptive":
        a = (uc >= -lc).to(l.dtype)  # unstable: 1 iff u ≥ −l; active 1, inactive 0
    elif lower_slope == "parallel":
        a = s
    else:
        a = (l >= 0).to(l.dtype)
    if alpha is not None:  # given lower slopes (NaN -> 0), clamped to [0, 1]: valid lower lines
        unstable = (l < 0) & (u > 0)
        a = torch.where(unstable, alpha.to(l.dtype).nan_to_num(0.0).clamp(0.0, 1.0), a)
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


def rel_signed(n: int) -> float:
    """A float32 contraction of length ``n`` whose products share one sign: its error is at most
    ``γ_n/(1 − γ_n)`` times the computed result's magnitude (the sum of the magnitudes is |the sum|)."""
    gn = gamma(n)
    return gn / (1 - gn)


def slack_factor(width: int, steps: int = 0) -> float:
    """Multiplier of an accumulated slack whose dot products sum at most ``width`` terms of one sign
    (computed ≥ (1 − γ_width)·exact), with room for its float64 rounding.

    ``steps`` (the ops walked): the running bias is a float64 sum of at most ``A = steps + 6``
    contributions (one per op, the start, the two concretization dots, the final subtraction), each
    of magnitude at most ``1/u`` times the slack it was charged (every contribution's charge has a
    coefficient ≥ u), so the float64 rounding of that sum is at most ``A·u₆₄·Σ|contributions| ≤
    A·(u₆₄/u)·slack``. With float32 arithmetic that is below 2⁻²⁹·A of the slack (inside the factor's
    margin); in float64 arithmetic (``u = u₆₄``) it is up to ``A`` times the slack, charged here."""
    f = max(SLACK_FACTOR, 1.0005 / (1 - gamma(width)))
    if unit() < U32:
        f *= 1 + steps + 6
    return f


def round_pending() -> float:
    """The elementwise rounding of Λ·slope at a ReLU, charged against |Λ'|·|its input|."""
    return EXTRA * unit()


def _relu_step(st: State, i: int, a: torch.Tensor, g, bias, slack, pending: float):
    """Λ through ReLU op ``i``: returns (Λ', bias, slack, pending). ``Λ'`` takes the upper line where Λ < 0
    and the lower line elsewhere; the intercept contraction ``Σ min(Λ, 0)·t`` has products ≤ 0, so its
    rounding is ``rel_signed(n)·|result|``; the rounding of ``Λ'`` itself is left ``pending``: charged
    where a bound of |ReLU input| is summed anyway (the affine step below, or here if there is none)."""
    lo_s, up_s, icpt = st.relaxation(i)
    if slack is not None and pending:  # two ReLUs in a row: charge the last one's rounding here
        ymax = torch.maximum(st.lo[i + 1][g].abs(), st.hi[i + 1][g].abs())
        slack = slack + pending * _dot(a.detach().abs(), ymax).double()
    neg = a.clamp(max=0)
    contrib = _dot(neg, icpt[g])
    bias = bias + contrib.to(bias.dtype)
    if slack is not None:
        slack = slack + rel_signed(st.ops[i].out_size) * contrib.detach().double().abs()
    a = torch.addcmul(a.clamp(min=0) * lo_s[g].unsqueeze(1), neg, up_s[g].unsqueeze(1))
    return a, bias, slack, round_pending()


def _concretize(st: State, a: torch.Tensor, g, bias, slack, pending: float) -> torch.Tensor:
    """Lower bound of ``Λ·x + bias`` over the box; sound: ``Σ Λ⁺·x_lo + Σ Λ⁻·x_hi`` (x ∈ [0, 1], so each
    dot has products of one sign: rounding ``rel_signed(d)·|dot|``), minus the slack. With an ℓ2 input
    set, the better of that and the ball bound (:func:`l2_concretize`)."""
    box = _concretize_box(st, a, g, bias, slack, pending)
    if st.l2_center is None:
        return box
    return torch.maximum(box, l2_concretize(st, a, st.l2_center[g], st.x_hi[g], st.l2_eps[g], bias, slack, pending,
                                            _dot, 2))


def l2_concretize(st: State, a: torch.Tensor, x_c: torch.Tensor, x_hi: torch.Tensor, eps: torch.Tensor,
                  bias: torch.Tensor, slack, pending: float, dot, lead: int = 2,
                  inside: torch.Tensor | None = None) -> torch.Tensor:
    """Lower bound of ``Λ·x' + bias`` over the ℓ2 ball ``‖x' − x_c‖₂ ≤ ε``: ``Λ·x_c − ε·‖Λ‖₂`` (dual norm).

    The ball contains the domain (ball ∩ box) on which the relaxations hold, so the minimum over it is
    a lower bound there. Sound: ``Λ·x_c`` as two one-sign dots (``x_c ≥ 0``, rounding
    ``rel_signed(d)·|dot|``); ``‖Λ‖₂²`` a float32 sum of squares (one sign: ``γ_(d+1)/(1 − γ_(d+1))``
    relative, plus ``d·2⁻¹²⁶`` for underflow), its float64 square root and product with ``ε`` rounded
    up by ``2⁻⁵⁰`` relative; the pending ReLU rounding is charged against ``|x'| ≤ x_hi``. ``inside``
    (patches): 1 on the image's pixels, 0 on padding, so that ‖Λ‖ counts only real inputs.
    ``dot`` is the caller's row-wise dot product over all but the ``lead`` leading dims of ``a`` (rows of
    (G, S, ...) per image, ``eps`` (G,); or (N, ...) rows, ``eps`` (N,))."""
    acc = bias.dtype
    d = math.prod(a.shape[lead:])
    ai = a if inside is None else a * inside
    sq = ai.square().flatten(lead).sum(-1)
    e = eps.view((-1,) + (1,) * (lead - 1))
    if slack is None:
        return bias + dot(a, x_c).to(acc) - (e * sq.double().sqrt()).to(acc)
    norm = (sq.double() * (1 + rel_signed(d + 1)) + d * 2.0 ** -126).sqrt() * (1 + 2.0 ** -50)
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    d_p, d_n = dot(pos, x_c), dot(neg, x_c)
    bound = bias + d_p.to(acc) + d_n.to(acc) - (e * norm * (1 + 2.0 ** -50)).to(acc)
    slack = slack + rel_signed(d) * (d_p.detach().double() - d_n.detach().double()) + TINY
    if pending:
        slack = slack + pending * dot(a.detach().abs(), x_hi.detach()).double()
    return bound - slack_factor(max(d, st.width), len(st.ops)) * slack


def _concretize_box(st: State, a: torch.Tensor, g, bias, slack, pending: float) -> torch.Tensor:
    acc = bias.dtype
    if slack is None:
        return bias + (_dot(a, st.x_mid[g]) - _dot(a.abs(), st.x_rad[g])).to(acc)
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    x_lo, x_hi = st.x_lo[g], st.x_hi[g]
    d_lo, d_hi = _dot(pos, x_lo), _dot(neg, x_hi)
    bound = bias + d_lo.to(acc) + d_hi.to(acc)
    d = math.prod(a.shape[2:])
    slack = slack + rel_signed(d) * (d_lo.detach().double() - d_hi.detach().double()) + TINY
    if pending:  # a ReLU on the input itself: |x| ≤ x_hi
        slack = slack + pending * (_dot(pos.detach(), x_hi.detach()) - d_hi.detach()).double()
    slack = slack_factor(max(d, st.width), len(st.ops)) * slack
    if st.slack_out is not None and st.l2_center is None:
        st.slack_out.append(slack.detach())
    return bound - slack


def _affine_step(st: State, i: int, a: torch.Tensor, g, bias, slack, pending: float):
    """Λ through affine op ``i`` (Λ ↦ Λ W, bias Λ·b), charging the model's and our rounding (and the
    pending rounding of the ReLU above) against ``|Λ|·mag``, ``mag`` bounding the layer's magnitudes."""
    gn, sn = a.shape[0], a.shape[1]
    op = st.ops[i]
    b, per = _channel_bias(op)
    if slack is not None:
        slack = slack + (rel_back(op) + pending) * _dot(a.detach().abs(), st.mag[i + 1][g]).double()
    if b is not None:
        bias = bias + (a.reshape(gn * sn, b.shape[0], per).sum(2) @ b).view(gn, sn).to(bias.dtype)
    a = op.backward(a.reshape(gn * sn, *op.out_shape)).reshape(gn, sn, *op.in_shape)
    return a, bias, slack, 0.0


def backward(st: State, k: int, a: torch.Tensor, g: slice, bias: torch.Tensor,
             slack: torch.Tensor | None) -> torch.Tensor:
    """Lower bound of ``Λ·z_k + bias`` over the input box, ``Λ = a`` (G, S, *shape_k) for images ``g``.

    Walks ops ``k−1 … 0`` backward (CROWN), then concretizes over the box. Returns (G, S) in the
    dtype of ``bias`` (float64 when sound), minus the floating-point slack when ``slack`` is given.
    Contractions over a layer are float32 batched matmuls; their sum length enters the slack.
    """
    pending = 0.0
    for i in range(k - 1, -1, -1):
        op = st.ops[i]
        if isinstance(op, ReLU):
            a, bias, slack, pending = _relu_step(st, i, a, g, bias, slack, pending)
        elif isinstance(op, Reshape):
            a = a.reshape(a.shape[0], a.shape[1], *op.in_shape)
        elif isinstance(op, Channel) and op.identity:
            continue  # exact in the model and here; values (and a pending charge) pass through
        else:
            assert isinstance(op, Affine)
            a, bias, slack, pending = _affine_step(st, i, a, g, bias, slack, pending)
    return _concretize(st, a, g, bias, slack, pending)


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
            slack = slack + rel_start(op) * (coef.detach().abs() * mag).double()
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


def box_exact(ops: Sequence[Op], k: int) -> bool:
    """IBP is already tight at position ``k`` when the ops before it are diagonal maps plus at most
    one general affine map (a box maps to the exact bounding box)."""
    general = 0
    for op in ops[:k]:
        if isinstance(op, ReLU):
            return False
        if isinstance(op, Affine) and not op.diagonal:
            general += 1
    return general <= 1


def crown_layer(st: State, k: int, pure: bool, budget_elems: int) -> None:
    """Tighten the bounds at position ``k`` (a ReLU input) with the backward pass: over receptive fields
    (:mod:`.patches`) when the rows start at a convolution, else over whole layers."""
    from certaudit.defenses.interval.patches import patch_layer  # it builds on this module

    if USE_PATCHES and patch_layer(st, k, pure, budget_elems):
        return
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
        new_lo, new_hi = down_to(new_lo, lo.dtype), up_to(new_hi, lo.dtype)
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


def budget_elements(device: torch.device, budget_mb: float | None) -> int:
    """Coefficient elements per row block: ``budget_mb``, or by default 32 MiB on CPU and a quarter
    of the free memory on CUDA."""
    if budget_mb is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free / 4
        else:
            budget = DEFAULT_BUDGET_MB * 2**20
    else:
        budget = float(budget_mb) * 2**20
    return max(1, int(budget // (4 * 8)))  # Λ, its parts, gathered relaxations, float64 partial sums


def repropagate(st: State, k: int, sound: bool) -> None:
    """IBP from the tightened position ``k`` up to the next ReLU input, intersected with the old bounds.
    The magnitudes of the affine layers passed are recomputed from the tightened intervals (which
    contain the exact and the float32 values alike) when smaller: less rounding slack downstream."""
    l, u = st.lo[k], st.hi[k]
    nonneg = False
    for i in range(k, len(st.ops)):
        l, u, mg = ibp_step(st.ops[i], l, u, sound, nonneg)
        nonneg = nonneg_after(st.ops[i], nonneg)
        if mg is not None and st.mag[i + 1] is not None:
            st.mag[i + 1] = torch.minimum(st.mag[i + 1], mg)
        l, u = torch.maximum(l, st.lo[i + 1]), torch.minimum(u, st.hi[i + 1])
        u = torch.maximum(u, l)
        st.lo[i + 1], st.hi[i + 1] = l, u
        if i + 1 < len(st.ops) and isinstance(st.ops[i + 1], ReLU):
            break


def spec_backward(st: State, spec: Spec, budget_elems: int) -> torch.Tensor:
    """Lower bounds (B, S) of the folded specification by the backward pass from the last position."""
    bsz, s, n = spec.weight.shape
    k = len(st.ops)
    shape = st.lo[k].shape[1:]
    acc = torch.float64 if st.sound else spec.weight.dtype
    width = _max_width(st.ops, k)
    outs, slacks = [], []
    blocks = _blocks(bsz, s, width, budget_elems)
    for g, r in blocks:
        a = spec.weight[g, r].reshape(-1, r.stop - r.start, *shape)
        bias = spec.bias[g, r].to(acc)
        slack = None
        if st.sound:
            zmax = torch.maximum(st.lo[k][g].abs(), st.hi[k][g].abs()).flatten(1)
            mag = torch.einsum("bsn,bn->bs", spec.abs_weight[g, r], zmax.detach()) + spec.abs_bias[g, r]
            slack = spec.rel * mag.double()
        if slack is not None:
            st.slack_out = []
        outs.append(backward(st, k, a, g, bias, slack))
        if slack is not None:
            slacks.extend(st.slack_out)
            st.slack_out = None
    if len(slacks) == len(outs):
        st.spec_slack = _assemble(slacks, blocks)
    return _assemble(outs, blocks)
