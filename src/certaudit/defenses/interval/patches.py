"""CROWN rows that start at a convolution, held as patches: the backward pass over receptive fields.

The row of an intermediate neuron ``(c, h, w)`` of a convolution output is, at every earlier
position, zero outside the neuron's receptive field. :func:`patch_layer` bounds such neurons with
rows of shape (rows, C, P, Q) -- the receptive field at that position -- instead of whole layers
(on the Fashion-MNIST 2C2F: 16×4×4 = 256 instead of 3,136 entries at the first ReLU, 10×10 = 100
instead of 784 at the input), and without padding images to the same number of unstable neurons.

Geometry. Rows that start at output ``(h, w)`` of a convolution cover, at each earlier position, the
window of rows ``h·S + O … h·S + O + P − 1`` (and columns likewise): a :class:`Window` (stride S,
offset O, size P), pushed back through each convolution (``S·s``, ``O·s − p``, ``(P − 1)·s + d·(k−1) + 1``).
Windows may reach outside the layer (its zero padding). Per-image maps (ReLU slopes and intercepts,
magnitudes, the input box) are zero-padded, unfolded once per block of images and gathered per row.

Soundness is that of :func:`certaudit.defenses.interval.crown.backward`, with the same slack terms:
the same products are summed (windows hold the only non-zero entries of a row; entries outside the
layer are kept exactly zero: a ReLU step multiplies them by zero-padded slopes, and otherwise they
are masked after each transposed convolution), and exact zeros add no rounding, so every
contraction still has at most the terms the dense pass sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certaudit.defenses.interval.crown import (
    State, l2_concretize, rel_back, rel_signed, rel_start, round_pending, slack_factor,
)
from certaudit.defenses.interval.ibp import TINY, down_to, up_to
from certaudit.defenses.interval.ops import Channel, Conv, ReLU


@dataclass(frozen=True)
class Window:
    """Rows starting at grid point (h, w) cover rows ``h·stride + offset`` … ``+ size − 1`` of a position."""

    stride: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]

    @classmethod
    def kernel(cls, op: Conv) -> "Window":
        kh, kw = op.weight.shape[2:]
        size = tuple(d * (k - 1) + 1 for d, k in zip(op.dilation, (kh, kw)))
        return cls(op.stride, (-op.padding[0], -op.padding[1]), size)

    def back(self, op: Conv) -> "Window":
        """The window at the input of ``op`` of rows whose window at its output is this one."""
        kh, kw = op.weight.shape[2:]
        return Window(
            tuple(s0 * s for s0, s in zip(self.stride, op.stride)),
            tuple(o * s - p for o, s, p in zip(self.offset, op.stride, op.padding)),
            tuple((n - 1) * s + d * (k - 1) + 1 for n, s, d, k in zip(self.size, op.stride, op.dilation, (kh, kw))),
        )


def _first_conv(st: State, k: int) -> int | None:
    """Index of the convolution whose output feeds position ``k`` through diagonal ops only, when every
    op before it is spatial (ReLU, Channel, Conv); else None (the dense pass serves)."""
    i = k - 1
    while i >= 0 and (isinstance(st.ops[i], Channel) or st.ops[i].kind == "reshape"):
        i -= 1
    if i < 0 or not isinstance(st.ops[i], Conv):
        return None
    if not all(isinstance(op, (ReLU, Channel, Conv)) for op in st.ops[:i]):
        return None
    return i


def _path(st: State, i: int) -> list[Window]:
    """The windows at positions i, i−1, …, 0 of rows that start at the output of conv op ``i``."""
    wins = [Window.kernel(st.ops[i])]
    for j in range(i - 1, -1, -1):
        op = st.ops[j]
        wins.append(wins[-1].back(op) if isinstance(op, Conv) else wins[-1])
    return wins[::-1]  # wins[q]: the window at position q


def _worth_it(st: State, i: int, wins: list[Window]) -> bool:
    """Patches pay when they are clearly smaller than the layers they stand for."""
    patch = sum(st.lo[q].shape[1] * math.prod(w.size) for q, w in enumerate(wins))
    dense = sum(math.prod(st.lo[q].shape[1:]) for q in range(i + 1))
    return 2 * patch <= dense


class Maps:
    """Per-image maps unfolded to windows, for the images of one block, gathered per row."""

    def __init__(self, grid: tuple[int, int], g: slice):
        self.grid, self.g, self.cache = grid, g, {}

    def unfold(self, key, m: torch.Tensor, win: Window) -> torch.Tensor:
        """(images·L, C·P·Q): the window of every grid point of every image of ``m`` (B', C, H, W)."""
        if key not in self.cache:
            (gh, gw), (sh, sw), (oh, ow), (ph, pw) = self.grid, win.stride, win.offset, win.size
            _, c, h, w = m.shape
            need_h, need_w = (gh - 1) * sh + ph, (gw - 1) * sw + pw
            top, left = max(0, -oh), max(0, -ow)
            bottom, right = max(0, oh + need_h - h), max(0, ow + need_w - w)
            m = F.pad(m, (left, right, top, bottom))[:, :, oh + top:oh + top + need_h, ow + left:ow + left + need_w]
            u = F.unfold(m, (ph, pw), stride=(sh, sw))  # (B', C·P·Q, gh·gw)
            self.cache[key] = u.transpose(1, 2).reshape(-1, c * ph * pw)
        return self.cache[key]

    def rows(self, key, m: torch.Tensor, win: Window, where: torch.Tensor) -> torch.Tensor:
        """The window of ``m`` (B, C, H, W; or (1, ...) for maps shared by all images) of every row."""
        per_image = m.shape[0] != 1
        u = self.unfold(key, m[self.g] if per_image else m, win)
        idx = where if per_image else where % (self.grid[0] * self.grid[1])
        return u.index_select(0, idx).view(idx.shape[0], m.shape[1], *win.size)


def _bdot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of (N, ...) tensors: (N,), float32 sums of the products."""
    n = a.shape[0]
    return torch.bmm(a.reshape(n, 1, -1), v.reshape(n, -1, 1)).view(n)


def _start(st: State, k: int, i: int, img: torch.Tensor, idx: torch.Tensor, acc: torch.dtype):
    """Rows of the neurons ``idx`` (N,) of images ``img`` at position ``k``, walked through the diagonal
    ops down to conv op ``i``: (Λ (N, C_in, P, Q) at position i, bias, slack, grid point of each row)."""
    n = idx.shape[0]
    dev = idx.device
    coef = torch.ones(n, dtype=st.lo[k].dtype, device=dev)
    bias = torch.zeros(n, dtype=acc, device=dev)
    slack = torch.zeros(n, dtype=torch.float64, device=dev) if st.sound else None
    for j in range(k - 1, i - 1, -1):
        op = st.ops[j]
        if op.kind == "reshape" or (isinstance(op, Channel) and op.identity):
            continue
        if slack is not None:
            slack = slack + rel_start(op) * (coef.abs() * st.mag[j + 1].flatten(1)[img, idx]).double()
        if isinstance(op, Channel):
            ch = op.channel_of(idx)
            bias = bias + (coef * op.shift.flatten()[ch]).to(acc)
            coef = coef * op.scale.flatten()[ch]
    conv = st.ops[i]
    _, ho, wo = conv.out_shape
    c = idx // (ho * wo)
    kern = conv.dilated_kernel()
    if conv.bias is not None:
        bias = bias + (coef * conv.bias[c]).to(acc)
    a = kern.index_select(0, c) * coef.view(n, 1, 1, 1)
    return a, bias, slack, idx % (ho * wo)


def _relu_rows(st, j, a, maps, win, where, bias, slack, pending):
    """:func:`crown._relu_step` on patches."""
    lo_s, up_s, icpt = st.relaxation(j)
    if slack is not None and pending:
        ymax = torch.maximum(st.lo[j + 1].abs(), st.hi[j + 1].abs())
        slack = slack + pending * _bdot(a.detach().abs(), maps.rows(("ymax", j + 1), ymax, win, where)).double()
    neg = a.clamp(max=0)
    contrib = _bdot(neg, maps.rows(("icpt", j), icpt, win, where))
    bias = bias + contrib.to(bias.dtype)
    if slack is not None:
        slack = slack + rel_signed(st.ops[j].out_size) * contrib.detach().double().abs()
    a = torch.addcmul(a.clamp(min=0) * maps.rows(("lo_s", j), lo_s, win, where), neg,
                      maps.rows(("up_s", j), up_s, win, where))
    return a, bias, slack, round_pending()


def _affine_rows(st, j, a, maps, wins, where, bias, slack, pending):
    """:func:`crown._affine_step` on patches (Conv or Channel op ``j``); returns Λ at position j."""
    op = st.ops[j]
    if slack is not None:
        mag = maps.rows(("mag", j + 1), st.mag[j + 1], wins[j + 1], where)
        slack = slack + (rel_back(op) + pending) * _bdot(a.detach().abs(), mag).double()
    b = op.bias_full()
    if b is not None:  # per channel: the row's (in-layer) entries summed, then times the bias
        bias = bias + (a.sum((2, 3)) @ b.reshape(-1)).to(bias.dtype)
    if isinstance(op, Channel):
        return a * op.scale, bias, slack
    a = op.backward_patch(a)
    if j > 0 and not isinstance(st.ops[j - 1], ReLU):  # keep entries outside the layer exactly zero
        ones = torch.ones(1, *st.lo[j].shape[1:], dtype=a.dtype, device=a.device)
        a = a * maps.rows(("inside", j), ones, wins[j], where)
    return a, bias, slack


def _rows_bound(st: State, k: int, i: int, img: torch.Tensor, idx: torch.Tensor, g: slice) -> torch.Tensor:
    """Lower bounds of ``+z`` and of ``−z`` (2, N) for neurons ``idx`` of images ``img`` (all in block ``g``)
    at position ``k``, rows starting at conv op ``i``."""
    acc = torch.float64 if st.sound else st.lo[k].dtype
    a, bias, slack, point = _start(st, k, i, img, idx, acc)
    a, bias = torch.cat([a, -a]), torch.cat([bias, -bias])
    slack = None if slack is None else torch.cat([slack, slack])
    grid = st.ops[i].out_shape[1:]
    where = torch.cat([img - g.start, img - g.start]) * (grid[0] * grid[1]) + torch.cat([point, point])
    wins = _path(st, i)
    maps = Maps(grid, g)
    if i > 0 and not isinstance(st.ops[i - 1], ReLU):
        ones = torch.ones(1, *st.lo[i].shape[1:], dtype=a.dtype, device=a.device)
        a = a * maps.rows(("inside", i), ones, wins[i], where)
    pending = 0.0
    for j in range(i - 1, -1, -1):
        op = st.ops[j]
        if isinstance(op, ReLU):
            a, bias, slack, pending = _relu_rows(st, j, a, maps, wins[j], where, bias, slack, pending)
        elif not (isinstance(op, Channel) and op.identity):
            a, bias, slack = _affine_rows(st, j, a, maps, wins, where, bias, slack, pending)
            pending = 0.0
    return _concretize_rows(st, a, maps, wins[0], where, bias, slack, pending).view(2, -1)


def _concretize_rows(st, a, maps, win, where, bias, slack, pending):
    """:func:`crown._concretize` on patches (the box windows are zero outside the image); with an ℓ2
    input set the better of that and :func:`crown.l2_concretize` (the image of each row: ``where``)."""
    box = _concretize_box_rows(st, a, maps, win, where, bias, slack, pending)
    if st.l2_center is None:
        return box
    grid = maps.grid[0] * maps.grid[1]
    eps = st.l2_eps[maps.g][torch.div(where, grid, rounding_mode="floor")]
    x_c = maps.rows(("x_c",), st.l2_center, win, where)
    x_hi = maps.rows(("x_hi",), st.x_hi, win, where)
    ones = torch.ones(1, *st.x_lo.shape[1:], dtype=a.dtype, device=a.device)
    inside = maps.rows(("inside_x",), ones, win, where)
    return torch.maximum(box, l2_concretize(st, a, x_c, x_hi, eps, bias, slack, pending, _bdot, 1, inside))


def _concretize_box_rows(st, a, maps, win, where, bias, slack, pending):
    x_lo = maps.rows(("x_lo",), st.x_lo, win, where)
    x_hi = maps.rows(("x_hi",), st.x_hi, win, where)
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    d_lo, d_hi = _bdot(pos, x_lo), _bdot(neg, x_hi)
    bound = bias + d_lo.to(bias.dtype) + d_hi.to(bias.dtype)
    if slack is None:
        return bound
    d = math.prod(st.x_lo.shape[1:])
    slack = slack + rel_signed(d) * (d_lo.detach().double() - d_hi.detach().double()) + TINY
    if pending:
        slack = slack + pending * (_bdot(pos.detach(), x_hi.detach()) - d_hi.detach()).double()
    return bound - slack_factor(max(d, st.width), len(st.ops)) * slack


def patch_layer(st: State, k: int, pure: bool, budget_elems: int) -> bool:
    """Tighten the bounds at position ``k`` like :func:`crown.crown_layer`, with patches; False (nothing
    done) where rows do not start at a convolution or patches would not be smaller than layers."""
    i = _first_conv(st, k)
    if i is None:
        return False
    wins = _path(st, i)
    if not _worth_it(st, i, wins):
        return False
    lo, hi = st.lo[k], st.hi[k]
    bsz, shape = lo.shape[0], lo.shape[1:]
    lf, hf = lo.flatten(1), hi.flatten(1)
    mask = torch.ones_like(lf, dtype=torch.bool) if pure else (lf < 0) & (hf > 0)
    img, idx = mask.nonzero(as_tuple=True)  # image-major
    if img.numel() == 0:
        return True
    width = 2 * max(st.lo[q].shape[1] * math.prod(w.size) for q, w in enumerate(wins))
    counts = mask.sum(1).tolist()
    new = torch.cat([_rows_bound(st, k, i, img[r], idx[r], g) for g, r in _row_blocks(counts, width, budget_elems)],
                    dim=1)
    new_lo, new_hi = new[0], -new[1]
    if st.sound:
        new_lo, new_hi = down_to(new_lo, lo.dtype), up_to(new_hi, lo.dtype)
    else:
        new_lo, new_hi = new_lo.to(lo.dtype), new_hi.to(lo.dtype)
    lf2, hf2 = lf.clone(), hf.clone()
    lf2[img, idx] = new_lo if pure else torch.maximum(lf[img, idx], new_lo)
    hf2[img, idx] = new_hi if pure else torch.minimum(hf[img, idx], new_hi)
    if not pure:
        hf2 = torch.maximum(hf2, lf2)  # rounding can only cross them on an exactly-known neuron
    st.lo[k], st.hi[k] = lf2.reshape(bsz, *shape), hf2.reshape(bsz, *shape)
    return True


def _row_blocks(counts: list[int], width: int, budget_elems: int) -> list[tuple[slice, slice]]:
    """(image slice, slice of the image-major rows) blocks of at most ``budget_elems // width`` rows:
    consecutive whole images, or pieces of one image whose rows alone exceed that."""
    cap = max(1, budget_elems // max(1, width))
    out, start_img, start_row, rows, row = [], 0, 0, 0, 0
    for b, n in enumerate(counts):
        if n > cap:
            if rows:
                out.append((slice(start_img, b), slice(start_row, row)))
            out += [(slice(b, b + 1), slice(r, min(row + n, r + cap))) for r in range(row, row + n, cap)]
            row += n
            start_img, start_row, rows = b + 1, row, 0
            continue
        if rows + n > cap:
            out.append((slice(start_img, b), slice(start_row, row)))
            start_img, start_row, rows = b, row, 0
        rows += n
        row += n
    if rows:
        out.append((slice(start_img, len(counts)), slice(start_row, row)))
    return out


__all__ = ["Window", "patch_layer"]
