"""α-CROWN (Xu et al. 2021, "Fast and Complete"): CROWN with optimized lower ReLU slopes.

CROWN bounds an unstable ReLU ``z = max(y, 0)`` (``l < 0 < u``) from below by ``z ≥ α·y`` with a
fixed ``α ∈ {0, 1}``. *Every* ``α ∈ [0, 1]`` gives a valid lower line (for ``y ≥ 0``:
``α·y ≤ y = z``; for ``y ≤ 0``: ``α·y ≤ 0 = z``), so the backward pass is a lower bound of the
specification for any such choice, and the choice can be searched by gradient ascent on the bound:

* **what is optimized**: one ``α`` per (row, unstable neuron) -- a row is a specification row or,
  with ``intermediate=True``, one side (lower or upper) of a neuron whose pre-activation bounds
  CROWN computes by the backward pass: tighter intermediate bounds tighten the upper lines of the
  later layers, and the final bound is differentiated through them. ``shared=True`` uses one α per
  (image, neuron) for all rows of a layer (cheaper, looser);
* **warm start**: CROWN's adaptive slopes (``α = 1`` if ``u ≥ −l`` else 0): the first evaluation
  is CROWN's bound (on CROWN's intermediate bounds, which stay the floor of every later bound);
* **budget**: ``iters`` evaluations of the bound (Adam, learning rate ``lr`` decayed by
  ``lr_decay`` per step, projection onto [0, 1] after each step; the last evaluation has no step),
  the best slopes of each image kept (its objective: the sum over its rows of ``min(bound, τ)``;
  rows CROWN already certifies and rows above ``τ`` -- twice the rounding slack of CROWN's row --
  stop pulling, and an image whose rows all did stops early);
* **soundness**: the search runs in plain float32; the reported bound is recomputed afterwards by
  the floating-point-safe backward pass of :mod:`.crown` with the best slopes clamped to [0, 1]
  (intermediate layers first, row by row, intersected with CROWN's bounds and re-propagated by IBP;
  then the specification), and is the largest of that, CROWN's own bound and IBP on the tightened
  last interval: all three are sound, so α-CROWN never reports less than CROWN.

Row-specific slopes enter the sound pass through :class:`~.crown.State`'s ``slopes`` (per image and
neuron): every row becomes its own image of a :class:`State` built from the batch's bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from certaudit.defenses.interval.crown import (
    State, backward, box_exact, budget_elements, rel_back, repropagate, spec_backward,
)
from certaudit.defenses.interval.ibp import Spec, down_to, up_to
from certaudit.defenses.interval.ops import Channel, ReLU, Reshape
from certaudit.errors import InputError
from certaudit.validate import integer, number

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SEARCH_BUDGET_MB = 128  # CPU default of the search's chunks (larger than CROWN's blocks: fewer, longer ops)


@dataclass(frozen=True)
class AlphaOptions:
    """The search: ``iters`` bound evaluations (0: plain CROWN), Adam with ``lr`` decayed by
    ``lr_decay`` per step; ``intermediate``: also optimize the slopes of the intermediate bounds;
    ``shared``: one slope per (image, neuron) instead of per (row, neuron)."""

    iters: int = 20
    lr: float = 0.5
    lr_decay: float = 0.98
    intermediate: bool = True
    shared: bool = False

    def __post_init__(self):
        object.__setattr__(self, "iters", integer(self.iters, "alpha_iters", low=0))
        object.__setattr__(self, "lr", number(self.lr, "alpha_lr", low=0.0, low_open=True))
        object.__setattr__(self, "lr_decay", number(self.lr_decay, "alpha_lr_decay", low=0.0, low_open=True, high=1.0))
        for name in ("intermediate", "shared"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"alpha_{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def parse(cls, value: Any) -> "AlphaOptions":
        """``None`` (defaults), an :class:`AlphaOptions`, or a dict of its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise InputError(f"unknown α-CROWN option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
            return cls(**value)
        raise InputError(f"α-CROWN options must be a dict or AlphaOptions, got {type(value).__name__}")

    def settings(self) -> dict[str, Any]:
        return {f"alpha_{f.name}": getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------- helpers

def _unstable(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (G, m) of the neurons with ``lo < 0 < hi``, padded with ``n`` (a dummy column
    that scatters discard), and the mask of real entries."""
    lf, hf = lo.flatten(1), hi.flatten(1)
    mask = (lf < 0) & (hf > 0)
    counts = mask.sum(1)
    m = int(counts.max()) if counts.numel() else 0
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
    valid = torch.arange(m, device=lo.device).view(1, m) < counts.view(-1, 1)
    return torch.where(valid, order, torch.full_like(order, lf.shape[1])), valid


def _scatter(n: int, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Dense (..., n) zeros with ``vals`` at ``idx`` (entries equal to ``n`` are dropped)."""
    out = torch.zeros(*idx.shape[:-1], n + 1, dtype=vals.dtype, device=vals.device)
    return out.scatter(-1, idx, vals)[..., :n]


def _tighten(cur: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, better) -> torch.Tensor:
    """``cur`` (G, n) with ``better(cur, val)`` at ``idx`` (G, m) (padding ``n`` dropped). The gradient
    is that of ``val`` even where ``cur`` wins (straight through): where CROWN's bound (∩ IBP) is still
    the better one, the search must still learn to push the slopes' own bound past it."""
    n = cur.shape[1]
    padded = torch.cat([cur, cur[:, :1]], 1)
    best = better(padded.gather(1, idx), val)
    return padded.scatter(1, idx, val + (best - val).detach())[:, :n]


def _relax32(l: torch.Tensor, u: torch.Tensor):
    """Plain float32 relaxation: (upper slope, upper intercept, stable lower slope, unstable mask)."""
    unst = (l < 0) & (u > 0)
    active = (l >= 0).to(l.dtype)
    up = torch.where(unst, u / torch.where(unst, u - l, torch.ones_like(l)), active)
    return up, torch.where(unst, -up * l, torch.zeros_like(l)), active, unst


def _start(st: State, k: int, img: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor):
    """Rows ``coef·e_idx`` (G, R) at position ``k`` of images ``img``, walked down through diagonal
    ops and the first general affine op (its rows written from the weights): (position q,
    Λ (G, R, *shape_q), bias, slack). Accounting as in the sound backward pass (bias in float64 and
    the rounding slack of each step when ``st.sound``)."""
    g, r = idx.shape
    acc = torch.float64 if st.sound else torch.float32
    bias = torch.zeros(g, r, dtype=acc, device=idx.device)
    slack = torch.zeros(g, r, dtype=torch.float64, device=idx.device) if st.sound else None
    i = k - 1
    while i >= 0 and not isinstance(st.ops[i], ReLU):
        op = st.ops[i]
        if isinstance(op, Reshape):
            i -= 1
            continue
        if slack is not None:
            mag = st.mag[i + 1].index_select(0, img).flatten(1).gather(1, idx)
            slack = slack + rel_back(op) * (coef.abs() * mag).double()
        if isinstance(op, Channel):
            ch = op.channel_of(idx)
            bias = bias + (coef * op.shift.flatten()[ch]).to(acc)
            coef = coef * op.scale.flatten()[ch]
            i -= 1
            continue
        rows, b = op.rows(idx.flatten())
        if b is not None:
            bias = bias + (coef * b.view(g, r)).to(acc)
        lam = rows.reshape(g, r, *op.in_shape) * coef.view(g, r, *([1] * len(op.in_shape)))
        return i, lam.detach(), bias.detach(), slack
    shape = st.lo[i + 1].shape[1:]
    lam = _scatter(math.prod(shape), idx.unsqueeze(2), coef.unsqueeze(2)).reshape(g, r, *shape)
    return i + 1, lam.detach(), bias, slack


def _rows_state(st: State, img: torch.Tensor, upto: int, slopes: dict[int, torch.Tensor] | None) -> State:
    """The :class:`State` of the sub-network ``ops[:upto]`` (all a backward pass from position
    ``upto`` reads) for the images ``img`` (one per row), with the given lower slopes."""
    def pick(t):
        return None if t is None else t.index_select(0, img)

    lo, hi, mag = ([pick(t) for t in ts[:upto + 1]] for ts in (st.lo, st.hi, st.mag))
    return State(st.ops[:upto], lo, hi, mag, pick(st.x_lo), pick(st.x_hi), st.sound, st.lower_slope, {},
                 slopes=slopes)


@dataclass
class _Group:
    """Rows optimized together: ±e_j for the CROWN-unstable neurons at ReLU input ``k``, or the
    specification (``k = len(ops)``); fixed coefficients ``lam`` at position ``q``."""

    k: int
    q: int
    lam: torch.Tensor  # (G, R, *shape_q)
    bias: torch.Tensor  # (G, R), float64 when sound
    slack: torch.Tensor | None  # (G, R) rounding slack of the start (sound)
    tail: dict[str, torch.Tensor] | None = None  # see :func:`_fixed_tail`

    def select(self, keep: torch.Tensor) -> "_Group":
        tail = None if self.tail is None else {key: t[keep] for key, t in self.tail.items()}
        return _Group(self.k, self.q, self.lam[keep], self.bias[keep], None if self.slack is None else self.slack[keep],
                      tail)


def _affine_back(ops, a: torch.Tensor, bias: torch.Tensor, hi: int, lo: int):
    """Λ (G, R, *shape_hi) and its bias walked down through the affine and reshape ops ``lo … hi − 1``."""
    gn, r = a.shape[:2]
    for i in range(hi - 1, lo - 1, -1):
        op = ops[i]
        if not isinstance(op, Reshape):
            b = op.bias_full()
            if b is not None:
                c = op.out_shape[0]
                bias = bias + a.reshape(gn, r, c, -1).sum(3) @ b.reshape(c)
            a = op.backward(a.reshape(gn * r, *op.out_shape))
        a = a.reshape(gn, r, *op.in_shape)
    return a, bias


def _fixed_tail(ops, g: _Group, i0: int, lo, hi, unst) -> dict[str, torch.Tensor]:
    """The pass of group ``g`` below ReLU ``i0`` precomputed, for a ReLU whose incoming Λ and bounds are
    fixed and below which the network is affine: then ``Λ_input = a + (α·c) J`` and the bias is
    ``b + (α·c)·t``, with ``c`` the coefficients of the unstable neurons where Λ ≥ 0 and ``J``, ``t``
    the affine tail's rows for those neurons. Per iteration: one small batched matmul."""
    a, bias = _affine_back(ops, g.lam, g.bias.to(g.lam.dtype), g.q, i0 + 1)
    gn, r = a.shape[:2]
    af = a.reshape(gn, r, -1)
    up, icpt, active, unstable = _relax32(lo[i0], hi[i0])
    bias = bias + torch.bmm(af.clamp(max=0), icpt.unsqueeze(2)).squeeze(2)
    slope = torch.where(af < 0, up.unsqueeze(1), torch.where(unstable, 0.0, active).unsqueeze(1))
    a_fix, b_fix = _affine_back(ops, (af * slope).reshape(a.shape), bias, i0, 0)
    sidx, valid = unst[i0]
    pad = torch.zeros_like(af[:, :, :1])
    c = torch.cat([af, pad], 2).gather(2, sidx.unsqueeze(1).expand(gn, r, -1)).clamp(min=0) * valid.unsqueeze(1)
    onehot = _scatter(af.shape[2], sidx.unsqueeze(2), valid.unsqueeze(2).to(af.dtype))
    j, t = _affine_back(ops, onehot.reshape(gn, -1, *ops[i0].in_shape), torch.zeros_like(valid, dtype=af.dtype), i0, 0)
    return {"a": a_fix.flatten(2), "b": b_fix, "c": c, "j": j.flatten(2), "t": t}


class _Chunk:
    """The search for a few images: CROWN's bounds at the ReLU inputs (plain float32, fixed), the row
    groups, the slopes (keys (group, ReLU position): (G, R or 1, m_i)) and CROWN's certified rows."""

    def __init__(self, ops, lo, hi, mid, rad, unst, groups, alpha, ok, shared):
        self.ops, self.lo, self.hi, self.mid, self.rad = ops, lo, hi, mid, rad
        self.unst, self.groups, self.alpha, self.ok, self.shared = unst, groups, alpha, ok, shared

    @classmethod
    def build(cls, st: State, spec: Spec, img: torch.Tensor, ok: torch.Tensor, opts: AlphaOptions) -> "_Chunk":
        ops = st.ops
        relus = [i for i, op in enumerate(ops) if isinstance(op, ReLU)]

        def pick(t):
            return t.index_select(0, img).detach()

        lo = {i: pick(st.lo[i]).flatten(1) for i in relus}
        hi = {i: pick(st.hi[i]).flatten(1) for i in relus}
        unst = {i: _unstable(lo[i], hi[i]) for i in relus}
        groups = []
        for k in relus if opts.intermediate else ():
            sidx, valid = unst[k]
            if box_exact(ops, k) or not bool(valid.any()):
                continue
            idx = torch.where(valid, sidx, torch.zeros_like(sidx))
            sign = torch.cat([torch.ones_like(sidx[0]), -torch.ones_like(sidx[0])]).to(lo[k].dtype)
            coef = torch.cat([valid, valid], 1).to(lo[k].dtype) * sign
            groups.append(_Group(k, *_start(st, k, img, torch.cat([idx, idx], 1), coef)))
        groups.append(_Group(len(ops), len(ops), pick(spec.weight), pick(spec.bias), None))
        searched = {g.k for g in groups}
        for g in groups:
            i0 = max((i for i in relus if i < g.q), default=None)
            if i0 is not None and i0 == relus[0] and i0 not in searched:
                g.tail = _fixed_tail(ops, g, i0, lo, hi, unst)
        alpha = {}
        for gi, g in enumerate(groups):
            for i in relus:
                sidx, valid = unst[i]
                if i >= g.q or not bool(valid.any()):
                    continue
                pad = torch.zeros_like(lo[i][:, :1])
                l, u = torch.cat([lo[i], pad], 1).gather(1, sidx), torch.cat([hi[i], pad], 1).gather(1, sidx)
                warm = ((u >= -l) & valid).to(l.dtype)  # CROWN's adaptive slopes
                alpha[(gi, i)] = warm.unsqueeze(1).repeat(1, 1 if opts.shared else g.lam.shape[1], 1)
        return cls(ops, lo, hi, pick(st.x_mid), pick(st.x_rad), unst, groups, alpha, ok, opts.shared)

    def select(self, keep: torch.Tensor) -> "_Chunk":
        """The same search restricted to the images ``keep`` (bool (G,))."""
        return _Chunk(self.ops, {i: t[keep] for i, t in self.lo.items()}, {i: t[keep] for i, t in self.hi.items()},
                      self.mid[keep], self.rad[keep], {i: (s[keep], v[keep]) for i, (s, v) in self.unst.items()},
                      [g.select(keep) for g in self.groups], {key: a[keep] for key, a in self.alpha.items()},
                      self.ok[keep], self.shared)

    def evaluate(self, alpha: dict) -> torch.Tensor:
        """Plain float32 lower bounds (G, S) of the specification with the slopes ``alpha`` (keyed as
        ``self.alpha``), differentiable in them (intermediate groups first, each tightening its layer)."""
        lo, hi = dict(self.lo), dict(self.hi)
        relax: dict[int, tuple] = {}
        for gi, g in enumerate(self.groups[:-1]):
            val = self._pass(alpha, gi, g, lo, hi, relax)
            sidx = self.unst[g.k][0]
            m = sidx.shape[1]
            lo[g.k] = _tighten(lo[g.k], sidx, val[:, :m], torch.maximum)
            hi[g.k] = _tighten(hi[g.k], sidx, -val[:, m:], torch.minimum)
        return self._pass(alpha, len(self.groups) - 1, self.groups[-1], lo, hi, relax)

    def _pass(self, alphas: dict, gi: int, g: _Group, lo, hi, relax) -> torch.Tensor:
        if g.tail is not None:
            t = g.tail
            alpha = alphas.get((gi, max(i for i in self.lo if i < g.q)))
            if alpha is None:
                return self._concretize(t["a"], t["b"])
            coef = alpha * t["c"]
            bias = t["b"] + torch.bmm(coef, t["t"].unsqueeze(2)).squeeze(2)
            return self._concretize(t["a"] + torch.bmm(coef, t["j"]), bias)
        a, bias = g.lam, g.bias.to(g.lam.dtype)
        gn, r = a.shape[:2]
        for i in range(g.q - 1, -1, -1):
            op = self.ops[i]
            if isinstance(op, ReLU):
                if i not in relax:
                    relax[i] = _relax32(lo[i], hi[i])
                up, icpt, low, unst = relax[i]
                af = a.reshape(gn, r, -1)
                bias = bias + torch.bmm(af.clamp(max=0), icpt.unsqueeze(2)).squeeze(2)
                low = low.unsqueeze(1)
                alpha = alphas.get((gi, i))
                if alpha is not None:
                    sidx = self.unst[i][0].unsqueeze(1).expand(gn, r, -1)
                    low = torch.where(unst.unsqueeze(1), _scatter(af.shape[2], sidx, alpha.expand(gn, r, -1)), low)
                a = (af * torch.where(af < 0, up.unsqueeze(1), low)).reshape(gn, r, *op.in_shape)
            else:
                a, bias = _affine_back(self.ops, a, bias, i + 1, i)
        return self._concretize(a, bias)

    def _concretize(self, a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        af = a.reshape(a.shape[0], a.shape[1], -1)
        mid, rad = self.mid.flatten(1).unsqueeze(2), self.rad.flatten(1).unsqueeze(2)
        return bias + torch.bmm(af, mid).squeeze(2) - torch.bmm(af.abs(), rad).squeeze(2)


def _adam(p: torch.Tensor, grad: torch.Tensor | None, moments: tuple[torch.Tensor, torch.Tensor], step: int,
          lr: float) -> torch.Tensor:
    """One Adam step (descent on ``grad``), projected onto [0, 1]; updates ``moments`` in place."""
    if grad is None:
        return p
    m, v = moments
    b1, b2 = ADAM_BETAS
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v / (1 - b2 ** step)).sqrt_().add_(ADAM_EPS)
    return (p - lr * (m / (1 - b1 ** step)) / denom).clamp_(0.0, 1.0)


def _optimize(ch: _Chunk, opts: AlphaOptions, crown_sound: torch.Tensor) -> dict:
    """Adam on the slopes of ``ch`` for ``opts.iters`` evaluations; the best slopes of every image
    (by its objective, see the module docstring), keyed as ``ch.alpha``, at the chunk's full size.
    ``crown_sound`` (G, S): the sound backward bound at CROWN's slopes, for the rounding guard τ."""
    alpha = dict(ch.alpha)
    best = {key: a.detach().clone() for key, a in alpha.items()}
    best_obj = torch.full((ch.ok.shape[0],), -math.inf, dtype=torch.float64, device=ch.ok.device)
    pos = torch.arange(ch.ok.shape[0], device=ch.ok.device)  # chunk index of each image still searched
    moments = {key: (torch.zeros_like(a), torch.zeros_like(a)) for key, a in alpha.items()}
    tau = None
    for t in range(opts.iters):
        keys = list(alpha)
        with torch.enable_grad():
            params = [alpha[key].detach().requires_grad_(True) for key in keys]
            bound = ch.evaluate(dict(zip(keys, params)))
            if tau is None:  # twice the rounding slack of CROWN's rows (float32 minus sound, same slopes)
                tau = (2 * (bound.detach().double() - crown_sound)).clamp(min=0).to(bound.dtype)
            tau_t = tau[pos]
            obj = torch.where(ch.ok, tau_t, torch.minimum(bound, tau_t)).sum(1)
            better = obj.detach().double() > best_obj[pos]
            if bool(better.any()):
                for key, p in zip(keys, params):
                    best[key][pos[better]] = p.detach()[better]
                best_obj[pos[better]] = obj.detach().double()[better]
            done = (ch.ok | (bound.detach() > tau_t)).all(1)
            if t == opts.iters - 1 or bool(done.all()) or not params:
                break
            grads = torch.autograd.grad(-obj.sum(), params, allow_unused=True)
        lr = opts.lr * opts.lr_decay ** t
        with torch.no_grad():
            alpha = {key: _adam(p.detach(), g, moments[key], t + 1, lr) for key, p, g in zip(keys, params, grads)}
        if bool(done.any()):
            keep = ~done
            ch, pos = ch.select(keep), pos[keep]
            alpha = {key: a[keep] for key, a in alpha.items()}
            moments = {key: (m[keep], v[keep]) for key, (m, v) in moments.items()}
    return best


# ------------------------------------------------------------------------------ sound pass

def _row_blocks(st: State, n_rows: int, upto: int, budget: int) -> list[slice]:
    """Blocks of rows (each row one image of a :func:`_rows_state`) within the memory budget."""
    per = sum(math.prod(st.lo[p].shape[1:]) for p in range(upto + 1))
    size = max(1, budget // max(1, per))
    return [slice(a, min(n_rows, a + size)) for a in range(0, n_rows, size)]


def _row_slopes(ch: _Chunk, best: dict, gi: int, img: torch.Tensor, row: torch.Tensor) -> dict[int, torch.Tensor]:
    """Dense lower slopes per ReLU position for the rows (chunk image ``img``, row ``row``) of group ``gi``."""
    out = {}
    for (g, i), a in best.items():
        if g == gi:
            vals = a[img, torch.zeros_like(row) if ch.shared else row]
            shape = ch.ops[i].in_shape
            out[i] = _scatter(math.prod(shape), ch.unst[i][0][img], vals).reshape(len(img), *shape)
    return out


def _spec_rows(spec: Spec, img: torch.Tensor, row: torch.Tensor | None = None) -> Spec:
    """The specification of images ``img``: all rows, or one row ``row`` per image."""
    parts = (spec.weight, spec.bias, spec.abs_weight, spec.abs_bias)
    parts = [t.index_select(0, img) if row is None else t[img, row].unsqueeze(1) for t in parts]
    return Spec(*parts, rel=spec.rel)


def _sound_layer(st: State, ch: _Chunk, img: torch.Tensor, gi: int, best: dict, budget: int) -> None:
    """Sound bounds of group ``gi``'s neurons with the best slopes, intersected into ``st`` (then IBP
    re-propagated to the next ReLU)."""
    g = ch.groups[gi]
    sidx, valid = ch.unst[g.k]
    m = sidx.shape[1]
    gg, rr = torch.cat([valid, valid], 1).nonzero(as_tuple=True)
    vals = []
    for blk in _row_blocks(st, len(gg), g.q, budget):
        sg, sr = gg[blk], rr[blk]
        pst = _rows_state(st, img[sg], g.q, _row_slopes(ch, best, gi, sg, sr))
        slack = None if g.slack is None else g.slack[sg, sr].unsqueeze(1)
        vals.append(backward(pst, g.q, g.lam[sg, sr].unsqueeze(1), slice(0, len(sg)), g.bias[sg, sr].unsqueeze(1),
                             slack)[:, 0])
    val = torch.cat(vals)
    low = rr < m
    neuron, rows_img = sidx[gg, rr % m], img[gg]
    dt = st.lo[g.k].dtype
    new_lo, new_hi = (down_to(val[low], dt), up_to(-val[~low], dt)) if st.sound else (val[low], -val[~low])
    shape = st.lo[g.k].shape
    lf, hf = st.lo[g.k].flatten(1), st.hi[g.k].flatten(1)
    at_lo, at_hi = (rows_img[low], neuron[low]), (rows_img[~low], neuron[~low])
    lf = lf.index_put(at_lo, torch.maximum(lf[at_lo], new_lo.to(lf.dtype)))
    hf = hf.index_put(at_hi, torch.minimum(hf[at_hi], new_hi.to(hf.dtype)))
    hf = torch.maximum(hf, lf)  # rounding can only cross them on an exactly-known neuron
    st.lo[g.k], st.hi[g.k] = lf.reshape(shape), hf.reshape(shape)
    repropagate(st, g.k, st.sound)


def _sound_spec(st: State, spec: Spec, ch: _Chunk, img: torch.Tensor, best: dict, budget: int) -> torch.Tensor:
    """Sound bounds (G, S) of the specification rows CROWN leaves unverified (−inf at the others),
    with the best slopes, on the (tightened) bounds of ``st``."""
    gi = len(ch.groups) - 1
    gg, ss = (~ch.ok).nonzero(as_tuple=True)
    vals = []
    for blk in _row_blocks(st, len(gg), len(st.ops), budget):
        sg, sr = gg[blk], ss[blk]
        pst = _rows_state(st, img[sg], len(st.ops), _row_slopes(ch, best, gi, sg, sr))
        vals.append(spec_backward(pst, _spec_rows(spec, img[sg], sr), budget)[:, 0])
    dtype = torch.float64 if st.sound else spec.weight.dtype
    out = torch.full(ch.ok.shape, -math.inf, dtype=dtype, device=ch.ok.device)
    return out.index_put((gg, ss), torch.cat(vals)) if vals else out


def _image_chunks(st: State, todo: torch.Tensor, rows: int, budget: int, opts: AlphaOptions) -> list[torch.Tensor]:
    """The images to search, in chunks whose rows × largest layer fit the budget (images sorted by
    their number of rows, so that the padding of a chunk is small)."""
    width = max(math.prod(t.shape[1:]) for t in st.lo)
    count = torch.full((todo.numel(),), rows, dtype=torch.long, device=todo.device)
    for k, op in enumerate(st.ops):
        if opts.intermediate and isinstance(op, ReLU) and not box_exact(st.ops, k):
            lf, hf = st.lo[k].index_select(0, todo).flatten(1), st.hi[k].index_select(0, todo).flatten(1)
            count += 2 * ((lf < 0) & (hf > 0)).sum(1)
    order = torch.sort(count, stable=True).indices
    chunks, start = [], 0
    for j in range(len(order)):
        if j > start and (j - start + 1) * int(count[order[j]]) * width > budget:
            chunks.append(todo[order[start:j]])
            start = j
    chunks.append(todo[order[start:]])
    return chunks


def alpha_spec_bounds(net, x: torch.Tensor, eps: float | torch.Tensor, c: torch.Tensor, *, alpha: Any = None,
                      sound: bool = True, budget_mb: float | None = None, return_state: bool = False):
    """α-CROWN lower bounds (B, S) of ``C f(x')`` over the clipped ℓ∞ ball: CROWN, then the slope
    search for the images CROWN leaves with an unverified row (``alpha``: :class:`AlphaOptions` or a
    dict of its fields), then the sound bound with the best slopes. Never below CROWN's bound."""
    from certaudit.defenses.interval.bounds import spec_bounds  # the CROWN driver (which dispatches here)

    opts = AlphaOptions.parse(alpha)
    crown, st = spec_bounds(net, x, eps, c, "crown", sound=sound, budget_mb=budget_mb, return_state=True)
    spec = Spec.fold(net.last, c)
    ok = crown > 0
    todo = (~ok).any(1).nonzero().squeeze(1)
    if opts.iters == 0 or todo.numel() == 0:
        return (crown, st) if return_state else crown
    budget = budget_elements(x.device, SEARCH_BUDGET_MB if budget_mb is None and x.device.type == "cpu" else budget_mb)
    found = torch.full_like(crown, -math.inf)
    for img in _image_chunks(st, todo, c.shape[1], budget, opts):
        with torch.no_grad():  # the search's constants
            ch = _Chunk.build(st, spec, img, ok[img], opts)
            base = spec_backward(_rows_state(st, img, len(st.ops), None), _spec_rows(spec, img), budget)
        best = _optimize(ch, opts, base.double())
        for gi in range(len(ch.groups) - 1):
            _sound_layer(st, ch, img, gi, best, budget)
        st.relax.clear()
        found = found.index_put((img,), _sound_spec(st, spec, ch, img, best, budget).to(found.dtype))
    bound = torch.maximum(crown, found)
    bound = torch.maximum(bound, spec.ibp(st.lo[-1], st.hi[-1], sound).to(bound.dtype))
    return (bound, st) if return_state else bound


__all__ = ["AlphaOptions", "alpha_spec_bounds"]
