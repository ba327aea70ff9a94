"""Lipschitz-margin certification (GloRo): certified layer bounds, sound certificates, GloRo training.

The claims tested are the paper's: the certified radius R(x) = min_j (f_y − f_j)/K_{y,j} is never
broken by a strong attack; every layer bound is an *upper* bound on the exact spectral norm (SVD of
the dense operator) and within 1% of it; Appendix A monotonicity of the degradation paper holds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from certaudit.attacks.pgd import pgd
from certaudit.cli import main
from certaudit.defenses.base import ABSTAIN
from certaudit.defenses.lipschitz import LipschitzDefense, certified_report
from certaudit.defenses.lipschitz.bounds import (
    ConvGeometry, ConvOperator, conv_bound, conv_circulant_bound, gram_bound, linear_bound, power_iteration,
)
from certaudit.defenses.lipschitz.gloro import GLORO_METHOD, PowerIterationEstimator
from certaudit.errors import InputError
from certaudit.models import Normalize, build_model, load_checkpoint
from certaudit.results import read_rows
from certaudit.train import TrainConfig, train

EPS = 0.5  # ℓ2 radius on the 8x8 digits (pixels in [0, 1]; the images' norms are about 3)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gloro_ckpt(tmp_path_factory):
    """A GloRo 2C2F trained at ε = 0.5 on the 8x8 digits through the CLI (a few seconds on CPU)."""
    path = tmp_path_factory.mktemp("lip") / "digits_gloro.safetensors"
    rc = main(["train", "--dataset", "digits", "--arch", "2c2f", "--method", "gloro", "--eps", str(EPS),
               "--epochs", "20", "--lr", "3e-3", "--seed", "0", "--device", "cpu", "--out", str(path), "--json"])
    assert rc == 0
    return path


@pytest.fixture(scope="module")
def gloro(gloro_ckpt):
    net, meta = load_checkpoint(gloro_ckpt)
    return net, meta, LipschitzDefense(net, meta.num_classes, EPS, input_shape=meta.input_shape)


def _dense_norm(op: ConvOperator) -> float:
    return float(torch.linalg.matrix_norm(op.dense(), ord=2))


# ------------------------------------------------------------------- layer bounds vs. SVD

GEOMETRIES = [  # (C_in, C_out, kernel, stride, padding, dilation, groups, H, W)
    (1, 16, 4, 2, 1, 1, 1, 12, 12),  # 2C2F's first layer, on a small image
    (16, 8, 4, 2, 1, 1, 1, 6, 6),  # 2C2F's second layer (fewer channels)
    (3, 8, 3, 1, 1, 1, 1, 8, 8),  # 6C2F-style 3x3 stride 1
    (2, 3, 5, 3, 2, 1, 1, 11, 9),  # odd stride, non-square image
    (4, 4, 3, 1, 2, 2, 2, 8, 8),  # dilated and grouped
    (2, 4, 4, 1, "same", 1, 1, 7, 7),  # asymmetric 'same' padding
    (1, 3, 3, 1, "valid", 1, 1, 5, 9),
    (3, 3, 1, 1, 0, 1, 1, 6, 6),  # 1x1
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_conv_bound_is_an_upper_bound_within_one_percent_of_the_exact_norm(geo):
    ci, co, k, s, p, d, g, h, w = geo
    torch.manual_seed(hash(geo) % 1000)
    conv = nn.Conv2d(ci, co, k, stride=s, padding=p, dilation=d, groups=g)
    geom = ConvGeometry.of(conv, (ci, h, w))
    exact = _dense_norm(ConvOperator(conv.weight.detach().double(), geom))
    bound, info = conv_bound(conv.weight, geom)
    assert exact <= bound <= 1.01 * exact, info
    circ, _ = conv_circulant_bound(conv.weight, geom)  # the always-available bound: sound, maybe looser
    gram, _ = conv_circulant_bound(conv.weight, geom, use_gram_iteration=True)
    assert circ >= exact and gram >= exact
    # power iteration approaches from below: never above the exact norm, so never a certificate
    op = ConvOperator(conv.weight.detach().double(), geom)
    est, _ = power_iteration(op.apply, op.adjoint, torch.randn(1, ci, h, w, dtype=torch.float64), 3)
    assert est <= exact * (1 + 1e-12)


def test_trained_layer_bounds_match_the_svd_of_the_dense_operators(gloro):
    """Every conv/linear bound of the trained net is ≥ its exact spectral norm and within 1%."""
    net, meta, defense = gloro
    report = defense.lipschitz_constants()
    _, layers = certified_report(net, meta.input_shape, meta.num_classes)
    for lb, layer in zip(report.layers, layers):
        if layer.kind == "conv":
            exact = _dense_norm(ConvOperator(layer.module.weight.detach().double(), layer.geom))
        elif layer.kind == "linear":
            exact = float(torch.linalg.matrix_norm(layer.module.weight.detach().double(), ord=2))
        elif layer.kind == "normalize":
            exact = float((1 / layer.module.std.double()).max())
        else:
            exact = 1.0
        assert exact <= lb.bound <= 1.01 * exact, (lb.name, lb.method)
    prod = math.prod(lb.bound for lb in report.layers)
    assert report.penultimate == pytest.approx(prod, rel=1e-9) and report.penultimate >= prod
    w = layers[-1].module.weight.detach().double()
    dist = torch.cdist(w, w)
    assert torch.all(report.pairwise >= report.penultimate * dist * (1 - 1e-12))  # K_{i,j} = L·‖w_i − w_j‖
    assert torch.allclose(report.pairwise, report.penultimate * dist, rtol=1e-9)


@pytest.mark.parametrize("shape", [(10, 100), (300, 20), (7, 7)])
def test_linear_and_gram_iteration_bounds_are_upper_bounds(shape):
    torch.manual_seed(shape[0])
    w = torch.randn(*shape, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    b, _ = linear_bound(w)
    assert exact <= b <= 1.01 * exact
    assert exact <= gram_bound(w) <= 1.01 * exact
    batch = torch.randn(5, 6, 4, dtype=torch.complex128)
    assert gram_bound(batch) >= float(torch.linalg.matrix_norm(batch, ord=2).max())


def test_lipschitz_bound_dominates_observed_gradient_norms(gloro, digits):
    """‖∇x (f_i − f_j)‖ ≤ K_{i,j} at data points, noisy points and points PGD pushes to steep regions."""
    net, _, defense = gloro
    k = defense.lipschitz_constants().pairwise.float()
    x = digits[2][:48]
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    i, j = torch.triu_indices(10, 10, 1)

    def grad_ratio(xs: torch.Tensor) -> torch.Tensor:
        """(B, pairs) ‖∇(f_i − f_j)‖ / K_{i,j}."""
        jac = torch.func.vmap(torch.func.jacrev(lambda v: net(v.unsqueeze(0)).squeeze(0)))(xs).flatten(2)  # (B, C, d)
        return (jac[:, i] - jac[:, j]).norm(dim=-1) / k[i, j]

    def steep(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return grad_ratio(xs).amax(1)

    xs = torch.cat([x, noisy])
    hard = pgd(steep, x, 1.0, "l2", steps=10, restarts=1, seed=0).x  # climb the gradient norm
    ratios = grad_ratio(torch.cat([xs, hard])).detach()
    assert float(ratios.max()) <= 1.0
    assert float(ratios.max()) > 0.05  # the check is not vacuous


# ------------------------------------------------------------------ certificate soundness

def test_strong_pgd_never_changes_the_label_inside_the_certified_radius(gloro, digits):
    net, _, defense = gloro
    x = digits[2][:40]
    cert = defense.certify(x)
    keep = cert.label != ABSTAIN
    xs, lab, rad = x[keep], cert.label[keep], cert.radius[keep].float()
    assert len(lab) >= 20

    def loss(xx: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # best rival minus the certified label
        f = net(xx)
        fy = f.gather(1, lab[idx].view(-1, 1)).squeeze(1)
        return f.scatter(1, lab[idx].view(-1, 1), -math.inf).amax(1) - fy

    res = pgd(loss, xs, rad, "l2", steps=60, restarts=4, seed=1)
    assert bool((net(res.x).argmax(1) == lab).all())
    assert bool(((res.x - xs).flatten(1).norm(dim=1) <= rad * (1 + 1e-5)).all())
    # the same attack is strong: at 3x the certified radius it flips most labels (the bound is tight-ish)
    res3 = pgd(loss, xs, 3 * rad, "l2", steps=60, restarts=1, seed=1)
    assert float((net(res3.x).argmax(1) != lab).float().mean()) > 0.5


def test_monotonicity_of_appendix_a_on_samples(gloro, digits):
    """cert(x, ε) and ‖x' − x‖ = δ < ε  ⇒  cert(x', ε − δ) with the same label (Lemma A.5)."""
    net, _, defense = gloro
    x = digits[2][:60]
    cert = defense.certify(x)
    ok = cert.radius >= 0.2
    xs, lab, rad = x[ok], cert.label[ok], cert.radius[ok]
    assert len(lab) >= 10
    gen = torch.Generator().manual_seed(2)
    checked = 0
    for frac in (0.2, 0.5, 0.9):
        d = torch.randn(xs.shape, generator=gen)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        xp = (xs + frac * rad.float().view(-1, 1, 1, 1) * d).clamp(0, 1)
        delta = (xp - xs).double().flatten(1).norm(dim=1)
        c2 = defense.certify(xp)
        assert bool((c2.label == lab).all())
        assert bool((c2.radius >= rad - delta - 1e-6).all())
        checked += len(lab)
    # adversarial x': the point of the δ-ball that lowers the radius most
    delta = 0.5 * rad.float()
    res = pgd(lambda v, i: -defense.margin(v, 1e-6, lab[i]), xs, delta, "l2", steps=30, seed=3)
    c3 = defense.certify(res.x)
    moved = (res.x - xs).double().flatten(1).norm(dim=1)
    assert bool((c3.label == lab).all()) and bool((c3.radius >= rad - moved - 1e-6).all())
    assert checked >= 30


# --------------------------------------------------------------- accept / margin / ⊥ logit

def test_accept_abstains_exactly_below_the_certified_radius(gloro, digits):
    _, _, defense = gloro
    x = digits[2][:80]
    cert = defense.certify(x)
    for eps in (0.1, EPS, 1.0):
        acc = defense.accept(x, eps)
        expect = torch.where(cert.radius >= eps, cert.label, torch.full_like(cert.label, ABSTAIN))
        assert torch.equal(acc, expect)
    assert torch.equal(defense.accept(x), defense.accept(x, EPS))  # default radius from the defense
    rej = [float((defense.accept(x, e) == ABSTAIN).float().mean()) for e in (0.1, 0.5, 1.0, 2.0)]
    assert rej == sorted(rej) and rej[0] < rej[-1]
    # the GloRo ⊥ logit wins exactly where Algorithm 2.1 rejects
    g = defense.gloro_logits(x, EPS)
    rejected = g.argmax(1) == defense.num_classes
    assert torch.equal(rejected, defense.accept(x, EPS) == ABSTAIN) or \
        int((rejected != (defense.accept(x, EPS) == ABSTAIN)).sum()) <= 1  # a float tie at most


def test_margin_is_differentiable_and_positive_iff_certified(gloro, digits):
    net, _, defense = gloro
    x = digits[2][:50].clone().requires_grad_(True)
    cert = defense.certify(x.detach())
    pred = torch.where(cert.label == ABSTAIN, torch.zeros_like(cert.label), cert.label)
    m = defense.margin(x, EPS, pred)
    assert m.shape == (50,) and m.requires_grad
    (g,) = torch.autograd.grad(m.sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    far = (m.detach().abs() > 1e-4)
    assert torch.equal((m.detach() > 0)[far], (defense.accept(x.detach(), EPS) != ABSTAIN)[far])
    # a step along the gradient raises the margin (first-order consistency)
    m2 = defense.margin((x + 1e-3 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1).detach(), EPS, pred)
    assert float((m2 > m.detach()).float().mean()) > 0.8
    # per-example radii: margin at ε_i equals the scalar margins
    eps_vec = torch.full((50,), EPS)
    assert torch.allclose(defense.margin(x.detach(), eps_vec, pred), m.detach())


def test_bounds_are_cached_and_refreshed_when_the_weights_change(gloro_ckpt):
    net, meta = load_checkpoint(gloro_ckpt)
    defense = LipschitzDefense(net, 10, EPS, input_shape=meta.input_shape)
    a = defense.lipschitz_constants()
    assert defense.lipschitz_constants() is a
    with torch.no_grad():
        net[-1].weight.mul_(2.0)
    b = defense.lipschitz_constants()
    assert b is not a and float(b.pairwise.max()) == pytest.approx(2 * float(a.pairwise.max()), rel=1e-6)


# ----------------------------------------------------------------------------- training

def test_gloro_training_buys_certified_accuracy_over_standard_training(gloro, digits):
    x_tr, y_tr, x_te, y_te = digits
    std = build_model("2c2f", (1, 8, 8), 10)
    train(std, x_tr, y_tr, TrainConfig(method="standard", epochs=20, lr=3e-3, seed=0), progress=False)
    vra = {}
    for name, net in (("standard", std), ("gloro", gloro[0])):
        cert = LipschitzDefense(net, 10, EPS, input_shape=(1, 8, 8)).certify(x_te)
        vra[name] = float(((cert.label == y_te) & (cert.radius >= EPS)).float().mean())
    assert vra["gloro"] > vra["standard"] + 0.2
    assert vra["gloro"] > 0.3


def test_power_iteration_estimator_is_below_the_certified_bound(gloro):
    net, meta, defense = gloro
    est = PowerIterationEstimator(net, tuple(meta.input_shape), 10, torch.Generator().manual_seed(0))
    lip = est(50)
    assert lip.requires_grad  # the training estimate is differentiable in the weights
    value = float(lip.detach())
    assert value <= defense.lipschitz_constants().penultimate * (1 + 1e-5)  # float32 estimate of ‖A v‖
    assert value >= 0.9 * defense.lipschitz_constants().penultimate  # and converges to it


def test_gloro_loss_uses_the_bottom_logit_and_warms_up_eps(digits):
    from certaudit.train import StepInfo

    x, y = digits[0][:32], digits[1][:32]
    net = build_model("2c2f", (1, 8, 8), 10)
    cfg = TrainConfig(method="gloro", eps=1.0, eps_warmup=0.5)
    GLORO_METHOD.setup(net, cfg)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in (0, 50, 100):
        loss, aug = GLORO_METHOD.loss(net, x, y, cfg, StepInfo(0, step, 100, gen))
        assert aug.shape == (32, 11)
        losses.append(float(loss.detach()))
    assert losses[0] < losses[1] <= losses[2] + 1e-6  # a larger ε raises the ⊥ logit, hence the loss
    with pytest.raises(InputError):
        GLORO_METHOD.setup(build_model("resnet20", (3, 32, 32), 10), cfg)
    with pytest.raises(InputError):
        GLORO_METHOD.options(TrainConfig(method="gloro", eps=1.0, extra={"bogus": 1}))


# --------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_input_error(gloro):
    net, _, defense = gloro
    x = torch.rand(2, 1, 8, 8)
    for eps in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError):
            defense.accept(x, eps)
        with pytest.raises(InputError):
            LipschitzDefense(net, 10, eps)
    with pytest.raises(InputError):
        defense.margin(x, torch.tensor([0.5, float("nan")]), torch.tensor([0, 1]))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        defense.certify(bad)
    with pytest.raises(InputError):
        defense.certify(torch.rand(2, 1, 9, 9))  # not the shape the bounds were built for
    with pytest.raises(InputError):
        defense.margin(x, EPS, torch.tensor([0, 10]))


class _SneakyConv(nn.Conv2d):
    def forward(self, x):  # a subclass may change the map: refused, not trusted
        return 10 * super().forward(x)


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.Tanh(), _SneakyConv(4, 4, 3, padding=1),
                                   nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Dropout()])
def test_unknown_layers_are_refused_never_assumed_one_lipschitz(layer):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer, nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(InputError, match="not supported|padding_mode"):
        LipschitzDefense(net, 10)
    no_logits = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU())
    with pytest.raises(InputError, match="last layer"):
        LipschitzDefense(no_logits, 10)


# ----------------------------------------------------------------------------------- CLI

def test_certify_cli_lipschitz_rows_and_summary(gloro_ckpt, gloro, digits, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    capsys.readouterr()
    rc = main(["certify", "--model", str(gloro_ckpt), "--defense", "lipschitz", "--eps", str(EPS), "--dataset",
               "digits", "--limit", "60", "--device", "cpu", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    header, rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(60))
    cert = gloro[2].certify(digits[2][:60])
    assert [r["prediction"] for r in rows] == cert.label.tolist()
    assert [r["radius"] for r in rows] == pytest.approx(cert.radius.tolist(), rel=1e-9)
    y = digits[3][:60]
    ok = cert.label == y
    assert summary["clean_accuracy"] == pytest.approx(float(ok.float().mean()))
    assert summary["vra_eps"] == pytest.approx(float((ok & (cert.radius >= EPS)).float().mean()))
    assert summary["vra_2eps"] == pytest.approx(float((ok & (cert.radius >= 2 * EPS)).float().mean()))
    assert summary["rejection_rate_eps"] == pytest.approx(float((cert.radius < EPS).float().mean()))
    assert summary["vra_eps"] > summary["vra_2eps"] >= 0
    settings = header["config"]["settings"]
    assert settings["eps"] == EPS and summary["settings"]["penultimate_lipschitz"] > 0
    # computed bounds (their last bits vary with the thread count) stay out of the resume header
    assert "penultimate_lipschitz" not in settings
    # a rerun resumes (nothing new to certify) and gives the same summary
    capsys.readouterr()
    assert main(["certify", "--model", str(gloro_ckpt), "--defense", "lipschitz", "--eps", str(EPS), "--dataset",
                 "digits", "--limit", "60", "--device", "cpu", "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["new_images"] == 0 and again["vra_eps"] == summary["vra_eps"]


def test_cli_bad_lipschitz_input_exits_2(gloro_ckpt, capsys):
    base = ["certify", "--model", str(gloro_ckpt), "--defense", "lipschitz", "--limit", "4", "--device", "cpu"]
    assert main([*base, "--eps", "0"]) == 2
    assert main([*base, "--eps", "nan"]) == 2
    assert main([*base, "--sigma", "0.25"]) == 2
    assert main(["train", "--dataset", "digits", "--arch", "2c2f", "--method", "gloro", "--epochs", "1",
                 "--out", "unused.safetensors"]) == 2  # no --eps
    err = capsys.readouterr().err
    assert "Traceback" not in err


# ------------------------------------------------- float32 decisions (docs/lipschitz.md, fast path)


def _tiny(seed: int, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize([0.4], [0.3]), nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 24), nn.ReLU(),
                        nn.Linear(24, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _pair(net: nn.Module, eps: float) -> tuple[LipschitzDefense, LipschitzDefense]:
    kw = dict(input_shape=(1, 8, 8), batch_size=128)
    return LipschitzDefense(net, 5, eps, **kw), LipschitzDefense(net, 5, eps, arithmetic="float64", **kw)


def _near_thresholds(ref: LipschitzDefense, x: torch.Tensor, radii: list[float]) -> torch.Tensor:
    """Adversarial inputs: bisection (in float64 s, evaluated at float32 points) on segments between
    images the reference decides differently (label, or verdict at a radius), to the last float32 step."""
    out, lab = [], ref.certify(x).label
    for r in [0.0, *radii]:
        side = (lab == lab[0]) if r == 0 else (ref.accept(x, r) >= 0)
        a, b = x[side][:12], x[~side][:12]
        n = min(len(a), len(b))
        if n == 0:  # e.g. one label only
            continue
        a, b = a[:n], b[:n]
        lo, hi = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        for _ in range(36):  # 2^-36 of a segment: about one float32 step of the pixels
            mid = (lo + hi) / 2
            xm = (a.double() + mid.view(-1, 1, 1, 1) * (b - a).double()).float()
            keep = (ref.certify(xm).label == lab[0]) if r == 0 else (ref.accept(xm, r) >= 0)
            lo, hi = torch.where(keep, mid, lo), torch.where(keep, hi, mid)
        for s in (lo, hi):
            out.append((a.double() + s.view(-1, 1, 1, 1) * (b - a).double()).float())
    return torch.cat(out)


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1.0), (2, 3.0)])
def test_fast_path_gives_exactly_the_float64_decisions(seed, scale, one_thread):
    net = _tiny(seed, scale)
    x = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    eps = 1.001 * float(LipschitzDefense(net, 5, arithmetic="float64").certify(x).radius.median())  # small radii
    radii = [eps, 2 * eps, 0.37 * eps]
    fast, ref = _pair(net, eps)
    fast.certify_checks(x, radii)  # random images: settled in float32 (a few need the measured residuals)
    assert fast.counts["float64"] <= len(x) // 50 and fast.counts["residuals"] > 0
    x = torch.cat([x, _near_thresholds(ref, x, radii)])  # a float32 step from a threshold: many need the reference
    cf, cr = fast.certify_checks(x, radii), ref.certify_checks(x, radii)
    assert torch.equal(cf.label, cr.label) and cf.checks.keys() == cr.checks.keys()
    assert all(torch.equal(cf.checks[k], cr.checks[k]) for k in cr.checks)
    for t in fast._decision_radii(radii):  # every decision radius (the labels: above)
        assert torch.equal(cf.radius >= t, cr.radius >= t), t
    assert bool((cf.radius <= cr.radius).all())  # never more than the reference certifies
    # thresholds exactly at reference radii: the interval always straddles them; the reference decides
    at = [float(r) for r in cr.radius[cr.label >= 0][:3]]
    fast.counts.update(float64=0)
    got, want = fast.certify_checks(x, at), ref.certify_checks(x, at)
    assert all(torch.equal(got.checks[k], want.checks[k]) for k in want.checks)
    assert fast.counts["float64"] >= 3 and torch.equal(fast.accept(x, at[0]), ref.accept(x, at[0]))


@pytest.mark.parametrize("seed,scale", [(3, 1.0), (4, 40.0)])
def test_rounding_bound_bounds_the_float32_margins(seed, scale, one_thread):
    """|float32 margin − float64 margin| ≤ the proven bound, the reference's slack ≤ its bound, and
    every layer's measured float32 error ≤ Lemma 1 (order-independent γ_{n+1})."""
    from certaudit.defenses.lipschitz.fast import ETA32, U32, FastCertifier, _injected
    from certaudit.defenses.lipschitz.network import walk

    net = _tiny(seed, scale)
    _, ref = _pair(net, 0.05)
    x = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[:50] = (x[:50] > 0.5).float()  # saturated images: large activations, cancellation
    report = ref.lipschitz_constants()
    fc = FastCertifier(walk(net, (1, 8, 8), 5), [b.bound for b in report.layers])
    f32, nus, acts = fc.forward(x)
    b = fc.bounds(nus)
    f64, e64 = ref._forward(x, ref._state((1, 8, 8)))
    assert bool(b.ok.all()) and bool((b.ebar >= e64).all())
    diff = ((f32.unsqueeze(2) - f32.unsqueeze(1)) - (f64.unsqueeze(2) - f64.unsqueeze(1))).abs()  # (B, C, C)
    lam = b.lam_fast + b.lam_ref
    bound = fc.dist * (b.e_fast + b.e_ref).view(-1, 1, 1) + lam.unsqueeze(2) + lam.unsqueeze(1)
    assert bool((diff <= bound).all())
    ratio = float((diff / bound).max())
    assert ratio > 1e-6  # a bound, but not a vacuous one
    measured = fc.residuals(acts, nus)
    for i, m in measured.items():
        assert bool((m <= _injected(fc.steps[i], nus[i], U32, ETA32)[0] * 1.01).all()), i
    assert fc.steps[6].head and not fc.steps[3].head  # convolutions in float32, the dense head in float64


def test_fast_path_on_the_trained_model_and_where_it_steps_aside(gloro, digits, one_thread):
    net, meta, fast = gloro
    ref = LipschitzDefense(net, 10, EPS, input_shape=meta.input_shape, arithmetic="float64")
    x = digits[2]
    radii = [EPS, 2 * EPS]
    cf, cr = fast.certify_checks(x, radii), ref.certify_checks(x, radii)
    assert torch.equal(cf.label, cr.label) and all(torch.equal(cf.checks[k], cr.checks[k]) for k in cr.checks)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # would allow bf16 matmuls in oneDNN: forced off in the pass
    try:
        assert torch.equal(fast.certify(x).label, cr.label)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    odd = (x[:8].double() + 1e-12).clamp(0, 1)  # not float32 numbers: the reference decides
    before = fast.counts["float64"]
    assert torch.equal(fast.certify(odd).label, ref.certify(odd).label) and fast.counts["float64"] == before + 8
    assert fast.settings()["arithmetic"] != ref.settings()["arithmetic"] == "float64"
    with pytest.raises(InputError):
        LipschitzDefense(net, 10, EPS, arithmetic="float16")
