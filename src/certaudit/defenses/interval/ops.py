"""A feed-forward model as a list of bound-friendly operators, for a closed set of layers.

:func:`compile_model` walks an ``nn.Sequential`` (nested ones are flattened) and turns every layer
into one of four operators:

* :class:`Dense` -- ``nn.Linear`` on flat inputs;
* :class:`Conv` -- ``nn.Conv2d`` (any stride, padding, dilation, groups; zero padding), and the
  average poolings ``nn.AvgPool2d`` / ``nn.AdaptiveAvgPool2d`` (as depthwise convolutions);
* :class:`Channel` -- a per-channel affine map: certaudit's ``Normalize`` and ``BatchNorm1d/2d`` in
  eval mode (running statistics folded into a scale and a shift);
* :class:`Reshape` -- ``nn.Flatten`` (and ``nn.Identity``);
* :class:`ReLU`.

Anything else (max pooling, sigmoid, dropout, residual blocks, BatchNorm in training mode, ...) is
refused with an :class:`~certaudit.errors.InputError`: a layer is never silently assumed to be
the identity or 1-Lipschitz.

Every affine operator offers what interval and linear-relaxation bounds need, batched:
``forward`` (``W z + b``), ``forward_abs`` (``|W| z``), ``backward`` (``Λ ↦ Λ W`` for coefficient
rows Λ over its output), ``rows`` (rows of ``W`` for given output neurons, without building the
whole Jacobian) and the floating-point facts of :mod:`certaudit.defenses.interval.bounds`
(``fan_in``, ``fan_out``, ``abs_bias``: a bound on the magnitudes the float32 forward pass adds).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.errors import InputError
from certaudit.models import Normalize

SUPPORTED = ("Conv2d", "Linear", "ReLU", "Flatten", "Normalize", "BatchNorm1d/2d (eval mode)", "AvgPool2d",
             "AdaptiveAvgPool2d (exact divisor)", "Identity")

Shape = tuple[int, ...]


class Op:
    """Base class: ``in_shape``/``out_shape`` are per-example shapes (no batch dimension)."""

    kind = "op"
    affine = False
    diagonal = False  # output neuron j depends on input neuron j only (Channel, Reshape)
    in_shape: Shape
    out_shape: Shape
    name: str = ""

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)


class ReLU(Op):
    kind = "relu"

    def __init__(self, shape: Shape, name: str = ""):
        self.in_shape = self.out_shape = tuple(shape)
        self.name = name


class Affine(Op):
    """``z ↦ W z + b``; subclasses implement the batched maps."""

    kind = "affine"
    affine = True
    fan_in = 1  # products summed per output in the forward pass
    fan_out = 1  # products summed per input in the backward pass (Λ W)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, *in) -> (N, *out)
        raise NotImplementedError

    def forward_abs(self, z: torch.Tensor) -> torch.Tensor:  # |W| z, no bias
        raise NotImplementedError

    def abs_bias(self) -> torch.Tensor | None:
        """Per-output magnitude added to ``|W| |z|`` in bounds on |intermediate values| (or None)."""
        raise NotImplementedError

    def bias_full(self) -> torch.Tensor | None:
        """Bias broadcastable to (N, *out_shape), or None."""
        raise NotImplementedError

    def backward(self, a: torch.Tensor) -> torch.Tensor:  # (N, *out) -> (N, *in)
        raise NotImplementedError

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of ``W`` (len(idx), *in_shape) and bias entries (len(idx),) for flat output indices."""
        raise NotImplementedError


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter of a weight (None for inference tensors, which cannot change)."""
    try:
        return t._version
    except RuntimeError:
        return None


class Dense(Affine):
    kind = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = ""):
        self.weight, self.bias = weight, bias
        self.in_shape, self.out_shape = (weight.shape[1],), (weight.shape[0],)
        self.fan_in, self.fan_out = int(weight.shape[1]) + (bias is not None), int(weight.shape[0])
        self.name = name
        self._abs: torch.Tensor | None = None
        self._ver = _version(weight)

    def _wabs(self) -> torch.Tensor:
        """``|W|``, cached while the weight is unchanged (a model trained in place after compiling
        invalidates it)."""
        if self._abs is None or self._ver != _version(self.weight):
            self._abs, self._ver = self.weight.abs(), _version(self.weight)
        return self._abs

    def forward(self, z):
        return F.linear(z, self.weight, self.bias)

    def forward_abs(self, z):
        return F.linear(z, self._wabs())

    def abs_bias(self):
        return None if self.bias is None else self.bias.abs()

    def bias_full(self):
        return self.bias

    def backward(self, a):
        return a @ self.weight

    def rows(self, idx):
        return self.weight[idx], (None if self.bias is None else self.bias[idx])


class Conv(Affine):
    kind = "conv"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, in_shape: Shape, name: str = ""):
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = int(groups)
        c_out, cin_g, kh, kw = weight.shape
        c, h, w = in_shape
        if c != cin_g * self.groups:
            raise InputError(f"layer {name}: expects {cin_g * self.groups} input channels, gets {c}")
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise InputError(f"layer {name}: input {tuple(in_shape)} is too small for its kernel")
        self.in_shape, self.out_shape = (c, h, w), (int(c_out), ho, wo)
        self.fan_in = cin_g * kh * kw + (bias is not None)
        # products summed per input in Λ ↦ Λ W: an input position meets ⌈k/(s/gcd(s, d))⌉ taps per axis
        self.fan_out = (c_out // self.groups) * math.prod(
            -(-k // (s // math.gcd(s, d))) for k, s, d in zip((kh, kw), self.stride, self.dilation))
        # output_padding that makes conv_transpose2d return exactly the input size
        self.out_pad = tuple(
            size + 2 * p - d * (k - 1) - 1 - (o - 1) * s
            for size, p, d, k, o, s in zip((h, w), self.padding, self.dilation, (kh, kw), (ho, wo), self.stride)
        )
        self.name = name
        self._abs: torch.Tensor | None = None
        self._phases: torch.Tensor | None = None
        self._jac: dict = {}  # patch size -> (matrix of Λ ↦ Λ W over the patch, output patch shape)
        self._ver = _version(weight)

    def _check_cache(self) -> None:
        """Drop the caches derived from the weight when it was changed in place since."""
        v = _version(self.weight)
        if v != self._ver:
            self._abs, self._phases, self._jac, self._ver = None, None, {}, v

    def _wabs(self) -> torch.Tensor:
        self._check_cache()
        if self._abs is None:
            self._abs = self.weight.abs()
        return self._abs

    def _conv(self, z, weight, bias):
        return F.conv2d(z, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, z):
        return self._conv(z, self.weight, self.bias)

    def forward_abs(self, z):
        return self._conv(z, self._wabs(), None)

    def abs_bias(self):
        return None if self.bias is None else self.bias.abs().view(-1, 1, 1)

    def bias_full(self):
        return None if self.bias is None else self.bias.view(-1, 1, 1)

    def backward(self, a):
        if self._phases_ok(a):
            return self._phase_transpose(a, self.padding, self.in_shape[1:])
        return F.conv_transpose2d(a, self.weight, None, self.stride, self.padding, self.out_pad, self.groups,
                                  self.dilation)

    def backward_full(self, a):
        """``Λ ↦ Λ W`` onto the whole unpadded canvas: (N, C_in, (P−1)·s + d·(k−1) + 1, ...) for a patch
        (N, C_out, P, Q); entry 0 of the canvas is input position (first output position)·s − padding."""
        kh, kw = self.weight.shape[2:]
        size = tuple((n - 1) * s + d * (k - 1) + 1
                     for n, s, d, k in zip(a.shape[2:], self.stride, self.dilation, (kh, kw)))
        if self._phases_ok(a):
            return self._phase_transpose(a, (0, 0), size)
        return F.conv_transpose2d(a, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)

    def backward_patch(self, a):
        """:meth:`backward_full` for many small patches (N, C_out, P, Q): one matmul with the map's matrix
        (built once per patch size; its zero entries add nothing), which beats a convolution over tiny
        images by far on CPU."""
        size = tuple(a.shape[1:])
        n_in = math.prod(size)
        if torch.is_grad_enabled() and (a.requires_grad or self.weight.requires_grad) or n_in > 4096:
            return self.backward_full(a)
        self._check_cache()
        if size not in self._jac:
            with torch.no_grad():
                eye = torch.eye(n_in, dtype=a.dtype, device=a.device).view(n_in, *size)
                full = self.backward_full(eye)
            if full[0].numel() * n_in > 2**22:  # too large a matrix: stay with the convolution
                return self.backward_full(a)
            self._jac[size] = (full.reshape(n_in, -1), full.shape[1:])
        mat, out = self._jac[size]
        return (a.reshape(a.shape[0], n_in) @ mat).view(a.shape[0], *out)

    def dilated_kernel(self) -> torch.Tensor:
        """Row of output channel c over its receptive field, for every c: (C_out, C_in, d(k_h−1)+1, d(k_w−1)+1)
        (zeros between dilated taps and outside the channel's group)."""
        w = self.weight
        if self.groups == 1 and self.dilation == (1, 1):
            return w
        c_out, cin_g, kh, kw = w.shape
        (dh, dw), co_g = self.dilation, c_out // self.groups
        out = w.new_zeros(c_out, cin_g * self.groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        for grp in range(self.groups):
            out[grp * co_g:(grp + 1) * co_g, grp * cin_g:(grp + 1) * cin_g, ::dh, ::dw] = w[grp * co_g:(grp + 1) * co_g]
        return out

    def _phases_ok(self, a) -> bool:
        """The phase form below serves plain (groups 1, dilation 1) kernels outside autograd, where it is
        faster: stride 1 (one flipped convolution), or few input channels (the phase interleave is a copy)."""
        few = self.stride == (1, 1) or self.weight.shape[1] * self.stride[0] * self.stride[1] <= 16
        # CPU only: oneDNN convolutions are direct sums; cuDNN might pick Winograd/FFT for stride 1
        return (few and a.device.type == "cpu" and self.groups == 1 and self.dilation == (1, 1)
                and not (torch.is_grad_enabled() and (a.requires_grad or self.weight.requires_grad)))

    def _phase_kernels(self) -> torch.Tensor:
        """The transposed convolution as s_h·s_w ordinary stride-1 convolutions, one per output phase:
        weight (s_h·s_w·C_in, C_out, ⌈k_h/s_h⌉, ⌈k_w/s_w⌉), flipped, taps beyond k zero."""
        self._check_cache()
        if self._phases is None:
            w = self.weight.detach()
            c_out, c_in, kh, kw = w.shape
            (sh, sw) = self.stride
            mh, mw = -(-kh // sh), -(-kw // sw)
            w = F.pad(w, (0, mw * sw - kw, 0, mh * sh - kh))
            w = w.view(c_out, c_in, mh, sh, mw, sw).permute(3, 5, 1, 0, 2, 4).flip(-1, -2)
            self._phases = w.reshape(sh * sw * c_in, c_out, mh, mw).contiguous()
        return self._phases

    def _phase_transpose(self, a, start, size):
        """``conv_transpose2d`` (groups 1, dilation 1) as one stride-1 ``conv2d`` over the output phases
        (much faster on CPU): canvas rows ``start … start + size`` (zeros past the canvas). Every output
        still sums its own products only (the padded taps are exact zeros): the same γ_fan_out bound."""
        w = self._phase_kernels()
        sh, sw = self.stride
        mh, mw = w.shape[2:]
        n = a.shape[0]
        c_in = w.shape[0] // (sh * sw)
        o = F.conv2d(a, w, None, 1, (mh - 1, mw - 1))
        hq, wq = o.shape[2:]
        if sh * sw > 1:
            o = o.view(n, sh, sw, c_in, hq, wq).permute(0, 3, 4, 1, 5, 2).reshape(n, c_in, hq * sh, wq * sw)
        (h0, w0), (hs, ws) = start, size
        extra_h, extra_w = max(0, h0 + hs - o.shape[2]), max(0, w0 + ws - o.shape[3])
        if extra_h or extra_w:
            o = F.pad(o, (0, extra_w, 0, extra_h))
        return o[:, :, h0:h0 + hs, w0:w0 + ws]

    def rows(self, idx):
        """Place the kernel of output neuron (c, h, w) at its receptive field: O(R·C_in·k²) writes."""
        c_out, cin_g, kh, kw = self.weight.shape
        _, ho, wo = self.out_shape
        c_in, h_in, w_in = self.in_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        r = idx.shape[0]
        c = idx // (ho * wo)
        oh = (idx // wo) % ho
        ow = idx % wo
        dev = idx.device
        g = c // (c_out // self.groups)
        ch = (g * cin_g).view(r, 1, 1) + torch.arange(cin_g, device=dev).view(1, cin_g, 1)  # (R, cin_g, 1)
        ki = torch.arange(kh, device=dev).repeat_interleave(kw)
        kj = torch.arange(kw, device=dev).repeat(kh)
        hh = (oh * sh).view(r, 1, 1) + (ki * dh).view(1, 1, -1)  # (R, 1, K) on the padded canvas
        ww = (ow * sw).view(r, 1, 1) + (kj * dw).view(1, 1, -1)
        rr = torch.arange(r, device=dev).view(r, 1, 1)
        vals = self.weight[c].reshape(r, cin_g, kh * kw)  # (R, cin_g, K)
        canvas = torch.zeros(r, c_in, h_in + 2 * ph, w_in + 2 * pw, dtype=self.weight.dtype, device=dev)
        shape = (r, cin_g, kh * kw)
        canvas = canvas.index_put((rr.expand(shape), ch.expand(shape), hh.expand(shape), ww.expand(shape)), vals)
        out = canvas[:, :, ph:ph + h_in, pw:pw + w_in]
        return out, (None if self.bias is None else self.bias[c])


class Channel(Affine):
    """``y[c] = scale[c]·x[c] + shift[c]``; ``mag_bias`` bounds the extra magnitude of the model's own
    float computation (``(x − mean)/std``: ``|mean|/std``; BatchNorm: ``|scale·mean| + |β|``)."""

    kind = "channel"
    diagonal = True

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, mag_bias: torch.Tensor, shape: Shape, name: str = ""):
        self.in_shape = self.out_shape = tuple(shape)
        extra = (1,) * (len(shape) - 1)
        self.scale = scale.reshape(-1, *extra)
        self.shift = shift.reshape(-1, *extra)
        self.mag = mag_bias.reshape(-1, *extra)
        self.per = math.prod(shape[1:]) if len(shape) > 1 else 1  # neurons per channel
        self.fan_in = self.fan_out = 2
        self.name = name
        # set by compile for Normalize(mean 0, std 1): the model's (x − 0)/1 is exact, bounds pass it through
        self.identity = False
        self.positive = bool((self.scale >= 0).all())

    def forward(self, z):
        return z * self.scale + self.shift

    def forward_abs(self, z):
        return z * self.scale.abs()

    def abs_bias(self):
        return self.mag

    def bias_full(self):
        return self.shift

    def backward(self, a):
        return a * self.scale

    def channel_of(self, idx: torch.Tensor) -> torch.Tensor:
        return idx // self.per


class Reshape(Op):
    kind = "reshape"
    diagonal = True

    def __init__(self, in_shape: Shape, out_shape: Shape, name: str = ""):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.name = name

    def forward(self, z):
        return z.reshape(z.shape[0], *self.out_shape)

    def backward(self, a):
        return a.reshape(a.shape[0], *self.in_shape)


# ------------------------------------------------------------------------------------ compile

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _flat_modules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        if type(m) is nn.Sequential:
            out += _flat_modules(m, full + ".")
        else:
            out.append((full, m))
    return out


def refuse(name: str, m: nn.Module, why: str = "") -> InputError:
    extra = f" ({why})" if why else ""
    return InputError(
        f"interval bounds do not support layer {name!r} ({type(m).__name__}){extra}; supported layers: "
        f"{', '.join(SUPPORTED)} in an nn.Sequential"
    )


def check_supported(model: nn.Module) -> None:
    """Refuse early (before any data) a model with layers outside the closed set."""
    if type(model) is not nn.Sequential:
        raise InputError(
            f"interval bounds need a feed-forward nn.Sequential of supported layers, got {type(model).__name__}; "
            f"supported layers: {', '.join(SUPPORTED)}"
        )
    for name, m in _flat_modules(model):
        if not isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten, Normalize, nn.BatchNorm1d, nn.BatchNorm2d,
                              nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)):
            raise refuse(name, m)


def compile_model(model: nn.Module, input_shape: Sequence[int]) -> list[Op]:
    """The model as operators for inputs of per-example shape ``input_shape`` (C, H, W)."""
    check_supported(model)
    shape: Shape = tuple(int(s) for s in input_shape)
    ops: list[Op] = []
    for name, m in _flat_modules(model):
        op = _convert(name, m, shape)
        if op is not None:
            ops.append(op)
            shape = op.out_shape
    if not ops:
        raise InputError("the model has no layers to bound")
    return ops


def _convert(name: str, m: nn.Module, shape: Shape) -> Op | None:
    if isinstance(m, nn.Identity):
        return None
    if isinstance(m, nn.ReLU):
        return ReLU(shape, name)
    if isinstance(m, nn.Flatten):
        ndim = len(shape) + 1
        start, end = m.start_dim % ndim, m.end_dim % ndim
        if start != 1 or end != ndim - 1:
            raise refuse(name, m, "only Flatten(start_dim=1, end_dim=-1)")
        return Reshape(shape, (math.prod(shape),), name)
    if isinstance(m, nn.Linear):
        if len(shape) != 1 or shape[0] != m.in_features:
            raise refuse(name, m, f"needs a flat input of {m.in_features} features, gets {shape}")
        return Dense(m.weight, m.bias, name)
    if isinstance(m, nn.Conv2d):
        if len(shape) != 3:
            raise refuse(name, m, f"needs (C, H, W) inputs, gets {shape}")
        if m.padding_mode != "zeros":
            raise refuse(name, m, f"padding_mode {m.padding_mode!r}; only zero padding")
        padding = m.padding
        if isinstance(padding, str):
            padding = _same_padding(name, m) if padding == "same" else (0, 0)
        return Conv(m.weight, m.bias, _pair(m.stride), _pair(padding), _pair(m.dilation), m.groups, shape, name)
    if isinstance(m, Normalize):
        mean, std = m.mean.flatten(), m.std.flatten()
        c = shape[0]
        if mean.numel() not in (1, c):
            raise refuse(name, m, f"{mean.numel()} channel statistics for {c} channels")
        mean, std = mean.expand(c), std.expand(c)
        scale = 1.0 / std
        op = Channel(scale, -mean * scale, mean.abs() * scale, shape, name)
        op.identity = bool((mean == 0).all()) and bool((std == 1).all())
        return op
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.training:
            raise refuse(name, m, "BatchNorm is bounded in eval mode only (running statistics folded); call model.eval()")
        if m.running_mean is None or m.running_var is None:
            raise refuse(name, m, "BatchNorm without running statistics (track_running_stats=False)")
        want = 3 if isinstance(m, nn.BatchNorm2d) else 1
        if len(shape) != want or shape[0] != m.num_features:
            raise refuse(name, m, f"does not fit inputs of shape {shape}")
        inv = torch.rsqrt(m.running_var + m.eps)
        gamma = m.weight if m.weight is not None else torch.ones_like(inv)
        beta = m.bias if m.bias is not None else torch.zeros_like(inv)
        scale = gamma * inv
        mag = (scale * m.running_mean).abs() + beta.abs()
        return Channel(scale, beta - m.running_mean * scale, mag, shape, name)
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _pool(name, m, shape)
    raise refuse(name, m)


def _same_padding(name: str, m: nn.Conv2d) -> tuple[int, int]:
    pads = []
    for k, d in zip(m.kernel_size, m.dilation):
        total = d * (k - 1)
        if total % 2:
            raise refuse(name, m, "padding='same' with an even receptive field pads asymmetrically")
        pads.append(total // 2)
    return pads[0], pads[1]


def _pool(name: str, m: nn.Module, shape: Shape) -> Conv:
    if len(shape) != 3:
        raise refuse(name, m, f"needs (C, H, W) inputs, gets {shape}")
    c, h, w = shape
    if isinstance(m, nn.AdaptiveAvgPool2d):
        oh, ow = _pair(m.output_size if m.output_size is not None else (h, w))
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            raise refuse(name, m, f"output {oh}x{ow} does not divide input {h}x{w}")
        kernel, stride, padding, divisor = (h // oh, w // ow), (h // oh, w // ow), (0, 0), None
    else:
        kernel, padding = _pair(m.kernel_size), _pair(m.padding)
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        divisor = m.divisor_override
        if m.ceil_mode:
            raise refuse(name, m, "ceil_mode=True")
        if not m.count_include_pad and (padding[0] or padding[1]):
            raise refuse(name, m, "count_include_pad=False with padding (position-dependent divisor)")
    den = float(divisor) if divisor else float(kernel[0] * kernel[1])
    ref = m.weight if hasattr(m, "weight") else None  # pools have no parameters
    dtype = ref.dtype if isinstance(ref, torch.Tensor) else torch.float32
    weight = torch.full((c, 1, kernel[0], kernel[1]), 1.0 / den, dtype=dtype)
    return Conv(weight, None, stride, padding, (1, 1), c, shape, name)


def to_device(ops: list[Op], device: torch.device, dtype: torch.dtype) -> None:
    """Move parameter-free tensors (pool kernels) to the model's device and dtype."""
    for op in ops:
        if isinstance(op, Conv) and (op.weight.device != device or op.weight.dtype != dtype):
            op.weight = op.weight.to(device=device, dtype=dtype)
            op._abs = op._phases = None
            op._jac = {}
            op._ver = _version(op.weight)
