"""A zero-padded ``Conv2d`` as a linear operator, and power iteration on such operators.

* :class:`ConvGeometry` -- shapes, stride, padding, dilation and groups of a convolution on a fixed
  input size;
* :class:`ConvOperator` -- the convolution's linear part with its exact adjoint;
* :func:`full_kernel` -- groups and dilation expanded into one plain kernel;
* :func:`power_iteration` -- a *lower* estimate of an operator norm (never a certificate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.errors import InputError


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


def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor], adjoint: Callable[[torch.Tensor], torch.Tensor],
                    v: torch.Tensor, iters: int) -> tuple[float, torch.Tensor]:
    """``iters`` steps of ``v ← AᵀA v / ‖·‖``; returns ``‖A v‖`` (a *lower* bound) and ``v``."""
    with torch.no_grad():
        v = v / v.norm().clamp_min(1e-30)
        for _ in range(int(iters)):
            v = adjoint(apply(v))
            v = v / v.norm().clamp_min(1e-30)
        return float(apply(v).norm()), v
