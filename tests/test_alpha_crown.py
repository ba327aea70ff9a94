"""α-CROWN (optimized lower ReLU slopes): never below CROWN, sound, optimal on one hidden layer.

Claims tested:
* the α-CROWN bound is never below CROWN's (row by row), and above it where CROWN is loose;
* it is never above the minimum an attack finds (PGD, box samples and vertices), nor above the
  exact minimum of a tiny 2-input network (one LP per activation pattern);
* on one hidden layer it reaches the triangle LP relaxation (the optimum over all slopes);
* any lower slopes are sound through :class:`State`'s ``slopes`` (random ones in [0, 1]; values
  outside [0, 1] or NaN are clamped, giving the same bound as the clamped slopes);
* ``iters = 0`` is CROWN exactly; bad options are refused with InputError; the defense and
  ``certaudit certify --method alpha-crown`` work.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from certaudit.defenses.interval import IntervalDefense, compile_network, layer_bounds, spec_bounds
from certaudit.defenses.interval.alpha_crown import AlphaOptions
from certaudit.defenses.interval.bounds import specification
from certaudit.defenses.interval.crown import budget_elements, spec_backward
from certaudit.defenses.interval.ibp import Spec
from certaudit.defenses.interval.ops import ReLU
from certaudit.errors import InputError
from certaudit.models import ModelMeta, Normalize, build_model

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _init(m: nn.Module, seed: int, scale: float = 1.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (scale / math.sqrt(max(1, p[0].numel()))))
    return m.eval()


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """Three ReLU layers on 8x8 images (Normalize, convs with BatchNorm, a dilated grouped conv, pooling
    between a ReLU and a linear layer)."""
    m = nn.Sequential(
        Normalize([0.4], [0.3]), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10),
    )
    _init(m, seed)
    with torch.no_grad():
        for bn in (m[2], m[5]):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def mlp2(hidden: tuple[int, ...], seed: int, outputs: int = 3) -> nn.Sequential:
    """A ReLU network on 2 inputs (images of shape (1, 1, 2))."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 2
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, outputs))
    return _init(nn.Sequential(*layers), seed, scale=2.0)


@pytest.fixture(scope="module")
def images():
    from certaudit.data import load_dataset

    x, _ = load_dataset("digits", "test")
    return x[:8]


def _attack_min(model, x, eps, c, steps=30, seed=0):
    """Per (image, row), the smallest C f(x') found by sampling (half vertices) and signed-gradient descent."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((64, *x.shape), generator=gen)
    u[:32] = (u[:32] > 0.5).float()
    with torch.no_grad():
        best = torch.stack([torch.einsum("bsk,bk->bs", c, model(lo + ui * (hi - lo))) for ui in u]).min(0).values
    xa = (lo + torch.rand(x.shape, generator=gen) * (hi - lo)).requires_grad_(True)
    for _ in range(steps):
        v = torch.einsum("bsk,bk->bs", c, model(xa))
        best = torch.minimum(best, v.detach())
        (g,) = torch.autograd.grad(v.min(1).values.sum(), xa)
        xa = torch.max(torch.min(xa.detach() - eps / 4 * g.sign(), hi), lo).requires_grad_(True)
    return best.double()


def _margins(model, x, eps, method, **kw):
    net = compile_network(model, x.shape[1:])
    c, _ = specification(model(x).argmax(1), 10, x.dtype)
    with torch.no_grad():
        return spec_bounds(net, x, eps, c, method, **kw), c


EPS = 0.08


@pytest.fixture(scope="module")
def case(images):
    """A tiny CNN with many unstable neurons at EPS: CROWN's bound, α-CROWN's, and an attack's minimum."""
    model = tiny_cnn(1)
    crown, c = _margins(model, images, EPS, "crown")
    alpha, _ = _margins(model, images, EPS, "alpha-crown", alpha={"iters": 10})
    return model, c, crown, alpha, _attack_min(model, images, EPS, c)


# ----------------------------------------------------------------------- order and soundness

def test_alpha_crown_is_never_below_crown_and_never_above_an_attack(case):
    _, _, crown, alpha, found = case
    assert alpha.dtype == torch.float64 and alpha.shape == crown.shape
    assert bool((alpha >= crown).all())
    assert float((alpha - crown).max()) > 1e-3  # the search does tighten where CROWN is loose
    assert bool((alpha <= found).all())


@pytest.mark.parametrize("opts", [{"shared": True, "iters": 8}, {"intermediate": False, "iters": 8},
                                  {"lr": 50.0, "iters": 6}, {"iters": 4, "budget_mb": 0.3}])
def test_variants_lie_between_crown_and_the_attack(images, case, opts):
    """Shared slopes, no intermediate search, a wild learning rate (the search jumps around in
    [0, 1]) and tiny memory blocks: still never below CROWN (same blocks) nor above the attack."""
    model, _, crown, _, found = case
    opts = dict(opts)
    budget = opts.pop("budget_mb", None)
    if budget is not None:  # small blocks: CROWN itself may differ in the last bits
        images, found = images[:4], found[:4]
        crown, _ = _margins(model, images, EPS, "crown", budget_mb=budget)
    other, _ = _margins(model, images, EPS, "alpha-crown", alpha=opts, budget_mb=budget)
    assert bool((other >= crown).all()) and bool((other <= found).all())


def test_iters_zero_is_crown_exactly_and_layer_bounds_lie_inside_crowns(images, case):
    model, _, crown, _, _ = case
    zero, _ = _margins(model, images, EPS, "alpha-crown", alpha={"iters": 0})
    assert torch.equal(crown, zero)
    net = compile_network(model, images.shape[1:])
    with torch.no_grad():
        inner = layer_bounds(net, images[:4], EPS, "alpha-crown", alpha={"iters": 8})
        outer = layer_bounds(net, images[:4], EPS, "crown")
    for (l_a, u_a), (l_c, u_c) in zip(inner, outer):
        assert bool((l_a >= l_c).all()) and bool((u_a <= u_c).all()) and bool((l_a <= u_a).all())
    assert any(bool((l_a > l_c).any()) for (l_a, _), (l_c, _) in zip(inner, outer))
    # and they contain the pre-activations of sampled points of the box (half of them vertices)
    x = images[:4]
    lo, hi = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    u = torch.rand((200, *x.shape), generator=torch.Generator().manual_seed(1))
    u[:100] = (u[:100] > 0.5).float()
    with torch.no_grad():
        z = (lo + u * (hi - lo)).reshape(-1, *x.shape[1:])
        k = 0
        for layer in model:
            if isinstance(layer, nn.ReLU):
                zz = z.reshape(200, 4, *z.shape[1:])
                assert bool((zz >= inner[k][0]).all()) and bool((zz <= inner[k][1]).all()), k
                k += 1
            z = layer(z)


def test_any_slopes_in_0_1_are_sound_and_others_are_clamped(images, case):
    model, c, _, _, found = case
    net = compile_network(model, images.shape[1:])
    spec = Spec.fold(net.last, c)
    budget = budget_elements(images.device, None)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, st = spec_bounds(net, images, EPS, c, "crown", return_state=True)
        relus = [i for i, op in enumerate(st.ops) if isinstance(op, ReLU)]
        for trial in range(4):
            st.slopes = {i: torch.rand(st.lo[i].shape, generator=gen) for i in relus}
            st.relax.clear()
            assert bool((spec_backward(st, spec, budget) <= found).all()), trial
        wild = {i: torch.randn(st.lo[i].shape, generator=gen) * 3 for i in relus}
        wild[relus[0]].view(-1)[::5] = math.nan
        st.slopes, st.relax = wild, {}
        low_wild = spec_backward(st, spec, budget)
        st.slopes, st.relax = {i: w.nan_to_num(0.0).clamp(0, 1) for i, w in wild.items()}, {}
        assert torch.equal(low_wild, spec_backward(st, spec, budget))
        assert bool((low_wild <= found).all())


# ----------------------------------------------------------------- exactness on 2-input nets

def _linear_pieces(model: nn.Sequential):
    ws = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
          for m in model if isinstance(m, nn.Linear)]
    return ws[:-1], ws[-1]


def _exact_min(model: nn.Sequential, lo, hi, row) -> float:
    """min over the box of row · f(x), exactly: on each activation pattern's region (a polygon) the
    network is affine, so its minimum there is at a vertex: an intersection of two of the region's
    lines (hidden pre-activations = 0, box edges) satisfying all of them."""
    import numpy as np

    hidden, (w_out, b_out) = _linear_pieces(model)
    box_a = np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    box_b = np.array([hi[0], hi[1], -lo[0], -lo[1]])
    best = math.inf
    for pattern in itertools.product(*[itertools.product((0.0, 1.0), repeat=w.shape[0]) for w, _ in hidden]):
        a, b = np.eye(2), np.zeros(2)  # the current layer input as a x + b
        rows_a, rows_b = [box_a], [box_b]
        for (w, bias), p in zip(hidden, pattern):
            za, zb = w @ a, w @ b + bias
            sign = np.where(np.array(p) == 1, -1.0, 1.0)  # active: z >= 0; inactive: z <= 0
            rows_a.append(sign[:, None] * za)
            rows_b.append(-sign * zb)
            a, b = np.array(p)[:, None] * za, np.array(p) * zb
        ca, cb = np.vstack(rows_a), np.concatenate(rows_b)
        i, j = np.triu_indices(len(cb), 1)
        det = ca[i, 0] * ca[j, 1] - ca[i, 1] * ca[j, 0]
        keep = np.abs(det) > 1e-12
        i, j, det = i[keep], j[keep], det[keep]
        pts = np.stack([(cb[i] * ca[j, 1] - ca[i, 1] * cb[j]) / det, (ca[i, 0] * cb[j] - cb[i] * ca[j, 0]) / det], 1)
        pts = pts[(pts @ ca.T <= cb + 1e-9).all(1)]
        if len(pts):
            best = min(best, float((pts @ (row @ (w_out @ a)) + row @ (w_out @ b + b_out)).min()))
    return best


def _triangle_lp(model: nn.Sequential, lo, hi, row) -> float:
    """The LP relaxation of one hidden layer (triangle on each unstable ReLU, exact input bounds)."""
    import numpy as np
    from scipy.optimize import linprog

    ((w1, b1),), (w2, b2) = _linear_pieces(model)
    h = w1.shape[0]
    center, radius = (np.array(lo) + np.array(hi)) / 2, (np.array(hi) - np.array(lo)) / 2
    l, u = w1 @ center + b1 - np.abs(w1) @ radius, w1 @ center + b1 + np.abs(w1) @ radius
    a_ub, b_ub, eq_a, eq_b = [], [], [], []
    for j in range(h):  # variables: x (2), z (h); y_j = w1_j x + b1_j
        ex = np.zeros(2 + h)
        ex[:2], ex[2 + j] = w1[j], 0.0
        ez = np.zeros(2 + h)
        ez[2 + j] = 1.0
        if l[j] >= 0:
            eq_a.append(ez - ex), eq_b.append(b1[j])
        elif u[j] <= 0:
            eq_a.append(ez), eq_b.append(0.0)
        else:
            s = u[j] / (u[j] - l[j])
            a_ub += [-ez, ex - ez, ez - s * ex]
            b_ub += [0.0, -b1[j], s * (b1[j] - l[j])]
    cost = np.concatenate([np.zeros(2), row @ w2])
    res = linprog(cost, A_ub=np.array(a_ub) if a_ub else None, b_ub=np.array(b_ub) if b_ub else None,
                  A_eq=np.array(eq_a) if eq_a else None, b_eq=np.array(eq_b) if eq_b else None,
                  bounds=list(zip(lo, hi)) + [(None, None)] * h, method="highs")
    assert res.status == 0
    return res.fun + row @ b2


def _bounds_2d(model, x, eps, c, method, **kw):
    net = compile_network(model, (1, 1, 2))
    with torch.no_grad():
        return spec_bounds(net, x, eps, c, method, **kw)


def test_two_input_network_below_the_exact_minimum():
    model = mlp2((5, 4), seed=4)
    x = torch.tensor([[[[0.3, 0.6]]], [[[0.5, 0.5]]]])
    eps = 0.25
    c = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]]).expand(2, 3, 3)
    crown = _bounds_2d(model, x, eps, c, "crown")
    alpha = _bounds_2d(model, x, eps, c, "alpha-crown", alpha={"iters": 40})
    for b in range(2):
        lo, hi = (x[b].flatten() - eps).clamp(0, 1).tolist(), (x[b].flatten() + eps).clamp(0, 1).tolist()
        grid = torch.stack(torch.meshgrid(torch.linspace(lo[0], hi[0], 201), torch.linspace(lo[1], hi[1], 201),
                                          indexing="ij"), -1).reshape(-1, 1, 1, 2)
        with torch.no_grad():
            on_grid = (model(grid).double() @ c[b].double().T).min(0).values
        for s in range(3):
            exact = _exact_min(model, lo, hi, c[b, s].double().numpy())
            assert exact <= float(on_grid[s]) + 1e-6 and float(on_grid[s]) - exact < 0.05  # the helper is exact
            assert crown[b, s] <= alpha[b, s] <= exact + 1e-9, (b, s)
    assert bool((alpha > crown + 1e-4).any())


def test_one_hidden_layer_reaches_the_triangle_lp_relaxation():
    pytest.importorskip("scipy")
    model = mlp2((12,), seed=5)
    x = torch.tensor([[[[0.4, 0.55]]]])
    eps = 0.3
    c = torch.cat([torch.eye(3), -torch.eye(3)]).unsqueeze(0)  # lower and upper bound of every output
    alpha = _bounds_2d(model, x, eps, c, "alpha-crown", alpha={"iters": 100, "lr": 0.2})
    crown = _bounds_2d(model, x, eps, c, "crown")
    lo, hi = (x.flatten() - eps).clamp(0, 1).tolist(), (x.flatten() + eps).clamp(0, 1).tolist()
    for s in range(6):
        lp = _triangle_lp(model, lo, hi, c[0, s].double().numpy())
        assert float(alpha[0, s]) <= lp + 1e-9
        if float(crown[0, s]) < 0:  # rows not yet certified are optimized towards the LP optimum
            assert float(alpha[0, s]) >= lp - 2e-3 * (1 + abs(lp)), (s, float(alpha[0, s]), lp)


# ------------------------------------------------------------------------- options, defense, CLI

@pytest.mark.parametrize("bad", [{"iters": -1}, {"iters": 2.5}, {"lr": 0.0}, {"lr": math.nan}, {"lr_decay": 0.0},
                                 {"lr_decay": 1.5}, {"intermediate": "yes"}, {"bogus": 1}])
def test_bad_options_are_refused(bad):
    with pytest.raises(InputError):
        AlphaOptions.parse(bad)


def test_bad_options_are_refused_by_the_defense_and_the_driver(images):
    from certaudit.defenses.registry import build_defense

    model = tiny_cnn(0)
    with pytest.raises(InputError, match="alpha_iters"):
        IntervalDefense(model, 10, "alpha-crown", alpha_iters=-3)
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0])
    with pytest.raises(InputError, match="alpha_lr"):
        build_defense("interval", model, meta, {"method": "alpha-crown", "alpha_lr": "fast"})
    with pytest.raises(InputError):
        AlphaOptions.parse(3)
    with pytest.raises(InputError, match="adaptive"):
        _margins(model, images[:2], 0.05, "alpha-crown", pure=True)


def test_defense_accepts_everything_crown_accepts_and_margin_has_gradients(images):
    model = tiny_cnn(1)
    crown = IntervalDefense(model, 10, "crown")
    alpha = IntervalDefense(model, 10, "alpha_crown", alpha_iters=10, alpha_lr=0.3)
    assert alpha.method == "alpha-crown" and "alpha-crown" in alpha.methods
    assert alpha.settings()["alpha_iters"] == 10 and "alpha_iters" not in crown.settings()
    a, c = alpha.accept(images, 0.03), crown.accept(images, 0.03)
    assert bool(((c == -1) | (a == c)).all()) and int((a != -1).sum()) >= int((c != -1).sum())
    x = images[:4].clone().requires_grad_(True)
    target = model(x).argmax(1)
    m = alpha.margin(x, 0.03, target)
    (g,) = torch.autograd.grad(m.sum(), x)
    assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    assert bool((m.detach().double() >= crown.margin(x.detach(), 0.03, target).double() - 1e-6).all())
    assert alpha.proof_name is not None and alpha.prove_nondegradable(images[:2], 0.001, a[:2]).dtype == torch.bool


def test_certify_cli_with_alpha_crown(tmp_path, capsys):
    from certaudit.cli import main
    from certaudit.models import save_checkpoint

    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10).eval()
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0])
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    out = tmp_path / "rows.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "interval", "--method", "alpha-crown", "--device", "cpu",
                 "--limit", "3", "--eps", "0.01", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["method"] == "alpha-crown" and summary["settings"]["alpha_iters"] == 20
