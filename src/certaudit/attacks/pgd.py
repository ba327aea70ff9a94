"""Projected gradient ascent (PGD, Madry et al. 2018) for ℓ2 and ℓ∞, batched over examples.

One routine, :func:`pgd`, maximizes any differentiable per-example loss over the feasible set

    S(x) = { x' : ‖x' − x‖ ≤ ε } ∩ [lower, upper]^d        (d = all dimensions but the batch one)

for every example of a batch at once. What counts as success is kept apart from how to search:
the caller passes the loss to climb and, optionally, a ``done_fn`` that says which candidates
already succeed; those examples are frozen at their successful point and drop out of the batch.

Building blocks, usable on their own by other attacks:

* :func:`project` -- the exact Euclidean projection onto S(x) (ℓ∞: a coordinate-wise clamp; ℓ2:
  the KKT point ``clip(x + t·(v − x))`` found by batched bisection on ``t``);
* :func:`random_in_ball` -- a uniform draw from the ε-ball, projected onto S(x);
* :func:`ascent_direction` -- sign of the gradient (ℓ∞) or the unit-ℓ2 gradient (ℓ2);
* :func:`step_size_at` -- the step-size schedules (constant, linear, cosine, step halving).

Conventions: the loss is called as ``loss_fn(x_sub, index)`` where ``index`` (int64) says which
examples of the original batch the rows of ``x_sub`` are, so per-example data (labels, targets)
is looked up as ``y[index]``. It must return a (len(index),) tensor differentiable in ``x_sub``.
Every random draw uses an explicit ``torch.Generator`` (or ``seed``), never the global RNG.

Example (an untargeted attack on a classifier)::

    def loss(xs, i):
        return torch.nn.functional.cross_entropy(model(xs), y[i], reduction="none")

    res = pgd(loss, x, 8 / 255, "linf", steps=50, restarts=3, seed=0)
    x_adv = res.x
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from certaudit import validate
from certaudit.defenses.base import Norm
from certaudit.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(x_sub, index) -> (len(index),)``: per-example loss, differentiable in ``x_sub``."""

DoneFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``done_fn(x_sub, index) -> (len(index),) bool``: which candidates already succeed."""

SCHEDULES = ("constant", "linear", "cosine", "step")

_TINY = 1e-12


@dataclass
class PGDResult:
    """Outcome of :func:`pgd`, one entry per example of the batch.

    ``x`` is the successful point where ``done_fn`` accepted one, else the point of highest loss
    seen over all steps and restarts; ``loss`` the loss there (as returned by ``loss_fn``);
    ``success`` whether ``done_fn`` accepted it (all False without ``done_fn``); ``evals`` how many
    evaluations this example used (one per loss/gradient call, one per ``done_fn`` call).
    """

    x: torch.Tensor  # (B, ...) same shape as the input
    loss: torch.Tensor  # (B,)
    success: torch.Tensor  # (B,) bool
    evals: torch.Tensor  # (B,) int64


# ------------------------------------------------------------------------------ small helpers

def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor so it broadcasts against ``like`` of shape (B, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def flat_norm(t: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """Per-example ℓ2 or ℓ∞ norm of a (B, ...) tensor, as a (B,) tensor."""
    flat = t.reshape(t.shape[0], -1)
    if Norm.parse(norm) is Norm.L2:
        return flat.norm(p=2, dim=1)
    return flat.abs().amax(dim=1)


def _eps_tensor(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ε as a (B,) tensor of x's dtype and device; a scalar is broadcast to every example."""
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(device=x.device, dtype=x.dtype)
        if e.dim() == 0:
            e = e.expand(x.shape[0])
        if e.shape != (x.shape[0],):
            raise InputError(f"eps must be a number or a ({x.shape[0]},) tensor, got shape {tuple(e.shape)}")
    else:
        try:
            value = float(eps)
        except (TypeError, ValueError):
            raise InputError(f"eps must be a number, got {eps!r}") from None
        e = torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(e).all()) or not bool((e > 0).all()):
        raise InputError("eps must be finite and > 0 for every example")
    return e


def _uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U[0,1) draws on ``like``'s device from ``generator`` (drawn on the generator's device)."""
    out = torch.rand(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return out.to(like.device)


def _normal(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    out = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return out.to(like.device)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed`` (the project's way to make random draws explicit)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# -------------------------------------------------------------------------------- projections

def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor,
                 lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """Exact projection onto {‖x' − x‖∞ ≤ ε} ∩ [lower, upper]^d (the intersection of two boxes)."""
    e = _per_example(_eps_tensor(eps, x), x)
    lo = (x - e).clamp(min=lower)
    hi = (x + e).clamp(max=upper)
    return torch.maximum(torch.minimum(x_adv, hi), lo)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor,
               lower: float = 0.0, upper: float = 1.0, iters: int = 40) -> torch.Tensor:
    """Exact Euclidean projection onto {‖x' − x‖₂ ≤ ε} ∩ [lower, upper]^d.

    By the KKT conditions the projection of ``v`` is ``clip(x + t·(v − x))`` for the largest
    ``t ∈ [0, 1]`` whose distance to ``x`` is at most ε (``t = 1`` when ``clip(v)`` is already in
    the ball). The distance grows monotonically with ``t``, so ``t`` is found by bisection, for
    the whole batch at once. ``x`` itself must lie in the box.
    """
    e = _eps_tensor(eps, x)
    u = x_adv - x
    clipped = x_adv.clamp(lower, upper)
    inside = flat_norm(clipped - x, Norm.L2) <= e  # (B,)
    lo = torch.zeros_like(e)
    hi = torch.ones_like(e)
    for _ in range(int(iters)):
        mid = 0.5 * (lo + hi)
        dist = flat_norm((x + _per_example(mid, x) * u).clamp(lower, upper) - x, Norm.L2)
        over = dist > e
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    z = (x + _per_example(lo, x) * u).clamp(lower, upper)
    # Guard against rounding: pull back radially (stays in the box, which is convex and holds x).
    dist = flat_norm(z - x, Norm.L2)
    scale = torch.where(dist > e, e / dist.clamp_min(_TINY), torch.ones_like(dist))
    z = x + _per_example(scale, x) * (z - x)
    return torch.where(_per_example(inside, x), clipped, z)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: Norm | str,
            lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """Exact projection of ``x_adv`` onto the ε-ball around ``x`` (in ``norm``) ∩ [lower, upper]^d."""
    if Norm.parse(norm) is Norm.L2:
        return project_l2(x_adv, x, eps, lower, upper)
    return project_linf(x_adv, x, eps, lower, upper)


def random_in_ball(x: torch.Tensor, eps: float | torch.Tensor, norm: Norm | str,
                   generator: torch.Generator, lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """A uniform draw from the ε-ball around every example, projected onto the box.

    ℓ∞: uniform in the cube. ℓ2: a uniform direction times ``ε·U^(1/d)`` (uniform in volume).
    """
    norm = Norm.parse(norm)
    e = _per_example(_eps_tensor(eps, x), x)
    if norm is Norm.LINF:
        delta = (2.0 * _uniform(tuple(x.shape), x, generator) - 1.0) * e
    else:
        d = x[0].numel()
        direction = _normal(tuple(x.shape), x, generator)
        direction = direction / _per_example(flat_norm(direction, Norm.L2).clamp_min(_TINY), x)
        radius = _uniform((x.shape[0],), x, generator).pow(1.0 / d)
        delta = direction * _per_example(radius, x) * e
    return project(x + delta, x, e.flatten(), norm, lower, upper)


# ------------------------------------------------------------------------------ steps, schedules

def ascent_direction(grad: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: ``sign(g)`` for ℓ∞, ``g/‖g‖₂`` for ℓ2 (0 if g = 0)."""
    if Norm.parse(norm) is Norm.LINF:
        return grad.sign()
    return grad / _per_example(flat_norm(grad, Norm.L2).clamp_min(_TINY), grad)


def step_size_at(schedule: str, base: float, t: int, steps: int) -> float:
    """Step size at step ``t`` (0-based) of ``steps``, relative multiplier applied to ``base``.

    ``constant``: base. ``linear``: decays to base/steps. ``cosine``: half cosine from base to ~0.
    ``step``: base, halved after 50% and again after 75% of the steps.
    """
    if schedule == "constant" or steps <= 1:
        return base
    if schedule == "linear":
        return base * (1.0 - t / steps)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t / steps))
    if schedule == "step":
        return base * (0.5 ** (int(t >= steps // 2) + int(t >= (3 * steps) // 4)))
    raise InputError(f"unknown step-size schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def _loss_and_grad(loss_fn: LossFn, cur: torch.Tensor, index: torch.Tensor, sign: float,
                   need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signed loss (B',) and its gradient (or None) at ``cur``."""
    if need_grad:
        with torch.enable_grad():
            xv = cur.detach().requires_grad_(True)
            loss = loss_fn(xv, index)
            _check_loss(loss, index)
            if not loss.requires_grad:
                raise InputError("loss_fn must return a tensor that is differentiable in its input")
            (grad,) = torch.autograd.grad((sign * loss).sum(), xv)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        value = sign * loss.detach()
    else:
        with torch.no_grad():
            loss = loss_fn(cur.detach(), index)
            _check_loss(loss, index)
            value = sign * loss.detach()
        grad = None
    value = torch.nan_to_num(value.to(cur.dtype), nan=-math.inf)
    return value, grad


def _check_loss(loss: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(loss, torch.Tensor) or loss.shape != (index.shape[0],):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InputError(f"loss_fn must return a ({index.shape[0]},) tensor, got {shape}")


# ------------------------------------------------------------------------------------- the attack

def pgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    eps: float | torch.Tensor,
    norm: Norm | str,
    *,
    steps: int = 40,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    schedule: str = "constant",
    generator: torch.Generator | None = None,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    done_fn: DoneFn | None = None,
    check_every: int = 1,
    budget: int | None = None,
    maximize: bool = True,
    lower: float = 0.0,
    upper: float = 1.0,
) -> PGDResult:
    """Maximize (or minimize) ``loss_fn`` over the ε-ball ∩ [lower, upper]^d, batched.

    Each restart starts at a uniform point of the ball (restart 0 starts at ``x_init``, or at ``x``,
    when ``random_start`` is False), then takes ``steps`` steps ``x ← Π(x + α_t·dir(∇loss))`` with
    the steepest-ascent direction of the norm and the step size ``α_t`` of ``schedule`` (default
    ``α = 2.5·ε/steps``, Madry et al.'s rule). The loss is evaluated at every iterate, including
    the last, and the best point per example is kept across restarts.

    ``done_fn`` (optional) is asked at every ``check_every``-th iterate, at the last iterate of each
    restart and at random starts; an example it accepts is frozen at that point and leaves the
    batch, so later restarts only spend compute on the examples still failing. ``budget`` caps the
    evaluations per example (loss/gradient calls plus ``done_fn`` calls); the search stops for all
    remaining examples when it is spent. ``eps`` may be a (B,) tensor of per-example radii.
    """
    norm = Norm.parse(norm)
    steps, restarts, check_every, budget = _check_search(x, lower, upper, steps, restarts, check_every, budget,
                                                         schedule)
    x = x.detach()
    e_all = _eps_tensor(eps, x)  # (B,)
    base = _base_step_size(step_size)
    if x_init is not None:
        if not isinstance(x_init, torch.Tensor) or x_init.shape != x.shape:
            raise InputError(f"x_init must be a tensor of shape {tuple(x.shape)}")
        x_init = project(x_init.detach().to(x), x, e_all, norm, lower, upper)
    if generator is None:
        generator = make_generator(seed, x.device)
    start = x if x_init is None else x_init
    search = _Search(loss_fn, done_fn, x, e_all, norm, lower, upper, steps, base, schedule, check_every, budget,
                     sign=1.0 if maximize else -1.0, start=start)
    active = torch.arange(x.shape[0], device=x.device)
    for r in range(restarts):
        if active.shape[0] == 0 or search.out_of_budget():
            break
        fresh = r > 0 or random_start
        cur = random_in_ball(x[active], e_all[active], norm, generator, lower, upper) if fresh else start[active]
        active = search.run_restart(active, cur, fresh)
    return search.result()


def _check_search(x: torch.Tensor, lower: float, upper: float, steps: int, restarts: int, check_every: int,
                  budget: int | None, schedule: str) -> tuple[int, int, int, int | None]:
    """Check the batch and the search settings of :func:`pgd`; returns the counts as ints."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError("x must be a floating-point torch.Tensor")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InputError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or infinite values")
    if not lower < upper:
        raise InputError(f"lower must be < upper, got [{lower}, {upper}]")
    if float(x.min()) < lower or float(x.max()) > upper:
        raise InputError(f"x must lie in [{lower}, {upper}]")
    steps = validate.integer(steps, "steps", low=0)
    restarts = validate.integer(restarts, "restarts", low=0)
    check_every = validate.integer(check_every, "check_every", low=0)
    if restarts < 1 or check_every < 1:
        raise InputError("restarts and check_every must be >= 1")
    if budget is not None:
        budget = validate.integer(budget, "budget", low=0)
        if budget < 1:
            raise InputError("budget must be >= 1 evaluation")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown step-size schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    return steps, restarts, check_every, budget


def _base_step_size(step_size: float | None) -> float | None:
    """The user's constant step size, checked (None: the ε-relative default of :func:`pgd`)."""
    if step_size is None:
        return None
    base = float(step_size)
    if not base > 0 or math.isinf(base):
        raise InputError(f"step_size must be a finite number > 0, got {step_size!r}")
    return base


class _Search:
    """The bookkeeping of one :func:`pgd` call across restarts: the best point and loss per example,
    which examples ``done_fn`` accepted, and the evaluations spent.

    Examples still being searched move in lockstep, so one counter ``spent`` is the evaluations of
    every active example; an accepted example's count is frozen at acceptance.
    """

    def __init__(self, loss_fn: LossFn, done_fn: DoneFn | None, x: torch.Tensor, e_all: torch.Tensor, norm: Norm,
                 lower: float, upper: float, steps: int, base: float | None, schedule: str, check_every: int,
                 budget: int | None, *, sign: float, start: torch.Tensor):
        self.loss_fn, self.done_fn, self.sign = loss_fn, done_fn, sign
        self.x, self.e_all, self.norm, self.lower, self.upper = x, e_all, norm, lower, upper
        self.steps, self.base, self.schedule = steps, base, schedule
        self.check_every, self.budget = check_every, budget
        b = x.shape[0]
        self.best_x = start.clone()
        self.best_val = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        self.success = torch.zeros(b, dtype=torch.bool, device=x.device)
        self.evals = torch.zeros(b, dtype=torch.long, device=x.device)
        self.spent = 0  # evaluations so far of every example still active

    def out_of_budget(self) -> bool:
        return self.budget is not None and self.spent >= self.budget

    def run_restart(self, idx: torch.Tensor, cur: torch.Tensor, fresh: bool) -> torch.Tensor:
        """``steps`` steps from ``cur`` for the examples ``idx``; returns those still not accepted."""
        xa, ea = self.x[idx], self.e_all[idx]
        for t in range(self.steps + 1):
            if self.out_of_budget():
                break
            need_grad = t < self.steps
            val, grad = _loss_and_grad(self.loss_fn, cur, idx, self.sign, need_grad)
            self.spent += 1
            self._keep_best(idx, cur, val)
            if self._check_due(t, fresh) and not self.out_of_budget():
                keep = self._accept(idx, cur, val)
                idx, cur, xa, ea = idx[keep], cur[keep], xa[keep], ea[keep]
                if grad is not None:
                    grad = grad[keep]
                if idx.shape[0] == 0:
                    break
            if need_grad:
                cur = self._step(cur, grad, xa, ea, t)
        return idx

    def _keep_best(self, idx: torch.Tensor, cur: torch.Tensor, val: torch.Tensor) -> None:
        better = val > self.best_val[idx]
        self.best_val[idx] = torch.where(better, val, self.best_val[idx])
        self.best_x[idx] = torch.where(_per_example(better, cur), cur, self.best_x[idx])

    def _check_due(self, t: int, fresh: bool) -> bool:
        """Whether ``done_fn`` is asked at iterate ``t``: every ``check_every``-th, the last, a random start."""
        return self.done_fn is not None and (t == self.steps or (t > 0 and t % self.check_every == 0)
                                             or (t == 0 and fresh))

    def _accept(self, idx: torch.Tensor, cur: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """Ask ``done_fn``, freeze the accepted examples at ``cur``; returns the mask of the others."""
        ok = self.done_fn(cur.detach(), idx)
        self.spent += 1
        if not isinstance(ok, torch.Tensor) or ok.shape != (idx.shape[0],):
            raise InputError(f"done_fn must return a ({idx.shape[0]},) boolean tensor")
        ok = ok.to(device=self.x.device, dtype=torch.bool)
        hit = idx[ok]
        self.best_x[hit] = cur[ok]
        self.best_val[hit] = val[ok]
        self.success[hit] = True
        self.evals[hit] = self.spent
        return ~ok

    def _step(self, cur: torch.Tensor, grad: torch.Tensor, xa: torch.Tensor, ea: torch.Tensor, t: int) -> torch.Tensor:
        """One projected steepest-ascent step of step size ``α_t``."""
        alpha = ea * (2.5 / self.steps) if self.base is None else torch.full_like(ea, self.base)
        alpha = alpha * (step_size_at(self.schedule, 1.0, t, self.steps))
        step = _per_example(alpha, cur) * ascent_direction(grad, self.norm)
        return project(cur + step, xa, ea, self.norm, self.lower, self.upper)

    def result(self) -> PGDResult:
        self.evals[~self.success] = self.spent
        return PGDResult(x=self.best_x, loss=self.sign * self.best_val, success=self.success, evals=self.evals)
