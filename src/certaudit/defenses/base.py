"""The defense protocol every certified run-time defense implements.

A defense answers, for a batch of inputs ``x`` in ``[0,1]^d`` (float32, NCHW):

* :meth:`Defense.certify` -- which label, certified up to which radius (``Certificates``);
* :meth:`Defense.accept` -- Algorithm 2.1 of the degradation paper (PredictWithDefense): the label
  if it is certified at radius ``eps``, else :data:`ABSTAIN` (the rejection symbol ⊥);
* :meth:`Defense.margin` -- a differentiable score, positive iff the defense would certify
  ``target`` at ``x`` with radius ``eps``; attacks are written once against it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import torch

from certaudit import validate
from certaudit.errors import InputError

ABSTAIN: int = -1
"""The rejection label ⊥, everywhere (tensors, rows, reports)."""


class Norm(str, Enum):
    """Threat-model norms; strings are converted once, at the boundary."""

    L2 = "l2"
    LINF = "linf"

    @classmethod
    def parse(cls, value: "str | Norm") -> "Norm":
        try:
            return cls(str(value.value if isinstance(value, Norm) else value).lower())
        except ValueError:
            raise InputError(f"unknown norm {value!r}; choose one of: l2, linf") from None


def radius_key(r: float) -> str:
    """The key of a checked radius in ``Certificates.checks`` and in rows (``certified_at``): the
    shortest repr of the float, so a radius read back from JSON finds its check exactly."""
    return repr(float(r))


@dataclass
class Certificates:
    """Batched certification result.

    ``label[i]`` is the predicted label or :data:`ABSTAIN`; ``radius[i]`` the radius (in input
    space, in ``norm``) up to which ``label[i]`` is certified (0 where ABSTAIN; NaN where the
    defense was asked for checks only and computed no radius). ``extras`` holds per-defense tensors
    of the same batch length (e.g. smoothing counts, Lipschitz margins).

    ``radius_tol`` says what the radius means: 0 when ``radius >= r`` *is* the defense's own check
    at r (closed-form radii: smoothing, Lipschitz); > 0 when the radius is the last certified point
    of a bisection with that tolerance (interval bounds): certified, but ``radius >= r`` is then
    not the run-time check at r. ``checks`` maps a radius (key :func:`radius_key`) to the bool
    (B,) verdict of the defense's own check at *exactly* that radius (Algorithm 2.1 accepts the
    label). :meth:`accept` uses a check where one exists and refuses to read a bisection radius.
    """

    label: torch.Tensor  # (B,) int64
    radius: torch.Tensor  # (B,) float
    norm: Norm
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    checks: dict[str, torch.Tensor] = field(default_factory=dict)
    radius_tol: float = 0.0

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def has_radius(self) -> bool:
        """Whether a radius was computed (NaN marks a check-only certificate)."""
        return not bool(torch.isnan(self.radius.double()).all()) if len(self) else True

    def accept(self, eps: float) -> torch.Tensor:
        """Algorithm 2.1 on already computed certificates: label if certified at ``eps``, else ABSTAIN.

        From the defense's check at exactly ``eps`` when one was made; else from a closed-form radius
        (``radius >= eps``). A bisection radius (``radius_tol > 0``) or a missing one is refused:
        ask the defense (``defense.accept(x, eps)``) instead.
        """
        eps = check_eps(eps)
        hit = self.checks.get(radius_key(eps))
        if hit is not None:
            keep = (self.label != ABSTAIN) & hit.to(self.label.device).bool()
        elif self.radius_tol > 0 or not self.has_radius():
            raise InputError(f"these certificates hold no check at eps={eps!r} and their radius "
                             + ("is a bisection point (tol " + f"{self.radius_tol:g}), not the run-time check"
                                if self.has_radius() else "was not computed")
                             + "; ask the defense's accept(x, eps)")
        else:
            keep = (self.label != ABSTAIN) & (self.radius >= eps)
        return torch.where(keep, self.label, torch.full_like(self.label, ABSTAIN))

    def certified_at(self, eps: float) -> torch.Tensor:
        """Boolean mask: cert(x, eps) of the paper."""
        return self.accept(eps) != ABSTAIN

    def with_checks(self, radii: Sequence[float]) -> "Certificates":
        """These certificates with ``checks`` at ``radii`` from a closed-form radius (``radius_tol == 0``)."""
        for r in radii:
            key = radius_key(check_eps(r, "radius"))
            if key not in self.checks:
                self.checks[key] = self.certified_at(r)
        return self


class Defense(ABC):
    """A certified run-time defense around a model (a class: it holds the model and cached state).

    Declared capabilities (class attributes, read by attacks and audits instead of sniffing):

    * ``randomized``: its certificates draw noise; :meth:`certify` then takes ``seed`` and
      ``indices`` (image i's noise derives from (seed, indices[i])) and a re-check is a re-draw;
    * ``monotone``: cert(x, ε) implies cert(x', ε') for every x' with ‖x' − x‖ + ε' ≤ ε exactly
      (Appendix A of the degradation paper), so the 2ε check is a proven degradation upper bound.
    """

    norm: Norm
    randomized: bool = False
    monotone: bool = False
    radius_is_search: bool = False
    """``certify``'s radius costs a search over radii (interval bisection) while the checks at given
    radii are cheap: callers skip it (``full_radius=False``) unless a radius is asked for."""
    noise_sigma: float | None = None
    """The Gaussian noise level of a randomized-smoothing defense (what SPGD samples with); else None."""
    methods: tuple[str, ...] = ()
    """Bound methods the defense can run (option ``method``); empty: it has no such choice."""
    margin_reductions: tuple[str, ...] = ("min",)
    """``margin(..., reduction=)`` values beyond the default ``min`` (interval: ``ce``, the robust CE)."""
    sequential_test: bool = False
    """It can decide certification at one radius with an anytime-valid sequential test (option
    ``sequential``; :meth:`certify_checks` with one radius and ``full_radius=False`` then uses it)."""

    @classmethod
    def from_options(cls, model: torch.nn.Module, meta: Any, options: dict[str, Any]) -> "Defense":
        """Build from CLI-level ``options`` (the registry passes every option the user gave; a defense
        takes its own, refuses options that only make sense for it when they conflict, and fills
        defaults from the checkpoint's ``meta``)."""
        raise InputError(f"{cls.__name__} cannot be built from options")

    def settings(self) -> dict[str, Any]:
        """The *stable* settings that determine the defense's answers (result headers and resume
        hashes): never values computed from the model (see :meth:`diagnostics`)."""
        return {}

    def diagnostics(self) -> dict[str, Any]:
        """Values the defense computes from the model (e.g. Lipschitz bounds), for summaries only:
        their last bits can depend on the thread count, so they never enter a resume hash."""
        return {}

    def images_per_chunk(self, sample_shape: Sequence[int], *, full_radius: bool = True) -> int:
        """Images per certify call (and per write of rows) for images of ``sample_shape``."""
        return 256

    def rival_margins(self, x: torch.Tensor, eps: float, target: torch.Tensor) -> torch.Tensor | None:
        """Optional capability: a differentiable (B, K) table of the certification margin of
        ``target`` against each rival class j (+inf at the target), whose minimum is :meth:`margin`;
        attacks use it to aim at one rival at a time. None where the defense has no such table."""
        return None

    def __init__(self, model: torch.nn.Module, num_classes: int):
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(num_classes) < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.num_classes = int(num_classes)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")

    @abstractmethod
    def certify(self, x: torch.Tensor, *, seed: int | None = None,
                indices: Sequence[int] | None = None) -> Certificates:
        """Label and certified radius for every input of the batch. ``seed`` and ``indices`` (the
        inputs' data-set indices) key the noise of a :attr:`randomized` defense; others ignore them."""

    def accept(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """Algorithm 2.1 (PredictWithDefense): label if certified at ``eps``, else ABSTAIN."""
        return self.certify(x).accept(eps)

    @abstractmethod
    def margin(self, x: torch.Tensor, eps: float, target: torch.Tensor) -> torch.Tensor:
        """Differentiable (B,) score, > 0 iff ``target`` would be certified at ``x`` with radius ``eps``."""

    def certify_checks(self, x: torch.Tensor, radii: Sequence[float] = (), *, full_radius: bool = True,
                       seed: int | None = None, indices: Sequence[int] | None = None,
                       **options: Any) -> Certificates:
        """:meth:`certify` plus the defense's own check (Algorithm 2.1) at exactly each of ``radii``,
        in ``Certificates.checks``; one noise draw for a randomized defense (seed, indices and
        ``options`` such as ``n0``/``n`` go to its certify). ``full_radius=False`` lets a defense
        whose radius costs more than the checks (interval bisection) skip the radius (NaN).

        This default suits closed-form radii (``radius >= r`` is the check at r); defenses whose
        radius is a search override it."""
        return self.certify(x, seed=seed, indices=indices, **options).with_checks(radii)

    @property
    def proof_name(self) -> str | None:
        """What :meth:`prove_nondegradable` proves with, in words for reports; None: no proof."""
        return None

    def prove_nondegradable(self, x: torch.Tensor, eps: float, label: torch.Tensor) -> torch.Tensor | None:
        """(B,) bool: True where it is *proven* that Algorithm 2.1 accepts ``label`` at radius ``eps``
        at every x' in B(x, eps) ∩ [0,1]^d (so x cannot be degraded); None where the defense has
        no such proof (the default; randomized smoothing). Defenses that have one override this and
        :attr:`proof_name` (docs/degradation.md, "The proven upper bound"). This is the defense's
        cheapest proof; :meth:`prove` runs the costlier ones named in :attr:`proof_methods`."""
        return None

    @property
    def proof_methods(self) -> tuple[str, ...]:
        """Names of the defense's proofs of non-degradability, cheapest first; the first is
        :meth:`prove_nondegradable`. Empty where it has none."""
        return ("2eps",) if self.proof_name is not None else ()

    @property
    def default_proofs(self) -> tuple[str, ...]:
        """The proofs an audit runs unless told otherwise: all but the searches (``milp``), whose cost
        is seconds per input."""
        return tuple(m for m in self.proof_methods if m != "milp")

    def prove(self, x: torch.Tensor, eps: float, label: torch.Tensor, methods: Sequence[str], *,
              budget: float | None = None) -> "Proof | None":
        """Run the proofs ``methods`` (a subset of :attr:`proof_methods`, cheapest first; each only on
        the inputs the earlier ones left unproven): which input each proved, and where the defense
        can say so, a proven lower bound of the certified radius over the ball (how far the proof
        side stands from ε on an undecided input). ``budget``: seconds per input for a proof that
        searches (branch and bound); it then may also return an x' the check rejects (``witness``).
        None where the defense has no proof."""
        unknown = [m for m in methods if m not in self.proof_methods]
        if unknown:
            raise InputError(f"unknown proof {unknown[0]!r} for this defense; it has: "
                             f"{', '.join(self.proof_methods) or 'none'}")
        proven = self.prove_nondegradable(x, eps, label) if methods else None
        if proven is None:
            return None
        proven = proven.cpu().bool()
        by = [self.proof_methods[0] if bool(p) else None for p in proven]
        return Proof(proven, by, torch.full((proven.shape[0],), math.nan, dtype=torch.float64))


def milp_available(model: torch.nn.Module, input_shape: Sequence[int] | None) -> bool:
    """Whether the exact MILP (HiGHS, optional extra ``exact``) can encode ``model`` for ``input_shape``."""
    if input_shape is None:
        return False
    import importlib.util

    if importlib.util.find_spec("highspy") is None:
        return False
    from certaudit.defenses.interval.bounds import compile_network
    from certaudit.defenses.interval.ops import ReLU
    from certaudit.verify.milp import MAX_NEURONS

    try:
        net = compile_network(model, tuple(int(s) for s in input_shape))
    except InputError:
        return False
    return sum(op.out_size for op in net.body if isinstance(op, ReLU)) <= MAX_NEURONS


@dataclass
class Proof:
    """What :meth:`Defense.prove` established, per input (CPU tensors)."""

    proven: torch.Tensor  # (B,) bool: every x' in B(x, ε) ∩ [0,1]^d is accepted with the label at ε
    method: list[str | None]  # the proof that succeeded, None where none did
    radius_floor: torch.Tensor  # (B,) float64: proven lower bound of the certified radius over the ball, NaN: none
    witness: list[torch.Tensor | None] = field(default_factory=list)  # a searched x' (C, H, W) the check rejects


def check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate a batch of images: a float tensor (B, C, H, W), finite, in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise InputError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


def check_eps(eps: float, name: str = "eps") -> float:
    """A radius must be a finite number > 0 (:func:`certaudit.validate.eps`)."""
    return validate.eps(eps, name)


def check_labels(y: torch.Tensor, batch: int, num_classes: int, name: str = "target") -> torch.Tensor:
    """Validate (B,) integer labels in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() == 0:
        y = y.expand(batch)
    if y.dim() != 1 or y.shape[0] != batch:
        raise InputError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"{name} must be integer labels, got dtype {y.dtype}")
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"{name} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y.long()
