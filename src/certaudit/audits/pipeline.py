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

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from certaudit.audits.degradation import degrade_batch
from certaudit.audits.spoofing import spoof_batch
from certaudit.errors import InputError

STAGES = ("clean", "certify", "degrade", "spoof")
EXAMPLE_ATTACK_SEED_STRIDE = 7919  # example re-runs of an attack: seed + stride × first index (not the rows' seeds)
EXAMPLE_RECHECK_SEED_OFFSET = 104729  # and their re-check noise (smoothing), apart from every row's stream
SUMMARY_VERSION = 1

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
    selection and of the judging CERTIFY; default n), ``spoof_channels``. ``chunk``: images per
    batch in every stage. ``examples``: images kept per grid.
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
    examples: int = 6
    stages: tuple[str, ...] = STAGES

    def check(self) -> "AuditSettings":
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise InputError(f"eps must be a finite number > 0, got {self.eps!r}")
        for name in ("chunk", "n0", "n", "attack_steps", "attack_restarts", "attack_samples", "spoof_samples",
                     "spoof_select_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("spoof_images", "spoof_steps", "spoof_n", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if not (0 < float(self.alpha) < 1):
            raise InputError(f"alpha must lie in (0, 1), got {self.alpha!r}")
        if self.examples < 0:
            raise InputError(f"examples must be >= 0, got {self.examples!r}")
        if self.spoof_channels not in (1, 3):
            raise InputError(f"spoof channels must be 1 or 3, got {self.spoof_channels!r}")
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
    from certaudit.defenses.registry import build_defense
    from certaudit.distributed import DistEnv
    from certaudit.results import write_json_atomic

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
        from certaudit.audits.runner import run_rows

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
    from certaudit.audits.certified import certification_rows
    from certaudit.defenses.base import radius_key

    s = ctx.settings
    checks = [s.eps, 2 * s.eps]
    config = {"stage": "certify", **ctx.base, "checks": [radius_key(r) for r in checks]}
    return ctx.run("certify", config, lambda idx: certification_rows(ctx.guard, ctx.x, ctx.y, idx, checks,
                                                                      full_radius=True, device=ctx.device), s.chunk)


def _attack_options(s: AuditSettings) -> dict[str, Any]:
    return {"steps": s.attack_steps, "restarts": s.attack_restarts, "samples": s.attack_samples}


def _stage_degrade(ctx: StageContext) -> tuple[list[dict[str, Any]], int]:
    """Degradation attacks on the images certified at ε; the 2ε check and the proof; a few examples kept."""
    from certaudit.attacks.degradation import AttackConfig, attacks_for
    from certaudit.audits.degradation import ROW_FORMAT

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
    from certaudit.attacks.degradation import run_attack, verify_candidates

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
    from certaudit.attacks.shadow import DefenseMargin, ShadowConfig, SmoothedCrossEntropy
    from certaudit.audits.spoofing import is_randomized

    if is_randomized(guard) and guard.noise_sigma is not None:
        config = ShadowConfig(channels=s.spoof_channels)
        loss: Any = SmoothedCrossEntropy(model, float(guard.noise_sigma), samples=s.spoof_samples, noise="fixed")
    else:
        config = ShadowConfig.crown_ibp(channels=s.spoof_channels)
        kwargs = {"n_samples": s.spoof_samples} if is_randomized(guard) else {}
        loss = DefenseMargin(guard, s.eps, **kwargs)
    if s.spoof_steps is not None:
        config = config.with_(steps=s.spoof_steps)
    return config, loss


def _stage_spoof(ctx: StageContext) -> tuple[list[dict[str, Any]], int]:
    """Untargeted Shadow Attack on the first ``spoof_images`` images; a fresh certification judges success."""
    from certaudit.audits.spoofing import is_randomized

    s, guard = ctx.settings, ctx.guard
    targets = ctx.wanted if s.spoof_images is None else ctx.wanted[:s.spoof_images]
    config, loss = _spoof_loss(guard, ctx.model, s)
    randomized = is_randomized(guard)
    cert_opts = {"n0": s.n0, "n": s.spoof_n or s.n} if randomized else {}
    sel_opts = {"n0": s.n0, "n": s.spoof_select_n} if randomized else {}
    stage_config = {"stage": "spoof", **ctx.base, "eps": s.eps, "shadow": config.as_dict(),
                    "spoof_loss": loss.settings(), "certify": cert_opts,
                    "select": sel_opts, "skip_abstained": randomized, "checks": "eps"}
    kept = [_count_examples(ctx.out, "spoof") if ctx.env.is_main else s.examples]  # rank 0 keeps the examples

    def work(idx: list[int]) -> list[dict[str, Any]]:
        res = spoof_batch(guard, loss, ctx.x[idx].to(ctx.device), ctx.y[idx], config, indices=idx, seed=s.seed,
                          certify_options=cert_opts, select_options=sel_opts, skip_abstained=randomized,
                          eps=s.eps)
        if kept[0] < s.examples:
            pick = [b for b, r in enumerate(res.rows) if r.get("success")][:s.examples - kept[0]]
            if pick:
                meta_rows = [(int(res.rows[b]["index"]), int(res.rows[b]["label"]),
                              int(res.rows[b]["spoofed_prediction"]), float(res.rows[b]["spoofed_radius"]),
                              float(res.rows[b]["l2"]), f"natural {res.rows[b]['natural_prediction']} "
                              f"r={res.rows[b]['natural_radius']:.3f}") for b in pick]
                sel = torch.tensor(pick, dtype=torch.long)
                _save_examples(ctx.out / "images" / f"spoof_{idx[0]:07d}.npz", res.natural[sel].cpu(),
                               res.x_adv[sel].cpu(), meta_rows)
                kept[0] += len(pick)
        return res.rows

    return ctx.run("spoof", stage_config, work, s.chunk, wanted=targets)


_STAGE_RUNNERS = {"clean": _stage_clean, "certify": _stage_certify, "degrade": _stage_degrade, "spoof": _stage_spoof}


# ------------------------------------------------------------------------------ example images

def _save_examples(path: Path, natural: torch.Tensor, adv: torch.Tensor,
                   meta_rows: list[tuple[int, int, int, float, float, str]]) -> None:
    """Atomic npz: natural and perturbed images (K, C, H, W) float32 and one record per image."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, natural=natural.float().numpy(), adv=adv.float().numpy(),
                        index=np.array([m[0] for m in meta_rows], dtype=np.int64),
                        label=np.array([m[1] for m in meta_rows], dtype=np.int64),
                        prediction=np.array([m[2] for m in meta_rows], dtype=np.int64),
                        radius=np.array([m[3] for m in meta_rows], dtype=np.float64),
                        distance=np.array([m[4] for m in meta_rows], dtype=np.float64),
                        note=np.array([m[5] for m in meta_rows]))
    os.replace(tmp, path)


def _count_examples(out: Path, kind: str) -> int:
    return sum(len(v["index"]) for v in load_examples(out, kind))


def load_examples(out: str | os.PathLike, kind: str) -> list[dict[str, np.ndarray]]:
    """The saved example files of ``kind`` (``degrade`` or ``spoof``), in index order."""
    files = sorted((Path(out) / "images").glob(f"{kind}_*.npz"))
    result = []
    for f in files:
        with np.load(f, allow_pickle=False) as data:
            result.append({k: data[k] for k in data.files})
    return result


# ------------------------------------------------------------------------------------ summary

def _versions() -> dict[str, Any]:
    import certaudit

    out = {"certaudit": certaudit.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "platform": platform.platform()}
    for mod in ("scipy", "matplotlib"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional in odd installs
            out[mod] = None
    return out


def _device_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": dev.type, "name": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(dev)
    return info


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def build_summary(source: AuditSource, settings: AuditSettings, guard: Any, norm: str,
                  rows: dict[str, list[dict[str, Any]]], timings: dict[str, Any], dev: torch.device,
                  wall: float, *, input_dim: int, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All headline figures from the stage rows (see the README for the meaning of each)."""
    from certaudit.audits import certified as cert_mod
    from certaudit.audits import spoofing as spoof_mod

    eps = float(settings.eps)
    head: dict[str, Any] = {"defense": source.defense.lower(), "norm": norm, "eps": eps,
                            "images": len(source.indices)}
    out: dict[str, Any] = {
        "kind": "certaudit-audit", "summary_version": SUMMARY_VERSION,
        "config": {"model": source.model, "model_sha256": source.model_sha256, "arch": source.arch,
                   "defense": source.defense.lower(), "dataset": source.dataset, "split": source.split,
                   "indices": _ranges(source.indices), "images": len(source.indices), "norm": norm,
                   "input_dim": int(input_dim), "defense_settings": guard.settings(),
                   "defense_diagnostics": guard.diagnostics(),
                   "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
                   **({"extra": source.extra} if source.extra else {})},
        "seed": settings.seed, "device": _device_info(dev), "versions": _versions(),
        "stages": list(settings.stages), "headline": head,
    }
    if class_names is not None:
        out["config"]["classes"] = list(class_names)
    if "clean" in rows:
        r = rows["clean"]
        head["clean_accuracy"] = _rate(sum(bool(v["correct"]) for v in r), len(r))
        out["clean"] = {"images": len(r), "accuracy": head["clean_accuracy"]}
    if "certify" in rows:
        r = rows["certify"]
        radii = sorted(set(cert_mod.default_radii(norm)) | {0.0, eps / 2, eps, 2 * eps})
        c = cert_mod.summarize(r, radii, eps=eps)
        out["certification"] = c
        head.update({"certified_clean_accuracy": c.get("clean_accuracy"), "abstain_rate": c.get("abstain_rate"),
                     "vra_eps": c.get("vra_eps"), "vra_2eps": c.get("vra_2eps"),
                     "rejection_rate_eps": c.get("rejection_rate_eps")})
        if r:
            from certaudit.audits.degradation import default_curve_radii, fpr_curve

            grid = sorted(set(default_curve_radii(r, 40)) | {eps, 2 * eps})
            out["fpr_curve"] = fpr_curve(r, grid)
    if "degrade" in rows:
        from certaudit.audits.degradation import summarize_degradation

        d = summarize_degradation(rows["degrade"], eps, proof=guard.proof_name) if rows["degrade"] else {"test": 0}
        out["degradation"] = d
        for key in ("testR", "testA_lower", "testA_upper", "testA_2eps_check", "fpr_lower", "fpr_upper",
                    "fpr_2eps_check", "utility_reduction_lower", "utility_reduction_upper",
                    "utility_reduction_2eps_check", "lower_over_upper", "upper_bound"):
            head[key] = d.get(key)
        inv = d.get("invariant") or {}
        head["lower_subset_upper"] = inv.get("lower_subset_upper")
        head["broken_certificates"] = len(d.get("label_changed") or [])
    if "spoof" in rows:
        sp = spoof_mod.summarize(rows["spoof"], eps)
        out["spoofing"] = sp
        head.update({"spoof_images": sp.get("images"), "spoof_attacked": sp.get("attacked"),
                     "spoof_success_rate": sp.get("success_rate"),
                     "natural_radius_mean": sp.get("natural_radius_mean"),
                     "shadow_radius_mean": sp.get("shadow_radius_mean"),
                     "spoofed_beats_natural": sp.get("spoofed_beats_natural"),
                     "robust_error": sp.get("robust_error"), "attack_error": sp.get("attack_error")})
    out["timings"] = {"stages": timings, "wall_seconds_this_run": round(wall, 3)}
    out["coverage"] = coverage(norm, eps, input_dim)
    return _clean_json(out)


def coverage(norm: str, eps: float, input_dim: int) -> dict[str, Any]:
    """What an ε-certificate covers in the other norm (ℓ∞ ball of ε has ℓ2 radius ε·√d)."""
    root = math.sqrt(input_dim)
    if norm == "l2":
        return {"norm": "l2", "eps": eps, "input_dim": input_dim, "linf_radius_covered": eps / root,
                "linf_radius_covered_255": eps / root * 255, "l2_radius_of_linf_ball_eps": eps * root}
    return {"norm": "linf", "eps": eps, "input_dim": input_dim, "l2_radius_covered": eps,
            "l2_radius_of_linf_ball_eps": eps * root}


def _ranges(indices: Sequence[int]) -> list[list[int]]:
    """Indices as [start, stop, step] runs (compact and exact)."""
    out: list[list[int]] = []
    idx = [int(i) for i in indices]
    i = 0
    while i < len(idx):
        j = i + 1
        step = idx[j] - idx[i] if j < len(idx) else 1
        while j < len(idx) and idx[j] - idx[j - 1] == step and step > 0:
            j += 1
        if j - i == 1:
            step = 1
        out.append([idx[i], idx[j - 1] + step, step])
        i = j
    return out


def expand_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [i for a, b, s in ranges for i in range(a, b, s)]


def _clean_json(obj: Any) -> Any:
    """NaN/inf → None (JSON has neither), tuples → lists, numpy scalars → Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------- JSON schema

_NUM = {"type": ["number", "null"]}
_RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_COUNT = {"type": "integer", "minimum": 0}

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "certaudit audit summary",
    "type": "object",
    "required": ["kind", "summary_version", "config", "seed", "device", "versions", "stages", "headline",
                 "timings", "coverage"],
    "properties": {
        "kind": {"enum": ["certaudit-audit"]},
        "summary_version": {"enum": [SUMMARY_VERSION]},
        "seed": {"type": "integer"},
        "stages": {"type": "array", "items": {"enum": list(STAGES)}},
        "config": {
            "type": "object",
            "required": ["model", "defense", "dataset", "split", "indices", "images", "norm", "input_dim",
                         "defense_settings", "settings"],
            "properties": {
                "model": {"type": "string"}, "model_sha256": {"type": ["string", "null"]},
                "defense": {"enum": ["smoothing", "lipschitz", "interval"]},
                "dataset": {"type": "string"}, "split": {"enum": ["train", "test"]},
                "indices": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                "images": {"type": "integer", "minimum": 1}, "norm": {"enum": ["l2", "linf"]},
                "input_dim": {"type": "integer", "minimum": 1},
                "defense_settings": {"type": "object"},
                "settings": {"type": "object", "required": ["eps", "seed", "attack"],
                             "properties": {"eps": {"type": "number", "exclusiveMinimum": 0}}},
            },
        },
        "device": {"type": "object", "required": ["type", "cpu_count", "torch_threads"],
                   "properties": {"type": {"type": "string"}}},
        "versions": {"type": "object", "required": ["certaudit", "python", "torch", "numpy"],
                     "properties": {k: {"type": "string"} for k in ("certaudit", "python", "torch", "numpy")}},
        "headline": {
            "type": "object",
            "required": ["defense", "norm", "eps", "images"],
            "properties": {
                "defense": {"type": "string"}, "norm": {"enum": ["l2", "linf"]},
                "eps": {"type": "number", "exclusiveMinimum": 0}, "images": {"type": "integer", "minimum": 1},
                **{k: _RATE for k in ("clean_accuracy", "certified_clean_accuracy", "abstain_rate", "vra_eps",
                                      "vra_2eps", "rejection_rate_eps", "fpr_lower", "fpr_upper",
                                      "utility_reduction_lower", "utility_reduction_upper", "lower_over_upper",
                                      "fpr_2eps_check", "utility_reduction_2eps_check",
                                      "spoof_success_rate", "spoofed_beats_natural", "robust_error",
                                      "attack_error")},
                **{k: _COUNT for k in ("testR", "testA_lower", "testA_2eps_check", "broken_certificates",
                                       "spoof_images", "spoof_attacked")},
                "testA_upper": {"type": ["integer", "null"], "minimum": 0}, "upper_bound": {"type": "string"},
                "natural_radius_mean": _NUM, "shadow_radius_mean": _NUM,
                "lower_subset_upper": {"type": ["boolean", "null"]},
            },
        },
        "clean": {"type": "object", "required": ["images", "accuracy"]},
        "certification": {"type": "object", "required": ["images", "certified_accuracy"],
                          "properties": {"certified_accuracy": {"type": "array", "items": {
                              "type": "object", "required": ["radius", "accuracy"],
                              "properties": {"radius": {"type": "number", "minimum": 0}, "accuracy": _RATE,
                                             "source": {"type": "string"}}}}}},
        "fpr_curve": {"type": "array", "items": {"type": "object",
                                                  "required": ["radius", "testR", "fpr_2r_check"],
                                                  "properties": {"radius": {"type": "number"}, "testR": _COUNT,
                                                                 "fpr_2r_check": _RATE}}},
        "degradation": {"type": "object", "required": ["test"]},
        "spoofing": {"type": "object", "required": ["images"]},
        "timings": {"type": "object", "required": ["stages", "wall_seconds_this_run"],
                    "properties": {"wall_seconds_this_run": {"type": "number", "minimum": 0},
                                   "stages": {"type": "object", "additionalProperties": {
                                       "type": "object", "required": ["wall_seconds_this_run", "new_images",
                                                                      "row_seconds"]}}}},
        "coverage": {"type": "object", "required": ["norm", "eps", "input_dim"]},
    },
}

__all__ = ["STAGES", "AuditSettings", "AuditSource", "run_audit", "build_summary", "load_examples", "coverage",
           "expand_ranges", "SUMMARY_SCHEMA"]
