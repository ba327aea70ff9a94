"""The spoof verb as a library call: the Shadow Attack against a certified defense; rows, summary, grid.

For every image: a natural CERTIFY, the untargeted Shadow Attack (all wrong classes at once), a
selection CERTIFY of every candidate and a fresh judging CERTIFY of the chosen one
(:func:`certaudit.audits.spoofing.spoof_batch`). Rows are written as produced and resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from certaudit.attacks.budget import run_budgets, sweep_budgets
from certaudit.attacks.shadow import DefenseMargin, ShadowConfig, SmoothedCrossEntropy
from certaudit.audits.session import Session, check_output, check_range, err_console
from certaudit.audits.spoofing import ROW_FORMAT, save_grid, spoof_batch, summarize
from certaudit.defenses.base import ABSTAIN
from certaudit.defenses.registry import defense_class
from certaudit.errors import InputError

MAX_SAMPLES_PER_STEP = 1 << 16  # noisy copies per image and step: more cannot be allocated for any image
PRESETS = ("smoothing", "crown-ibp")  # ShadowConfig() and ShadowConfig.crown_ibp(), in this order
LOSSES = ("ce", "margin", "robust-ce")
SMOOTHED_BLOCK = 10  # default images per block (rows written per block) for a randomized defense


def shadow_config(preset: str | None, randomized: bool, changes: dict[str, Any]) -> ShadowConfig:
    """The preset's configuration (default: the paper's smoothing setting for a randomized defense,
    its CROWN-IBP setting otherwise) with ``changes`` (``None`` values ignored) applied and checked.

    A ``lambda_ssim`` without a ``min_ssim`` is refused: it weights a penalty that exists only under an
    SSIM bound (the sweep's budgets take the same ``min_ssim``), so it would be silently ignored."""
    name = (preset or ("smoothing" if randomized else "crown-ibp")).lower()
    if name not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = (ShadowConfig, ShadowConfig.crown_ibp)[PRESETS.index(name)]()
    config = base.with_(**{k: v for k, v in changes.items() if v is not None})  # raises InputError on bad values
    if changes.get("lambda_ssim") is not None and config.min_ssim is None:
        raise InputError("--lambda-ssim weights the SSIM penalty, which exists only with an SSIM bound: give "
                         "--min-ssim too, or leave --lambda-ssim out")
    return config


def _loss_kind(cls: Any, name: str, loss: str | None, method: Any, eps: float | None) -> str:
    kind = (loss or ("ce" if cls.randomized else "margin")).lower()
    if kind not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose ce, margin or robust-ce")
    if kind == "robust-ce" and "ce" not in cls.margin_reductions:
        raise InputError("--loss robust-ce is the interval defense's training loss; use --defense interval")
    if method is not None and not cls.methods:
        raise InputError(f"--method applies to --defense interval only (its bound methods); {name} has none")
    if kind == "ce" and not cls.randomized:
        raise InputError("--loss ce is the randomized-smoothing loss; use --loss margin for other defenses")
    if kind in ("margin", "robust-ce") and eps is None and not cls.randomized:
        raise InputError("--loss margin needs --eps: the radius at which the spoofed label should be certified")
    return kind


def _objective(kind: str, guard: Any, net: Any, samples: int, noise: str, eps: float | None) -> Any:
    """The spoofing loss: the paper's smoothed cross-entropy, or the defense's margin at ``eps``."""
    if kind == "ce":
        return SmoothedCrossEntropy(net, guard.noise_sigma, samples=samples, noise=noise)
    return DefenseMargin(guard, eps or 0.0, **({"n_samples": samples} if guard.randomized else {}),
                         **({"reduction": "ce"} if kind == "robust-ce" else {}))


@dataclass
class _Grid:
    """The images shown in the grid: (natural, δ, x + δ, captions) of the first attacked images."""

    limit: int
    classes: Sequence[str]
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, str]]] = field(default_factory=list)

    def caption(self, label: int, pred: Any, radius: Any) -> str:
        if pred is None:
            return "not attacked"
        name = "abstain" if pred == ABSTAIN else self.classes[int(pred)]
        mark = "" if pred in (label, ABSTAIN) else " (wrong)"
        return f"{name}{mark}, r={float(radius or 0.0):.3f}"

    def take(self, result: Any) -> None:
        for b, row in enumerate(result.rows):
            if row["attacked"] and len(self.shown) < self.limit:
                # a success on an image the defense already labelled wrong needed no attack: say so
                already = row["success"] and row["natural_prediction"] not in (row["label"], ABSTAIN)
                spoof = (f"{self.caption(row['label'], row['spoofed_prediction'], row['spoofed_radius'])}"
                         f"{' (natural already wrong)' if already else ''}\n"
                         f"SSIM {row['ssim']:.3f}, ℓ∞ {row['linf'] * 255:.1f}/255"
                         f"{'' if row['within_budget'] else ' (over budget)'}")
                captions = (self.caption(row["label"], row["natural_prediction"], row["natural_radius"]), spoof)
                self.shown.append((result.natural[b].cpu(), result.delta[b].cpu(), result.x_adv[b].cpu(), captions))

    def save(self, path: Any, title: str) -> None:
        save_grid(path, *(torch.stack([s[k] for s in self.shown]) for k in range(3)), [s[3] for s in self.shown],
                  title=title)


def spoof_job(model: Any, *, weights: Any = None, defense: str = "smoothing", shadow: dict[str, Any] | None = None,
              preset: str | None = None, loss: str | None = None, samples: int = 400, noise: str = "fixed",
              method: str | None = None, eps: float | None = None, targets: Sequence[int] | None = None,
              defense_options: dict[str, Any] | None = None, select_n: int = 200, seed: int = 0,
              device: str = "auto", dataset: str | None = None, split: str = "test", limit: int | None = None,
              skip: int = 0, stride: int = 1, chunk: int | None = None, data_root: Any = None, out: Any = None,
              grid: Any = None, grid_images: int = 8, sweep: Sequence[float | None] | None = None,
              quiet: bool = False) -> dict[str, Any] | None:
    """Spoof images ``skip, skip+stride, ...`` (at most ``limit``); rows to ``out`` (resumable); the
    summary (``None`` on the ranks other than 0 of a multi-process launch).

    ``shadow``: changes to the preset's :class:`~certaudit.attacks.shadow.ShadowConfig` (the budget:
    ``max_linf``, ``min_ssim``, ``lambda_ssim``); ``loss``: ce, margin or robust-ce (default by the
    defense); ``defense_options``: sigma, n0, n, alpha, batch_size. ``sweep``: ℓ∞ budgets (``None``:
    unbounded) attacked as well, each with the budget's ``min_ssim``, in the same batch."""
    check_range(limit, skip, stride)
    for flag, value in (("--chunk", chunk), ("--grid-images", grid_images), ("--select-n", select_n),
                        ("--batch-size", (defense_options or {}).get("batch_size"))):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if not 1 <= samples <= MAX_SAMPLES_PER_STEP:
        raise InputError(f"--samples must lie in [1, {MAX_SAMPLES_PER_STEP:,}] (noisy copies per step), got {samples}")
    name = defense.lower()
    cls = defense_class(name)  # its declared capabilities decide defaults and what applies
    config = shadow_config(preset, cls.randomized, dict(shadow or {}))
    # a sweep entry that prints like the run's own budget is that budget (merged, attacked once)
    budgets = None if sweep is None else sweep_budgets(sweep, config.min_ssim, config.budget, name="--sweep-linf")
    kind = _loss_kind(cls, name, loss, method, eps)
    if noise.lower() not in ("fixed", "fresh"):
        raise InputError(f"unknown --noise {noise!r}; choose fixed or fresh")
    check_output(out, "--out")
    check_output(grid, "--grid")
    s = Session.open(model, weights=weights, dataset=dataset, device=device, quiet=quiet)
    if targets is not None and max(targets) >= s.info.num_classes:
        raise InputError(f"--targets must lie in [0, {s.info.num_classes}), got {list(targets)}")
    opts = {**(defense_options or {}), "eps": eps, "seed": seed, "method": method}
    guard = cls.from_options(s.net, s.meta, {k: v for k, v in opts.items() if v is not None})
    randomized = guard.randomized  # noise in CERTIFY: skip abstentions, re-draw to judge
    objective = _objective(kind, guard, s.net, samples, noise.lower(), eps)
    x_all, y_all, wanted = s.data(split, data_root, skip=skip, limit=limit, stride=stride)
    n0, n = (defense_options or {}).get("n0", 100), (defense_options or {}).get("n", 100_000)
    cert_opts = {"n0": n0, "n": n} if randomized else {}
    sel_opts = {"n0": n0, "n": select_n} if randomized else {}
    settings, loss_settings = guard.settings(), objective.settings()
    row_config = {"verb": "spoof", "model_sha256": s.model_sha, "arch": s.meta.arch, "defense": name,
                  "settings": settings, "shadow": config.as_dict(), "spoof_loss": loss_settings,
                  "select": sel_opts, "targets": None if targets is None else list(targets), "seed": seed,
                  "eps": eps, "skip_abstained": randomized, "checks": "eps" if eps is not None else None,
                  "dataset": s.info.name, "split": split, "device": s.device.type, "row_format": ROW_FORMAT,
                  "sweep": None if budgets is None else [b.as_dict() for b in budgets]}
    shown = _Grid(grid_images if grid is not None else 0, s.info.classes)

    def work(idx: list[int]) -> list[dict[str, Any]]:
        result = spoof_batch(guard, objective, x_all[idx].to(s.device), y_all[idx], config, indices=idx, seed=seed,
                             candidates=None if targets is None else list(targets), certify_options=cert_opts,
                             select_options=sel_opts, skip_abstained=randomized, on_step=s.advance, eps=eps,
                             sweep=budgets)
        shown.take(result)
        return result.rows

    # every draw is keyed by (seed, image index); the run loop's fixed blocks also keep the batches, hence
    # the last floating-point bits, the same for any number of processes. A randomized defense's block is
    # small by default (SMOOTHED_BLOCK): each image costs Monte Carlo CERTIFYs at every step, and rows are
    # written (and a crash loses work) per block; 100 CIFAR images in one block wrote nothing for 55 min
    n_targets = len(targets) if targets is not None else s.info.num_classes - 1
    n_budgets = len(run_budgets(config.budget, budgets))
    run = s.run(work, wanted, out=out, config=row_config,
                block=chunk or max(1, min(SMOOTHED_BLOCK if randomized else 256,
                                          int(objective.max_images(tuple(s.info.shape))))),
                label=f"shadow attack ({name}, {config.channels}-channel, {config.budget.label}"
                      f"{f', {n_budgets} budgets' if n_budgets > 1 else ''})", done_noun="attacked",
                steps_per_image=n_targets * n_budgets * config.steps)
    if not s.env.is_main:
        return None  # the grid shows rank 0's images
    summary = {"model": str(model), "defense": name, "dataset": s.info.name, "split": split,
               "images_selected": len(wanted), "settings": settings, "shadow": config.as_dict(),
               "spoof_loss": loss_settings, **s.run_fields(run, out), **summarize(run.rows, eps)}
    if grid is not None:
        if shown.shown:
            shown.save(grid, f"Shadow Attack, attacked images (successes and failures), budget: {config.budget.label}")
            summary["grid"] = str(grid)
        elif not quiet:
            err_console.print("no image was attacked in this run: no grid written")
    return summary


__all__ = ["LOSSES", "MAX_SAMPLES_PER_STEP", "PRESETS", "shadow_config", "spoof_job"]
