"""Shadow Attack (Ghiasi, Shafahi & Goldstein, ICLR 2020): large, smooth perturbations that make a
certified defense issue a *spoofed* certificate for a wrong label.

For every (image ``x``, target ``t``) pair the attack maximizes, over a perturbation δ (unbounded, as
in the paper, unless a budget is given),

    −L(clip(x + δ, 0, 1), t) − λc·C(δ) − λtv·TV(δ) − λs·Dissim(δ)          (Eq. 3; Eq. 4 over t ≠ y)

with the paper's penalties (Section 3), computed on the perturbation as applied to the image (a
1-channel δ is broadcast to every channel first, as the authors' code does):

* ``C(δ) = ‖(mean|δ_R|, mean|δ_G|, mean|δ_B|)‖₂`` (:func:`color_penalty`; the CROWN-IBP setting of
  Section 5 uses ``C(δ) = ‖δ‖₂`` instead: ``color="l2"``);
* ``TV(δ)`` = the anisotropic total variation squared, ``Σ (δ_{i+1,j} − δ_{i,j})² + (δ_{i,j+1} − δ_{i,j})²``
  summed over channels (:func:`tv_penalty`);
* ``Dissim(δ) = ‖((δ_R − δ_G)², (δ_R − δ_B)², (δ_G − δ_B)²)‖₂`` for a 3-channel δ
  (:func:`dissim_penalty`), or 0 for the *1-channel* attack whose single δ is copied to all channels.

The spoofing loss ``L`` is pluggable (:class:`SpoofLoss`): :class:`SmoothedCrossEntropy` is the
paper's loss for randomized smoothing (mean cross-entropy toward ``t`` over ``n`` Gaussian copies),
and :class:`DefenseMargin` turns any defense's differentiable ``margin(x, r, t)`` (the protocol of
:mod:`certaudit.defenses.base`) into a loss, so Lipschitz and interval (IBP / CROWN-IBP) defenses
are attacked with the same code.

Batching: :func:`shadow_attack` optimizes *all* (image, target) pairs of a call at once; the
untargeted attack of Eq. 4 is every wrong class of every image in one batch
(:func:`wrong_class_pairs`). The objective is a *sum over pairs* of per-pair objectives, so the
gradient each pair receives is exactly the gradient of its own single-pair objective (the
classification term is the mean over that pair's noise copies, never divided again by the number
of copies). Big (pair × copy) batches are cut into memory-sized chunks whose gradients are added,
which gives the unchunked gradient.

Randomness: every draw comes from generators seeded by a hash of (base seed, role, image index,
target or step): the random start of pair (i, t), and the Gaussian copies of image i (shared by
all targets of the image, fixed for the whole run as in the authors' code, or fresh at every step).
Results therefore depend on the seed and the image indices, not on batch composition or chunking.

Perceptual budget (:mod:`certaudit.attacks.budget`): with ``max_linf`` τ the perturbation is projected
onto ``[−τ, τ] ∩ [−x, 1 − x]`` after every step, so the optimization never leaves the budget, and each
step is *scaled down* (direction kept) so that its ℓ∞ norm is at most ``τ/4`` (:data:`STEP_FRACTION`):
the smooth Shadow direction of ``lr·∇`` survives instead of every step landing on a corner of the box
(with the CROWN-IBP preset's lr = 200 an unscaled step would turn the attack into ℓ∞ sign-PGD). With
``min_ssim`` s the objective subtracts ``λ_ssim · max(0, s − SSIM(x, x + δ))``, the random start is
halved until it is feasible (:data:`START_HALVINGS` times, then 0), and each pair ends at its best
iterate with SSIM ≥ s; the SSIM returned for that pair is the very value the iterate was accepted with
(never a recomputation, which may differ in the last bits with the batch: see
:mod:`certaudit.attacks.budget`). Budgets may differ per pair, so a sweep over budgets is one batch.

What counts as *success* is not decided here: a spoof succeeds only when the real defense's
CERTIFY, run afresh on ``x + δ``, returns a wrong label (see :mod:`certaudit.audits.spoofing`).

Layout: this module holds the attack loop; the settings, penalties and seeds live in
:mod:`certaudit.attacks.shadow_config` and the spoofing losses in
:mod:`certaudit.attacks.shadow_losses` (with the memory budgets of its chunking); the public names
of both are importable from here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from certaudit.attacks.budget import LINF_RANGE, MIN_LINF, SSIM_RANGE, Budget, ssim, ssim_at_least
from certaudit.attacks.shadow_config import (
    COLOR_MODES,
    OPTIMIZERS,
    ROLE_INIT,
    ShadowConfig,
    base_seed,
    color_penalty,
    delta_channels,
    dissim_penalty,
    expand_delta,
    mix_seed,
    noise_key,
    penalty_terms,
    tv_penalty,
)
from certaudit.attacks.shadow_losses import (
    NOISE_MODES,
    DefenseMargin,
    SmoothedCrossEntropy,
    SpoofLoss,
)
from certaudit.errors import InputError

_RESULT_FIELDS = ("loss", "objective", "color", "tv", "dissim", "ssim")
STEP_FRACTION = 0.25  # with an ℓ∞ budget τ, each step's ℓ∞ norm is at most STEP_FRACTION·τ (direction kept)
START_HALVINGS = 8  # with an SSIM bound, the random start is halved up to this many times, then set to 0


# --------------------------------------------------------------------------------------- attack

@dataclass
class ShadowResult:
    """Outcome of :func:`shadow_attack`, one entry per (image, target) pair.

    ``delta`` is the optimized δ as applied to the image (a 1-channel δ copied to every channel);
    ``x_adv = clip(x + delta, 0, 1)`` is the image to certify; ``loss`` the spoofing loss ``L`` and
    ``objective`` the objective of Eq. 3 at the last evaluated step; ``color``, ``tv``, ``dissim``
    the penalties of the returned δ; ``ssim`` = SSIM(x, x_adv) (:func:`certaudit.attacks.budget.ssim`): for
    a pair with an SSIM bound, the value its returned iterate was accepted as feasible with, the one value
    the selection and the judge compare with the bound.
    ``image`` indexes the batch ``x``; ``target`` the target class.
    """

    delta: torch.Tensor  # (P, C, H, W)
    x_adv: torch.Tensor  # (P, C, H, W)
    image: torch.Tensor  # (P,) int64
    target: torch.Tensor  # (P,) int64
    loss: torch.Tensor  # (P,)
    objective: torch.Tensor  # (P,)
    color: torch.Tensor  # (P,)
    tv: torch.Tensor  # (P,)
    dissim: torch.Tensor  # (P,)
    ssim: torch.Tensor  # (P,) SSIM(x, x_adv)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.target.shape[0])


def wrong_class_pairs(y: torch.Tensor, num_classes: int, candidates: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, target) pairs of the untargeted attack (Eq. 4): every class ≠ the true label.

    ``candidates`` restricts the targets (the paper's ImageNet runs used 10 class ids); the true
    label is always left out. Returns ``image`` (P,) and ``target`` (P,), grouped by image.
    """
    y = torch.as_tensor(y).long().flatten()
    k = int(num_classes)
    classes = torch.arange(k, device=y.device) if candidates is None else torch.as_tensor(
        sorted(set(int(c) for c in candidates)), dtype=torch.long, device=y.device)
    if classes.numel() == 0 or int(classes.min()) < 0 or int(classes.max()) >= k:
        raise InputError(f"target classes must lie in [0, {k}), got {classes.tolist()}")
    keep = classes[None, :] != y[:, None]  # (B, T)
    image = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(keep)[keep]
    target = classes[None, :].expand_as(keep)[keep]
    return image, target


def shadow_objective(loss: SpoofLoss, x_pair: torch.Tensor, delta: torch.Tensor, target: torch.Tensor,
                     keys: torch.Tensor, config: ShadowConfig, step: int = 0, min_ssim: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 3 for P pairs: objective (P,), its gradient with respect to ``delta``, and its parts.

    ``x_pair`` (P, C, H, W) are the pairs' natural images, ``delta`` (P, 1 or C, H, W) the
    variables. The objective is ``−L(clip(x + δ)) − λc·C − λtv·TV − λs·Dissim``; the batched
    objective is the sum over pairs, so ``grad[p]`` is the gradient of pair p's own objective.
    ``min_ssim`` (P,): per-pair SSIM bound (−inf: none); where given, the objective also subtracts
    ``λ_ssim · max(0, s − SSIM(x, clip(x + δ)))`` and ``parts["ssim"]`` holds the SSIM.
    """
    d = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        eff = expand_delta(d, x_pair.shape[1])  # (P, C, H, W)
        x_adv = (x_pair + eff).clamp(0.0, 1.0)  # the image optimized is the image certified
        value, g_x = loss(x_adv.detach(), target, keys, step)  # (P,), (P, C, H, W)
        terms = penalty_terms(eff, config)
        penalty = config.lambda_c * terms["color"] + config.lambda_tv * terms["tv"] + config.lambda_s * terms["dissim"]
        if min_ssim is not None:
            terms["ssim"] = ssim(x_pair, x_adv)  # (P,)
            hinge = torch.where(torch.isfinite(min_ssim), (min_ssim - terms["ssim"]).clamp_min(0.0), 0.0)
            penalty = penalty + config.lambda_ssim * hinge
        # d/dδ of Σ_p (−L_p − penalty_p): the chain rule through the clip for L, autograd for the penalties.
        (grad,) = torch.autograd.grad([x_adv, penalty.sum()], [d], grad_outputs=[-g_x, torch.ones_like(penalty.sum()).neg()])
    objective = (-value.detach() - penalty.detach()).float()
    parts = {"loss": value.detach(), **{k: v.detach() for k, v in terms.items()}, "x_adv": x_adv.detach()}
    return objective, grad, parts


def shadow_attack(loss: SpoofLoss, x: torch.Tensor, target: torch.Tensor, config: ShadowConfig | None = None, *,
                  image: torch.Tensor | None = None, indices: Sequence[int] | torch.Tensor | None = None,
                  seed: int | None = None, generator: torch.Generator | None = None,
                  images_per_group: int | None = None, max_linf: torch.Tensor | Sequence[float] | None = None,
                  min_ssim: torch.Tensor | Sequence[float] | None = None,
                  on_step: Callable[[int], None] | None = None) -> ShadowResult:
    """Run the Shadow Attack on every (image, target) pair at once.

    ``x`` (B, C, H, W) natural images in [0, 1]; ``target`` (P,) target classes; ``image`` (P,)
    which image of ``x`` each pair attacks (default: pair b attacks image b, P = B). For the
    untargeted attack pass the pairs of :func:`wrong_class_pairs`. ``indices`` (B,) are the images'
    data-set indices (default 0..B−1); seeds derive from (``seed`` or a draw from ``generator``,
    index), so a pair's result does not depend on which other pairs share the call.

    ``max_linf`` / ``min_ssim`` (P,): a perceptual budget per pair (``inf`` / ``−inf``: none; default:
    the config's for every pair), so one call optimizes the same (image, target) under several budgets
    (a budget sweep) as one batch. A pair with a finite ``max_linf`` τ takes steps of ℓ∞ norm at most
    ``τ/4`` (the optimizer's step scaled down, direction kept) and is projected onto
    ``[−τ, τ] ∩ [−x, 1 − x]`` after every step; one with ``min_ssim`` starts from a feasible point (its
    random start halved until SSIM ≥ s), gets the SSIM penalty and returns its best feasible iterate
    (see :class:`ShadowConfig`).

    Images are processed in groups (all pairs of an image in the same group) of
    ``images_per_group`` (default: what the loss's memory budget allows, ``loss.max_images``);
    ``on_step(k)`` is called after each step of each group with the number of pairs stepped.
    """
    config = config or ShadowConfig()
    image, target, idx = _check_pairs(x, target, image, indices)
    tau, sim = _pair_budgets(config, max_linf, min_ssim, int(target.shape[0]), x.device)
    base = base_seed(seed, generator)
    b_count, c, h, w = x.shape
    per_group = images_per_group
    if per_group is None:
        per_group = min(b_count, int(loss.max_images((c, h, w))))
    out = _empty_outputs(int(target.shape[0]), tuple(x.shape[1:]), x.device)
    t0 = time.perf_counter()
    for sel in _image_groups(image, max(1, int(per_group))):
        sel_dev = sel.to(x.device)
        img, tgt = image[sel_dev], target[sel_dev]  # (Pg,)
        x_pair = x[img]  # (Pg, C, H, W)
        pair_indices = [idx[i] for i in img.tolist()]
        keys = torch.tensor([noise_key(base, i) for i in pair_indices], dtype=torch.long, device=x.device)
        delta = _random_start(config, base, pair_indices, tgt.tolist(), (delta_channels(config, c), h, w), x.device)
        g_tau = None if tau is None else tau[sel_dev]
        g_sim = None if sim is None else sim[sel_dev]
        if g_tau is not None and config.init > 0:  # U(−min(init, τ), min(init, τ)): the same draw, scaled
            delta *= (g_tau.clamp(max=config.init) / config.init).view(-1, 1, 1, 1)
        objective, value, kept_ssim = _ascend(loss, x_pair, delta, tgt, keys, config, on_step, g_tau, g_sim)
        _store_group(out, sel_dev, x_pair, delta, objective, value, config, kept_ssim)
    return ShadowResult(image=image, target=target, seconds=time.perf_counter() - t0, **out)


def _pair_budgets(config: ShadowConfig, max_linf: Any, min_ssim: Any, p_count: int, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-pair τ (inf: none) and SSIM bound (−inf: none), each None where no pair has one."""
    def per_pair(v: Any, default: float | None, none: float, name: str) -> torch.Tensor:
        t = torch.full((p_count,), none if default is None else float(default), device=device) if v is None \
            else torch.as_tensor(v, dtype=torch.float32, device=device).flatten()
        if t.shape[0] != p_count or bool(torch.isnan(t).any()):
            raise InputError(f"{name} must give one number per pair ({p_count}), got {tuple(t.shape)}")
        return t

    tau = per_pair(max_linf, config.max_linf, math.inf, "max_linf")
    sim = per_pair(min_ssim, config.min_ssim, -math.inf, "min_ssim")
    min_tau = torch.tensor(MIN_LINF, dtype=torch.float32).to(device)  # compared in float32, as the tensors
    if bool(((tau < min_tau) | (torch.isfinite(tau) & (tau > 1))).any()) or \
            bool((torch.isfinite(sim) & ((sim <= 0) | (sim > 1))).any()):
        raise InputError(f"max_linf must lie in {LINF_RANGE} (inf: none) and min_ssim in {SSIM_RANGE} (-inf: none) "
                         "for every pair, after rounding to float32")
    return (tau if bool(torch.isfinite(tau).any()) else None), (sim if bool(torch.isfinite(sim).any()) else None)


def _check_pairs(x: torch.Tensor, target: torch.Tensor, image: torch.Tensor | None,
                 indices: Sequence[int] | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Check the attack's inputs; returns ``image`` (P,), ``target`` (P,) as int64 on x's device and
    the images' data-set indices."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.numel() == 0 or not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise InputError("x must be non-empty, finite and in [0, 1]")
    b_count = x.shape[0]
    target = torch.as_tensor(target, device=x.device).long().flatten()
    image = torch.arange(b_count, device=x.device) if image is None else torch.as_tensor(image, device=x.device).long().flatten()
    if image.shape != target.shape:
        raise InputError(f"image and target must have one entry per pair, got {tuple(image.shape)} and {tuple(target.shape)}")
    if image.numel() == 0:
        raise InputError("no (image, target) pairs to attack")
    if int(image.min()) < 0 or int(image.max()) >= b_count:
        raise InputError(f"image positions must lie in [0, {b_count})")
    idx = list(range(b_count)) if indices is None else [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if len(idx) != b_count:
        raise InputError(f"indices must have one entry per image ({b_count}), got {len(idx)}")
    return image, target, idx


def _image_groups(image: torch.Tensor, per_group: int) -> Iterator[torch.Tensor]:
    """Pair ids (CPU, int64) of each group of ``per_group`` whole images, pairs sorted by image.

    Groups hold whole images: the attack on one image never depends on the group it lands in.
    """
    image_cpu = image.cpu()
    order = torch.argsort(image_cpu, stable=True)  # pairs grouped by image
    uniq_images = torch.unique(image_cpu).tolist()
    for g0 in range(0, len(uniq_images), per_group):
        members = uniq_images[g0:g0 + per_group]
        yield order[torch.isin(image_cpu[order], torch.tensor(members, dtype=torch.long))]


def _ascend(loss: SpoofLoss, x_pair: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, keys: torch.Tensor,
            config: ShadowConfig, on_step: Callable[[int], None] | None, tau: torch.Tensor | None = None,
            min_ssim: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``config.steps`` optimizer steps on Eq. 3, updating ``delta`` in place; returns the objective
    (P,) and the spoofing loss (P,) at the last evaluated step (or of the kept feasible iterate), and
    the SSIM each kept feasible iterate was accepted with (P,; NaN for pairs without one; None without
    SSIM bounds).

    ``tau`` (P,): δ is projected onto its ℓ∞ box ∩ [−x, 1 − x] at the start and after every step, and
    each step of a pair with a finite τ is scaled so that its ℓ∞ norm is at most ``STEP_FRACTION · τ``.
    ``min_ssim`` (P,): the start is made feasible (:func:`_feasible_start`), the SSIM penalty is added,
    and pairs with a bound end at their best feasible iterate.
    """
    box = None if tau is None else _box(x_pair, tau, delta.shape[1])
    if box is not None:
        _project(delta, box)
    if min_ssim is not None:
        _feasible_start(delta, x_pair, min_ssim)
    step_cap = None if tau is None else STEP_FRACTION * tau  # (P,), inf where unbounded
    delta.requires_grad_(True)
    opt: torch.optim.Optimizer
    if config.optimizer == "adam":
        opt = torch.optim.Adam([delta], lr=config.lr, maximize=True)
    else:
        opt = torch.optim.SGD([delta], lr=config.lr, maximize=True)
    keep = None if min_ssim is None else _BestFeasible(delta, min_ssim)
    objective = value = None
    for step in range(config.steps):
        objective, grad, parts = shadow_objective(loss, x_pair, delta, target, keys, config, step, min_ssim)
        value = parts["loss"]
        if keep is not None:
            keep.offer(delta, objective, value, parts["ssim"])
        delta.grad = grad
        before = None if step_cap is None else delta.detach().clone()
        opt.step()
        if step_cap is not None:
            _cap_step(delta, before, step_cap)
            _project(delta, box)
        if on_step is not None:
            on_step(int(target.shape[0]))
    kept_ssim = None
    if keep is not None:  # the last iterate is a candidate too
        last_obj, _, parts = shadow_objective(loss, x_pair, delta, target, keys, config, config.steps, min_ssim)
        keep.offer(delta, last_obj, parts["loss"], parts["ssim"])
        objective, value = keep.apply(delta, objective, value)
        kept_ssim = torch.where(keep.found, keep.ssim, math.nan)
    return objective, value, kept_ssim


def _box(x_pair: torch.Tensor, tau: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds (lo, hi) of δ: ``[−τ, τ] ∩ [−x, 1 − x]`` for pairs with a finite τ, (−inf, inf) otherwise.

    A 1-channel δ is added to every channel, so its bounds are the tightest over the channels.
    """
    lo_x, hi_x = -x_pair, 1.0 - x_pair  # (P, C, H, W)
    if channels == 1 and x_pair.shape[1] > 1:
        lo_x, hi_x = lo_x.amax(dim=1, keepdim=True), hi_x.amin(dim=1, keepdim=True)
    t = tau.view(-1, 1, 1, 1)
    bounded = torch.isfinite(t)
    lo = torch.where(bounded, torch.maximum(lo_x, -t), -math.inf)
    hi = torch.where(bounded, torch.minimum(hi_x, t), math.inf)
    return lo, hi


def _project(delta: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        delta.copy_(torch.clamp(delta, box[0], box[1]))


def _cap_step(delta: torch.Tensor, before: torch.Tensor, cap: torch.Tensor) -> None:
    """Scale each pair's step ``delta − before`` down to ℓ∞ norm ``cap`` (P,) where it is larger.

    The whole step of the pair is multiplied by one factor, so its direction (the smooth Shadow
    direction of ``lr·∇``, or Adam's) is kept: this is a step-size rule, not a sign attack. Pairs whose
    step is within the cap, and pairs without a budget (cap = inf), keep their iterate bit for bit.
    """
    with torch.no_grad():
        step = delta - before
        size = step.flatten(1).abs().amax(dim=1)  # (P,)
        shrink = size > cap
        if bool(shrink.any()):
            factor = torch.where(shrink, cap / size.clamp_min(torch.finfo(size.dtype).tiny), 1.0).view(-1, 1, 1, 1)
            delta.copy_(torch.where(shrink.view(-1, 1, 1, 1), before + step * factor, delta))


def _feasible_start(delta: torch.Tensor, x_pair: torch.Tensor, min_ssim: torch.Tensor) -> None:
    """Halve the start of every pair with an SSIM bound until ``SSIM(x, clip(x + δ0)) ≥ s``, at most
    :data:`START_HALVINGS` times; a start still infeasible then is set to 0 (δ = 0 has SSIM 1).

    Halving keeps δ inside its ℓ∞ box (the box contains 0 and is convex). Each pair's start depends on
    its own image only, so the result does not depend on the batch.
    """
    bounded = torch.isfinite(min_ssim)
    with torch.no_grad():
        for k in range(START_HALVINGS + 1):
            sim = ssim(x_pair, (x_pair + expand_delta(delta, x_pair.shape[1])).clamp(0.0, 1.0))
            bad = bounded & ~ssim_at_least(sim, min_ssim)
            if not bool(bad.any()):
                return
            factor = 0.0 if k == START_HALVINGS else 0.5
            delta.mul_(torch.where(bad, factor, 1.0).view(-1, 1, 1, 1))


class _BestFeasible:
    """Per pair with an SSIM bound, the iterate with the best objective among those with SSIM ≥ s, and
    the SSIM it was accepted with (``ssim``)."""

    def __init__(self, delta: torch.Tensor, min_ssim: torch.Tensor):
        self.min_ssim = min_ssim
        self.bounded = torch.isfinite(min_ssim)
        self.delta = delta.detach().clone()
        self.objective = torch.full_like(min_ssim, -math.inf)
        self.value = torch.zeros_like(min_ssim)
        self.ssim = torch.full_like(min_ssim, math.nan)
        self.found = torch.zeros_like(self.bounded)

    def offer(self, delta: torch.Tensor, objective: torch.Tensor, value: torch.Tensor, sim: torch.Tensor) -> None:
        better = self.bounded & ssim_at_least(sim, self.min_ssim) & (objective > self.objective)  # (P,)
        self.delta[better] = delta.detach()[better]
        self.objective = torch.where(better, objective, self.objective)
        self.value = torch.where(better, value.float(), self.value)
        self.ssim = torch.where(better, sim.detach().float(), self.ssim)
        self.found |= better

    def apply(self, delta: torch.Tensor, objective: torch.Tensor, value: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            delta[self.found] = self.delta[self.found]
        return torch.where(self.found, self.objective, objective), torch.where(self.found, self.value, value.float())


def _empty_outputs(p_count: int, sample_shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """The result tensors of :class:`ShadowResult` for ``p_count`` pairs, filled group by group."""
    out = {"delta": torch.empty((p_count, *sample_shape), device=device)}
    out["x_adv"] = torch.empty_like(out["delta"])
    out.update({k: torch.empty(p_count, device=device) for k in _RESULT_FIELDS})
    return out


def _store_group(out: dict[str, torch.Tensor], sel: torch.Tensor, x_pair: torch.Tensor, delta: torch.Tensor,
                 objective: torch.Tensor, value: torch.Tensor, config: ShadowConfig,
                 kept_ssim: torch.Tensor | None = None) -> None:
    """Write one group's final δ (as applied to the image), image, loss, penalties and SSIM at rows ``sel``.

    ``kept_ssim`` (P,): the SSIM a kept feasible iterate was accepted with (NaN: none); it is stored as it
    is, so that the bound is compared with one value only. The other pairs' SSIM is computed here."""
    with torch.no_grad():
        eff = expand_delta(delta.detach(), x_pair.shape[1])
        terms = penalty_terms(eff, config)
        out["delta"][sel] = eff
        out["x_adv"][sel] = (x_pair + eff).clamp(0.0, 1.0)
        out["loss"][sel] = value.float()
        out["objective"][sel] = objective
        for k in ("color", "tv", "dissim"):
            out[k][sel] = terms[k].float()
        sim = ssim(x_pair, out["x_adv"][sel]).float()
        out["ssim"][sel] = sim if kept_ssim is None else torch.where(torch.isnan(kept_ssim), sim, kept_ssim)


def _random_start(config: ShadowConfig, base: int, indices: list[int], targets: list[int],
                  shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """δ0 ~ U(−init, init) per pair, seeded by (base, image index, target)."""
    delta = torch.zeros((len(indices), *shape), device=device)
    if config.init > 0:
        gen = torch.Generator(device=device)
        for p, (i, t) in enumerate(zip(indices, targets)):
            delta[p].uniform_(-config.init, config.init, generator=gen.manual_seed(mix_seed(base, ROLE_INIT, i, t)))
    return delta


__all__ = [
    "Budget", "ShadowConfig", "ShadowResult", "SpoofLoss", "SmoothedCrossEntropy", "DefenseMargin", "shadow_attack",
    "shadow_objective", "wrong_class_pairs", "color_penalty", "tv_penalty", "dissim_penalty", "penalty_terms",
    "expand_delta", "delta_channels", "mix_seed", "noise_key", "base_seed", "COLOR_MODES", "OPTIMIZERS", "NOISE_MODES",
    "STEP_FRACTION", "START_HALVINGS",
]
