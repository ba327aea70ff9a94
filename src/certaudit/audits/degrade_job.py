"""The degrade verb as library calls: degradation attacks with rows + summary, or the 2ε check from logs.

:func:`degrade_job` certifies every image at ε and 2ε, attacks the ones certified at ε, re-checks
every candidate (distance, box, the run-time check itself, fresh noise for smoothing) and writes one
row per image (resumable) through :func:`certaudit.audits.degradation.degrade_batch`; its summary
has the lower bound (attacks), the proven upper bound (the defense's proof of non-degradability)
and the run-time method's 2ε check. :func:`degrade_from_logs` reads certification logs (certaudit
rows or Cohen et al.'s TSV) and gives the 2ε check and its curve: a log proves nothing about the
certifier, so these are not called bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from certaudit.attacks.degradation import AttackConfig, attacks_for
from certaudit.audits.degradation import (
    ROW_FORMAT, check_proofs, default_curve_radii, degrade_batch, fpr_curve, plot_fpr_curves, read_certification_log,
    summarize_degradation, upper_from_log,
)
from certaudit.audits.session import Session, check_output, check_plot, check_range
from certaudit.defenses.registry import defense_class
from certaudit import validate
from certaudit.errors import InputError

ATTACK_CHOICES = ("pgd", "pgd-2eps", "spgd", "margin", "all", "identity")


def check_attack(attack: str) -> str:
    """A known attack name or a comma list of them, lower case."""
    attack = str(attack).lower()
    for a in attack.replace(" ", "").split(","):
        if a not in ATTACK_CHOICES:
            raise InputError(f"unknown --attack {a!r}; choose one of: {', '.join(ATTACK_CHOICES)} (or a comma list)")
    return attack


def degrade_job(model: Any, *, eps: float, weights: Any = None, defense: str = "lipschitz", attack: str = "all",
                exhaustive: bool = False, prune: bool = False, proofs: Sequence[str] | None = None,
                upper_n: int | None = None, proof_budget: float | None = None,
                attack_options: dict[str, Any] | None = None,
                defense_options: dict[str, Any] | None = None, seed: int = 0, device: str = "auto",
                dataset: str | None = None, split: str = "test", limit: int | None = None, skip: int = 0,
                chunk: int | None = None, data_root: Any = None, out: Any = None,
                radii: Sequence[float] | None = None, plot: Any = None, quiet: bool = False) -> dict[str, Any] | None:
    """Attack images ``skip .. skip+limit`` at radius ``eps``; rows to ``out`` (resumable); the summary
    (``None`` on the ranks other than 0 of a multi-process launch)."""
    attack = check_attack(attack)
    check_range(limit, skip)
    name = defense.lower()
    cls = defense_class(name)
    chunk = chunk if chunk is not None else (20 if cls.randomized else 256)  # a CERTIFY per image and attack
    if chunk < 1:
        raise InputError(f"--chunk must be >= 1, got {chunk}")
    check_output(out, "--out")
    check_plot(plot)
    s = Session.open(model, weights=weights, dataset=dataset, device=device, quiet=quiet)
    opts = {k: v for k, v in {**(defense_options or {}), "seed": seed, "eps": eps}.items() if v is not None}
    guard = cls.from_options(s.net, s.meta, opts)  # each defense takes its own options
    upper = None
    if upper_n is not None:  # smoothing: the 2ε check through the sequential test, budget upper_n per input
        if not cls.sequential_test:
            raise InputError(f"--upper-n is the sequential 2ε check of randomized smoothing; {name} has no such test")
        upper_n = validate.count(upper_n, "--upper-n")
        upper = cls.from_options(s.net, s.meta, {**opts, "sequential": True, "n": upper_n})
    names = attacks_for(guard, attack)  # refuses spgd on deterministic defenses early
    if prune and guard.proof_name is None:
        raise InputError(f"--prune needs a defense that proves non-degradability; {name} "
                         f"({', '.join(f'{k}={v}' for k, v in guard.settings().items() if k == 'method') or 'this one'}) "
                         "has no such proof")
    # a radius that costs a search (interval bisection: ~11 bound passes per image) only for the --plot curve
    full_radius = not guard.radius_is_search or plot is not None
    methods = check_proofs(guard, proofs)
    if proof_budget is not None:
        proof_budget = validate.positive(proof_budget, "--proof-budget")
        if "milp" not in methods:
            raise InputError("--proof-budget is the time per input of the branch-and-bound proof (milp): give "
                             "--proofs all (small networks, with the `exact` extra); "
                             f"this run's proofs: {', '.join(methods) or 'none'}")
    cfg = AttackConfig.from_options({k: v for k, v in (attack_options or {}).items() if v is not None})
    x, y, wanted = s.data(split, data_root, skip=skip, limit=limit)
    settings = guard.settings()  # stable values only: computed constants are diagnostics, not in the hash
    config = {"verb": "degrade", "model_sha256": s.model_sha, "arch": s.meta.arch, "defense": name,
              "settings": settings, "eps": eps, "attack": attack, "attacks": names, "exhaustive": exhaustive,
              "prune": prune, "proofs": methods, "proof_budget": proof_budget, "upper_n": upper_n,
              "attack_config": cfg.as_dict(), "seed": seed,
              "chunk": chunk, "dataset": s.info.name,
              "split": split, "row_format": ROW_FORMAT, "full_radius": full_radius, "device": s.device.type}
    # attacks are seeded per batch: the run loop's fixed blocks keep the batches (hence the rows) the
    # same whatever the number of processes and however often the run resumed
    run = s.run(lambda idx: degrade_batch(guard, x[idx], y[idx], eps, attack=attack, seed=seed, indices=idx,
                                          exhaustive=exhaustive, prune=prune, full_radius=full_radius, proofs=methods,
                                          upper=upper, proof_budget=proof_budget,
                                          **cfg.as_dict()),
                wanted, out=out, config=config, block=chunk, label=f"degrade ({name}, {attack})",
                done_noun="audited")
    if not s.env.is_main:
        return None
    rows = run.rows
    radius_known = all(r.get("radius") is not None for r in rows)
    norm = guard.norm.value
    summary = {"model": str(model), "defense": name, "norm": norm, "dataset": s.info.name, "split": split,
               "range": [skip, wanted[-1] + 1], "attack": attack, "attacks": names, "exhaustive": exhaustive,
               "prune": prune, "proofs": methods, "proof_budget": proof_budget, "upper_n": upper_n,
               "attack_config": cfg.as_dict(), "settings": settings,
               **s.run_fields(run, out),
               **summarize_degradation(rows, eps, proof=proof_text(guard, methods))}
    if plot is not None or radius_known:
        summary["fpr_curve"] = fpr_curve(rows, list(radii) if radii is not None else
                                         [eps / 2, eps, 1.5 * eps, 2 * eps])
    else:
        summary["fpr_curve"] = []
        summary["curve_note"] = "no FPR curve: the interval defense's radius is a bisection, run only with --plot"
    if plot is not None:
        plot_fpr_curves({Path(str(model)).stem: rows}, plot, radii=radii, eps=eps, norm=norm,
                        title=f"{Path(str(model)).name}: {len(rows)} {split} images")
        summary["plot"] = str(plot)
    return summary


def proof_text(defense: Any, methods: Sequence[str]) -> str | None:
    """What the proven upper bound rests on: the defense's first proof, and the costlier ones run."""
    name = defense.proof_name
    if name is None or len(methods) <= 1:
        return name
    return f"{name}; then, where the attacks and that left it open: {', '.join(methods[1:])} (rows: proven_by)"


def degrade_from_logs(paths: Sequence[Any], eps: float, *, radii: Sequence[float] | None = None,
                      plot: Any = None) -> list[dict[str, Any]]:
    """The 2ε check (and its curve against radius) of each certification log; one plot for all."""
    check_plot(plot)
    summaries, curves = [], {}
    for path in paths:
        fmt, rows = read_certification_log(path)
        if not rows:
            raise InputError(f"{path}: no certification rows")
        entry = {"log": str(path), "format": fmt, **upper_from_log(rows, eps)}
        if any(r.get("radius") is None for r in rows):
            entry["fpr_curve"] = []
            entry["curve_note"] = "rows hold checks at given radii only (no radius): no curve"
        else:
            entry["fpr_curve"] = fpr_curve(rows, list(radii) if radii is not None else default_curve_radii(rows, 20))
        summaries.append(entry)
        curves[Path(path).name if Path(path).name not in curves else str(path)] = rows
    if plot is not None:
        if any(not e["fpr_curve"] for e in summaries):
            raise InputError("--plot needs rows with radii (these hold checks at given radii only)")
        title = f"{Path(paths[0]).name}: {len(curves[next(iter(curves))])} images" if len(paths) == 1 else None
        plot_fpr_curves(curves, plot, radii=radii, eps=eps, title=title)
        for entry in summaries:
            entry["plot"] = str(plot)
    return summaries


__all__ = ["ATTACK_CHOICES", "check_attack", "degrade_from_logs", "degrade_job"]
