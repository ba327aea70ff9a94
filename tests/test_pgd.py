"""PGD (certaudit.attacks.pgd): stays feasible, finds known optima, batching changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from certaudit.attacks.pgd import (
    SCHEDULES,
    ascent_direction,
    flat_norm,
    make_generator,
    pgd,
    project,
    project_l2,
    random_in_ball,
    step_size_at,
)
from certaudit.errors import InputError

TOL = 1e-5


def _images(b=6, c=1, h=4, w=4, seed=0):
    g = make_generator(seed)
    return torch.rand(b, c, h, w, generator=g)


def _wiggly_loss(w: torch.Tensor):
    """A non-linear per-example loss: sum(sin(3 w·x)) + <w, x>."""
    def loss(xs, idx):
        ws = w[idx]
        return (torch.sin(3 * ws * xs) + ws * xs).flatten(1).sum(1)
    return loss


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_result_stays_in_ball_and_box(norm, schedule):
    x = _images(8)
    x[0] = 0.0  # corners of the box make the projection matter
    x[1] = 1.0
    w = torch.randn(x.shape, generator=make_generator(1))
    eps = 0.7 if norm == "l2" else 0.2
    res = pgd(_wiggly_loss(w), x, eps, norm, steps=15, restarts=3, schedule=schedule, seed=3)
    assert res.x.shape == x.shape
    assert float(res.x.min()) >= 0.0 and float(res.x.max()) <= 1.0
    assert bool((flat_norm(res.x - x, norm) <= eps + TOL).all())
    assert bool(torch.isfinite(res.loss).all())
    # the reported loss is the loss at the returned point
    torch.testing.assert_close(res.loss, _wiggly_loss(w)(res.x, torch.arange(8)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_in_ball_is_feasible(norm):
    x = _images(16)
    eps = 0.5 if norm == "l2" else 0.1
    z = random_in_ball(x, eps, norm, make_generator(0))
    assert bool((flat_norm(z - x, norm) <= eps + TOL).all())
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    assert not torch.equal(z, x)


def test_linear_loss_linf_finds_the_corner():
    # max <w, x'> over the linf ball ∩ box: x'_i = clip(x_i + eps·sign(w_i)).
    x = _images(5)
    w = torch.randn(x.shape, generator=make_generator(2))
    eps = 0.1
    res = pgd(lambda xs, i: (w[i] * xs).flatten(1).sum(1), x, eps, "linf", steps=10, random_start=False)
    optimum = (x + eps * w.sign()).clamp(0, 1)
    torch.testing.assert_close(res.x, optimum, atol=1e-6, rtol=0)


def test_linear_loss_l2_finds_the_optimum_inside_the_box():
    # With x = 0.5 and eps = 0.2 the ball lies inside the box: optimum x + eps·w/‖w‖, value <w,x> + eps‖w‖.
    x = torch.full((4, 1, 4, 4), 0.5)
    w = torch.randn(x.shape, generator=make_generator(3))
    eps = 0.2
    res = pgd(lambda xs, i: (w[i] * xs).flatten(1).sum(1), x, eps, "l2", steps=20, random_start=False)
    optimum = x + eps * w / flat_norm(w, "l2").view(-1, 1, 1, 1)
    torch.testing.assert_close(res.x, optimum, atol=1e-4, rtol=0)
    expected = (w * x).flatten(1).sum(1) + eps * flat_norm(w, "l2")
    torch.testing.assert_close(res.loss, expected, atol=1e-4, rtol=0)


def _slsqp_projection(v: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """Reference: SLSQP on min ‖z − v‖² s.t. ‖z − x‖ ≤ eps, 0 ≤ z ≤ 1."""
    return minimize(lambda z: ((z - v) ** 2).sum(), x, jac=lambda z: 2 * (z - v), method="SLSQP",
                    bounds=[(0, 1)] * len(x),
                    constraints=[{"type": "ineq", "fun": lambda z: eps ** 2 - ((z - x) ** 2).sum(),
                                  "jac": lambda z: -2 * (z - x)}],
                    options={"ftol": 1e-12, "maxiter": 500}).x


def test_l2_projection_matches_a_generic_solver():
    rng = np.random.default_rng(0)
    eps = 0.6
    for _ in range(5):
        x = rng.uniform(0, 1, size=6)
        v = x + rng.normal(0, 1.0, size=6)
        ref = _slsqp_projection(v, x, eps)
        got = project_l2(torch.tensor(v)[None], torch.tensor(x)[None], eps)[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_is_idempotent_and_keeps_feasible_points(norm):
    x = _images(4)
    eps = 0.3
    z = random_in_ball(x, eps, norm, make_generator(5))
    torch.testing.assert_close(project(z, x, eps, norm), z)
    far = x + 5 * torch.randn(x.shape, generator=make_generator(6))
    p = project(far, x, eps, norm)
    torch.testing.assert_close(project(p, x, eps, norm), p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_batched_equals_per_image(norm):
    x = _images(5)
    w = torch.randn(x.shape, generator=make_generator(7))
    loss = _wiggly_loss(w)
    eps = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])  # per-example radii
    kw = dict(steps=12, random_start=False, schedule="cosine")
    batched = pgd(loss, x, eps, norm, **kw)
    for i in range(5):
        single = pgd(lambda xs, idx, i=i: loss(xs, idx + i), x[i:i + 1], float(eps[i]), norm, **kw)
        torch.testing.assert_close(single.x[0], batched.x[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(single.loss[0], batched.loss[i], atol=1e-5, rtol=0)


def test_done_fn_freezes_successes_and_budget_caps_evaluations():
    x = torch.full((3, 1, 2, 2), 0.5)
    w = torch.ones_like(x)
    w[2] = -1.0  # the third example walks the wrong way and never succeeds
    seen = []

    def loss(xs, i):
        return (w[i] * xs).flatten(1).sum(1)

    def done(xs, i):
        seen.append(i.clone())
        return xs.flatten(1).mean(1) > 0.55

    res = pgd(loss, x, 0.1, "linf", steps=8, restarts=5, random_start=False, done_fn=done, budget=20)
    assert res.success.tolist() == [True, True, False]
    assert bool((res.x[:2].flatten(1).mean(1) > 0.55).all())
    assert int(res.evals.max()) <= 20
    assert int(res.evals[2]) == 20
    assert int(res.evals[0]) < 20
    # successes leave the batch: later checks only see the failing example
    assert seen[-1].tolist() == [2]


def test_minimize_flag_and_step_schedules():
    x = torch.full((2, 1, 2, 2), 0.5)
    res = pgd(lambda xs, i: xs.flatten(1).sum(1), x, 0.1, "linf", steps=5, random_start=False, maximize=False)
    torch.testing.assert_close(res.x, torch.full_like(x, 0.4))
    assert step_size_at("constant", 1.0, 3, 10) == 1.0
    assert step_size_at("step", 1.0, 9, 10) == 0.25
    assert math.isclose(step_size_at("cosine", 1.0, 5, 10), 0.5)
    assert math.isclose(step_size_at("linear", 1.0, 5, 10), 0.5)
    g = torch.tensor([[[[3.0, -4.0]]]])
    torch.testing.assert_close(ascent_direction(g, "l2"), torch.tensor([[[[0.6, -0.8]]]]))
    torch.testing.assert_close(ascent_direction(g, "linf"), torch.tensor([[[[1.0, -1.0]]]]))


def test_bad_arguments_raise_input_error():
    x = _images(2)
    loss = lambda xs, i: xs.flatten(1).sum(1)  # noqa: E731
    with pytest.raises(InputError):
        pgd(loss, x, 0.0, "l2")
    with pytest.raises(InputError):
        pgd(loss, x, float("nan"), "l2")
    with pytest.raises(InputError):
        pgd(loss, x, 0.1, "l3")
    with pytest.raises(InputError):
        pgd(loss, x + 2.0, 0.1, "l2")
    with pytest.raises(InputError):
        pgd(loss, x, 0.1, "l2", schedule="warp")
    with pytest.raises(InputError):
        pgd(lambda xs, i: xs.sum(), x, 0.1, "l2")  # not per-example
    with pytest.raises(InputError):
        pgd(loss, x, 0.1, "l2", restarts=0)
