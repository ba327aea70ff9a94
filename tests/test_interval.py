"""Interval (IBP), CROWN-IBP and CROWN ℓ∞ bounds: soundness, tightness, the oracle, the defense.

Claims tested, as the papers state them:
* a bound is never violated by sampled or PGD-attacked points of the clipped ε-ball (float32 model);
* a bound that theory says is exact (CROWN on a linear network) is attained up to its slack and
  still not violated in float32;
* CROWN's pre-activation bounds lie inside IBP's; all methods agree where the box is exact;
* on one hidden layer, CROWN = CROWN-IBP, and with zero lower slopes CROWN-IBP ⊇ IBP is beaten;
* with parallel slopes and no IBP, our CROWN is the Wong & Kolter dual bound (convex_adversarial);
* the radius returned by the bisection is itself certified.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from certaudit.defenses.base import ABSTAIN
from certaudit.defenses.interval import (
    CROWN_IBP, IBP, IntervalDefense, compile_network, convert_kw, layer_bounds, logit_bounds, margin_bounds,
    spec_bounds, specification,
)
from certaudit.defenses.interval.ops import Conv
from certaudit.errors import CheckpointError, InputError
from certaudit.models import ModelMeta, Normalize, build_model

METHODS = ("ibp", "crown-ibp", "crown")
SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_cnn(seed: int = 0, channels: int = 1) -> nn.Sequential:
    """Every supported layer kind on 8x8 inputs: Normalize, strided/padded/dilated/grouped conv,
    BatchNorm (eval), average pooling, Flatten, Linear."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(
        Normalize([0.4] * channels, [0.3] * channels),
        nn.Conv2d(channels, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 4x4x4
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.ReLU(),  # 6x4x4
        nn.AvgPool2d(2), nn.Flatten(),  # 24
        nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(max(1, p[0].numel()))))
        bn = m[2]
        bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    from certaudit.data import load_dataset

    x, y = load_dataset("digits", "test")
    return x[:16], y[:16]


def _box_samples(x, eps, n, gen):
    """Uniform samples and random corners of the clipped ball, (n, B, C, H, W)."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((n, *x.shape), generator=gen)
    u[: n // 2] = (u[: n // 2] > 0.5).float()  # vertices
    return lo + u * (hi - lo)


def _pgd_min_margin(model, x, eps, target, steps=25, seed=0):
    """Per image, the smallest f_target − f_j found by signed-gradient descent from random starts."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    best = torch.full((x.shape[0],), math.inf)
    for restart in range(2):
        xa = (lo + torch.rand(x.shape, generator=gen) * (hi - lo)).requires_grad_(True)
        for _ in range(steps):
            f = model(xa)
            m = f.gather(1, target[:, None]) - f
            m = m.scatter(1, target[:, None], math.inf).min(1).values
            best = torch.minimum(best, m.detach())
            (g,) = torch.autograd.grad(m.sum(), xa)
            xa = torch.max(torch.min(xa.detach() - eps / 4 * g.sign(), hi), lo).requires_grad_(True)
        with torch.no_grad():
            f = model(xa)
            m = (f.gather(1, target[:, None]) - f).scatter(1, target[:, None], math.inf).min(1).values
            best = torch.minimum(best, m)
    return best


# ---------------------------------------------------------------------------------- operators

@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (2, 2, 2, 2), (3, 1, 1, 4)])
def test_conv_rows_are_the_rows_of_the_convolution(stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    op = Conv(conv.weight, conv.bias, (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups, (4, 9, 9))
    n = op.out_size
    idx = torch.arange(n)
    rows, bias = op.rows(idx)
    onehot = torch.eye(n).view(n, *op.out_shape)
    ref = op.backward(onehot)
    assert torch.equal(rows, ref)
    assert torch.equal(bias, conv.bias.repeat_interleave(n // 8))


# ---------------------------------------------------------------------------------- soundness

@pytest.mark.parametrize("method", METHODS)
def test_bounds_are_never_violated_by_samples(method, images):
    model = tiny_cnn(1)
    x, _ = images
    eps = 0.06
    net = compile_network(model, x.shape[1:])
    lo, hi = logit_bounds(net, x, eps, method)
    pred = model(x).argmax(1)
    low = margin_bounds(net, x, eps, pred, method)
    gen = torch.Generator().manual_seed(0)
    xs = _box_samples(x, eps, 400, gen)
    with torch.no_grad():
        f = model(xs.flatten(0, 1)).view(400, *lo.shape)
    assert bool((f >= lo).all()) and bool((f <= hi).all())
    margins = f.gather(2, pred.view(1, -1, 1).expand(400, -1, 1)) - f  # (n, B, K)
    assert bool(((margins.double() >= low.unsqueeze(0)) | torch.isinf(low).unsqueeze(0)).all())


@pytest.mark.parametrize("method", METHODS)
def test_bounds_are_never_violated_by_pgd(method, images):
    model = tiny_cnn(2)
    x, _ = images
    eps = 0.04
    net = compile_network(model, x.shape[1:])
    pred = model(x).argmax(1)
    with torch.no_grad():
        low = margin_bounds(net, x, eps, pred, method).min(1).values
    found = _pgd_min_margin(model, x, eps, pred)
    assert bool((found.double() >= low).all())
    if method == "crown":  # and CROWN is not vacuous here: some gap stays small
        assert float((found.double() - low).min()) < 1.0


def test_an_exact_bound_is_attained_and_still_not_violated_in_float32():
    """On a linear network CROWN is exact: the minimizing corner reaches it up to the slack."""
    torch.manual_seed(3)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(64, 40), nn.Linear(40, 10)).eval()
    x = torch.rand(8, 1, 8, 8)
    eps = 0.1
    net = compile_network(model, x.shape[1:])
    target = model(x).argmax(1)
    c, others = specification(target, 10, x.dtype)
    with torch.no_grad():
        low = spec_bounds(net, x, eps, c, "crown")  # (B, 9)
        tiny = spec_bounds(net, x, 1e-7, c, "crown")
    w = model[3].weight @ model[2].weight / 0.25  # effective weights on the input
    a = torch.einsum("bsk,kd->bsd", c, w)  # (B, 9, 64)
    lo, hi = (x - eps).clamp(0, 1).flatten(1), (x + eps).clamp(0, 1).flatten(1)
    corner = torch.where(a > 0, lo.unsqueeze(1), hi.unsqueeze(1))  # argmin of each spec row
    with torch.no_grad():
        f = model(corner.view(-1, 1, 8, 8)).view(8, 9, 10)
    val = torch.einsum("bsk,bsk->bs", c.double(), f.double())
    assert bool((val >= low).all())
    assert float((val - low).max()) < 1e-3  # tight: only the floating-point slack separates them
    with torch.no_grad():
        f0 = model(x)
    assert bool((torch.einsum("bsk,bk->bs", c.double(), f0.double()) >= tiny).all())


# ---------------------------------------------------------------------------------- tightness

def test_crown_intermediate_bounds_lie_inside_ibp_and_first_layers_agree(images):
    model = tiny_cnn(4)
    x, _ = images
    net = compile_network(model, x.shape[1:])
    with torch.no_grad():
        ibp = layer_bounds(net, x, 0.05, "ibp")
        cib = layer_bounds(net, x, 0.05, "crown-ibp")
        crown = layer_bounds(net, x, 0.05, "crown")
    for (li, ui), (lc, uc), (l2, u2) in zip(ibp, crown, cib):
        assert bool((lc >= li).all()) and bool((uc <= ui).all())
        assert torch.equal(li, l2) and torch.equal(ui, u2)  # CROWN-IBP uses IBP's
    assert torch.equal(ibp[0][0], crown[0][0])  # the first ReLU sees an exact box: all agree
    assert float(sum((u - l).sum() for l, u in crown)) < float(sum((u - l).sum() for l, u in ibp))


def test_one_hidden_layer_crown_equals_crown_ibp_and_zero_slopes_beat_ibp():
    torch.manual_seed(5)
    model = nn.Sequential(Normalize([0.0], [1.0]), nn.Flatten(), nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 10)).eval()
    x = torch.rand(12, 1, 8, 8)
    net = compile_network(model, x.shape[1:])
    y = model(x).argmax(1)
    c, _ = specification(y, 10, x.dtype)
    kw = dict(sound=False)
    crown = spec_bounds(net, x, 0.05, c, "crown", **kw)
    cib = spec_bounds(net, x, 0.05, c, "crown-ibp", **kw)
    ibp = spec_bounds(net, x, 0.05, c, "ibp", **kw)
    assert torch.allclose(crown, torch.maximum(cib, ibp))  # CROWN keeps the better of its pass and IBP
    assert bool((crown >= ibp).all())
    zero = spec_bounds(net, x, 0.05, c, "crown-ibp", lower_slope="zero", **kw)
    assert bool((zero >= ibp - 1e-5).all())


def test_agreement_with_the_convex_adversarial_oracle():
    ca = pytest.importorskip("convex_adversarial")
    torch.manual_seed(6)
    model = build_model("2c2f", (1, 12, 12), 10).eval()  # Normalize(0, 1) first: the oracle gets model[1:]
    x = torch.rand(4, 1, 12, 12)
    eps = 0.05
    net = compile_network(model, x.shape[1:])
    y = model(x).argmax(1)
    c, _ = specification(y, 10, x.dtype)
    with torch.no_grad():
        ref = ca.DualNetwork(model[1:], x, eps, bounded_input=True)(c).double()  # lower bounds of C f
        ours = spec_bounds(net, x, eps, c, "crown", pure=True, lower_slope="parallel", sound=False)
        sound = spec_bounds(net, x, eps, c, "crown", pure=True, lower_slope="parallel")
        crown = spec_bounds(net, x, eps, c, "crown")
    assert torch.allclose(ours.double(), ref, atol=1e-4, rtol=1e-4)
    assert bool((sound <= ref + 1e-6).all())  # the float-safe version only widens
    assert float(crown.mean()) > float(ref.mean())  # adaptive slopes + IBP intersection: tighter here


# ---------------------------------------------------------------------------------- defense

@pytest.mark.parametrize("method", ("ibp", "crown"))
def test_the_bisection_radius_is_itself_certified(method, images):
    model = tiny_cnn(7)
    x, _ = images
    d = IntervalDefense(model, 10, method, tol=1e-3)
    cert = d.certify(x)
    assert cert.radius.dtype == torch.float32
    pos = cert.radius > 0
    assert int(pos.sum()) >= 4
    with torch.no_grad():
        for r in cert.radius[pos].unique():
            sel = pos & (cert.radius == r)
            m = d.margin(x[sel], float(r), cert.label[sel])
            assert bool((m > 0).all())
    if method == "ibp":  # IBP is monotone in ε: just above the returned radius nothing certifies
        above = (cert.radius[pos] + 1e-3).clamp(max=1.0)
        for i, e in zip(pos.nonzero().squeeze(1), above):
            if e < 1.0:
                assert not bool(d.margin(x[i:i + 1], float(e), cert.label[i:i + 1]) > 0)
        for eps in (0.01, 0.03):
            acc = d.accept(x, eps)
            assert torch.equal(acc != ABSTAIN, cert.radius >= eps) or bool(
                ((acc != ABSTAIN) == (cert.radius >= eps))[(cert.radius - eps).abs() > 1e-3].all())


def test_margin_is_differentiable_and_positive_iff_accepted(images):
    model = tiny_cnn(7)
    x, _ = images
    d = IntervalDefense(model, 10, "crown")
    eps = 0.01
    pred = model(x).argmax(1)
    xg = x.clone().requires_grad_(True)
    m = d.margin(xg, eps, pred)
    assert m.shape == (16,) and m.dtype == torch.float32
    m.sum().backward()
    assert bool(torch.isfinite(xg.grad).all()) and float(xg.grad.abs().sum()) > 0
    acc = d.accept(x, eps)
    assert torch.equal(acc != ABSTAIN, m.detach() > 0)
    assert torch.equal(acc[acc != ABSTAIN], pred[acc != ABSTAIN])


def test_bounds_do_not_depend_on_batch_mates_or_memory_blocks(images):
    model = tiny_cnn(8)
    x, _ = images
    net = compile_network(model, x.shape[1:])
    y = model(x).argmax(1)
    full = margin_bounds(net, x, 0.05, y, "crown")
    small = margin_bounds(net, x, 0.05, y, "crown", budget_mb=0.3)  # forces row blocks
    part = margin_bounds(net, x[3:7], 0.05, y[3:7], "crown")
    assert torch.allclose(full, small, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full[3:7], part, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer,why", [
    (nn.MaxPool2d(2), "MaxPool2d"), (nn.Sigmoid(), "Sigmoid"), (nn.Dropout(0.1), "Dropout"),
])
def test_unsupported_layers_are_refused(layer, why):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(), nn.Linear(2 * 64 if why != "MaxPool2d" else 32, 10))
    with pytest.raises(InputError, match=why):
        IntervalDefense(model, 10).certify(torch.rand(2, 1, 8, 8))


def test_non_sequential_models_and_training_batchnorm_are_refused():
    with pytest.raises(InputError, match="nn.Sequential"):
        IntervalDefense(build_model("resnet20", (3, 32, 32), 10)[1], 10)
    with pytest.raises(InputError, match="CifarResNet"):
        IntervalDefense(build_model("resnet20", (3, 32, 32), 10), 10)
    model = tiny_cnn(0).train()
    with pytest.raises(InputError, match="eval mode"):
        IntervalDefense(model, 10).accept(torch.rand(2, 1, 8, 8), 0.1)
    conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(InputError, match="padding_mode"):
        IntervalDefense(nn.Sequential(conv, nn.Flatten(), nn.Linear(128, 10)), 10).accept(torch.rand(2, 1, 8, 8), 0.1)


def test_registry_builds_the_defense_from_options():
    from certaudit.defenses.registry import build_defense

    model = build_model("2c2f", (1, 8, 8), 10).eval()
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0])
    d = build_defense("interval", model, meta, {"method": "crown-ibp", "tol": 0.01, "batch_size": 4, "eps": 0.1})
    assert isinstance(d, IntervalDefense) and d.method == "crown-ibp" and d.tol == 0.01
    with pytest.raises(InputError, match="bound method"):
        build_defense("interval", model, meta, {"method": "lp"})
    with pytest.raises(InputError):
        d.accept(torch.rand(2, 1, 8, 8) * 2, 0.1)
    with pytest.raises(InputError):
        d.accept(torch.rand(2, 1, 8, 8), -0.1)


# ---------------------------------------------------------------------------------- training

def test_training_methods_are_registered_and_scheduled():
    from certaudit.train import TrainConfig, check_config, get_method

    assert get_method("crown-ibp") is CROWN_IBP and get_method("ibp") is IBP
    with pytest.raises(InputError, match="eps"):
        check_config(TrainConfig(method="crown-ibp"))
    cfg = TrainConfig(method="crown-ibp", eps=0.2, eps_warmup=0.5)
    assert CROWN_IBP.schedule(cfg, 0.0) == (0.0, 1.0, 1.0)
    eps, kappa, beta = CROWN_IBP.schedule(cfg, 0.25)
    assert eps == pytest.approx(0.1) and kappa == pytest.approx(0.5) and beta == pytest.approx(0.5)
    assert CROWN_IBP.schedule(cfg, 0.9) == (pytest.approx(0.2), 0.0, 0.0)
    assert IBP.schedule(TrainConfig(method="ibp", eps=0.2, eps_warmup=0.5), 1.0)[1:] == (0.5, 0.0)
    assert CROWN_IBP.meta(cfg) == {"eps": 0.2, "norm": "linf"}
    with pytest.raises(InputError, match="unknown option"):
        CROWN_IBP.setup(build_model("2c2f", (1, 8, 8), 10), TrainConfig(method="crown-ibp", eps=0.1, extra={"kapa": 1}))
    with pytest.raises(InputError, match="BatchNorm"):
        CROWN_IBP.setup(tiny_cnn(0), cfg)


@pytest.mark.parametrize("method", ("crown-ibp", "ibp"))
def test_certified_training_gives_interval_certificates(method, digits):
    """Four short epochs on digits: IBP certifies about a quarter of the test set at ε = 0.05
    (a standard model trained the same way: none)."""
    from certaudit.train import TrainConfig, train

    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10)
    cfg = TrainConfig(method=method, eps=0.05, epochs=4, batch_size=64, lr=5e-3, eps_warmup=0.5, seed=0)
    res = train(model, x_tr, y_tr, cfg, x_te, y_te, progress=False)
    assert all(math.isfinite(r["loss"]) for r in res.history)
    acc = IntervalDefense(model, 10, "ibp").accept(x_te, 0.05)
    assert float((acc == y_te).float().mean()) >= 0.15


def test_crown_ibp_loss_on_a_cifar_model_has_gradients():
    from certaudit.train import StepInfo, TrainConfig

    torch.manual_seed(0)
    model = build_model("4c3f", (3, 32, 32), 10, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2))
    cfg = TrainConfig(method="crown-ibp", eps=8 / 255, eps_warmup=0.5)
    CROWN_IBP.setup(model, cfg)
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    loss, logits = CROWN_IBP.loss(model, x, y, cfg, StepInfo(0, 1, 4, torch.Generator()))
    loss.backward()
    assert math.isfinite(loss.item()) and logits.shape == (4, 10)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------- import

def _kw_net(in_ch: int, side: int) -> nn.Sequential:
    flat = 32 * (side // 4) ** 2
    return nn.Sequential(nn.Conv2d(in_ch, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, 10))


def test_convert_kw_single_model_and_cascade(tmp_path):
    torch.manual_seed(0)
    theirs = _kw_net(1, 28).eval()
    path = tmp_path / "fashion_mnist.pth"
    torch.save(theirs.state_dict(), path)
    model, meta = convert_kw(path, "fashion-mnist")
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(model(x), theirs(x), atol=1e-6)
    assert meta.arch == "2c2f" and meta.eps == 0.1 and meta.norm == "linf" and meta.method == "kw"
    assert meta.training["reported"]["robust_error"] == 0.3453

    stages = [_kw_net(3, 32).eval() for _ in range(3)]
    cpath = tmp_path / "cifar_small_8px.pth"
    torch.save({"state_dict": [s.state_dict() for s in stages], "err": 0.7171, "epoch": 20}, cpath)
    model, meta = convert_kw(cpath, "cifar10", stage=1)
    xc = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(model(xc), stages[1]((xc - mean) / 0.225), atol=1e-5)
    assert meta.eps == pytest.approx(8 / 255) and meta.training["stage"] == 1 and meta.training["err"] == 0.7171
    with pytest.raises(InputError, match="stage"):
        convert_kw(cpath, "cifar10", stage=3)
    with pytest.raises(InputError, match="channel"):
        convert_kw(path, "cifar10")
    bad = theirs.state_dict()
    bad["5.weight"] = bad["5.weight"][:, :100]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape"):
        convert_kw(tmp_path / "bad.pth", "fashion-mnist")


def test_published_fashion_mnist_model():
    """The Wong & Kolter model: its clean error and, on a few images, the oracle's bound."""
    path = SHARED / "models" / "kw" / "fashion_mnist.pth"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    from certaudit.data import load_dataset
    from certaudit.errors import DataNotFoundError

    try:
        x, y = load_dataset("fashion-mnist", "test", download=False)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST test set not available")
    model, meta = convert_kw(path, "fashion-mnist")
    with torch.no_grad():
        err = float((model(x[:1000]).argmax(1) != y[:1000]).float().mean())
    assert 0.15 < err < 0.30  # 21.73% on the full test set
    d = IntervalDefense(model, 10, "crown")
    acc = d.accept(x[:20], 0.1)
    assert int((acc == y[:20]).sum()) >= 8  # about 65% verified on the full test set
    ca = pytest.importorskip("convex_adversarial")
    net = compile_network(model, (1, 28, 28))
    c, _ = specification(y[:3], 10, x.dtype)
    with torch.no_grad():
        ref = ca.DualNetwork(model[1:], x[:3], 0.1, bounded_input=True)(c).double()
        ours = spec_bounds(net, x[:3], 0.1, c, "crown", pure=True, lower_slope="parallel", sound=False)
    assert torch.allclose(ours.double(), ref, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------- Shadow Attack

@pytest.fixture(scope="module")
def crown_ibp_digits(tmp_path_factory):
    """A 2C2F trained with CROWN-IBP at ε = 0.05 on digits (a few seconds), saved as a checkpoint."""
    from certaudit.data import load_dataset
    from certaudit.models import save_checkpoint
    from certaudit.train import TrainConfig, train

    x_tr, y_tr = load_dataset("digits", "train")
    x_te, y_te = load_dataset("digits", "test")
    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10)
    train(model, x_tr, y_tr, TrainConfig(method="crown-ibp", eps=0.05, epochs=2, batch_size=64, lr=5e-3,
                                         eps_warmup=0.5, seed=0), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "digits_crownibp.safetensors"
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0],
                     method="crown-ibp", eps=0.05, norm="linf")
    save_checkpoint(path, model.eval(), meta)
    return model.eval(), path, x_te, y_te


def test_robust_ce_margin_is_the_training_loss_term(crown_ibp_digits):
    model, _, x_te, y_te = crown_ibp_digits
    d = IntervalDefense(model, 10, "crown-ibp")
    x, t = x_te[:6], (y_te[:6] + 1) % 10
    low = d.bounds(x, 0.05, target=t)  # (B, K), +inf at t
    xg = x.clone().requires_grad_(True)
    ce = d.margin(xg, 0.05, t, reduction="ce")
    ref = torch.nn.functional.cross_entropy(-low.masked_fill(torch.isinf(low), 0.0), t, reduction="none")
    assert torch.allclose(-ce.detach().double(), ref, atol=1e-4)
    assert bool((ce.detach().double() < low.min(1).values.clamp(max=0) + 1e-6).all())
    ce.sum().backward()
    assert bool(torch.isfinite(xg.grad).all()) and float(xg.grad.abs().sum()) > 0
    with pytest.raises(InputError, match="reduction"):
        d.margin(x, 0.05, t, reduction="mean")


def test_shadow_attack_on_interval_through_the_cli_is_sound_and_reports_table_2(crown_ibp_digits, tmp_path, capsys):
    """`certaudit spoof --defense interval` with the paper's CROWN-IBP setting: every spoofed
    certificate is real (the bound at the spoofed label and radius is positive, and neither samples
    nor PGD in that ball change the label), and robust / attack error follow from the rows."""
    import json

    from certaudit.cli import main

    model, path, x_te, y_te = crown_ibp_digits
    rows_path = tmp_path / "spoof.jsonl"
    argv = ["spoof", "--model", str(path), "--defense", "interval", "--method", "crown-ibp", "--eps", "0.05",
            "--loss", "robust-ce", "--steps", "10", "--limit", "4", "--out", str(rows_path), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    header, *rows = [json.loads(s) for s in rows_path.read_text().splitlines()]
    shadow = header["config"]["shadow"]
    assert (shadow["lambda_tv"], shadow["lambda_c"], shadow["color"], shadow["lr"], shadow["channels"]) == (
        9e-6, 0.02, "l2", 200.0, 1)
    assert header["config"]["settings"]["method"] == "crown-ibp" and header["config"]["spoof_loss"]["reduction"] == "ce"
    assert len(rows) == 4 and all(r["attacked"] for r in rows)  # deterministic: every image is attacked
    # Table 2 comes from the defense's own check at exactly ε (never from a bisection radius compared with ε)
    d_cli = IntervalDefense(model, 10, "crown-ibp")
    acc_nat = d_cli.accept(x_te[:4], 0.05).tolist()
    assert [r["natural_certified_eps"] for r in rows] == [a != -1 for a in acc_nat]
    assert all(r["radius_tol"] > 0 for r in rows)
    nat_ok = [r["natural_prediction"] == r["label"] and r["natural_certified_eps"] for r in rows]
    adv_ok = [r["spoofed_prediction"] != r["label"] and r["spoofed_certified_eps"] for r in rows]
    assert summary["robust_error"] == pytest.approx(1 - sum(nat_ok) / 4)
    assert summary["attack_error"] == pytest.approx(1 - sum(adv_ok) / 4)
    assert all(r["success"] == (r["spoofed_prediction"] != r["label"] and r["spoofed_radius"] > 0) for r in rows)
    assert summary["successes"] >= 1  # this weak model is spoofed
    # soundness of the spoofed certificates, recomputed from x + δ (rebuilt from the rows' images)
    from certaudit.attacks.shadow import DefenseMargin, ShadowConfig
    from certaudit.audits.spoofing import spoof_batch

    d = IntervalDefense(model, 10, "crown-ibp")
    out = spoof_batch(d, DefenseMargin(d, 0.05, reduction="ce"), x_te[:4], y_te[:4], ShadowConfig.crown_ibp(steps=10),
                      indices=[0, 1, 2, 3], skip_abstained=False)
    assert [r["spoofed_prediction"] for r in out.rows] == [r["spoofed_prediction"] for r in rows]
    ok = torch.tensor([r["success"] for r in out.rows])
    xa = out.x_adv[ok]
    lab = torch.tensor([r["spoofed_prediction"] for r in out.rows])[ok]
    rad = torch.tensor([r["spoofed_radius"] for r in out.rows], dtype=torch.float32)[ok]
    for i in range(xa.shape[0]):
        r = float(rad[i])
        assert float(d.margin(xa[i:i + 1], r, lab[i:i + 1]).detach()) > 0
        gen = torch.Generator().manual_seed(i)
        pts = _box_samples(xa[i:i + 1], r, 200, gen).flatten(0, 1)
        with torch.no_grad():
            assert bool((model(pts).argmax(1) == lab[i]).all())
        assert float(_pgd_min_margin(model, xa[i:i + 1], r, lab[i:i + 1], steps=15)) > 0


def test_crown_never_certifies_less_than_ibp_on_an_ibp_trained_model(crown_ibp_digits):
    model, _, x_te, _ = crown_ibp_digits
    x = x_te[:32]
    net = compile_network(model, x.shape[1:])
    y = model(x).argmax(1)
    with torch.no_grad():
        ibp = margin_bounds(net, x, 0.05, y, "ibp")
        crown = margin_bounds(net, x, 0.05, y, "crown")
    assert bool((crown >= ibp).all())
    found = _pgd_min_margin(model, x, 0.05, y, steps=10)
    assert bool((found.double() >= crown.min(1).values).all())
