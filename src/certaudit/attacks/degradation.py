"""Degradation attacks ("Degradation attacks on certifiably robust neural networks", TMLR 2022):
force a certified run-time defense to reject (⊥) an ε-perturbation of an input it certifies.

Every attack here searches the feasible set ``B(x, ε) ∩ [0,1]^d`` (norm from the defense) with
:func:`certaudit.attacks.pgd.pgd` and returns one candidate ``x'`` per image; *what counts as
success* is decided once, by :func:`verify_candidates` (distance ≤ ε + tol, ``x'`` in [0,1], and the
defense's real ``accept(x', ε)`` returns ABSTAIN, for a randomized defense with fresh noise).

* ``pgd``       -- Algorithm 3.1: an off-the-shelf attack (PGD on the cross-entropy of the model's
  logits at the defense's label) inside the ε-ball; ``x'`` is whatever it finds.
* ``pgd-2eps``  -- Algorithm B.1: the same PGD inside the 2ε-ball, then projected back onto the
  ε-ball (ℓ2: ``x + min(ε, ‖d‖)·d/‖d‖``; ℓ∞: a clip) and into [0,1].
* ``spgd``      -- Algorithm 3.2 (smoothed PGD, randomized smoothing only): each step ascends the
  cross-entropy of the mean logits over ``samples`` fresh Gaussian copies ``x' + ζ_i``,
  ``ζ ~ N(0, σ²I)`` with the *model's own* σ, and projects onto the ε-ball ∩ [0,1]^d (the paper's
  public code used a fixed σ and no box constraint).
* ``margin``    -- certificate-aware (ours): minimize the defense's own differentiable
  ``margin(x', ε, ŷ)``, which is > 0 iff ŷ would be certified at ``x'`` with radius ε (GloRo: push
  the ⊥ logit over the label; IBP/CROWN: push the worst-case lower bound below 0; smoothing: push
  the soft estimate of ``p_ŷ`` below ``Φ(ε/σ)``). ``targeted=True`` (default) spends the restarts
  on the runner-up classes one by one (the margin against class ``j`` alone), which finds the
  binding class more often than the min over all classes.

Batched over images throughout: one PGD call per attack and chunk; no per-image Python loop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from certaudit.attacks.pgd import flat_norm, make_generator, pgd
from certaudit.defenses.base import ABSTAIN, Defense, Norm
from certaudit.errors import InputError

ATTACKS = ("pgd", "pgd-2eps", "spgd", "margin")
"""Attack names, in the order ``all`` tries them."""
CONTROLS = ("identity",)
"""Not attacks: ``identity`` submits x itself (x' = x), so for smoothing it measures how often a
fresh CERTIFY rejects a clean certified input by chance alone (the baseline any lower bound must beat)."""

_SHRINK = 1e-6  # candidates are pulled to ε·(1 − _SHRINK) before float32 rounding


def is_randomized(defense: Defense) -> bool:
    """A defense whose CERTIFY draws noise (declared by the protocol's ``randomized``): its verdicts are re-drawn."""
    return bool(defense.randomized)


def attacks_for(defense: Any, attack: str) -> list[str]:
    """The attacks ``attack`` names for this defense: one name, a comma list (tried in that order),
    or ``all`` (every one that applies, in the order of :data:`ATTACKS`)."""
    name = str(attack).lower().replace(" ", "")
    if name == "all":
        return [a for a in ATTACKS if a != "spgd" or is_randomized(defense)]
    names = [a for a in name.split(",") if a]
    if not names:
        raise InputError("no degradation attack named")
    for a in names:
        if a not in ATTACKS and a not in CONTROLS:
            raise InputError(f"unknown degradation attack {a!r}; choose one of: {', '.join(ATTACKS)}, all "
                             "(or a comma list)")
        if a == "spgd" and not is_randomized(defense):
            raise InputError("spgd (Algorithm 3.2) attacks randomized smoothing only; use pgd, pgd-2eps or margin")
    return list(dict.fromkeys(names))


@dataclass
class AttackConfig:
    """Search settings shared by the attacks (PGD of :mod:`certaudit.attacks.pgd`).

    ``steps``/``restarts``/``step_size`` (default 2.5·radius/steps)/``schedule`` drive PGD;
    ``samples`` is the number of Gaussian copies per step of SPGD and of the smoothing margin;
    ``check_every`` how often a deterministic defense is asked whether the iterate is already
    rejected (early stop; 0 disables); ``targeted`` makes the margin attack spend its restarts on
    one runner-up class each; ``tol`` the relative distance tolerance of the final check.
    """

    steps: int = 50
    restarts: int = 1
    step_size: float | None = None
    schedule: str = "constant"
    samples: int = 32
    check_every: int = 1
    targeted: bool = True
    tol: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "AttackConfig":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise InputError(f"unknown attack option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**{k: v for k, v in options.items() if v is not None})
        for name in ("steps", "restarts", "samples"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or int(v) != v or int(v) < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
            setattr(cfg, name, int(v))
        if cfg.samples > 1 << 16:
            raise InputError(f"samples must be at most {1 << 16:,} noisy copies per step, got {cfg.samples:,}")
        if int(cfg.check_every) < 0:
            raise InputError(f"check_every must be >= 0, got {cfg.check_every!r}")
        if cfg.step_size is not None and not (float(cfg.step_size) > 0 and math.isfinite(float(cfg.step_size))):
            raise InputError(f"step_size must be a finite number > 0, got {cfg.step_size!r}")
        if not (0 <= float(cfg.tol) < 0.1):
            raise InputError(f"tol must lie in [0, 0.1), got {cfg.tol!r}")
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "restarts": self.restarts, "step_size": self.step_size,
                "schedule": self.schedule, "samples": self.samples, "check_every": self.check_every,
                "targeted": self.targeted, "tol": self.tol}


# ------------------------------------------------------------------------------ geometry

def shrink_into_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: Norm | str) -> torch.Tensor:
    """Pull ``x_adv`` (float64 arithmetic) to within ε·(1 − 1e-6) of ``x`` and clip to [0, 1], so
    the float32 result lies in the closed ε-ball despite rounding (clipping never moves it away
    from ``x``, which is in [0, 1])."""
    norm = Norm.parse(norm)
    d = x_adv.double() - x.double()
    limit = float(eps) * (1.0 - _SHRINK)
    if norm is Norm.L2:
        n = flat_norm(d, Norm.L2)
        scale = torch.where(n > limit, limit / n.clamp_min(1e-300), torch.ones_like(n))
        d = d * scale.view(-1, *([1] * (d.dim() - 1)))
    else:
        d = d.clamp(-limit, limit)
    z = (x.double() + d).clamp(0.0, 1.0).to(x.dtype)
    for _ in range(4):  # float rounding can still land a hair outside: step back towards x
        dz = z.double() - x.double()
        if norm is Norm.LINF:
            out = dz.abs() > float(eps)
            if not bool(out.any()):
                break
            z = torch.where(out, torch.nextafter(z, x), z)
        else:
            n = flat_norm(dz, Norm.L2)
            out = n > float(eps)
            if not bool(out.any()):
                break
            shrink = torch.where(out, torch.full_like(n, 1.0 - 1e-5), torch.ones_like(n))
            z = (x.double() + dz * shrink.view(-1, *([1] * (dz.dim() - 1)))).clamp(0.0, 1.0).to(x.dtype)
    return z


def project_to_eps(x: torch.Tensor, x_far: torch.Tensor, eps: float, norm: Norm | str) -> torch.Tensor:
    """Algorithm B.1, line 3: ℓ2 ``x + min(ε, ‖d‖)·d/‖d‖`` (radial), ℓ∞ a clip; then into [0,1]."""
    return shrink_into_ball(x, x_far, eps, norm)


def distances(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """(B,) float64 distances ‖x' − x‖ in ``norm``."""
    return flat_norm(x_adv.double() - x.double(), norm)


# ------------------------------------------------------------------------------ the attacks

def _model_logits(defense: Defense, xs: torch.Tensor) -> torch.Tensor:
    return defense.model(xs.to(defense.device))


def _rejects(defense: Defense, eps: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Early-stop check for deterministic defenses: Algorithm 2.1 returns ⊥ at the iterate."""
    def done(xs: torch.Tensor, _idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (defense.accept(xs, eps) == ABSTAIN).to(xs.device)
    return done


def _pgd_kwargs(cfg: AttackConfig, generator: torch.Generator) -> dict[str, Any]:
    # restart 0 starts at x itself (a random start wastes part of the radius on directions the
    # gradient does not use once the ball constraint binds); restarts 1, 2, ... start at random
    return {"steps": cfg.steps, "restarts": cfg.restarts, "step_size": cfg.step_size,
            "schedule": cfg.schedule, "generator": generator, "random_start": False}


def attack_pgd(defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float, cfg: AttackConfig,
               generator: torch.Generator) -> torch.Tensor:
    """Algorithm 3.1: PGD on the cross-entropy of the (base) model at ``label`` inside B(x, ε)."""
    norm = defense.norm

    def loss(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_model_logits(defense, xs), label[idx].to(defense.device), reduction="none")

    done = _rejects(defense, eps) if cfg.check_every and not is_randomized(defense) else None
    res = pgd(loss, x, eps, norm, done_fn=done, check_every=max(1, cfg.check_every), **_pgd_kwargs(cfg, generator))
    return shrink_into_ball(x, res.x, eps, norm)


def attack_pgd_2eps(defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float, cfg: AttackConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """Algorithm B.1: PGD on the cross-entropy inside B(x, 2ε), then projected onto B(x, ε)."""
    norm = defense.norm

    def loss(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_model_logits(defense, xs), label[idx].to(defense.device), reduction="none")

    done: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    if cfg.check_every and not is_randomized(defense):
        inner = _rejects(defense, eps)

        def judge_projected(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return inner(project_to_eps(x[idx], xs, eps, norm), idx)

        done = judge_projected

    res = pgd(loss, x, 2.0 * eps, norm, done_fn=done, check_every=max(1, cfg.check_every),
              **_pgd_kwargs(cfg, generator))
    return project_to_eps(x, res.x, eps, norm)


def attack_spgd(defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float, cfg: AttackConfig,
                generator: torch.Generator) -> torch.Tensor:
    """Algorithm 3.2 (SPGD): ascend CE(mean_i f(x' + ζ_i), ŷ), ζ_i ~ N(0, σ²I) fresh every step.

    σ is the defense's own; the first restart starts at ``x`` itself (line 2 of the algorithm),
    later restarts at random points of the ball. The step is PGD's normalized steepest-ascent
    step rather than the raw gradient of line 5 (the raw gradient's scale is arbitrary).
    """
    sigma = defense.noise_sigma
    if sigma is None:
        raise InputError("spgd needs a randomized-smoothing defense (with a noise level σ)")
    norm = defense.norm
    n = cfg.samples
    dev = defense.device

    def loss(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b = xs.shape[0]
        zeta = torch.randn((b, n, *xs.shape[1:]), generator=generator, device=generator.device).to(xs.device)
        noisy = (xs.unsqueeze(1) + float(sigma) * zeta).reshape(b * n, *xs.shape[1:])  # (B·n, C, H, W)
        logits = defense.model(noisy.to(dev)).reshape(b, n, -1).mean(dim=1)  # (B, K) mean logits
        return F.cross_entropy(logits, label[idx].to(dev), reduction="none")

    res = pgd(loss, x, eps, norm, **_pgd_kwargs(cfg, generator))
    return shrink_into_ball(x, res.x, eps, norm)


def attack_margin(defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float, cfg: AttackConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Certificate-aware attack: minimize ``defense.margin(x', ε, ŷ)`` over B(x, ε) ∩ [0,1]^d.

    Deterministic defenses stop early where Algorithm 2.1 already rejects. With ``targeted`` and a
    Lipschitz defense, restart r attacks the r-th runner-up class alone (``f_ŷ − f_j − ε·K_{ŷ,j}``),
    then the last restart the full margin; otherwise every restart minimizes the full margin.
    """
    norm = defense.norm
    randomized = is_randomized(defense)
    kwargs = _pgd_kwargs(cfg, generator)

    if randomized:
        def loss(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return defense.margin(xs, eps, label[idx], n_samples=cfg.samples, generator=generator)

        res = pgd(loss, x, eps, norm, maximize=False, **kwargs)
        return shrink_into_ball(x, res.x, eps, norm)

    done = _rejects(defense, eps) if cfg.check_every else None
    check = max(1, cfg.check_every)

    def full(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return defense.margin(xs, eps, label[idx])

    per_class = None
    if cfg.targeted:
        with torch.no_grad():  # (B, K) margin against each class (+inf at the label), where the defense has it
            per_class = defense.rival_margins(x, eps, label)
    if per_class is None:
        res = pgd(full, x, eps, norm, maximize=False, done_fn=done, check_every=check, **kwargs)
        return shrink_into_ball(x, res.x, eps, norm)

    # Targeted restarts: runner-up classes by their (ε-adjusted) clean margin, closest first.
    pair = _pairwise_margin(defense, eps)
    order = per_class.argsort(dim=1)  # (B, K) closest rival first
    best = x.clone()
    best_val = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    todo = torch.arange(x.shape[0])
    rounds = min(cfg.restarts, per_class.shape[1] - 1)
    one = dict(kwargs, restarts=1)
    for r in range(rounds + 1):  # rounds targeted restarts, then one on the full margin
        if todo.numel() == 0:
            break
        xs, ys = x[todo], label[todo]
        if r < rounds:
            rival = order[todo, r]

            def loss(z: torch.Tensor, idx: torch.Tensor, ys=ys, rival=rival) -> torch.Tensor:
                return pair(z, ys[idx], rival[idx])
        else:
            def loss(z: torch.Tensor, idx: torch.Tensor, ys=ys) -> torch.Tensor:
                return defense.margin(z, eps, ys[idx])
        one["random_start"] = r > 0
        res = pgd(loss, xs, eps, norm, maximize=False, done_fn=done, check_every=check, **one)
        cand = shrink_into_ball(xs, res.x, eps, norm)
        with torch.no_grad():
            val = defense.margin(cand, eps, ys).detach().double().cpu()
        better = val < best_val[todo]
        best[todo[better]] = cand[better]
        best_val[todo[better]] = val[better]
        todo = todo[~res.success.cpu()]
    return best


def _pairwise_margin(defense: Defense, eps: float):
    """``m(x, y, j)``: the margin of ``y`` against rival ``j`` (B,), or the (B, K) table when ``j`` is
    None, from the defense's optional ``rival_margins`` (only called where it has one)."""
    def m(xs: torch.Tensor, y: torch.Tensor, j: torch.Tensor | None) -> torch.Tensor:
        table = defense.rival_margins(xs, eps, y)
        assert table is not None
        if j is None:
            return table
        return table.gather(1, j.to(table.device).long().view(-1, 1)).squeeze(1)

    return m


def attack_identity(defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float, cfg: AttackConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """The control: x' = x (no perturbation)."""
    return x.clone()


ATTACK_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "pgd": attack_pgd, "pgd-2eps": attack_pgd_2eps, "spgd": attack_spgd, "margin": attack_margin,
    "identity": attack_identity,
}


def run_attack(name: str, defense: Defense, x: torch.Tensor, label: torch.Tensor, eps: float,
               cfg: AttackConfig | None = None, *, seed: int = 0) -> torch.Tensor:
    """Run one named attack on a batch; returns candidates (B, ...) in B(x, ε) ∩ [0,1]^d."""
    cfg = cfg or AttackConfig()
    if name not in ATTACK_FUNCTIONS:
        raise InputError(f"unknown degradation attack {name!r}; choose one of: {', '.join(ATTACKS)}")
    gen = make_generator(seed, x.device)
    with torch.enable_grad(), warnings.catch_warnings():
        # the defenses' input checks read min/max of the iterate, which requires grad here
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        return ATTACK_FUNCTIONS[name](defense, x.detach(), label.long(), float(eps), cfg, gen).detach()


# ------------------------------------------------------------------------------ success

@dataclass
class CandidateCheck:
    """Per-candidate verdict of :func:`verify_candidates` (all (B,) tensors on the CPU)."""

    success: torch.Tensor  # bool: counted as a forced rejection
    distance: torch.Tensor  # float64
    in_ball: torch.Tensor  # bool
    in_box: torch.Tensor  # bool
    accepted: torch.Tensor  # int64: accept(x', ε), ABSTAIN where rejected
    label_changed: torch.Tensor  # bool: accepted with another label (a broken certificate!)
    radius: torch.Tensor | None = None  # float64: certified radius of the label at x' (0 if other), when cheap


def verify_candidates(defense: Defense, x: torch.Tensor, x_adv: torch.Tensor, label: torch.Tensor, eps: float, *,
                      tol: float = 1e-5, seed: int | None = None,
                      indices: Sequence[int] | None = None) -> CandidateCheck:
    """Re-check candidates before they count: ‖x' − x‖ ≤ ε·(1 + tol), x' ∈ [0,1]^d, and the
    defense's real Algorithm 2.1 ``accept(x', ε)`` returns ABSTAIN. A randomized defense runs a
    fresh CERTIFY with ``seed`` (pass one different from the clean certification's)."""
    norm = defense.norm
    dist = distances(x, x_adv, norm).cpu()
    in_ball = dist <= float(eps) * (1.0 + float(tol))
    flat = x_adv.detach().reshape(x_adv.shape[0], -1)
    in_box = ((flat >= 0) & (flat <= 1)).all(dim=1).cpu() & torch.isfinite(flat).all(dim=1).cpu()
    probe = x_adv.detach().clamp(0.0, 1.0).nan_to_num(0.0)
    with torch.no_grad():
        # one certification with the run-time check at exactly ε (a fresh CERTIFY for a randomized
        # defense); the radius only where it costs nothing extra (closed form): NaN otherwise
        cert = defense.certify_checks(probe, [float(eps)], full_radius=False, seed=seed,
                                      indices=None if indices is None else list(indices))
    acc = cert.accept(eps)
    lab = label.detach().cpu().long()
    radius = None
    if cert.has_radius() and cert.radius_tol == 0:
        radius = torch.where(cert.label.cpu() == lab, cert.radius.detach().double().cpu(),
                             torch.zeros(lab.shape, dtype=torch.float64))
    acc = acc.detach().cpu().long()
    rejected = acc == ABSTAIN
    changed = ~rejected & (acc != label.detach().cpu().long())
    return CandidateCheck(success=rejected & in_ball & in_box, distance=dist, in_ball=in_ball, in_box=in_box,
                   accepted=acc, label_changed=changed, radius=radius)


__all__ = ["ATTACKS", "CONTROLS", "AttackConfig", "CandidateCheck", "attacks_for", "attack_margin", "attack_pgd", "attack_pgd_2eps",
           "attack_spgd", "distances", "is_randomized", "project_to_eps", "run_attack", "shrink_into_ball",
           "verify_candidates"]
