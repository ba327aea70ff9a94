"""Tramèr's reductions, measured on a certified model (certaudit.detection).

Theorem 5 (with a certified classifier, §2.3 of the paper): the detector "answer if certified at
ε/2, else reject" is robust with detection at ε wherever the classifier is certified at ε/2. This
script builds that detector from a defense, attacks it at ε with PGD on its accept/reject decision
(pushing a wrong label to be accepted), and prints the measured robust accuracy with detection next
to the classifier's verified robust accuracy (VRA) at ε/2, plus the number of certified inputs where
the detector was driven to a wrong answer (the theorem says 0).

On top, Theorem 4 turns that detector back into a classifier: the script attacks the base model at
ε/2 (PGD on cross-entropy) and reports how often the Theorem-4 classifier still answers correctly.

Runs today on an exact linear defense trained on scikit-learn's digits (CPU, seconds)::

    PYTHONPATH=src python benchmarks/detector_reduction.py
    PYTHONPATH=src python benchmarks/detector_reduction.py --norm linf --eps 0.2

Any other defense plugs in through a factory ``module:callable`` that is imported only when asked
for, and called as ``factory(checkpoint=PATH, device=DEVICE)``; it returns a certaudit ``Defense``.
Data come from ``certaudit.data.load_dataset`` (the data set named by ``--dataset``, else the
checkpoint's metadata)::

    PYTHONPATH=src python benchmarks/detector_reduction.py --defense mypkg.defenses:build \\
        --checkpoint model.safetensors --eps 0.5 --n 500
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time

import torch
from torch import nn

from certaudit.attacks.pgd import make_generator, pgd
from certaudit.defenses.base import Certificates, Defense, Norm, check_images
from certaudit.detection import (
    SOURCE_SEARCH,
    DetectorToClassifier,
    ClassifierToDetector,
    check_classifier_to_detector,
)
from certaudit.errors import InputError


class LinearDefense(Defense):
    """z = Wx + b with its exact certificate: radius = min_j (z_y − z_j) / ‖w_y − w_j‖_* (dual norm)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, norm: str = "l2"):
        c, d = weight.shape
        model = nn.Sequential(nn.Flatten(), nn.Linear(d, c))
        with torch.no_grad():
            model[1].weight.copy_(weight)
            model[1].bias.copy_(bias)
        super().__init__(model.eval(), c)
        self.norm = Norm.parse(norm)
        diff = weight[:, None, :] - weight[None, :, :]  # (C, C, d)
        self.lip = diff.norm(p=2 if self.norm is Norm.L2 else 1, dim=2).detach()  # (C, C)

    def certify(self, x: torch.Tensor) -> Certificates:
        x = check_images(x)
        with torch.no_grad():
            z = self.model(x)
        label = z.argmax(1)
        gap = z.gather(1, label[:, None]) - z  # (B, C)
        ratio = gap / self.lip[label].clamp_min(1e-12)
        ratio = ratio.masked_fill(nn.functional.one_hot(label, self.num_classes).bool(), math.inf)
        return Certificates(label, ratio.amin(1).clamp_min(0.0), self.norm)

    def margin(self, x: torch.Tensor, eps: float, target: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        gap = z.gather(1, target[:, None]) - z - eps * self.lip[target]  # (B, C)
        gap = gap.masked_fill(nn.functional.one_hot(target, self.num_classes).bool(), math.inf)
        return gap.amin(1)


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from certaudit.data import load_dataset

        return load_dataset("digits", split)
    except ImportError:  # the data module is optional for this script
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.tensor(bunch.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=make_generator(0))
        idx = order[360:] if split == "train" else order[:360]
        return x[idx], y[idx]


def train_linear_digits(norm: str, train_eps: float, seed: int = 0, steps: int = 400) -> LinearDefense:
    """Linear model on digits trained on certified logits (the margin-aware loss of GloRo, linear case)."""
    x, y = _digits("train")
    x = x.flatten(1)
    g = make_generator(seed)
    w = (0.01 * torch.randn(10, x.shape[1], generator=g)).requires_grad_(True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    onehot = nn.functional.one_hot(y, 10).bool()
    p = 2 if Norm.parse(norm) is Norm.L2 else 1
    for _ in range(steps):
        z = x @ w.T + b  # (N, 10)
        lip = (w[:, None, :] - w[None, :, :]).norm(p=p, dim=2)[y]  # (N, 10) ‖w_y − w_j‖_*
        worst = torch.where(onehot, z, z + train_eps * lip)  # rivals pushed up by their certificate cost
        loss = nn.functional.cross_entropy(worst, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return LinearDefense(w.detach(), b.detach(), norm)


def _load_factory(spec: str):
    if ":" not in spec:
        raise InputError(f"--defense must be 'linear-digits' or 'module:callable', got {spec!r}")
    mod, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        raise InputError(f"cannot import {mod!r} for --defense ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{spec!r} is not a callable")
    return factory


def build(args) -> tuple[Defense, torch.Tensor, torch.Tensor, str]:
    if args.defense == "linear-digits":
        defense = train_linear_digits(args.norm, args.eps / 2, seed=args.seed)
        x, y = _digits("test")
        name = f"linear (certified training at eps/2), digits, {args.norm}"
    else:
        factory = _load_factory(args.defense)
        defense = factory(checkpoint=args.checkpoint, device=args.device)
        if not isinstance(defense, Defense):
            raise InputError(f"{args.defense} returned {type(defense).__name__}, not a certaudit Defense")
        dataset = args.dataset
        if dataset is None and args.checkpoint:
            from certaudit.models import read_meta

            dataset = read_meta(args.checkpoint).dataset
        if dataset is None:
            raise InputError("--dataset is needed when the checkpoint does not name one")
        from certaudit.data import load_dataset

        x, y = load_dataset(dataset, "test")
        name = f"{args.defense} on {dataset}"
    x, y = x[: args.n].to(defense.device), y[: args.n].to(defense.device)
    return defense, x, y, name


def theorem4_under_attack(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float, budget: int,
                          seed: int) -> dict[str, float]:
    """Attack the base model at ε/2 (PGD on cross-entropy), then classify with the Theorem-4 wrapper."""
    def ce(xs, i):
        return nn.functional.cross_entropy(defense.model(xs), y[i], reduction="none")

    x_adv = pgd(ce, x, eps / 2, defense.norm, steps=40, restarts=1, seed=seed).x
    with torch.no_grad():
        base_ok = (defense.model(x_adv).argmax(1) == y).float().mean()
    clf = DetectorToClassifier(ClassifierToDetector(defense, eps), eps, budget=budget, seed=seed)
    out = clf.classify(x_adv)
    rejected = out.source != 0
    return {
        "base_accuracy_under_pgd_half_eps": float(base_ok),
        "theorem4_accuracy_under_pgd_half_eps": float((out.label == y).float().mean()),
        "theorem4_rejected_by_detector": float(rejected.float().mean()),
        "theorem4_recovered_by_search": float((out.source == SOURCE_SEARCH).float().mean()),
        "theorem4_mean_search_evals": float(out.evals[rejected].float().mean()) if bool(rejected.any()) else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--defense", default="linear-digits", help="'linear-digits' or module:callable (imported lazily)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--norm", default="l2", choices=["l2", "linf"], help="norm of the linear-digits defense")
    ap.add_argument("--eps", type=float, default=1.0, help="detection radius ε (the classifier is certified at ε/2)")
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--budget", type=int, default=100, help="Theorem-4 search budget (detector evaluations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if not args.eps > 0 or args.n < 1:
            raise InputError("--eps must be > 0 and --n >= 1")
        t0 = time.perf_counter()
        defense, x, y, name = build(args)
        t1 = time.perf_counter()
        check = check_classifier_to_detector(defense, x, y, args.eps, steps=args.steps, restarts=args.restarts,
                                             seed=args.seed)
        t2 = time.perf_counter()
        thm4 = theorem4_under_attack(defense, x, y, args.eps, args.budget, args.seed)
        t3 = time.perf_counter()
    except InputError as exc:
        print(f"detector_reduction: error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        clean = float((defense.model(x).argmax(1) == y).float().mean())
    result = {"defense": name, "clean_accuracy": clean, **check.summary(), **thm4,
              "seconds": {"build": t1 - t0, "theorem5_attack": t2 - t1, "theorem4": t3 - t2}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    e, h = args.eps, args.eps / 2
    print(f"defense: {name}; n={check.n}, norm={check.norm.value}, eps={e:g}, eps/2={h:g}")
    print(f"  classifier clean accuracy                         {100 * clean:6.2f}%")
    print(f"  classifier VRA at eps/2                           {100 * check.vra_half:6.2f}%")
    print(f"  Theorem-5 detector: robust acc. with detection at eps (measured, PGD "
          f"{args.steps} steps x {args.restarts} restarts) {100 * check.robust_accuracy_with_detection:6.2f}%")
    print(f"  wrong answers forced by the attack (any input)    {int(check.attack_wrong.sum()):6d}")
    print(f"  ... of which on inputs certified at eps/2         {check.violations:6d}   (Theorem 5: 0)")
    print(f"  base classifier accuracy under PGD at eps/2       {100 * thm4['base_accuracy_under_pgd_half_eps']:6.2f}%")
    thm4_acc = thm4["theorem4_accuracy_under_pgd_half_eps"]
    print(f"  Theorem-4 classifier accuracy on those points     {100 * thm4_acc:6.2f}%"
          f"   (>= VRA at eps/2 when the search succeeds)")
    print(f"    rejected by the detector {100 * thm4['theorem4_rejected_by_detector']:.1f}%, recovered by the search "
          f"{100 * thm4['theorem4_recovered_by_search']:.1f}%, mean search evals "
          f"{thm4['theorem4_mean_search_evals']:.1f} (budget {args.budget})")
    print(f"  time: build {t1 - t0:.1f}s, Theorem-5 attack {t2 - t1:.1f}s, Theorem-4 {t3 - t2:.1f}s")
    ok = check.violations == 0 and abs(check.robust_accuracy_with_detection - check.vra_half) < 1e-9
    print("  consistent with Theorem 5: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
