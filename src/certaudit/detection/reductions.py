"""Tramèr's two reductions over any certified defense: Theorem 5 (a classifier certified at ε/2
answers as a detector at ε) and Theorem 4 (a detector at ε gives a classifier at ε/2), and the
empirical check that the Theorem-5 detector never answers a wrong label."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from certaudit.attacks.pgd import make_generator, pgd, random_in_ball
from certaudit.defenses.base import ABSTAIN, Defense, Norm, check_eps, check_images, check_labels
from certaudit.errors import InputError

from certaudit.detection.claims import parse_norm_name

class Detector(ABC):
    """A classifier with a rejection option: :meth:`predict` returns a label or :data:`ABSTAIN`.

    Detectors that can, also expose :meth:`acceptance_score`, a differentiable (B,) score that is
    positive where the input is accepted; the Theorem-4 search climbs it. Without one the search
    falls back to random sampling.
    """

    num_classes: int
    norm: Norm

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64: a label in [0, num_classes) or ABSTAIN for every input."""

    def acceptance_score(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable (B,) score, > 0 iff the input is accepted (not available by default)."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable acceptance score")

    @property
    def has_score(self) -> bool:
        return type(self).acceptance_score is not Detector.acceptance_score

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)


class FunctionDetector(Detector):
    """Any detector given as functions: ``predict_fn(x) -> labels/ABSTAIN``, optional ``score_fn``."""

    def __init__(self, predict_fn: Callable[[torch.Tensor], torch.Tensor], num_classes: int, norm: Norm | str,
                 score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not callable(predict_fn):
            raise InputError("predict_fn must be callable")
        if int(num_classes) < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        self._predict = predict_fn
        self._score = score_fn
        self.num_classes = int(num_classes)
        self.norm = parse_norm_name(norm)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._predict(x).long()

    @property
    def has_score(self) -> bool:
        return self._score is not None

    def acceptance_score(self, x: torch.Tensor) -> torch.Tensor:
        if self._score is None:
            return super().acceptance_score(x)
        return self._score(x)


class ClassifierToDetector(Detector):
    """Theorem 5 instantiated with a certified classifier (Tramèr §2.3).

    On input x̂ answer the defense's label if it is certified at radius ε/2 around x̂, else reject
    (ABSTAIN). If the classifier is certified at ε/2 on a clean x with its true label, no x̂ within
    ε of x can be answered with another label: the two ε/2-balls would overlap, and the classifier
    cannot be constant on both with different labels. So the detector's robust accuracy with
    detection at ε is at least the classifier's verified robust accuracy (VRA) at ε/2.
    """

    def __init__(self, defense: Defense, eps: float):
        if not isinstance(defense, Defense):
            raise InputError(f"defense must be a certaudit Defense, got {type(defense).__name__}")
        self.defense = defense
        self.eps = check_eps(eps)
        self.radius = self.eps / 2.0
        self.norm = defense.norm
        self.num_classes = defense.num_classes

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense.accept(x, self.radius).long()

    def label_margins(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) certification margins at ε/2 for every label (a loop over labels, not images)."""
        cols = [self.defense.margin(x, self.radius, torch.full((x.shape[0],), j, dtype=torch.long, device=x.device))
                for j in range(self.num_classes)]
        return torch.stack(cols, dim=1)

    def acceptance_score(self, x: torch.Tensor) -> torch.Tensor:
        """max over labels of the defense's margin at ε/2: > 0 iff some label is certified (accepted)."""
        return self.label_margins(x).amax(dim=1)


SOURCE_DETECTOR, SOURCE_SEARCH, SOURCE_RANDOM = 0, 1, 2
"""Where a Theorem-4 label came from: the detector on x̂, a non-rejected point found near x̂, a random draw."""


@dataclass
class Theorem4Output:
    """Labels of the Theorem-4 classifier and how each was obtained (see the ``SOURCE_*`` codes)."""

    label: torch.Tensor  # (B,) int64, never ABSTAIN
    source: torch.Tensor  # (B,) int64 in {SOURCE_DETECTOR, SOURCE_SEARCH, SOURCE_RANDOM}
    evals: torch.Tensor  # (B,) detector evaluations spent by the search (0 where not rejected)
    point: torch.Tensor  # (B, C, H, W) the accepted input whose label was used (x̂ where none)


class DetectorToClassifier:
    """Theorem 4: a (computationally inefficient) classifier built from a detector robust at ε.

    On input x̂: if the detector accepts x̂, answer its label. Otherwise search the ε/2-ball
    around x̂ (∩ [0,1]^d) for an input the detector accepts and answer that input's label; if the
    search finds none, answer a label drawn with a seeded generator. The exact construction needs
    a global search; here the search is an attack within ``budget`` detector evaluations per
    rejected input:

    * with a differentiable :meth:`Detector.acceptance_score`: PGD maximizing it (minimizing
      rejection), first from x̂ then from random points of the ball, checking acceptance every
      ``check_every`` steps (each gradient step and each check costs one evaluation);
    * without one: random search, ``candidates_per_round`` uniform draws per rejected input per round.

    All rejected inputs of a batch are searched together. A :class:`Defense` passed instead of a
    detector is first wrapped by :class:`ClassifierToDetector` at the same ε.
    """

    def __init__(self, detector: Detector | Defense, eps: float, budget: int = 100, *, steps: int = 10,
                 check_every: int = 1, step_size: float | None = None, schedule: str = "constant",
                 candidates_per_round: int = 8, search: str = "auto", seed: int = 0):
        if isinstance(detector, Defense):
            detector = ClassifierToDetector(detector, eps)
        if not isinstance(detector, Detector):
            raise InputError(f"detector must be a certaudit Detector or Defense, got {type(detector).__name__}")
        if search not in ("auto", "pgd", "random"):
            raise InputError(f"unknown search {search!r}; choose one of: auto, pgd, random")
        if search == "pgd" and not detector.has_score:
            raise InputError(f"search='pgd' needs a detector with an acceptance score; "
                             f"{type(detector).__name__} has none")
        for name, v in (("budget", budget), ("steps", steps), ("check_every", check_every),
                        ("candidates_per_round", candidates_per_round)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        self.detector = detector
        self.eps = check_eps(eps)
        self.radius = self.eps / 2.0
        self.norm = detector.norm
        self.num_classes = detector.num_classes
        self.budget = budget
        self.steps = steps
        self.check_every = check_every
        self.step_size = step_size
        self.schedule = schedule
        self.candidates_per_round = candidates_per_round
        self.search = "pgd" if search == "auto" and detector.has_score else ("random" if search == "auto" else search)
        self.seed = int(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x).label

    predict = __call__

    def classify(self, x: torch.Tensor) -> Theorem4Output:
        """Labels for a batch (B, C, H, W) in [0, 1], with their provenance."""
        x = check_images(x)
        generator = make_generator(self.seed)  # CPU draws: the same labels on every device
        labels = self.detector.predict(x).long()
        source = torch.full_like(labels, SOURCE_DETECTOR)
        evals = torch.zeros_like(labels)
        point = x.detach().clone()
        rejected = (labels == ABSTAIN).nonzero().flatten()  # (R,)
        if rejected.numel() == 0:
            return Theorem4Output(labels, source, evals, point)
        xr = x[rejected].detach()
        if self.search == "pgd":
            found, found_label, xf, used = self._pgd_search(xr, generator)
        else:
            found, found_label, xf, used = self._random_search(xr, generator)
        random_labels = torch.randint(self.num_classes, (xr.shape[0],), generator=generator).to(labels.device)
        labels[rejected] = torch.where(found, found_label, random_labels)
        source[rejected] = torch.where(found, torch.full_like(found_label, SOURCE_SEARCH),
                                       torch.full_like(found_label, SOURCE_RANDOM))
        evals[rejected] = used
        point[rejected] = torch.where(found.view(-1, *([1] * (x.dim() - 1))), xf, xr)
        return Theorem4Output(labels, source, evals, point)

    def _pgd_search(self, xr: torch.Tensor, generator: torch.Generator):
        found_label = torch.full((xr.shape[0],), ABSTAIN, dtype=torch.long, device=xr.device)

        def score(xs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return self.detector.acceptance_score(xs)

        def accepted(xs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            pred = self.detector.predict(xs).long()
            ok = pred != ABSTAIN
            found_label[index[ok]] = pred[ok]
            return ok

        steps = min(self.steps, self.budget)
        per_restart = steps + 1 + (steps + self.check_every - 1) // self.check_every
        restarts = max(1, math.ceil(self.budget / per_restart) + 1)  # the budget stops the last one
        res = pgd(score, xr, self.radius, self.norm, steps=steps, step_size=self.step_size, restarts=restarts,
                  random_start=False, schedule=self.schedule, generator=generator, done_fn=accepted,
                  check_every=self.check_every, budget=self.budget)
        return res.success, found_label, res.x, res.evals

    def _random_search(self, xr: torch.Tensor, generator: torch.Generator):
        n = xr.shape[0]
        found = torch.zeros(n, dtype=torch.bool, device=xr.device)
        found_label = torch.full((n,), ABSTAIN, dtype=torch.long, device=xr.device)
        xf = xr.clone()
        used = torch.zeros(n, dtype=torch.long, device=xr.device)
        active = torch.arange(n, device=xr.device)
        spent = 0
        while active.numel() > 0 and spent < self.budget:
            k = min(self.candidates_per_round, self.budget - spent)
            xa = xr[active].repeat_interleave(k, dim=0)  # (A*k, C, H, W)
            cand = random_in_ball(xa, self.radius, self.norm, generator)
            pred = self.detector.predict(cand).long().view(-1, k)  # (A, k)
            ok = pred != ABSTAIN
            hit_rows = ok.any(dim=1)
            first = ok.long().argmax(dim=1)  # first accepted candidate of each row
            hit = active[hit_rows]
            sel = first[hit_rows]
            cand = cand.view(active.shape[0], k, *xr.shape[1:])
            xf[hit] = cand[hit_rows, sel]
            found_label[hit] = pred[hit_rows, sel]
            used[hit] = spent + sel + 1
            found[hit] = True
            spent += k
            active = active[~hit_rows]
        used[~found] = spent
        return found, found_label, xf, used


# ====================================================================== the empirical check

@dataclass
class ReductionCheck:
    """Theorem 5, measured: the detector built from a certified classifier, attacked at ε.

    Per input: ``certified`` (the classifier is certified at ε/2 with the true label), ``clean_ok``
    (the detector answers the true label on x), ``attack_wrong`` (the attack found x̂ within ε
    with a wrong, non-ABSTAIN answer), ``evals`` (attack evaluations used).
    """

    eps: float
    norm: Norm
    certified: torch.Tensor  # (N,) bool
    clean_ok: torch.Tensor  # (N,) bool
    attack_wrong: torch.Tensor  # (N,) bool
    evals: torch.Tensor  # (N,) int64

    @property
    def n(self) -> int:
        return int(self.certified.shape[0])

    @property
    def vra_half(self) -> float:
        """The classifier's verified robust accuracy at ε/2."""
        return float(self.certified.float().mean())

    @property
    def robust_accuracy_with_detection(self) -> float:
        """Measured 1 − R_adv-det at ε (Definition 3 under this attack; an upper estimate)."""
        return float((self.clean_ok & ~self.attack_wrong).float().mean())

    @property
    def violations(self) -> int:
        """Certified inputs where the detector was driven to a wrong label (Theorem 5 says: 0)."""
        return int((self.certified & self.attack_wrong).sum())

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n, "eps": self.eps, "half_eps": self.eps / 2, "norm": self.norm.value,
            "vra_half_eps": self.vra_half,
            "detector_clean_accuracy": float(self.clean_ok.float().mean()),
            "robust_accuracy_with_detection": self.robust_accuracy_with_detection,
            "wrong_answers_forced": int(self.attack_wrong.sum()),
            "violations_on_certified": self.violations,
        }


def check_classifier_to_detector(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                                 steps: int = 50, restarts: int = 2, step_size: float | None = None,
                                 schedule: str = "constant", seed: int = 0, batch_size: int = 256) -> ReductionCheck:
    """Attack the Theorem-5 detector at ε and compare with the classifier's VRA at ε/2.

    For each (x, y): PGD over the ε-ball around x maximizes the best certification margin at ε/2
    of any wrong label (so that the detector *accepts* a wrong label), stopping as soon as the
    detector answers a label outside {y, ⊥}. Batched over inputs; ``batch_size`` bounds memory.
    """
    x = check_images(x)
    y = check_labels(y, x.shape[0], defense.num_classes, "y").to(x.device)
    eps = check_eps(eps)
    detector = ClassifierToDetector(defense, eps)
    generator = make_generator(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    certified, clean_ok, wrong, evals = [], [], [], []
    for lo in range(0, x.shape[0], batch_size):  # a loop over batches, not images
        xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
        # the defense's own check at exactly ε/2 (no bisection radius compared with it)
        cert = defense.certify_checks(xb, [detector.radius], full_radius=False)
        certified.append(cert.certified_at(detector.radius).to(yb.device) & (cert.label.to(yb.device) == yb))
        clean_ok.append(detector.predict(xb) == yb)

        def wrong_label_margin(xs: torch.Tensor, index: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
            m = detector.label_margins(xs)  # (b, C)
            own = torch.nn.functional.one_hot(yb[index], detector.num_classes).bool()
            return m.masked_fill(own, -math.inf).amax(dim=1)

        def answered_wrong(xs: torch.Tensor, index: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
            pred = detector.predict(xs)
            return (pred != yb[index]) & (pred != ABSTAIN)

        res = pgd(wrong_label_margin, xb, eps, defense.norm, steps=steps, step_size=step_size, restarts=restarts,
                  random_start=False, schedule=schedule, generator=generator, done_fn=answered_wrong,
                  check_every=1)
        wrong.append(res.success)
        evals.append(res.evals)
    return ReductionCheck(eps, defense.norm, torch.cat(certified), torch.cat(clean_ok), torch.cat(wrong),
                          torch.cat(evals))
