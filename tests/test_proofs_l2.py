"""Proofs of non-degradability over the ℓ2 ball (issue 18 item 1, docs/degradation.md "Proofs over
the ℓ2 ball"): CROWN over the ball and the local Lipschitz bound are sound (below every attack, below
the exact MILP minimum, above every gradient norm in the ball), the Lipschitz defense's proofs never
prove an input an attack degrades, and the degradation rows split testR into degraded / proven /
undecided with the two sides' radii for the undecided."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certaudit.attacks.pgd import pgd
from certaudit.audits.degradation import degrade_batch, summarize_degradation
from certaudit.defenses.interval.bounds import compile_network, layer_bounds, margin_bounds, specification
from certaudit.defenses.lipschitz import LipschitzDefense
from certaudit.defenses.lipschitz.local import local_lipschitz
from certaudit.errors import InputError
from certaudit.models import load_checkpoint
from certaudit.zoo import model_path

pytestmark = pytest.mark.usefixtures("one_thread_module")

N = 24


@pytest.fixture(scope="module")
def gloro(digits):
    """The digits zoo's GloRo 2C2F (trained at ε = 0.25), its defense and the first N test images."""
    net, meta = load_checkpoint(model_path("digits_gloro_eps"))
    _, _, x, y = digits
    return net, meta, LipschitzDefense(net, 10, meta.eps, input_shape=tuple(meta.input_shape)), x[:N], y[:N]


def _pgd_min(net, x, eps, target, j):
    """The smallest f_t − f_j PGD finds in B₂(x, ε) ∩ [0,1]^d."""
    def loss(xs, idx):
        out = net(xs)
        return out[torch.arange(len(idx)), target[idx]] - out[torch.arange(len(idx)), j[idx]]

    res = pgd(loss, x, eps, "l2", steps=30, restarts=1, seed=0, maximize=False)
    with torch.no_grad():
        return loss(res.x, torch.arange(x.shape[0])).double()


@pytest.mark.parametrize("eps", [0.05, 0.25, 0.8])
def test_l2_crown_lies_below_every_attack(gloro, eps):
    net, meta, _, x, _ = gloro
    cnet = compile_network(net, tuple(meta.input_shape))
    with torch.no_grad():
        pred = net(x).argmax(1)
    low = margin_bounds(cnet, x, eps, pred, "crown", norm="l2")  # (N, 10), +inf at pred
    plain = margin_bounds(cnet, x, eps, pred, "crown", norm="l2", sound=False).double()
    # every (image, rival) pair in one batched attack
    _, others = specification(pred, 10, torch.float32)
    xs = x.repeat_interleave(9, dim=0)
    found = _pgd_min(net, xs, eps, pred.repeat_interleave(9), others.flatten()).view(-1, 9)
    assert bool((low.gather(1, others) <= found + 1e-6).all()), eps
    fin = torch.isfinite(low)
    assert bool((low[fin] <= plain[fin]).all())  # the sound bound subtracts its rounding slack


def test_l2_crown_is_tight_on_a_tiny_ball(gloro):
    """As ε → 0 the ball bound approaches the margin itself (within ε times the margin's global rate)."""
    net, meta, defense, x, _ = gloro
    eps = 1e-4
    cnet = compile_network(net, tuple(meta.input_shape))
    with torch.no_grad():
        f = net(x).double()
    pred = f.argmax(1)
    k = defense.lipschitz_constants().pairwise.to(torch.float64)
    margin = f.gather(1, pred[:, None]) - f
    for sound, slack in ((False, 1e-5), (True, 0.02)):  # the sound bound also pays its float32 rounding slack
        low = margin_bounds(cnet, x, eps, pred, "crown", norm="l2", sound=sound).detach()
        fin = torch.isfinite(low)
        gap = (margin - low)[fin]
        assert bool((gap >= -1e-6).all()) and bool((gap <= eps * k[pred][fin] + slack).all())


def test_l2_ball_refuses_alpha_crown_and_unknown_norms(gloro):
    net, meta, _, x, _ = gloro
    cnet = compile_network(net, tuple(meta.input_shape))
    pred = torch.zeros(x.shape[0], dtype=torch.long)
    with pytest.raises(InputError):
        margin_bounds(cnet, x, 0.1, pred, "alpha-crown", norm="l2")
    with pytest.raises(InputError):
        margin_bounds(cnet, x, 0.1, pred, "crown", norm="l1")


@pytest.mark.parametrize("eps", [0.02, 0.25])
def test_local_lipschitz_bounds_every_gradient_in_the_ball(gloro, eps):
    net, meta, defense, x, _ = gloro
    x = x[:8]
    cnet = compile_network(net, tuple(meta.input_shape))
    with torch.no_grad():
        pred = net(x).argmax(1)
    spec, others = specification(pred, 10, torch.float32)
    relu_b = layer_bounds(cnet, x, eps, "crown", norm="l2")
    state = defense._state(tuple(meta.input_shape))  # the defense's own float64 network
    lip = local_lipschitz(state.layers, state.abs_weights, relu_b, spec.double())  # (8, 9)
    k = defense.lipschitz_constants().pairwise.to(torch.float64)[pred[:, None], others]
    assert bool((lip > 0).all()) and bool(torch.isfinite(lip).all())
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.randn(x.shape, generator=gen)
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        r = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * eps
        xs = (x + r * u).clamp(0, 1).requires_grad_(True)
        out = net(xs)
        for s in range(others.shape[1]):
            m = out.gather(1, pred[:, None])[:, 0] - out.gather(1, others[:, s:s + 1])[:, 0]
            (g,) = torch.autograd.grad(m.sum(), xs, retain_graph=True)
            assert bool((g.flatten(1).norm(dim=1).double() <= lip[:, s] * (1 + 1e-5)).all())
    if eps == 0.02:  # few unstable ReLUs: the local bound is below the global one
        assert float((lip / k).median()) < 1.0


def test_proofs_hold_against_the_attacks_and_split_testR(gloro):
    """Every proof (2ε check, CROWN over the ball, local Lipschitz) is checked against the attacks:
    no proven input is degraded, the proven radius floor never exceeds the smallest certified radius an
    attack reached, and degraded + proven + undecided = testR."""
    net, meta, defense, x, y = gloro
    eps = meta.eps / 3
    rows = degrade_batch(defense, x, y, eps, attack="all", exhaustive=True, seed=0, steps=30, check_every=5)
    for r in rows:
        if r["proven_nondegradable"]:
            assert r["degraded_by"] is None and r["proven_by"] in ("2eps", "crown-l2", "local-lipschitz")
        if r["radius_floor"] is not None and r["radius_after"] is not None:  # radius_after: the fast path's
            assert r["radius_floor"] <= r["radius_after"] + 1e-3  # radius, up to ~3e-4 below the reference
        if r["proven_by"] == "2eps":
            assert r["certified_2eps"]
    s = summarize_degradation(rows, eps, proof=defense.proof_name)
    sp = s["bracket"]
    assert sp["degraded"] + sp["proven"] + sp["undecided"] == s["testR"]
    assert sp["degraded"] == s["testA_lower"] and s["testA_upper"] == sp["degraded"] + sp["undecided"]
    assert s["invariant"]["lower_subset_upper"]


def test_local_proofs_prove_what_the_2eps_check_cannot(gloro, digits):
    """At ε = 1/3 of the training radius, CROWN over the ball proves inputs the 2ε check leaves open."""
    net, meta, defense, _, _ = gloro
    x = digits[2][:100]
    eps = meta.eps / 3
    cert = defense.certify_checks(x, [eps, 2 * eps])
    ok = cert.certified_at(eps)
    res = defense.prove(x[ok], eps, cert.label[ok], ["2eps", "local"])
    local = [i for i, m in enumerate(res.method) if m in ("crown-l2", "local-lipschitz")]
    assert local, "no input proven by the local proofs"
    two = cert.certified_at(2 * eps)[ok]
    for i in local:
        assert not bool(two[i]) and float(res.radius_floor[i]) > eps
    cheap = defense.prove(x[ok], eps, cert.label[ok], ["2eps"])
    assert bool((cheap.proven <= res.proven).all())  # more proofs never prove less
    assert bool((res.radius_floor >= cheap.radius_floor).all())
    # the 2ε floor is R(x) − ε of the float64 reference (up to the proof's rounding slack)
    ref = LipschitzDefense(net, 10, meta.eps, input_shape=tuple(meta.input_shape), arithmetic="float64")
    r = ref.certify(x[ok]).radius.double()
    assert np.allclose(cheap.radius_floor.numpy(), (r - eps).numpy(), atol=1e-6)
    assert not math.isnan(float(res.radius_floor.min()))


def test_unknown_proof_is_refused(gloro):
    _, _, defense, x, _ = gloro
    with pytest.raises(InputError):
        defense.prove(x[:2], 0.1, torch.zeros(2, dtype=torch.long), ["bab"])
