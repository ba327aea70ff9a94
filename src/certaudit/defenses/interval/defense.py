"""``IntervalDefense``: ℓ∞ certification of a ReLU network by IBP, CROWN-IBP or CROWN bounds.

* :meth:`IntervalDefense.accept` is Algorithm 2.1 of the degradation paper with
  ``cert(x, ε)`` = "the lower bound of every logit margin ``f_y − f_j`` over the clipped ℓ∞ ball of
  radius ε is > 0" (``y`` the model's prediction at ``x``): one bound evaluation at ε itself.
* :meth:`IntervalDefense.certify` finds, for every image in parallel, the largest certified radius
  by bisection on ε in ``[0, max_radius]`` to within ``tol``; the returned radius is one of the
  bisection points at which the bound *was* evaluated and positive, so it is itself certified
  (radii are float32 numbers, and the bound was evaluated at exactly that number).
* :meth:`IntervalDefense.margin` is the differentiable worst-case lower bound of
  ``f_target − f_j`` (minimum over ``j ≠ target``): positive iff ``target`` is certified at ``x``
  with radius ε. The degradation attack minimizes it inside the ε-ball; the Shadow Attack
  maximizes it for a wrong target (the paper's CROWN-IBP setting: ``method="crown-ibp"``).

Note: a CROWN bound is not always monotone in ε (the adaptive ReLU slopes change with it), so
``accept(x, ε)`` may, rarely, reject at an ε below a radius that ``certify`` found; both answers
are sound (the ball of radius ε lies inside the certified ball). IBP bounds are monotone.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from certaudit.defenses.base import (
    ABSTAIN, Certificates, Defense, Norm, Proof, check_eps, check_images, check_labels, milp_available, radius_key,
)
from certaudit.defenses.interval.alpha_crown import AlphaOptions
from certaudit.defenses.interval.bounds import (
    METHODS, Network, compile_network, down32, margin_bounds, no_tf32, parse_method,
)
from certaudit.defenses.interval.ops import check_supported
from certaudit.errors import InputError
from certaudit.validate import positive


class IntervalDefense(Defense):
    """ℓ∞ certificates from interval / linear-relaxation bounds (see :mod:`.bounds`)."""

    norm = Norm.LINF
    radius_is_search = True  # the radius is a bisection (~11 bound passes); checks at given radii cost one each
    methods = METHODS
    margin_reductions = ("min", "ce")

    def __init__(self, model: nn.Module, num_classes: int, method: str = "crown", *,
                 input_shape: Sequence[int] | None = None, tol: float = 1e-3, max_radius: float = 1.0,
                 batch_size: int = 256, budget_mb: float | None = None, alpha_iters: int = 20,
                 alpha_lr: float = 0.5):
        super().__init__(model, num_classes)
        check_supported(model)
        self.method = parse_method(method)
        self.tol = positive(tol, "tol")
        self.max_radius = positive(max_radius, "max_radius")
        if self.tol >= self.max_radius:
            raise InputError(f"tol ({tol}) must be smaller than max_radius ({max_radius})")
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.budget_mb = None if budget_mb is None else positive(budget_mb, "budget_mb")
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self._milp_ok: tuple[Any, bool] | None = None
        self.alpha = AlphaOptions(iters=alpha_iters, lr=alpha_lr)  # α-CROWN's search (alpha-crown only)

    @classmethod
    def from_options(cls, model: nn.Module, meta: Any, options: dict[str, Any]) -> "IntervalDefense":
        """Options: ``method`` (ibp | crown-ibp | crown | alpha-crown, default crown), ``tol``,
        ``max_radius``, ``batch_size``, ``budget_mb``, ``alpha_iters``, ``alpha_lr`` (α-CROWN's search: bound
        evaluations and Adam's learning rate). ``eps`` is not a setting of the defense (it is per query).
        ``precision`` other than fp32 is refused (the bounds are about the float32 model); options of
        other defenses (``sigma``, ``n0``, ``seed``, ...) are ignored."""
        precision = options.get("precision")
        if precision is not None and str(precision).lower() not in ("fp32", "float32"):
            raise InputError(f"the interval defense certifies the float32 model only (its bounds are float32-safe); "
                             f"got precision {precision!r}")
        if options.get("channels_last"):
            raise InputError("--channels-last does not apply to the interval defense")
        if options.get("sequential"):
            raise InputError("--sequential is randomized smoothing's test; the interval defense is deterministic")
        if options.get("sigma") is not None:
            raise InputError("--sigma is a randomized-smoothing setting; the interval defense has no noise")
        kwargs: dict[str, Any] = {}
        for key in ("tol", "max_radius", "batch_size", "budget_mb", "alpha_iters", "alpha_lr"):
            if options.get(key) is not None:
                kwargs[key] = options[key]
        method = options.get("method") or "crown"
        shape = getattr(meta, "input_shape", None)
        return cls(model, int(meta.num_classes), method, input_shape=shape, **kwargs)

    def settings(self) -> dict[str, Any]:
        return {"method": self.method, "tol": self.tol, "max_radius": self.max_radius, "norm": "linf",
                "domain": "[0,1]", "bounds": "sound-float32",
                "radius": "bisection; figures at a radius from checks at it",  # rows before had no radius_tol
                **(self.alpha.settings() if self.method == "alpha-crown" else {})}

    def images_per_chunk(self, sample_shape: Sequence[int], *, full_radius: bool = True) -> int:
        """Images per certify call (and per write of rows): a few seconds of work on a CPU, so that a
        crash loses little. The bisection costs ~11 bound evaluations per image, the checks 2."""
        per = {"ibp": 256, "crown-ibp": 128, "crown": 64, "alpha-crown": 32}[self.method]
        return max(8, per // 8) if full_radius else per

    # ------------------------------------------------------------------------------ helpers

    def _network(self, x: torch.Tensor) -> Network:
        shape = tuple(x.shape[1:])
        if self.input_shape is not None and shape != self.input_shape:
            raise InputError(f"x has per-image shape {shape}, the model takes {self.input_shape}")
        net = compile_network(self.model, shape)
        if net.num_classes != self.num_classes:
            raise InputError(f"the model has {net.num_classes} outputs, the defense expects {self.num_classes}")
        return net

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x.detach() if isinstance(x, torch.Tensor) else x)
        dev = self.device
        return x.to(device=dev, dtype=torch.float32) if (x.device != dev or x.dtype != torch.float32) else x

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)

    def bounds(self, x: torch.Tensor, eps: float | torch.Tensor, target: torch.Tensor | None = None,
               method: str | None = None) -> torch.Tensor:
        """(B, K) float64 lower bounds of ``f_target − f_j`` (``+inf`` at the target; target
        defaults to the prediction). No gradient; batched by ``batch_size``."""
        x = self._check(x)
        if not isinstance(eps, torch.Tensor):
            eps = check_eps(eps)
        meth = self.method if method is None else parse_method(method)
        net = self._network(x)
        tgt = None if target is None else check_labels(target, x.shape[0], self.num_classes).to(x.device)
        out = []
        with torch.no_grad(), no_tf32(x.device):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size]
                tb = self._predict(xb) if tgt is None else tgt[i:i + self.batch_size]
                eb = eps[i:i + self.batch_size] if isinstance(eps, torch.Tensor) else eps
                out.append(margin_bounds(net, xb, eb, tb, meth, budget_mb=self.budget_mb, alpha=self.alpha))
        return torch.cat(out)

    # ----------------------------------------------------------------------------- protocol

    def margin(self, x: torch.Tensor, eps: float, target: torch.Tensor, reduction: str = "min") -> torch.Tensor:
        """Differentiable (B,) worst-case lower bound of ``f_target − f_j`` over the clipped ε-ball,
        minimized over ``j ≠ target``; > 0 iff ``target`` is certified at ``x`` with radius ε.

        ``reduction="ce"`` returns instead ``−CE(−m, target) = −log(1 + Σ_j exp(−m_j))`` over the
        bounds ``m_j`` (always < 0, increasing in every ``m_j``): minus the robust cross-entropy that
        IBP / CROWN-IBP training minimizes, the term the Shadow Attack paper's Section 5 attacks.
        """
        if reduction not in ("min", "ce"):
            raise InputError(f"unknown margin reduction {reduction!r}; choose min or ce")
        x = self._check(x)
        eps = check_eps(eps)
        target = check_labels(target, x.shape[0], self.num_classes).to(x.device)
        net = self._network(x)
        with no_tf32(x.device):
            low = margin_bounds(net, x, eps, target, self.method, budget_mb=self.budget_mb, alpha=self.alpha)
        if reduction == "ce":  # +inf at the target column: exp(-inf) = 0, the "1 +" is the target's own term
            zero = torch.zeros_like(low[:, :1])
            return -torch.logsumexp(torch.cat([zero, -low], dim=1), dim=1).to(x.dtype)
        return low.min(1).values.to(x.dtype)

    def accept(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """Algorithm 2.1: the prediction if its margins are certified at ``eps``, else ABSTAIN."""
        x = self._check(x)
        eps = check_eps(eps)
        net = self._network(x)
        out = []
        with torch.no_grad(), no_tf32(x.device):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size]
                label = self._predict(xb)
                ok = margin_bounds(net, xb, eps, label, self.method, budget_mb=self.budget_mb,
                                   alpha=self.alpha).min(1).values > 0
                out.append(torch.where(ok, label, torch.full_like(label, ABSTAIN)))
        return torch.cat(out)

    @property
    def monotone(self) -> bool:  # type: ignore[override]
        """IBP bounds are monotone in the box (Appendix A); CROWN-style ones re-fit their slopes to ε."""
        return self.method == "ibp"

    def certify(self, x: torch.Tensor, *, seed: int | None = None,
                indices: Sequence[int] | None = None) -> Certificates:
        """Prediction and largest certified ℓ∞ radius (bisection on ε, all images in parallel).

        The radius is certified (the bound was evaluated at exactly that float32 value) and is
        within ``tol`` of the largest radius the bisection can certify: a bisection point above
        it failed. ``max_radius`` (default 1: the whole cube [0,1]^d) caps it. Radius 0 means no
        certificate at ``tol``; the label is still the prediction. ``radius_tol`` = ``tol``: the
        radius is a bisection point, so ``radius >= ε`` is *not* the run-time check at ε (use
        :meth:`accept`, or :meth:`certify_checks` with the radii that matter). Extras: ``margin``
        (the clean top-1 minus top-2 logit gap), ``evaluations`` (bound evaluations per image).
        """
        return self.certify_checks(x, (), full_radius=True)

    def certify_checks(self, x: torch.Tensor, radii: Sequence[float] = (), *, full_radius: bool = True,
                       seed: int | None = None, indices: Sequence[int] | None = None,
                       **options: Any) -> Certificates:
        """The prediction, the run-time check (one bound evaluation) at exactly each of ``radii``,
        and with ``full_radius`` the bisection radius of :meth:`certify`; without it the radius is
        NaN and the cost is ``len(radii)`` bound evaluations. ``seed``/``indices`` are ignored
        (nothing is random)."""
        x = self._check(x)
        radii = [check_eps(r, "radius") for r in radii]
        keys = list(dict.fromkeys(radius_key(r) for r in radii))
        values = [float(k) for k in keys]
        net = self._network(x)
        labels, radii_out, gaps = [], [], []
        checks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        steps = max(1, math.ceil(math.log2(self.max_radius / self.tol))) if full_radius else 0
        with torch.no_grad(), no_tf32(x.device):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size]
                logits = self.model(xb)
                top2 = logits.topk(2, dim=1)
                label = top2.indices[:, 0]
                gaps.append((top2.values[:, 0] - top2.values[:, 1]).float())
                for key, r in zip(keys, values):
                    checks[key].append(self._certified(net, xb, r, label).cpu())
                if full_radius:
                    lo, _ = self._bisect(net, xb, label, steps)
                    radii_out.append(lo)
                else:
                    radii_out.append(torch.full((xb.shape[0],), math.nan, dtype=torch.float32, device=xb.device))
                labels.append(label)
        label = torch.cat(labels)
        evals = len(keys) + (steps + 1 if full_radius else 0)
        return Certificates(label=label, radius=torch.cat(radii_out), norm=Norm.LINF,
                            extras={"margin": torch.cat(gaps), "evaluations": torch.full_like(label, evals)},
                            checks={k: torch.cat(v) for k, v in checks.items()},
                            radius_tol=self.tol if full_radius else 0.0)

    @property
    def proof_name(self) -> str | None:
        if self.method == "crown-ibp":
            return None
        why = ("IBP is inclusion-monotone" if self.method == "ibp"
               else "CROWN's bound is never below IBP's on the same box")
        if self.method == "alpha-crown":
            why += ", and α-CROWN's never below CROWN's"
        return f"IBP on the clipped box B∞(x, 2ε) with twice its rounding slack ({why})"

    def prove_nondegradable(self, x: torch.Tensor, eps: float, label: torch.Tensor) -> torch.Tensor | None:
        """(B,) bool: proven that every x' in B∞(x, ε) ∩ [0,1]^d is accepted with ``label`` at ε by
        this defense's run-time check (docs/degradation.md, "The proven upper bound"); None for
        CROWN-IBP, which has no such proof (its bound can be looser than IBP's on the same box).

        The proof is IBP on the clipped box B∞(x, 2ε) ∩ [0,1]^d: for x' in B∞(x, ε), the box of
        x' at radius ε lies inside it, IBP is inclusion-monotone, and the run-time bound is at
        least IBP's on the same box (IBP itself; CROWN keeps the best of its backward bound, IBP on
        its tightened intervals and IBP on the plain ones). A positive IBP margin of ``label``
        over the big box also makes ``label`` the prediction at every x'. Floating point: the IBP
        lower bound must exceed twice its own accumulated rounding slack (the slack-free minus the
        sound bound), which covers the rounding of the smaller boxes' evaluations.
        """
        if self.method == "crown-ibp":
            return None
        x = self._check(x)
        eps2 = 2.0 * check_eps(eps)
        net = self._network(x)
        label = torch.as_tensor(label).long().to(x.device)
        valid = label != ABSTAIN  # nothing to prove for a rejected input
        tgt = check_labels(torch.where(valid, label, torch.zeros_like(label)), x.shape[0], self.num_classes)
        out = []
        with torch.no_grad(), no_tf32(x.device):
            for i in range(0, x.shape[0], self.batch_size):
                xb, tb = x[i:i + self.batch_size], tgt[i:i + self.batch_size]
                sound = margin_bounds(net, xb, eps2, tb, "ibp", budget_mb=self.budget_mb).double()
                plain = margin_bounds(net, xb, eps2, tb, "ibp", budget_mb=self.budget_mb, sound=False).double()
                fin = torch.isfinite(sound)  # +inf in the label's own column
                slack = torch.where(fin, (plain - sound).clamp_min(0.0), torch.zeros_like(sound))
                out.append((torch.where(fin, sound - 2.0 * slack, sound).min(1).values > 0).cpu())
        return torch.cat(out) & valid.cpu()

    @property
    def proof_methods(self) -> tuple[str, ...]:
        """``2eps`` (:meth:`prove_nondegradable`; none for CROWN-IBP), then, where HiGHS is installed and
        the network is small enough, ``milp``: branch and bound over the ReLU phases with a time budget
        per input (:func:`certaudit.verify.oracle.interval_degradable`: the exact IBP bound at every x'
        for IBP, the same as a sufficient condition for CROWN, whose bound is never below IBP's)."""
        if self.proof_name is None:
            return ()
        key = (tuple((p.data_ptr(), p._version) for p in self.model.parameters()), self.input_shape)
        if self._milp_ok is None or self._milp_ok[0] != key:
            self._milp_ok = (key, milp_available(self.model, self.input_shape))
        return ("2eps", "milp") if self._milp_ok[1] else ("2eps",)

    def prove(self, x: torch.Tensor, eps: float, label: torch.Tensor, methods: Sequence[str], *,
              budget: float | None = None) -> Proof | None:
        """:meth:`Defense.prove`: the 2ε-box IBP proof, then branch and bound (``milp``) on the rest;
        no radius floor (the interval check has no closed-form radius): NaN."""
        unknown = [m for m in methods if m not in self.proof_methods]
        if unknown:
            raise InputError(f"unknown proof {unknown[0]!r} for the interval defense ({self.method}); it has: "
                             f"{', '.join(self.proof_methods) or 'none'}")
        if budget is not None:
            budget = positive(budget, "budget")
        if not methods:
            return None
        lab = torch.as_tensor(label).long().cpu()
        if "2eps" in methods:
            base = super().prove(x, eps, label, ["2eps"])
            assert base is not None
        else:
            base = Proof(torch.zeros(lab.shape[0], dtype=torch.bool), [None] * lab.shape[0],
                         torch.full((lab.shape[0],), math.nan, dtype=torch.float64))
        if "milp" not in methods:
            return base
        from certaudit.verify.oracle import interval_degradable

        limit = 10.0 if budget is None else positive(budget, "budget")
        base.witness = [None] * base.proven.shape[0]
        for i in (~base.proven).nonzero().flatten().tolist():
            if int(lab[i]) == ABSTAIN:
                continue
            try:
                (v,) = interval_degradable(self, x[i:i + 1], eps, time_limit=limit)
            except InputError:
                break  # the network does not fit the oracle
            if v.label != int(lab[i]):
                continue
            if v.decided is False:
                base.proven[i], base.method[i] = True, "milp"
            elif v.decided is True and v.witness is not None:
                base.witness[i] = v.witness
        return base

    def _bisect(self, net: Network, x: torch.Tensor, label: torch.Tensor, steps: int):
        b = x.shape[0]
        dev = x.device
        lo = torch.zeros(b, dtype=torch.float64, device=dev)
        cap = float(down32(torch.tensor(self.max_radius, dtype=torch.float64)))  # a float32 number <= max_radius
        hi = torch.full((b,), cap, dtype=torch.float64, device=dev)
        ok = self._certified(net, x, hi, label)
        lo = torch.where(ok, hi, lo)
        todo = ~ok
        for _ in range(steps):
            if not bool(todo.any()):
                break
            mid = ((lo + hi) / 2).float().double()  # a float32 number: the radius returned is exact
            split = todo & (mid > lo) & (mid < hi)
            if not bool(split.any()):
                break
            idx = split.nonzero().squeeze(1)
            good = self._certified(net, x[idx], mid[idx], label[idx])
            lo[idx] = torch.where(good, mid[idx], lo[idx])
            hi[idx] = torch.where(good, hi[idx], mid[idx])
        return lo.float(), hi.float()

    def _certified(self, net: Network, x: torch.Tensor, eps: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return margin_bounds(net, x, eps, label, self.method, budget_mb=self.budget_mb,
                             alpha=self.alpha).min(1).values > 0


__all__ = ["IntervalDefense", "METHODS"]
