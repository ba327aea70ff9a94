"""The fast paths of the interval bounds compute what the plain ones do.

* the transposed convolution by output phases and by one matrix over a patch equals ``conv_transpose2d``
  (strides, paddings, output padding, dilation, groups);
* CROWN's intermediate bounds over receptive fields (:mod:`certaudit.defenses.interval.patches`) equal
  the whole-layer backward pass up to float rounding, on a net with every spatial layer kind in the
  patch path (Normalize, a convolution straight after another, BatchNorm, a dilated grouped convolution,
  average pooling), and stay sound there (sampled points and vertices, PGD);
* IBP in image groups is IBP on the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certaudit.defenses.interval.crown as crown_mod
from certaudit.defenses.interval import compile_network, layer_bounds, margin_bounds, spec_bounds, specification
from certaudit.defenses.interval.ops import Conv
from certaudit.models import Normalize


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,dilation,groups,size", [
    (1, 16, 4, 2, 1, 1, 1, 28), (16, 4, 4, 2, 1, 1, 1, 14), (3, 8, 3, 1, 1, 1, 1, 9), (2, 3, 3, 2, 0, 1, 1, 8),
    (4, 6, 5, 3, 2, 1, 1, 11), (4, 6, 3, 1, 2, 2, 2, 9), (1, 2, 2, 2, 0, 1, 1, 7),
])
def test_transposed_convolutions_equal_conv_transpose2d(c_in, c_out, k, stride, padding, dilation, groups, size):
    torch.manual_seed(0)
    w = torch.randn(c_out, c_in // groups, k, k)
    op = Conv(w, None, (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups, (c_in, size, size))
    a = torch.randn(6, *op.out_shape)
    with torch.no_grad():
        ref = F.conv_transpose2d(a, w, None, op.stride, op.padding, op.out_pad, groups, op.dilation)
        full = F.conv_transpose2d(a, w, None, op.stride, 0, 0, groups, op.dilation)
        got, got_full, got_patch = op.backward(a), op.backward_full(a), op.backward_patch(a)
    assert got.shape == ref.shape and got_full.shape == got_patch.shape == full.shape
    for val, want in ((got, ref), (got_full, full), (got_patch, full)):
        assert float((val - want).abs().max()) <= 1e-5 * float(want.abs().max())


def patch_cnn(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(
        Normalize([0.4], [0.3]),
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 4x10x10
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU(),  # 6x5x5
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, stride=1),  # 6x4x4
        nn.Flatten(), nn.Linear(96, 16), nn.ReLU(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(max(1, p[0].numel()))))
        m[3].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        m[3].running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return m.eval()


def _both(monkeypatch, fn):
    out = {}
    for flag in (True, False):
        monkeypatch.setattr(crown_mod, "USE_PATCHES", flag)
        out[flag] = fn()
    return out[True], out[False]


def test_patches_equal_whole_layers_and_stay_sound(monkeypatch):
    model = patch_cnn()
    x = torch.rand(10, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    eps = 0.05
    net = compile_network(model, x.shape[1:])
    pred = model(x).argmax(1)
    with torch.no_grad():
        (lay_p, low_p), (lay_d, low_d) = _both(monkeypatch, lambda: (
            layer_bounds(net, x, eps, "crown"), margin_bounds(net, x, eps, pred, "crown", budget_mb=0.05)))
        pure_p, pure_d = _both(monkeypatch, lambda: spec_bounds(
            net, x, eps, specification(pred, 10, x.dtype)[0], "crown", pure=True, lower_slope="parallel"))
    for (lp, up), (ld, ud) in zip(lay_p, lay_d):
        scale = 1e-5 * (1 + float(torch.maximum(ld.abs(), ud.abs()).max()))
        assert float((lp - ld).abs().max()) <= scale and float((up - ud).abs().max()) <= scale
    finite = torch.isfinite(low_d)
    assert float((low_p[finite] - low_d[finite]).abs().max()) <= 1e-4
    assert float((pure_p - pure_d).abs().max()) <= 1e-4
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    gen = torch.Generator().manual_seed(2)
    u = torch.rand((300, *x.shape), generator=gen)
    u[:150] = (u[:150] > 0.5).float()
    with torch.no_grad():
        f = model((lo + u * (hi - lo)).flatten(0, 1)).view(300, 10, 10)
    margins = f.gather(2, pred.view(1, -1, 1).expand(300, -1, 1)) - f
    assert bool(((margins.double() >= low_p.unsqueeze(0)) | torch.isinf(low_p).unsqueeze(0)).all())


def test_ibp_in_image_groups_is_ibp_on_the_batch():
    model = patch_cnn(3)
    x = torch.rand(37, 1, 20, 20, generator=torch.Generator().manual_seed(4))
    net = compile_network(model, x.shape[1:])
    pred = model(x).argmax(1)
    eps = torch.linspace(0.01, 0.05, 37)
    with torch.no_grad():
        whole = margin_bounds(net, x, eps, pred, "ibp")
        groups = margin_bounds(net, x, eps, pred, "ibp", budget_mb=0.01)  # a few images per group
        one = torch.cat([margin_bounds(net, x[i:i + 1], eps[i:i + 1], pred[i:i + 1], "ibp") for i in range(37)])
    scale = 1e-5 * float(one.nan_to_num(posinf=0).abs().max())
    for other in (groups, one):
        assert float((whole - other).nan_to_num(posinf=0).abs().max()) <= scale
