"""Bounds in float64 arithmetic and bounds for the real-arithmetic network (``spec_bounds_real``).

Claims tested:
* a float64 network is bounded with float64's unit roundoff: its bounds are never violated by sampled
  or PGD-attacked points of its float64 forward pass, and stand within ~1e-9 of the plain (unsound)
  float64 bound, where float32's slack is thousands of times larger;
* on a linear network (CROWN exact) the float64 bound is attained by the minimizing corner up to 1e-9;
* ``spec_bounds_real`` decides a margin that lies inside float32's rounding slack (exact oracle: the
  minimizing corner of a linear network, evaluated in float64), never above the exact minimum, and
  leaves every image it does not redo at the float32-sound bound;
* the unit roundoff is float32's outside :func:`arithmetic`, and bad requests are refused.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from certaudit.defenses.interval.bounds import (
    U32, U64, arithmetic, compile_network, compile_network64, spec_bounds, spec_bounds_real, specification, unit,
)
from certaudit.errors import InputError
from certaudit.models import Normalize


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.3]), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(),
        nn.Linear(16, 10),
    ).eval()


def _linear(seed: int, d: int = 256, hidden: int = 256) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Linear(hidden, 10)).eval()


def _corner_values(model64: nn.Module, x: torch.Tensor, eps: float, c: torch.Tensor) -> torch.Tensor:
    """The exact minimum (B, S) of ``C f`` over the clipped box for a linear float64 ``model64``: f at the
    minimizing corner of each row (effective weights from the model's own layers)."""
    w = model64[2].weight @ model64[1].weight  # (10, d)
    a = torch.einsum("bsk,kd->bsd", c.double(), w)
    lo, hi = (x.double() - eps).clamp(0, 1).flatten(1), (x.double() + eps).clamp(0, 1).flatten(1)
    corner = torch.where(a > 0, lo.unsqueeze(1), hi.unsqueeze(1))  # (B, S, d)
    with torch.no_grad():
        f = model64(corner.view(-1, *x.shape[1:])).view(*c.shape)
    return torch.einsum("bsk,bsk->bs", c.double(), f)


@pytest.mark.parametrize("method", ("ibp", "crown-ibp", "crown", "alpha-crown"))
def test_float64_bounds_are_sound_and_their_slack_is_float64_sized(method):
    model = _cnn(1)
    model64 = copy.deepcopy(model).double()
    torch.manual_seed(5)
    x = torch.rand(6, 1, 12, 12, dtype=torch.float64)
    eps = 0.05
    net64 = compile_network64(model, x.shape[1:])
    net32 = compile_network(model, x.shape[1:])
    with torch.no_grad():
        pred = model64(x).argmax(1)
        c, _ = specification(pred, 10, torch.float64)
        low = spec_bounds(net64, x, eps, c, method)
        plain = spec_bounds(net64, x, eps, c, method, sound=False)
        low32 = spec_bounds(net32, x.float(), eps, c.float(), method)
        plain32 = spec_bounds(net32, x.float(), eps, c.float(), method, sound=False)
    assert low.dtype == torch.float64
    gap64 = float((plain - low).max())
    gap32 = float((plain32.double() - low32).min())
    assert 0 <= gap64 < 1e-9 * max(1.0, float(plain.abs().max()))
    assert gap32 > 1e3 * max(gap64, 1e-16)
    # samples (corners and uniform) and PGD in the float64 forward pass never go below the bound
    gen = torch.Generator().manual_seed(0)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((300, *x.shape), generator=gen, dtype=torch.float64)
    u[:150] = (u[:150] > 0.5).double()
    xs = lo + u * (hi - lo)
    with torch.no_grad():
        f = model64(xs.flatten(0, 1)).view(300, x.shape[0], 10)
    vals = torch.einsum("bsk,nbk->nbs", c, f)
    assert bool((vals >= low.unsqueeze(0)).all())
    xa = (lo + torch.rand(x.shape, generator=gen, dtype=torch.float64) * (hi - lo)).requires_grad_(True)
    for _ in range(30):
        m = torch.einsum("bsk,bk->bs", c, model64(xa)).min(1).values
        assert bool((m.detach() >= low.min(1).values).all())
        (g,) = torch.autograd.grad(m.sum(), xa)
        xa = torch.max(torch.min(xa.detach() - eps / 4 * g.sign(), hi), lo).requires_grad_(True)


def test_float64_crown_is_attained_on_a_linear_network():
    model = _linear(3, d=64, hidden=40)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    eps = 0.1
    net64 = compile_network64(model, x.shape[1:])
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        c, _ = specification(model64(x).argmax(1), 10, torch.float64)
        low = spec_bounds(net64, x, eps, c, "crown")
    exact = _corner_values(model64, x, eps, c)
    assert bool((exact >= low).all())
    assert float((exact - low).max()) < 1e-9


def test_real_network_bounds_decide_a_margin_inside_the_float32_slack():
    """A linear network whose exact smallest margin (oracle: the minimizing corner) is set to a quarter
    of float32's slack: float32-sound bounds leave it undecided, the real-network bound proves it."""
    model = _linear(7)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 16, 16, generator=gen)
    eps = 0.05
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        pred = model(x).argmax(1)
    c, _ = specification(pred, 10, torch.float32)
    net = compile_network(model, x.shape[1:])
    with torch.no_grad():
        gap = (spec_bounds(net, x, eps, c, "crown", sound=False).double() - spec_bounds(net, x, eps, c, "crown"))
    # image 0: lift its target logit's bias so that its smallest exact margin is a quarter of the slack
    exact = _corner_values(model64, x, eps, c.double())
    t = int(pred[0])
    with torch.no_grad():
        shift = float(-exact[0].min() + gap[0].min() / 4)
        model[2].bias[t] += shift
        model64 = copy.deepcopy(model).double()
        exact = _corner_values(model64, x, eps, c.double())
        assert int(model(x[:1]).argmax(1)) == t  # the shift keeps the prediction (seeded)
    assert 0 < float(exact[0].min()) < float(gap[0].min()) / 2
    net, net64 = compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:])
    with torch.no_grad():
        f32 = spec_bounds(net, x, eps, c, "crown")
        real, redo = spec_bounds_real(net, net64, x, eps, c, "crown")
    assert float(f32[0].min()) <= 0 < float(real[0].min())  # decided only with the real-network claim
    assert bool(redo[0])
    assert bool((real <= exact + 1e-9).all())  # sound against the exact oracle
    assert bool((real >= f32).all())
    assert torch.equal(real[~redo], f32[~redo])


def test_unit_roundoff_is_float32_outside_and_restored_after_errors():
    assert unit() == U32
    with arithmetic(torch.float64):
        assert unit() == U64
        with arithmetic(torch.float32):
            assert unit() == U32
        assert unit() == U64
    assert unit() == U32
    with pytest.raises(RuntimeError):
        with arithmetic(torch.float64):
            raise RuntimeError("boom")
    assert unit() == U32
    with pytest.raises(InputError):
        with arithmetic(torch.float16):
            pass


def test_real_network_bounds_refuse_what_they_do_not_cover():
    model = _linear(2, d=16, hidden=8)
    x = torch.rand(2, 1, 4, 4)
    net, net64 = compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:])
    c, _ = specification(torch.zeros(2, dtype=torch.long), 10, torch.float32)
    with pytest.raises(InputError, match="alpha-crown|ibp, crown-ibp"):
        spec_bounds_real(net, net64, x, 0.1, c, "alpha-crown")
    with pytest.raises(InputError, match="float64 copy"):
        spec_bounds_real(net, net, x, 0.1, c, "crown")
    with pytest.raises(InputError):
        spec_bounds_real(net, net64, x, 0.1, c, "crown", norm="l2")
    with torch.no_grad():
        assert math.isfinite(float(spec_bounds_real(net, net64, x, 0.1, c, "crown-ibp")[0].min()))


def test_real_network_ibp_selects_images_by_the_widening_of_every_layer():
    """IBP's float32 gap comes from the widening at every layer, not the last one's slack: an image whose
    float64 IBP bound is a quarter of that gap is still redone and proven."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    torch.manual_seed(4)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.weight, -0.1, 0.1)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    eps = 0.002
    with torch.no_grad():
        pred = model(x).argmax(1)
    c, _ = specification(pred, 10, torch.float32)
    for _ in range(2):  # set image 0's smallest float64 IBP margin to a quarter of float32's gap
        net, net64 = compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:])
        with torch.no_grad():
            f32 = spec_bounds(net, x, eps, c, "ibp")
            plain = spec_bounds(net, x, eps, c, "ibp", sound=False).double()
            f64 = spec_bounds(net64, x.double(), eps, c.double(), "ibp")
            gap = float((plain[0] - f32[0]).min())
            model[5].bias[int(pred[0])] += float(gap / 4 - f64[0].min())
    net, net64 = compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:])
    with torch.no_grad():
        assert int(model(x[:1]).argmax(1)) == int(pred[0])
        f32 = spec_bounds(net, x, eps, c, "ibp")
        f64 = spec_bounds(net64, x.double(), eps, c.double(), "ibp")
        _, st = spec_bounds(net, x, eps, c, "ibp", return_state=True)
        real, redo = spec_bounds_real(net, net64, x, eps, c, "ibp")
    last_slack = float(st.spec_slack[0].min())
    assert float(f32[0].min()) <= 0 < float(f64[0].min()) < gap
    assert gap > 2 * 1e-6 and bool(redo[0]) and float(real[0].min()) > 0
    assert last_slack >= gap / 2  # the selection measure covers the whole gap


def test_float64_networks_with_pooling_and_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    model[1].running_mean.uniform_(-0.2, 0.2)
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    net64 = compile_network64(model, x.shape[1:])
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        pred = model64(x).argmax(1)
        c, _ = specification(pred, 10, torch.float64)
        for method in ("ibp", "crown-ibp", "crown"):
            low = spec_bounds(net64, x, 0.01, c, method)
            assert low.dtype == torch.float64
            assert bool((low <= torch.einsum("bsk,bk->bs", c, model64(x))).all())


def test_real_network_bounds_refuse_a_float64_network_of_another_model_and_bad_inputs():
    model = _linear(2, d=16, hidden=8)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].bias[0] += 5
    x = torch.rand(2, 1, 4, 4)
    net = compile_network(model, x.shape[1:])
    c, _ = specification(torch.zeros(2, dtype=torch.long), 10, torch.float32)
    with pytest.raises(InputError, match="same model"):
        spec_bounds_real(net, compile_network64(other, x.shape[1:]), x, 0.1, c, "crown")
    net64 = compile_network64(model, x.shape[1:])
    bad = [((x.double(), 0.1, c), "float32 batch"), ((x, 0.1, c.double()), "specification"),
           ((x * float("nan"), 0.1, c), "finite"), ((x + 2, 0.1, c), r"\[0, 1\]"), ((x, -0.1, c), "> 0"),
           ((x, float("nan"), c), "> 0"), ((x, torch.tensor([0.1]), c), "per-image"),
           ((x[:0], 0.1, c[:0]), "non-empty"), ((x, 0.1, c[:1]), "specification")]
    for (xb, e, cb), msg in bad:
        with pytest.raises(InputError, match=msg):
            spec_bounds_real(net, net64, xb, e, cb, "crown-ibp")
    with pytest.raises(InputError, match="float64 tensor"):
        spec_bounds(net64, x, 0.1, c.double(), "crown")
    with pytest.raises(InputError, match="nn.Module"):
        compile_network64("model.pth", x.shape[1:])


def test_real_network_ibp_selects_a_deep_chain_whose_gap_is_its_rounded_up_radii():
    """30 one-neuron layers: the float32 gap is mostly the rounded-up radii (4u·|W|·rad a layer); an
    exact margin of a few 1e-6 is still redone and proven (a measure without that term missed it)."""
    def chain(d):
        layers = [Normalize([0.5], [0.5]), nn.Flatten()]
        for _ in range(30):
            lin = nn.Linear(1, 1)
            nn.init.ones_(lin.weight)
            nn.init.zeros_(lin.bias)
            layers.append(lin)
        last = nn.Linear(1, 2)
        with torch.no_grad():
            last.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            last.bias.copy_(torch.tensor([1.0 + d, -1.0]))
        return nn.Sequential(*layers + [last]).eval()

    x, c = torch.full((1, 1, 1, 1), 0.5), torch.tensor([[[1.0, -1.0]]])
    for d in (2 * 2.0 ** -23, 30 * 2.0 ** -23):
        model = chain(d)
        net, net64 = compile_network(model, (1, 1, 1)), compile_network64(model, (1, 1, 1))
        with torch.no_grad():
            f32 = float(spec_bounds(net, x, 0.5, c, "ibp"))
            real, redo = spec_bounds_real(net, net64, x, 0.5, c, "ibp")
        assert f32 <= 0 < float(real) <= d + 1e-12 and bool(redo)


def test_weights_changed_in_place_after_compiling():
    """The compiled network reads the model's weights live: cached |W| follows an in-place change, and a
    float64 copy made before it is refused by spec_bounds_real (it is no longer the same model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 10)).eval()
    x = torch.rand(2, 1, 6, 6)
    c, _ = specification(torch.zeros(2, dtype=torch.long), 10, torch.float32)
    net, net64 = compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:])
    with torch.no_grad():
        spec_bounds_real(net, net64, x, 0.05, c, "crown-ibp")
        before = spec_bounds(net, x, 0.05, c, "ibp")
        model[0].weight.mul_(10)
        model[3].bias.add_(1)
        stale = spec_bounds(net, x, 0.05, c, "ibp")
        fresh = spec_bounds(compile_network(model, x.shape[1:]), x, 0.05, c, "ibp")
        assert torch.equal(stale, fresh) and not torch.equal(stale, before)
        with pytest.raises(InputError, match="same model"):
            spec_bounds_real(net, net64, x, 0.05, c, "crown-ibp")
