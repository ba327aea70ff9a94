"""Lipschitz-margin certification (GloRo Nets, Leino, Wang & Fredrikson, ICML 2021), ℓ2.

For logits ``f = W_L · h(x) + b`` with a penultimate map ``h`` whose Lipschitz constant is at most
``L = Π_l ‖layer_l‖₂`` (ReLU, Flatten and Identity are 1-Lipschitz), the margin ``f_y − f_j`` is
``K_{y,j} = L·‖w_y − w_j‖₂``-Lipschitz. Hence ``f`` keeps label ``y`` on the ball of radius

    R(x) = min_{j≠y} (f_y(x) − f_j(x)) / K_{y,j}                       (GloRo, §2)

and the GloRo network's ⊥ logit at radius ε is ``f_⊥ = max_{j≠y} (f_j + ε·K_{y,j})``: the input is
accepted (Algorithm 2.1 of the degradation paper) iff ``f_y > f_⊥``, iff ``R(x) > ε``. Lemma A.5 of
the degradation paper (monotonicity) holds because ``K`` is global.

Soundness details (``docs/lipschitz.md``): every ``‖layer‖`` is a *certified upper bound*
(:mod:`.bounds`), never a power-iteration estimate; and the defense evaluates a float64 copy of the
model (whatever the model's dtype), with a magnitude pass that bounds the forward rounding error
``e_i ≥ |f̂_i − f_i|`` of every logit (Higham's ``|fl(Wx+b) − (Wx+b)| ≤ γ_{K+1}(|W||x| + |b|)``
propagated through ``|W|``). The margins are reduced by ``2(e_y + e_j)``: once for the evaluation at
``x``, once (to first order) for the evaluation at any point of the ball. (In float32 the same
worst-case bound is ~1e4 times the actual error and costs points of clean accuracy; in float64 it is
below 1e-9.) That float64 evaluation is the *reference*; ``certify``/``accept``/``certify_checks``
reach its decisions from a float32 evaluation with a proven rounding bound (:mod:`.fast`) and run it
only where that bound cannot settle them. Bounds are computed once per input shape and weight version
(parameters' ``data_ptr`` and ``_version``) and cached; :meth:`LipschitzDefense.refresh` forces it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.defenses.base import (
    ABSTAIN, Certificates, Defense, Norm, Proof, check_eps, check_images, check_labels, milp_available,
)
from certaudit.defenses.lipschitz.bounds import (
    EXACT_LIMIT, SAFETY, SLACK_INFLATION, U64, conv_bound, gamma, linear_bound, normalize_bound,
)
from certaudit.defenses.lipschitz.fast import FastCertifier, decision_radii, row_distances
from certaudit.defenses.lipschitz.network import Layer, walk
from certaudit.errors import InputError
from certaudit.validate import positive

DEFAULT_BATCH = 1024
LOCAL_BATCH = 64  # images per local proof (CROWN over the ℓ2 ball holds rows of every unstable neuron)
DEFAULT_PROOF_BUDGET = 10.0  # seconds per input for the branch-and-bound proof (milp)
ARITHMETIC = ("fast", "float64")
CUDA_SLACK_FACTOR = 16.0  # cuDNN may pick other summation algorithms than direct/GEMM


@dataclass
class LayerBound:
    """Certified bound of one layer and how it was obtained."""

    name: str
    kind: str
    bound: float
    method: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LipschitzReport:
    """All certified constants for one input shape.

    ``pairwise[i, j] = K_{i,j} = penultimate·‖w_i − w_j‖₂`` (float64, zero on the diagonal).
    """

    input_shape: tuple[int, ...]
    layers: list[LayerBound]
    penultimate: float
    pairwise: torch.Tensor  # (C, C) float64

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "penultimate_lipschitz": self.penultimate,
                "max_pairwise": float(self.pairwise.max()),
                "layers": [{"name": l.name, "kind": l.kind, "bound": l.bound, "method": l.method,
                            **{k: l.info[k] for k in ("estimate", "max_gap") if k in l.info}} for l in self.layers]}


@dataclass
class _State:
    report: LipschitzReport
    layers: list[Layer]  # of the float64 copy of the model: the network the defense evaluates
    pairwise: torch.Tensor  # (C, C) float64 on the model's device
    abs_weights: list[torch.Tensor | None]
    fast: FastCertifier | None = None  # built on first use (the float32 decision path)
    interval: Any = None  # the compiled network of the interval bounds (the local proofs), on first use


def certified_report(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                     exact_limit: int = EXACT_LIMIT) -> tuple[LipschitzReport, list[Layer]]:
    """Certified layer bounds, penultimate bound and pairwise margin constants of ``model``."""
    layers = walk(model, tuple(int(s) for s in input_shape), num_classes)
    out: list[LayerBound] = []
    prod = 1.0
    with torch.no_grad():
        for layer in layers[:-1]:
            m = layer.module
            if layer.kind == "normalize":
                b, info = normalize_bound(m.std)  # type: ignore[arg-type]
            elif layer.kind == "conv":
                b, info = conv_bound(m.weight, layer.geom, exact_limit)  # type: ignore[arg-type]
            elif layer.kind == "linear":
                b, info = linear_bound(m.weight)  # type: ignore[arg-type]
            else:
                b, info = 1.0, {"method": "1-Lipschitz"}
            if not math.isfinite(b):
                raise InputError(f"layer {layer.name!r} has a non-finite Lipschitz bound (NaN/inf weights?)")
            out.append(LayerBound(layer.name, layer.kind, b, info.pop("method"), info))
            prod *= b
        prod *= 1.0 + 4 * len(layers) * U64  # rounding of the product itself
        w = layers[-1].module.weight.detach().to(torch.float64).cpu()  # type: ignore[union-attr]
        if not bool(torch.isfinite(w).all()):
            raise InputError("the logit layer has NaN or infinite weights")
        dist = row_distances(w)  # (C, C) ‖w_i − w_j‖, float64, inflated (explicit differences, no cdist)
    return LipschitzReport(tuple(int(s) for s in input_shape), out, prod, prod * dist), layers


class LipschitzDefense(Defense):
    """GloRo-style ℓ2 certification of a feed-forward ReLU network from certified Lipschitz bounds.

    ``eps`` is the default radius of :meth:`accept` and :meth:`gloro_logits`; ``input_shape``
    (C, H, W) fixes the shape the convolution bounds are computed for (else taken from the first
    batch); ``exact_limit`` caps the banded Gram matrices of the Cholesky certificate (0: circulant
    bound only). ``arithmetic="fast"`` (default) decides ``certify``/``accept``/``certify_checks`` from
    a float32 evaluation with a proven rounding bound and re-evaluates in float64 only the images it
    cannot settle, with the float64 reference's labels and verdicts at every decision radius
    (``decision_radii``: default ε/2, ε, 2ε and the reports' ℓ2 table; the radii asked for are
    always added); ``"float64"`` evaluates every image in float64. ``counts`` tallies images
    certified and re-evaluated in float64.
    """

    norm = Norm.L2
    monotone = True  # Lemma A.5 of the degradation paper: K is global

    def __init__(self, model: nn.Module, num_classes: int, eps: float | None = None, *,
                 input_shape: Sequence[int] | None = None, exact_limit: int = EXACT_LIMIT,
                 batch_size: int | None = None, arithmetic: str = "fast",
                 decision_radii: Sequence[float] | None = None):
        super().__init__(model, num_classes)
        if arithmetic not in ARITHMETIC:
            raise InputError(f"arithmetic must be one of {', '.join(ARITHMETIC)}, got {arithmetic!r}")
        self.arithmetic = arithmetic
        self.decision_radii = None if decision_radii is None else tuple(check_eps(r, "decision radius") for r in decision_radii)
        self.counts = {"images": 0, "residuals": 0, "float64": 0}
        walk(model, None, self.num_classes)  # refuse unsupported layers now
        self.eps = None if eps is None else check_eps(eps)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if self.input_shape is not None:
            walk(model, self.input_shape, self.num_classes)
        if int(exact_limit) < 0:
            raise InputError(f"exact_limit must be >= 0, got {exact_limit}")
        self.exact_limit = int(exact_limit)
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size or DEFAULT_BATCH)
        dtypes = {p.dtype for p in model.parameters()}
        if not dtypes <= {torch.float32, torch.float64}:
            raise InputError(f"the Lipschitz defense certifies float32/float64 models, got {sorted(map(str, dtypes))}")
        self._states: dict[tuple[int, ...], tuple[tuple, _State]] = {}
        self._milp_ok: tuple[Any, bool] | None = None

    # ------------------------------------------------------------------------- construction

    @classmethod
    def from_options(cls, model: nn.Module, meta: Any, options: dict[str, Any]) -> "LipschitzDefense":
        """CLI entry: ``eps`` (default: the GloRo training ε of the checkpoint), ``batch_size``,
        ``exact_limit``; ``precision`` must be fp32; smoothing-only settings are ignored."""
        if options.get("sigma") is not None:
            raise InputError("--sigma is a randomized-smoothing setting; the lipschitz defense has no noise")
        if options.get("method") is not None:
            raise InputError("--method chooses interval bounds; the lipschitz defense has one bound (its Lipschitz constants)")
        if options.get("sequential"):
            raise InputError("--sequential is randomized smoothing's test; the lipschitz defense is deterministic")
        precision = str(options.get("precision", "fp32")).lower()
        if precision not in ("fp32", "float32"):
            raise InputError(f"the lipschitz defense certifies the fp32 model only, got precision {precision!r}")
        eps = options.get("eps")
        if eps is None and getattr(meta, "method", None) == "gloro" and (getattr(meta, "norm", None) or "l2") == "l2":
            eps = getattr(meta, "eps", None)
        return cls(model, int(meta.num_classes), eps, input_shape=tuple(meta.input_shape),
                   exact_limit=int(options.get("exact_limit", EXACT_LIMIT)), batch_size=options.get("batch_size"),
                   arithmetic=str(options.get("arithmetic") or "fast"))

    def settings(self) -> dict[str, Any]:
        out = {"eps": self.eps, "norm": "l2", "exact_limit": self.exact_limit,
               "arithmetic": "float64", "float_slack": "2*(e_y+e_j), magnitude pass"}
        if self.arithmetic == "fast":  # same labels and verdicts; radius R_lo <= the float64 one elsewhere
            out["arithmetic"] = "float32 with proven rounding bound, float64 near decision radii"
            out["decision_radii"] = list(self._decision_radii(()))
        return out

    def diagnostics(self) -> dict[str, Any]:
        """The certified per-layer bounds, L and the largest K (computed from the weights)."""
        return self.lipschitz_constants().to_dict() if self.input_shape is not None else {}

    def images_per_chunk(self, sample_shape: Sequence[int], *, full_radius: bool = True) -> int:
        return self.batch_size

    # ------------------------------------------------------------------------------- bounds

    def refresh(self) -> None:
        """Forget cached bounds (they are also recomputed automatically when weights change)."""
        self._states.clear()

    def _key(self) -> tuple:
        ts = list(self.model.parameters()) + list(self.model.buffers())
        return tuple((t.data_ptr(), t._version, str(t.device), tuple(t.shape)) for t in ts)

    def _state(self, shape: tuple[int, ...]) -> _State:
        key = self._key()
        hit = self._states.get(shape)
        if hit is not None and hit[0] == key:
            return hit[1]
        report, _ = certified_report(self.model, shape, self.num_classes, self.exact_limit)
        dev = self.device
        net64 = copy.deepcopy(self.model).to(torch.float64).eval()  # the evaluated network (see _forward)
        for p in net64.parameters():
            p.requires_grad_(False)
        layers = walk(net64, shape, self.num_classes)
        abs_w = [layer.module.weight.detach().abs() if layer.kind in ("conv", "linear") else None  # type: ignore[union-attr]
                 for layer in layers]
        state = _State(report, layers, report.pairwise.to(dev), abs_w)
        self._states[shape] = (key, state)
        return state

    def lipschitz_constants(self, input_shape: Sequence[int] | None = None) -> LipschitzReport:
        """Certified per-layer bounds, penultimate bound L and ``K_{i,j}`` for ``input_shape``."""
        shape = tuple(int(s) for s in input_shape) if input_shape is not None else self.input_shape
        if shape is None:
            raise InputError("input_shape is needed (convolution bounds depend on the image size)")
        return self._state(shape).report

    # ---------------------------------------------------------------------------- forward

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        quick = isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() and x.numel() > 0
        if quick:  # one pass; NaN propagates through aminmax and ±inf fail the range, so both get the full check
            lo, hi = torch.aminmax(x.detach())
            quick = bool(lo >= 0) and bool(hi <= 1)
        if not quick:
            check_images(x.detach())
        shape = tuple(int(s) for s in x.shape[1:])
        if self.input_shape is not None and shape != self.input_shape:
            raise InputError(f"x has image shape {shape}, the defense was built for {self.input_shape}")
        return x.to(device=self.device)

    def _forward(self, x: torch.Tensor, state: _State, slack: bool = True,
                 mags: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the model evaluated in float64 (differentiable in ``x``) and, with ``slack``, a
        bound ``e ≥ |f̂ − f|`` on their rounding error (B, C) float64 (no gradient).

        The defense evaluates a float64 copy of the model: the worst-case rounding bound of a float32
        pass is ~1e4 times its actual error and, subtracted from every margin, would cost several
        points of clean accuracy (measured: 3.4 on a GloRo 2C2F on Fashion-MNIST); in float64 it is
        below 1e-9.

        ``mags`` (one per layer: an upper bound of ``|h|`` at its input over a set of inputs, from
        :func:`.local.magnitudes`) makes ``e`` bound the rounding of the evaluation at *every* input of
        that set (the bound is monotone in the magnitudes)."""
        u = U64
        factor = CUDA_SLACK_FACTOR if x.device.type == "cuda" else 1.0
        h = x.to(torch.float64)
        err: torch.Tensor | None = None
        with _no_tf32(x.device):
            for i, (layer, wabs) in enumerate(zip(state.layers, state.abs_weights)):
                m = layer.module
                if slack and layer.kind in ("conv", "linear"):
                    kdim = m.weight[0].numel()  # type: ignore[union-attr,index]
                    g = gamma(kdim + 1, u) * factor
                    with torch.no_grad():
                        habs = h.detach().abs() if mags is None else mags[i]
                        src = g * habs if err is None else err + g * habs
                        if layer.kind == "conv":
                            err = F.conv2d(src, wabs, None, m.stride, m.padding, m.dilation, m.groups)  # type: ignore[arg-type]
                        else:
                            err = F.linear(src, wabs)
                        if m.bias is not None:  # type: ignore[union-attr]
                            shape = (1, -1, 1, 1) if layer.kind == "conv" else (1, -1)
                            err = err + g * m.bias.detach().abs().view(shape)  # type: ignore[union-attr]
                h = m(h)
                if slack and layer.kind == "normalize":
                    with torch.no_grad():
                        add = 3.0 * SAFETY * u * factor * (h.detach().abs() if mags is None else mags[i + 1])
                        err = add if err is None else err / m.std + add  # type: ignore[operator]
                elif slack and layer.kind == "flatten" and err is not None:
                    err = err.flatten(1)
        if not slack:
            return h, None
        e = torch.zeros_like(h, dtype=torch.float64) if err is None else err.to(torch.float64) * SLACK_INFLATION
        return h, e

    # ----------------------------------------------------------------------- certificates

    def certify(self, x: torch.Tensor, *, seed: int | None = None,
                indices: Sequence[int] | None = None) -> Certificates:
        """Predicted label and certified ℓ2 radius ``min_j (f_y − f_j − 2(e_y+e_j)) / K_{y,j}`` of the
        float64 reference; ABSTAIN (radius 0) where not even that is positive (float ties). With
        ``arithmetic="fast"`` decided from float32 (docs/lipschitz.md): the same labels and verdicts at
        the decision radii; the radius is the reference's where re-evaluated, else a lower bound of it."""
        return self._certify(x, ())

    def certify_checks(self, x: torch.Tensor, radii: Sequence[float] = (), *, full_radius: bool = True,
                       seed: int | None = None, indices: Sequence[int] | None = None, **options: Any) -> Certificates:
        """:meth:`certify` with the check at exactly each of ``radii`` (decided like the reference's)."""
        if options:
            raise TypeError(f"unexpected options for the lipschitz defense: {', '.join(sorted(options))}")
        radii = [check_eps(r, "radius") for r in radii]
        return self._certify(x, radii).with_checks(radii)

    def accept(self, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """Algorithm 2.1: the label where the certified radius is at least ``eps`` (default: the
        defense's ε), else ABSTAIN."""
        eps_v = self._eps(eps)
        return self._certify(x, (eps_v,)).accept(eps_v)

    def _decision_radii(self, radii: Sequence[float]) -> tuple[float, ...]:
        """Radii at which the fast path gives the reference's verdict (:func:`.fast.decision_radii`)."""
        return decision_radii(self.eps, self.decision_radii, radii)

    def _fast(self, x: torch.Tensor, state: _State) -> FastCertifier | None:
        """The float32 decision path where it applies: CPU, a float32 model, float32-exact inputs."""
        if self.arithmetic != "fast" or x.device.type != "cpu":
            return None
        dtypes = {t.dtype for t in list(self.model.parameters()) + list(self.model.buffers())}
        if dtypes != {torch.float32} or x.dtype == torch.float64 and not torch.equal(x.float().double(), x):
            return None
        if state.fast is None:
            layers = walk(self.model, tuple(int(s) for s in x.shape[1:]), self.num_classes)
            state.fast = FastCertifier(layers, [b.bound for b in state.report.layers], self.exact_limit)
        return state.fast

    def _certify(self, x: torch.Tensor, radii: Sequence[float]) -> Certificates:
        x = self._check_x(x)
        state = self._state(tuple(int(s) for s in x.shape[1:]))
        fast = self._fast(x, state)
        thresholds = self._decision_radii(radii)
        parts: list[tuple[torch.Tensor, ...]] = []
        with torch.no_grad():
            for a in range(0, x.shape[0], self.batch_size):
                xb = x[a:a + self.batch_size]
                if fast is None:
                    f, e = self._forward(xb, state)
                    parts.append(_radius(f, e, state.pairwise))  # type: ignore[arg-type]
                    self.counts["float64"] += xb.shape[0]
                    continue
                d = fast.decide(xb.float(), state.pairwise, thresholds)
                out = [d.label, d.radius, d.runner, d.gap]
                idx = d.todo.nonzero().flatten()
                if idx.numel():  # the reference, for the images the bound cannot settle
                    f, e = self._forward(xb[idx], state)
                    ref = _radius(f, e, state.pairwise)  # type: ignore[arg-type]
                    if not bool(fast.reference_settled(f, d.bounds.rows(idx), state.pairwise, thresholds).all()):
                        f, e = self._forward(xb, state)  # a verdict within the reference's own batch-size noise:
                        ref = tuple(v[idx] for v in _radius(f, e, state.pairwise))  # type: ignore[arg-type]
                        self.counts["float64"] += xb.shape[0] - int(idx.numel())  # decide it as the reference does
                    for t, v in zip(out, ref):
                        t[idx] = v.to(t.dtype)
                parts.append(tuple(out))
                self.counts["float64"] += int(idx.numel())
                self.counts["residuals"] += d.checked
        self.counts["images"] += x.shape[0]
        lab, rad, run, gap = (torch.cat([p[i] for p in parts]) for i in range(4))
        return Certificates(lab, rad, Norm.L2, {"runner_up": run, "logit_margin": gap})

    def margin(self, x: torch.Tensor, eps: float | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Differentiable (B,) ``f_t − max_{j≠t} (f_j + 2(e_t+e_j) + ε·K_{t,j})``: > 0 iff ``target``
        is certified at radius ε (the slack ``e`` carries no gradient)."""
        out_dtype = x.dtype
        x = self._check_x(x)
        b = x.shape[0]
        t = check_labels(target, b, self.num_classes).to(x.device)
        eps_t = _eps_tensor(eps, b, x.device)
        state = self._state(tuple(int(s) for s in x.shape[1:]))
        f, e = self._forward(x, state)
        assert e is not None
        k = state.pairwise[t].to(f.dtype)  # (B, C)
        slack = (2.0 * (e.gather(1, t.view(-1, 1)) + e)).to(f.dtype)  # (B, C)
        rival = f + slack + eps_t.to(f.dtype).view(-1, 1) * k
        rival = rival.masked_fill(F.one_hot(t, self.num_classes).bool(), -math.inf)
        return (f.gather(1, t.view(-1, 1)).squeeze(1) - rival.amax(dim=1)).to(out_dtype)  # rounding keeps the sign

    def rival_margins(self, x: torch.Tensor, eps: float, target: torch.Tensor) -> torch.Tensor:
        """Differentiable (B, C): ``f_t − f_j − 2(e_t+e_j) − ε·K_{t,j}`` per rival j (+inf at t)."""
        x = self._check_x(x)
        t = check_labels(target, x.shape[0], self.num_classes).to(x.device)
        state = self._state(tuple(int(s) for s in x.shape[1:]))
        f, e = self._forward(x, state)
        assert e is not None
        return _margin_table(f, e, t, state.pairwise, float(eps), slack_times=2.0)

    @property
    def proof_name(self) -> str | None:
        return "the 2ε check with four times its float64 rounding slack (Appendix A, Lemma A.5: K is global)"

    @property
    def proof_methods(self) -> tuple[str, ...]:
        """``2eps`` (:meth:`prove_nondegradable`), then ``local``: the better of CROWN over the ℓ2 ball
        and a local Lipschitz bound over it (:mod:`.local`; docs/degradation.md, "Proofs over the ℓ2
        ball"); rows name the one that succeeded (``crown-l2`` / ``local-lipschitz``). Then, where HiGHS
        is installed and the network is small enough, ``milp``: branch and bound over the ReLU phases
        (the exact oracle, :mod:`certaudit.verify.oracle`) with a time budget per input."""
        key = (self._key(), self.input_shape)
        if self._milp_ok is None or self._milp_ok[0] != key:
            self._milp_ok = (key, milp_available(self.model, self.input_shape))
        return ("2eps", "local") + (("milp",) if self._milp_ok[1] else ())

    def prove(self, x: torch.Tensor, eps: float, label: torch.Tensor, methods: Sequence[str], *,
              budget: float | None = None) -> Proof | None:
        """:meth:`Defense.prove` with the radius floor: per input, a proven lower bound of the
        certified radius ``min_j (f_y − f_j − 2(e_y + e_j))(x') / K_{y,j}`` of ``label`` over every x'
        in B₂(x, ε) ∩ [0, 1]^d (proven non-degradable iff it exceeds ε)."""
        unknown = [m for m in methods if m not in self.proof_methods]
        if unknown:
            raise InputError(f"unknown proof {unknown[0]!r} for the lipschitz defense; it has: "
                             f"{', '.join(self.proof_methods)} (milp: with the `exact` extra, small networks only)")
        if budget is not None:
            budget = positive(budget, "budget")
        x = self._check_x(x)
        eps = check_eps(eps)
        b = x.shape[0]
        label = torch.as_tensor(label).long().to(x.device)
        valid = (label != ABSTAIN).cpu()
        t = check_labels(torch.where(label != ABSTAIN, label, torch.zeros_like(label)), b, self.num_classes)
        proven = torch.zeros(b, dtype=torch.bool)
        floor = torch.full((b,), -math.inf, dtype=torch.float64)
        by: list[str | None] = [None] * b
        if "2eps" in methods:
            ok, fl = self._prove_2eps(x, eps, t)
            floor = torch.maximum(floor, fl)
            for i in (ok & valid).nonzero().flatten().tolist():
                proven[i], by[i] = True, "2eps"
        if "local" in methods:
            todo = (~proven & valid).nonzero().flatten()
            for a in range(0, todo.numel(), LOCAL_BATCH):
                idx = todo[a:a + LOCAL_BATCH]
                fl, names = self._prove_local(x[idx.to(x.device)], eps, t[idx.to(x.device)])
                floor[idx] = torch.maximum(floor[idx], fl)
                for j, i in enumerate(idx.tolist()):
                    if bool(fl[j] > eps):
                        proven[i], by[i] = True, names[j]
        witness: list[torch.Tensor | None] = [None] * b
        if "milp" in methods:
            todo = (~proven & valid).nonzero().flatten()
            if todo.numel():
                self._prove_milp(x, eps, t, todo, budget, proven, by, floor, witness)
        floor = torch.where(valid, floor, torch.full_like(floor, math.nan))
        return Proof(proven & valid, by, floor, witness)

    def _prove_milp(self, x: torch.Tensor, eps: float, t: torch.Tensor, todo: torch.Tensor, budget: float | None,
                    proven: torch.Tensor, by: list, floor: torch.Tensor, witness: list) -> None:
        """Branch and bound (HiGHS MILP, :func:`certaudit.verify.oracle.lipschitz_degradable`) on ``todo``,
        ``budget`` seconds each: proven (the dual bound clears every threshold by the oracle's tolerance),
        a witness x' the run-time check rejects, or undecided. Only a proof tightens the floor (then every
        rival has a bound: solved or screened); an undecided solve may have skipped the hardest rivals at the
        deadline, so its partial bound says nothing about them."""
        from certaudit.verify.oracle import lipschitz_degradable

        limit = DEFAULT_PROOF_BUDGET if budget is None else positive(budget, "budget")
        k = self.lipschitz_constants(tuple(int(s) for s in x.shape[1:])).pairwise.cpu()
        for i in todo.tolist():
            try:
                (v,) = lipschitz_degradable(self, x[i:i + 1], eps, time_limit=limit)
            except InputError:
                return  # the network does not fit the oracle: everything stays as the cheaper proofs left it
            if v.label != int(t[i]):
                continue  # the oracle's own certify disagrees on the label (a tie): leave it undecided
            if v.decided is False:
                proven[i], by[i] = True, "milp"
            elif v.decided is True and v.witness is not None:
                witness[i] = v.witness
            if v.decided is False and math.isfinite(v.bound):  # min over rivals of (min margin − threshold)
                kk = k[int(t[i])].clone()
                kk[int(t[i])] = math.inf
                scale = float(kk.min()) if v.bound < 0 else float(kk[torch.isfinite(kk)].max())
                floor[i] = max(float(floor[i]), eps + v.bound / scale)

    def _prove_2eps(self, x: torch.Tensor, eps: float, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2ε proof (:meth:`prove_nondegradable`) and its radius floor: (proven (B,), floor (B,)) on
        the CPU. With ``E ≥ e'`` the rounding bound of the check at every x' of the ball (the magnitude
        pass over the box B∞(x, ε) ∩ [0,1]^d, :func:`.local.magnitudes`), the certified radius at every
        x' is at least ``min_j (f_y − f_j − (e_y+e_j) − 3(E_y+E_j) − ε·K_yj) / K_yj`` (Lemma A.5: the exact
        margin moves by at most ε·K_yj); proven iff that floor exceeds ε."""
        from certaudit.defenses.lipschitz.local import magnitudes

        state = self._state(tuple(int(s) for s in x.shape[1:]))
        oks, floors = [], []
        with torch.no_grad():
            for a in range(0, x.shape[0], self.batch_size):
                xb, tb = x[a:a + self.batch_size], t[a:a + self.batch_size]
                f, e = self._forward(xb, state)
                xd = xb.double()
                mags = magnitudes(state.layers, (xd - eps).clamp(0.0, 1.0), (xd + eps).clamp(0.0, 1.0))
                _, e_sup = self._forward(xb, state, mags=mags)
                assert e is not None and e_sup is not None
                k = state.pairwise[tb].to(f.dtype)  # (B, C)
                ey, esy = e.gather(1, tb.view(-1, 1)), e_sup.gather(1, tb.view(-1, 1))
                low = f.gather(1, tb.view(-1, 1)) - f - (ey + e) - 3.0 * (esy + e_sup) * (1 + 1e-9) - eps * k
                r = torch.where(k > 0, low / k.clamp_min(1e-300), torch.where(low > 0, math.inf, -math.inf))
                r = (r * (1 - 1e-12)).masked_fill(F.one_hot(tb, self.num_classes).bool(), math.inf)
                floor = r.min(dim=1).values
                oks.append((floor > eps).cpu())
                floors.append(floor.double().cpu())
        return torch.cat(oks), torch.cat(floors)

    def _prove_local(self, x: torch.Tensor, eps: float, t: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Radius floors (B,) over B₂(x, ε) ∩ [0,1]^d from CROWN over the ℓ2 ball and the local
        Lipschitz bound, and which of the two gave each one (docs/degradation.md)."""
        from certaudit.defenses.interval.bounds import compile_network, input_box, spec_bounds, specification
        from certaudit.defenses.lipschitz.local import local_lipschitz, magnitudes

        shape = tuple(int(s) for s in x.shape[1:])
        state = self._state(shape)
        if state.interval is None:
            state.interval = compile_network(self.model, shape)
        net = state.interval
        c = self.num_classes
        spec, others = specification(t, c, torch.float32)
        xf = x.float()
        # the interval bounds take float32 centres: a ball around fl32(x) that contains B₂(x, ε)
        off = float((x.double() - xf.double()).flatten(1).norm(dim=1).max()) if x.dtype != torch.float32 else 0.0
        eps_b = eps + off * (1 + 1e-6) if off > 0 else eps
        with torch.no_grad():
            crown, st = spec_bounds(net, xf, eps_b, spec, "crown", norm="l2", return_state=True)
            from certaudit.defenses.interval.ops import ReLU
            relu_b = [(st.lo[i], st.hi[i]) for i, op in enumerate(st.ops) if isinstance(op, ReLU)]
            x_lo, x_hi = input_box(xf, eps_b)
            mags = magnitudes(state.layers, x_lo, x_hi, relu_b)
            f, e = self._forward(x, state)
            _, e_sup = self._forward(x, state, mags=mags)  # rounding of the check anywhere in the ball
            assert e is not None and e_sup is not None
            fy, ey, esy = (v.gather(1, t.view(-1, 1)) for v in (f, e, e_sup))
            fj, ej, esj = (v.gather(1, others) for v in (f, e, e_sup))
            k = state.pairwise[t.view(-1, 1), others]  # (B, C-1)
            lip = local_lipschitz(state.layers, state.abs_weights, relu_b, spec.double())
            exact_x = fy - fj - (ey + ej)  # below the exact margin at x
            via_lip = exact_x - eps * lip * (1 + 1e-12)
            low = torch.maximum(via_lip, crown.double().to(f.device))  # two lower bounds of min over the ball
            # the run-time check at x' needs (exact margin at x') > ε K + 3(e'_y + e'_j)
            r = (low - 3.0 * (esy + esj) * (1 + 1e-9)) / k.clamp_min(1e-300)
            r = torch.where(k > 0, r, torch.where(low > 0, math.inf, -math.inf)) * (1 - 1e-12)
            floor, j = r.min(dim=1)
            from_crown = crown.double().to(f.device).gather(1, j.view(-1, 1)).squeeze(1) >= via_lip.gather(
                1, j.view(-1, 1)).squeeze(1)
        names: list[str | None] = ["crown-l2" if bool(v) else "local-lipschitz" for v in from_crown.cpu()]
        return floor.double().cpu(), names

    def prove_nondegradable(self, x: torch.Tensor, eps: float, label: torch.Tensor) -> torch.Tensor:
        """(B,) bool: proven that every x' with ‖x' − x‖₂ ≤ ε is accepted with ``label`` at ε.

        Lemma A.5: ``f_y − f_j`` is ``K_{y,j}``-Lipschitz, so the exact margin at x' is at least the
        exact margin at x minus ``ε·K_{y,j}``. The run-time check at x' subtracts its own rounding
        slack ``2(e'_y + e'_j)`` from a computed margin that is itself within ``e'_y + e'_j`` of the
        exact one. So it suffices that ``f_y − f_j − 2ε·K_{y,j}`` at x exceeds ``(e_y + e_j)``
        (x's rounding) plus ``3(e'_y + e'_j)``; with ``e' ≤ e`` up to the magnitudes' change over the
        ball (float64: e is below 1e-9 of the logits) the proof demands
        ``f_y − f_j − (e_y + e_j) − 3(E_y + E_j) − 2ε·K_{y,j} > 0`` for every j ≠ y, with ``E`` the
        rounding bound of the evaluation at every x' of the ball (:meth:`_prove_2eps`)."""
        x = self._check_x(x)
        eps = check_eps(eps)
        label = torch.as_tensor(label).long().to(x.device)
        valid = label != ABSTAIN  # nothing to prove for a rejected input
        t = check_labels(torch.where(valid, label, torch.zeros_like(label)), x.shape[0], self.num_classes)
        return self._prove_2eps(x, eps, t)[0] & valid.cpu()

    def gloro_logits(self, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """(B, C+1) logits of the GloRo network at radius ε: ``f`` and the ⊥ logit
        ``max_{j≠ŷ} (f_j + 2(e_ŷ+e_j) + ε·K_{ŷ,j})`` for the predicted class ŷ (argmax = C: rejected)."""
        eps_v = self._eps(eps)
        out_dtype = x.dtype
        x = self._check_x(x)
        state = self._state(tuple(int(s) for s in x.shape[1:]))
        f, e = self._forward(x, state)
        assert e is not None
        pred = f.argmax(dim=1)
        k = state.pairwise[pred].to(f.dtype)
        slack = (2.0 * (e.gather(1, pred.view(-1, 1)) + e)).to(f.dtype)
        bot = (f + slack + eps_v * k).masked_fill(F.one_hot(pred, self.num_classes).bool(), -math.inf).amax(1)
        return torch.cat([f, bot.unsqueeze(1)], dim=1).to(out_dtype)

    def _eps(self, eps: float | None) -> float:
        if eps is None:
            if self.eps is None:
                raise InputError("no radius: pass eps or build the defense with eps")
            return self.eps
        return check_eps(eps)


def _margin_table(f: torch.Tensor, e: torch.Tensor, t: torch.Tensor, pairwise: torch.Tensor, eps: float,
                  slack_times: float) -> torch.Tensor:
    """(B, C) ``f_t − f_j − slack_times·(e_t + e_j) − ε·K_{t,j}`` per rival j, +inf at t (differentiable in f)."""
    k = pairwise[t].to(f.dtype)  # (B, C)
    slack = (slack_times * (e.gather(1, t.view(-1, 1)) + e)).to(f.dtype)
    table = f.gather(1, t.view(-1, 1)) - f - slack - eps * k
    return table.masked_fill(F.one_hot(t, f.shape[1]).bool(), math.inf)


def _radius(f: torch.Tensor, e: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Label, radius (float64), binding runner-up class and its raw logit margin, per row."""
    f64 = f.detach().to(torch.float64)  # (B, C)
    pred = f64.argmax(dim=1)  # (B,)
    fp = f64.gather(1, pred.view(-1, 1))  # (B, 1)
    m = fp - f64 - 2.0 * (e.gather(1, pred.view(-1, 1)) + e)  # (B, C) certified margins
    k = pairwise[pred]  # (B, C)
    r = torch.where(k > 0, m / k.clamp_min(1e-300), torch.where(m > 0, math.inf, -math.inf))
    r = r.masked_fill(F.one_hot(pred, f.shape[1]).bool(), math.inf)
    radius, runner = r.min(dim=1)
    gap = (fp.squeeze(1) - f64.gather(1, runner.view(-1, 1)).squeeze(1))
    ok = radius > 0
    label = torch.where(ok, pred, torch.full_like(pred, ABSTAIN))
    radius = torch.where(ok, radius, torch.zeros_like(radius))
    return label, radius, runner, gap


def _eps_tensor(eps: float | torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(device=device, dtype=torch.float64)
        if e.dim() == 0:
            e = e.expand(b)
        if e.shape != (b,):
            raise InputError(f"eps must be a number or a ({b},) tensor, got shape {tuple(e.shape)}")
        if not bool(torch.isfinite(e).all()) or not bool((e >= 0).all()):
            raise InputError("eps must be finite and >= 0")
        return e
    return torch.full((b,), check_eps(eps), dtype=torch.float64, device=device)


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """TF32 (10-bit mantissa) would void the float32 rounding analysis on CUDA: disable it."""
    if device.type != "cuda":
        yield
        return
    old_mm, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm
        torch.backends.cudnn.allow_tf32 = old_cudnn


__all__ = ["LipschitzDefense", "LipschitzReport", "LayerBound", "certified_report"]
