"""The one-command audit: clean accuracy → certification → degradation → spoofing, resumable.

:func:`run_audit` runs the four stages in order on one defended model and a list of images, and
writes, under the output folder ``DIR``:

* ``DIR/rows/clean.jsonl``   -- the undefended model's prediction per image (clean accuracy);
* ``DIR/rows/certify.jsonl`` -- the defense's label and certified radius per image (VRA against
  radius, VRA at ε and 2ε);
* ``DIR/rows/degrade.jsonl`` -- :func:`certaudit.audits.degradation.degrade_batch` rows (§3.3 of the
  degradation paper: testR, testA lower bound by attack, upper bound by the 2ε check);
* ``DIR/rows/spoof.jsonl``   -- :func:`certaudit.audits.spoofing.spoof_batch` rows (Shadow Attack:
  natural and spoofed labels and radii);
* ``DIR/images/*.npz``       -- a few successful degradation and spoofing examples (natural image,
  perturbed image) for the report's grids;
* ``DIR/summary.json``       -- every headline figure with the full configuration, versions, seed,
  device and timings (validated by :data:`SUMMARY_SCHEMA`).

Every stage writes its rows through :class:`certaudit.results.RowWriter` as they are produced,
with the stage's configuration hash in the header: a rerun with the same ``DIR`` and configuration
skips the images already done (a crash loses at most the chunk in flight, never duplicates a row);
a different configuration is refused rather than mixed. A larger ``--limit`` extends the rows.

Degradation examples: :func:`degrade_batch` keeps no perturbed images, so for the first few
degraded images of each chunk the stage re-runs the attack that degraded them on those images
alone and keeps the candidates that pass the same check (:func:`verify_candidates`); they are
illustrations, the counts come from the rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from certaudit import validate
from certaudit.attacks.budget import DEFAULT_SWEEP, Budget, check_linf, parse_linf_list, sweep_budgets
from certaudit.attacks.degradation import AttackConfig, attacks_for, run_attack, verify_candidates
from certaudit.attacks.shadow import DefenseMargin, ShadowConfig, SmoothedCrossEntropy
from certaudit.audits.certified import certification_rows
from certaudit.audits.degradation import ROW_FORMAT, degrade_batch
from certaudit.audits.runner import run_rows
from certaudit.audits.spoofing import ROW_FORMAT as SPOOF_ROW_FORMAT
from certaudit.audits.spoofing import is_randomized, spoof_batch
from certaudit.audits.summary import (  # noqa: F401 (re-exported)
    STAGES,
    SUMMARY_SCHEMA,
    build_summary,
    coverage,
    expand_ranges,
)
from certaudit.defenses.base import radius_key
from certaudit.defenses.registry import build_defense
from certaudit.distributed import DistEnv
from certaudit.errors import InputError
from certaudit.results import write_json_atomic

DEFAULT_MAX_LINF = 16 / 255  # the headline's spoof budget (docs/shadow.md: why these two numbers)
DEFAULT_MIN_SSIM = 0.9
EXAMPLE_ATTACK_SEED_STRIDE = 7919  # example re-runs of an attack: seed + stride × first index (not the rows' seeds)
EXAMPLE_RECHECK_SEED_OFFSET = 104729  # and their re-check noise (smoothing), apart from every row's stream

Progress = Callable[[str, int, int], None]  # (stage, images done in this run, images to do in this run)


@dataclass
class AuditSettings:
    """Everything that decides the audit's rows (besides the model and the images).

    Smoothing: ``sigma`` (default: the checkpoint's training σ), ``n0``, ``n``, ``alpha``.
    Interval: ``method``. Degradation: ``attack`` (``all`` or a comma list), ``attack_steps``,
    ``attack_restarts``, ``attack_samples``. Spoofing (Shadow Attack, the paper's settings by
    default for smoothing, Section 5's for other defenses): ``spoof_images`` (attack only the first
    K selected images; None = all), ``spoof_steps``, ``spoof_samples`` (Gaussian copies in the
    smoothing loss), ``spoof_select_n`` and ``spoof_n`` (smoothing CERTIFY samples of the
    selection and of the judging CERTIFY; default n), ``spoof_channels``. The spoof budget (the
    headline's "spoof success" is within it; docs/shadow.md): ``spoof_max_linf`` (default 16/255)
    and ``spoof_min_ssim`` (default 0.9), ``None`` for none; ``spoof_sweep``: ℓ∞ budgets also
    attacked, in the same batch, each with ``spoof_min_ssim`` (``None`` in it: the unbounded attack,
    the headline's separate "unbounded" column; default 4, 8, 16, 32, 64 /255 and unbounded; ``None``:
    no sweep). ``chunk``: images per batch in every stage. ``examples``: images kept per grid.

    :meth:`check` validates every field and stores the checked values (``eps``, ``alpha``, ``sigma`` and
    the spoof budget as floats, ``"16/255"`` read as 16/255; the sweep as a tuple of floats and None).
    """

    eps: float
    seed: int = 0
    chunk: int = 64
    sigma: float | None = None
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    batch_size: int | None = None
    method: str | None = None
    attack: str = "all"
    attack_steps: int = 50
    attack_restarts: int = 1
    attack_samples: int = 32
    spoof_images: int | None = None
    spoof_steps: int | None = None
    spoof_samples: int = 400
    spoof_select_n: int = 200
    spoof_n: int | None = None
    spoof_channels: int = 1
    spoof_max_linf: float | None = DEFAULT_MAX_LINF
    spoof_min_ssim: float | None = DEFAULT_MIN_SSIM
    spoof_sweep: tuple[float | None, ...] | None = DEFAULT_SWEEP
    examples: int = 6
    stages: tuple[str, ...] = STAGES

    def check(self) -> "AuditSettings":
        self.eps = validate.eps(self.eps, "eps")
        for name in ("chunk", "n0", "n", "attack_steps", "attack_restarts", "attack_samples", "spoof_samples",
                     "spoof_select_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("spoof_images", "spoof_steps", "spoof_n", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        self.alpha = validate.probability(self.alpha, "alpha")
        if self.sigma is not None:
            self.sigma = validate.positive(self.sigma, "sigma")
        if self.examples < 0:
            raise InputError(f"examples must be >= 0, got {self.examples!r}")
        if self.spoof_channels not in (1, 3):
            raise InputError(f"spoof channels must be 1 or 3, got {self.spoof_channels!r}")
        budget = Budget(self.spoof_max_linf, self.spoof_min_ssim)  # InputError on a bad budget
        self.spoof_max_linf, self.spoof_min_ssim = budget.max_linf, budget.min_ssim
        if self.spoof_sweep is not None:
            given = self.spoof_sweep
            sweep = parse_linf_list(given, "spoof_sweep") if isinstance(given, str) else list(given)
            if not sweep:
                raise InputError("spoof_sweep must list at least one budget (None: no sweep)")
            self.spoof_sweep = tuple(None if t is None else check_linf(t, "spoof_sweep") for t in sweep)
            sweep_budgets(self.spoof_sweep, self.spoof_min_ssim, name="spoof_sweep")  # two alike: refused
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise InputError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
        self.stages = tuple(s for s in STAGES if s in self.stages)  # always in pipeline order
        return self


@dataclass
class AuditSource:
    """What is audited, for the summary: model file (or name), data set, split and image indices."""

    model: str
    model_sha256: str | None
    defense: str
    dataset: str
    split: str
    indices: list[int]
    arch: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the run

def run_audit(out: str | os.PathLike, model: torch.nn.Module, meta: Any, source: AuditSource,
              x: torch.Tensor, y: torch.Tensor, settings: AuditSettings, *,
              device: torch.device | str = "cpu", progress: Progress | None = None,
              class_names: Sequence[str] | None = None, env: Any = None) -> dict[str, Any] | None:
    """Run (or resume) the audit of ``model`` under ``source.defense`` on ``x[source.indices]``.

    ``x`` (N, C, H, W) in [0, 1] and ``y`` (N,) are the whole split; only ``source.indices`` are
    audited. Returns the summary (also written to ``out/summary.json``).

    ``env`` (:class:`certaudit.distributed.DistEnv`, from ``certaudit.distributed.init()``) splits
    every stage across processes: fixed blocks of ``settings.chunk`` images dealt to ranks, one row
    shard per rank, merged by rank 0 after each stage; rank 0 alone keeps example images and writes
    the summary (other ranks return ``None``). Rows do not depend on the number of processes.
    """

    env = env if env is not None else DistEnv(rank=0, world_size=1, local_rank=0)

    settings.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    wanted = [int(i) for i in source.indices]
    if not wanted:
        raise InputError("no images to audit")
    if len(set(wanted)) != len(wanted):
        raise InputError("image indices must be distinct")
    if max(wanted) >= len(y) or min(wanted) < 0:
        raise InputError(f"image indices must lie in [0, {len(y)})")
    guard = build_defense(source.defense, model, meta, _defense_options(settings))
    norm = guard.norm.value
    base = {"model_sha256": source.model_sha256, "arch": source.arch, "defense": source.defense.lower(),
            "settings": guard.settings(), "dataset": source.dataset, "split": source.split,
            "device": dev.type, "seed": settings.seed}
    timings: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    t_all = time.perf_counter()
    ctx = StageContext(out=out, guard=guard, model=model, x=x, y=y, wanted=wanted, settings=settings, base=base,
                       device=dev, progress=progress if env.is_main else None, env=env)
    for stage in settings.stages:
        t0 = time.perf_counter()
        stage_rows, new = _STAGE_RUNNERS[stage](ctx)  # new: images of this run, all ranks
        rows[stage] = stage_rows
        timings[stage] = {"wall_seconds_this_run": round(time.perf_counter() - t0, 3), "new_images": new,
                          "row_seconds": round(sum(float(r.get("seconds") or 0.0) for r in stage_rows), 3)}
    if not env.is_main:
        return None
    summary = build_summary(source, settings, guard, norm, rows, timings, dev, time.perf_counter() - t_all,
                            input_dim=int(np.prod(tuple(x.shape[1:]))), class_names=class_names)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _defense_options(s: AuditSettings) -> dict[str, Any]:
    """Every defense option the audit settings give; each defense takes its own (the registry's rule)."""
    opts = {"sigma": s.sigma, "n0": s.n0, "n": s.n, "alpha": s.alpha, "batch_size": s.batch_size, "seed": s.seed,
            "method": s.method, "eps": s.eps}
    return {k: v for k, v in opts.items() if v is not None}


@dataclass
class StageContext:
    """What every stage of one audit shares (built once by :func:`run_audit`)."""

    out: Path
    guard: Any  # the Defense
    model: torch.nn.Module
    x: torch.Tensor  # the whole split, (N, C, H, W) in [0, 1]
    y: torch.Tensor  # (N,)
    wanted: list[int]  # the audited indices
    settings: AuditSettings
    base: dict[str, Any]  # the configuration common to every stage's result header
    device: torch.device
    progress: Progress | None  # rank 0 only
    env: Any  # certaudit.distributed.DistEnv

    def run(self, stage: str, config: dict[str, Any], work: Any, block: int,
            wanted: list[int] | None = None) -> tuple[list[dict[str, Any]], int]:
        """The shared run loop (:func:`certaudit.audits.runner.run_rows`) on ``rows/<stage>.jsonl``."""

        progress = self.progress
        res = run_rows(work, self.wanted if wanted is None else wanted, out=self.out / "rows" / f"{stage}.jsonl",
                       config=config, env=self.env, block=block,
                       progress=None if progress is None else lambda done, total: progress(stage, done, total))
        return res.rows, res.new_images


def _stage_clean(ctx: StageContext) -> tuple[list[dict[str, Any]], int]:
    """The undefended model's argmax on every image (clean accuracy of the base classifier)."""
    def work(idx: list[int]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = ctx.model(ctx.x[idx].to(ctx.device)).argmax(dim=1).cpu()  # (B,)
        sec = (time.perf_counter() - t0) / len(idx)
        return [{"index": i, "label": int(ctx.y[i]), "prediction": int(pred[b]),
                 "correct": int(pred[b]) == int(ctx.y[i]), "seconds": round(sec, 6)} for b, i in enumerate(idx)]

    return ctx.run("clean", {"stage": "clean", **ctx.base}, work, max(ctx.settings.chunk, 256))


def _stage_certify(ctx: StageContext) -> tuple[list[dict[str, Any]], int]:
    """The defense's certification of every image: label (or ABSTAIN), certified radius, and the
    defense's own checks at exactly ε and 2ε (the headline's figures at ε come from these)."""

    s = ctx.settings
    checks = [s.eps, 2 * s.eps]
    config = {"stage": "certify", **ctx.base, "checks": [radius_key(r) for r in checks]}
    return ctx.run("certify", config, lambda idx: certification_rows(ctx.guard, ctx.x, ctx.y, idx, checks,
                                                                      full_radius=True, device=ctx.device), s.chunk)


def _attack_options(s: AuditSettings) -> dict[str, Any]:
    return {"steps": s.attack_steps, "restarts": s.attack_restarts, "samples": s.attack_samples}


def _stage_degrade(ctx: StageContext) -> tuple[list[dict[str, Any]], int]:
    """Degradation attacks on the images certified at ε; the 2ε check and the proof; a few examples kept."""

    s, guard = ctx.settings, ctx.guard
    names = attacks_for(guard, s.attack)
    cfg = AttackConfig.from_options(_attack_options(s))
    config = {"stage": "degrade", **ctx.base, "eps": s.eps, "attack": s.attack, "attacks": names,
              "attack_config": cfg.as_dict(), "chunk": s.chunk, "row_format": ROW_FORMAT}
    kept = [_count_examples(ctx.out, "degrade") if ctx.env.is_main else s.examples]  # rank 0 keeps the examples

    def work(idx: list[int]) -> list[dict[str, Any]]:
        rows = degrade_batch(guard, ctx.x[idx], ctx.y[idx], s.eps, attack=s.attack, seed=s.seed, indices=idx,
                             full_radius=False, **cfg.as_dict())
        if kept[0] < s.examples:
            kept[0] += _keep_degrade_examples(ctx.out, guard, ctx.x, rows, s, cfg, s.examples - kept[0])
        return rows

    return ctx.run("degrade", config, work, s.chunk)


def _keep_degrade_examples(out: Path, guard: Any, x: torch.Tensor, rows: list[dict[str, Any]], s: AuditSettings,
                           cfg: Any, room: int) -> int:
    """Re-find x' for up to ``room`` degraded images of a chunk (grouped by the attack that found
    them) and save those that pass the check again to ``images/degrade_<first index>.npz``."""

    picked = [r for r in rows if r.get("degraded_by")][:room]
    if not picked:
        return 0
    nat, adv, meta_rows = [], [], []
    for name in dict.fromkeys(r["degraded_by"] for r in picked):
        group = [r for r in picked if r["degraded_by"] == name]
        idx = [int(r["index"]) for r in group]
        xs = x[idx].to(guard.device)
        label = torch.tensor([int(r["prediction"]) for r in group], dtype=torch.long)
        cand = run_attack(name, guard, xs, label.to(xs.device), s.eps, cfg, seed=s.seed + EXAMPLE_ATTACK_SEED_STRIDE * idx[0])
        verdict = verify_candidates(guard, xs, cand, label, s.eps, tol=cfg.tol, seed=s.seed + EXAMPLE_RECHECK_SEED_OFFSET,
                                    indices=idx)
        for j, r in enumerate(group):
            if bool(verdict.success[j]):
                nat.append(xs[j].detach().cpu())
                adv.append(cand[j].detach().cpu())
                meta_rows.append((int(r["index"]), int(r["label"]), int(r["prediction"]), float(r["radius"] or 0.0),
                                  float(verdict.distance[j]), name))
    if not nat:
        return 0
    _save_examples(out / "images" / f"degrade_{min(m[0] for m in meta_rows):07d}.npz", torch.stack(nat),
                   torch.stack(adv), meta_rows)
    return len(nat)


def _spoof_loss(guard: Any, model: torch.nn.Module, s: AuditSettings):
    if is_randomized(guard) and guard.noise_sigma is not None:
        config = ShadowConfig(channels=s.spoof_channels)
        loss: Any = SmoothedCrossEntropy(model, float(guard.noise_sigma), samples=s.spoof_samples, noise="fixed")
    else:
        config = ShadowConfig.crown_ibp(channels=s.spoof_channels)
        kwargs = {"n_samples": s.spoof_samples} if is_randomized(guard) else {}
        loss = DefenseMargin(guard, s.eps, **kwargs)
    if s.spoof_steps is not None:
        config = config.with_(steps=s.spoof_steps)
    return config.with_(max_linf=s.spoof_max_linf, min_ssim=s.spoof_min_ssim), loss


def _stage_spoof(ctx: StageContext) -> tuple[list[dict[str, Any]], int]:
    """Untargeted Shadow Attack on the first ``spoof_images`` images under the budget (and the sweep's);
    a fresh certification judges success."""

    s, guard = ctx.settings, ctx.guard
    targets = ctx.wanted if s.spoof_images is None else ctx.wanted[:s.spoof_images]
    config, loss = _spoof_loss(guard, ctx.model, s)
    # a sweep entry that prints like the headline's budget is that budget (merged, attacked once)
    sweep = None if s.spoof_sweep is None else sweep_budgets(s.spoof_sweep, s.spoof_min_ssim, config.budget)
    randomized = is_randomized(guard)
    cert_opts = {"n0": s.n0, "n": s.spoof_n or s.n} if randomized else {}
    sel_opts = {"n0": s.n0, "n": s.spoof_select_n} if randomized else {}
    stage_config = {"stage": "spoof", **ctx.base, "eps": s.eps, "shadow": config.as_dict(),
                    "spoof_loss": loss.settings(), "certify": cert_opts,
                    "select": sel_opts, "skip_abstained": randomized, "checks": "eps", "row_format": SPOOF_ROW_FORMAT,
                    "sweep": None if sweep is None else [b.as_dict() for b in sweep]}
    # [naturally correct, natural label already wrong] examples kept so far; rank 0 keeps the examples
    kept = _count_spoof_examples(ctx.out) if ctx.env.is_main else [s.examples, s.examples]

    def work(idx: list[int]) -> list[dict[str, Any]]:
        res = spoof_batch(guard, loss, ctx.x[idx].to(ctx.device), ctx.y[idx], config, indices=idx, seed=s.seed,
                          certify_options=cert_opts, select_options=sel_opts, skip_abstained=randomized,
                          eps=s.eps, sweep=sweep)
        if kept[0] < s.examples:
            _keep_spoof_examples(ctx.out, res, idx[0], kept, s.examples)
        return res.rows

    return ctx.run("spoof", stage_config, work, s.chunk, wanted=targets)


def _keep_spoof_examples(out: Path, res: Any, first: int, kept: list[int], limit: int) -> int:
    """Save successful spoofs (within the budget) of a chunk to ``images/spoof_<first>.npz``, preferring
    real spoofs: images whose natural label was correct.

    ``kept`` = [naturally correct, natural label already wrong] examples saved so far, updated here. A
    success on a naturally correct image is saved while fewer than ``limit`` of those are; one on an image
    the defense already labelled wrong before any attack (no attack needed) only while fewer than
    ``limit`` examples of both kinds together are. Early chunks of the second kind therefore never crowd
    out later real spoofs (at most ``limit`` of each kind are saved), and the report's grid shows the
    naturally correct ones first. Returns the number saved."""
    correct = [b for b, r in enumerate(res.rows) if r.get("success") and r["natural_prediction"] == r["label"]]
    wrong = [b for b, r in enumerate(res.rows) if r.get("success") and r["natural_prediction"] != r["label"]]
    take_correct = correct[:max(0, limit - kept[0])]
    take_wrong = wrong[:max(0, limit - kept[0] - len(take_correct) - kept[1])]
    pick = sorted(take_correct + take_wrong)
    if not pick:
        return 0
    kept[0] += len(take_correct)
    kept[1] += len(take_wrong)
    rows = [res.rows[b] for b in pick]
    meta_rows = [(int(r["index"]), int(r["label"]), int(r["spoofed_prediction"]), float(r["spoofed_radius"]),
                  float(r["l2"]), f"natural {r['natural_prediction']} r={r['natural_radius']:.3f}") for r in rows]
    sel = torch.tensor(pick, dtype=torch.long)
    _save_examples(out / "images" / f"spoof_{first:07d}.npz", res.natural[sel].cpu(), res.x_adv[sel].cpu(), meta_rows,
                   extra={"ssim": np.array([float(r["ssim"]) for r in rows]),
                          "linf": np.array([float(r["linf"]) for r in rows]),
                          "natural_prediction": np.array([int(r["natural_prediction"]) for r in rows], dtype=np.int64)})
    return len(pick)


_STAGE_RUNNERS = {"clean": _stage_clean, "certify": _stage_certify, "degrade": _stage_degrade, "spoof": _stage_spoof}


# ------------------------------------------------------------------------------ example images

def _save_examples(path: Path, natural: torch.Tensor, adv: torch.Tensor,
                   meta_rows: list[tuple[int, int, int, float, float, str]],
                   extra: dict[str, np.ndarray] | None = None) -> None:
    """Atomic npz: natural and perturbed images (K, C, H, W) float32, one record per image and
    ``extra`` arrays (K,) (spoofs: ``ssim``, ``linf``, ``natural_prediction``)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, natural=natural.float().numpy(), adv=adv.float().numpy(),
                        index=np.array([m[0] for m in meta_rows], dtype=np.int64),
                        label=np.array([m[1] for m in meta_rows], dtype=np.int64),
                        prediction=np.array([m[2] for m in meta_rows], dtype=np.int64),
                        radius=np.array([m[3] for m in meta_rows], dtype=np.float64),
                        distance=np.array([m[4] for m in meta_rows], dtype=np.float64),
                        note=np.array([m[5] for m in meta_rows]), **(extra or {}))
    os.replace(tmp, path)


def _count_examples(out: Path, kind: str) -> int:
    return sum(len(v["index"]) for v in load_examples(out, kind))


def _count_spoof_examples(out: Path) -> list[int]:
    """[naturally correct, natural label already wrong] spoof examples saved (files without the natural
    prediction count as naturally correct, so that a resumed run never saves more than its limit)."""
    counts = [0, 0]
    for v in load_examples(out, "spoof"):
        wrong = (v["natural_prediction"] != v["label"]) if "natural_prediction" in v else np.zeros(len(v["index"]), bool)
        counts[0] += int((~wrong).sum())
        counts[1] += int(wrong.sum())
    return counts


def load_examples(out: str | os.PathLike, kind: str) -> list[dict[str, np.ndarray]]:
    """The saved example files of ``kind`` (``degrade`` or ``spoof``), in index order."""
    files = sorted((Path(out) / "images").glob(f"{kind}_*.npz"))
    result = []
    for f in files:
        with np.load(f, allow_pickle=False) as data:
            result.append({k: data[k] for k in data.files})
    return result


__all__ = ["STAGES", "AuditSettings", "AuditSource", "run_audit", "build_summary", "load_examples", "coverage",
           "expand_ranges", "SUMMARY_SCHEMA"]
