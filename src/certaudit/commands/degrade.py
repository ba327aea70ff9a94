"""``certaudit degrade``: degradation attacks against a certified run-time defense, and the §3.3 audit.

Two modes:

* with ``--model``: certify every image at ε and 2ε, attack the ones certified at ε, re-check every
  candidate (distance, box, the real Algorithm 2.1, fresh noise for smoothing) and write one row
  per image (resumable); print the Tables 1–2 columns (baseline VRA, FPR, utility reduction) for
  the lower bound (attacks), the proven upper bound (the defense's proof of non-degradability) and
  the run-time method's 2ε check, per attack;
* with ``--from-log FILE``: the 2ε check and its FPR-against-radius curve (Figures 2–3) from an
  existing certification log (our certify rows or Cohen et al.'s tab-separated logs), no model run;
  a log proves nothing about monotonicity, so these are not called bounds.

Examples::

    certaudit degrade --model gloro.safetensors --defense lipschitz --eps 0.3 --attack all \\
        --dataset fashion-mnist --out rows.jsonl --plot fpr.png
    certaudit degrade --from-log data/certify/cifar10/resnet110/noise_0.25/test/sigma_0.25 --eps 0.5
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from certaudit.commands._common import (
    say_if_long,
    check_output,
    MODEL_HELP,
    WEIGHTS_HELP,
    console,
    err_console,
    load_model_for_data,
    parse_number,
    print_json,
    progress_bar,
)
from certaudit.errors import InputError

ATTACK_CHOICES = ("pgd", "pgd-2eps", "spgd", "margin", "all", "identity")


def register(app: typer.Typer) -> None:
    app.command("degrade", help="Degradation attacks (forced rejections of certified inputs): lower bounds by "
                                "attack, proven upper bounds and the 2ε check; or the 2ε check from a certification "
                                "log.")(degrade_cmd)


def degrade_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    defense: str = typer.Option("lipschitz", "--defense", help="smoothing, lipschitz or interval"),
    eps: str = typer.Option(..., "--eps", help="attack radius ε (norm of the defense: ℓ2, or ℓ∞ for interval)"),
    attack: str = typer.Option("all", "--attack", help="pgd (Alg 3.1), pgd-2eps (Alg B.1), spgd (Alg 3.2, smoothing), "
                                                       "margin (certificate-aware), a comma list, or all; the first "
                                                       "success counts; identity (x' = x) is a control"),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="with several attacks: run every attack on every "
                                                                 "certified image (per-attack lower bounds)"),
    prune: bool = typer.Option(False, "--prune", help="lipschitz / interval: do not attack inputs the defense proves "
                                                       "non-degradable (2ε check, or IBP at 2ε for CROWN)"),
    steps: int = typer.Option(50, "--steps", help="PGD steps per restart"),
    restarts: int = typer.Option(1, "--restarts", help="PGD restarts (margin on lipschitz: targeted runner-ups)"),
    step_size: Optional[str] = typer.Option(None, "--step-size", help="PGD step (default 2.5·radius/steps)"),
    samples: int = typer.Option(32, "--samples", help="smoothing: noisy copies per SPGD/margin step"),
    check_every: int = typer.Option(1, "--check-every", help="deterministic defenses: ask Algorithm 2.1 every K "
                                                             "steps whether the iterate is rejected (early stop)"),
    method: Optional[str] = typer.Option(None, "--method", help="interval: ibp, crown-ibp or crown"),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="smoothing σ (default: the model's training σ)"),
    n0: int = typer.Option(100, "--n0", help="smoothing: selection samples of CERTIFY"),
    n: int = typer.Option(10_000, "--n", help="smoothing: estimation samples of CERTIFY (clean and re-check)"),
    alpha: str = typer.Option("0.001", "--alpha", help="smoothing: failure probability of each certificate"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="samples per forward pass (smoothing)"),
    seed: int = typer.Option(0, "--seed", help="seed of the attacks and the certificate noise"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data set (default: the model's own)"),
    split: str = typer.Option("test", "--split", help="train or test"),
    limit: Optional[int] = typer.Option(None, "--limit", help="audit K images"),
    skip: int = typer.Option(0, "--skip", help="start at image J"),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="images per batched attack and per write of rows "
                                                               "(default 256; smoothing 20)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the data set files"),
    out: Optional[Path] = typer.Option(None, "--out", help="rows file (.jsonl); rerun with the same path to resume"),
    from_log: Optional[List[Path]] = typer.Option(None, "--from-log", help="certification log (certaudit rows or "
                                                                           "Cohen et al.'s TSV): the 2ε check without a "
                                                                           "model; repeat to compare models (one plot)"),
    radii: Optional[str] = typer.Option(None, "--radii", help="comma list of radii for the FPR curve"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: the FPR's 2r check and VRA against radius"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    eps_v = parse_number(eps, "--eps", positive=True, allow_zero=False)
    if plot is not None and plot.suffix.lower() != ".png":
        raise InputError(f"--plot must name a .png file, got {plot}")
    radii_v = None
    if radii is not None:
        radii_v = [parse_number(p, "--radii", positive=True, allow_zero=False) for p in radii.replace(" ", "").split(",") if p]
        if not radii_v:
            raise InputError("--radii needs at least one radius")
    check_output(plot, "--plot")
    if from_log:
        if model is not None:
            raise InputError("give either --model (run attacks) or --from-log (the 2ε check from a log), not both")
        return _from_log(from_log, eps_v, radii_v, plot, as_json)
    if model is None:
        raise InputError("--model is required (or --from-log FILE for the 2ε check from a certification log)")
    for a in attack.lower().replace(" ", "").split(","):
        if a not in ATTACK_CHOICES:
            raise InputError(f"unknown --attack {a!r}; choose one of: {', '.join(ATTACK_CHOICES)} (or a comma list)")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if skip < 0:
        raise InputError(f"--skip must be >= 0, got {skip}")
    if chunk is None:
        from certaudit.defenses.registry import defense_class

        chunk = 20 if defense_class(defense).randomized else 256  # a CERTIFY per image and attack: small chunks
    if chunk < 1:
        raise InputError(f"--chunk must be >= 1, got {chunk}")
    _run(model=model, weights=weights, defense=defense.lower(), eps=eps_v, attack=attack.lower(), exhaustive=exhaustive, prune=prune,
         attack_options={"steps": steps, "restarts": restarts,
                         "step_size": None if step_size is None else parse_number(step_size, "--step-size", positive=True,
                                                                                  allow_zero=False),
                         "samples": samples, "check_every": check_every},
         defense_options={"method": method, "sigma": None if sigma is None else parse_number(sigma, "--sigma"),
                          "n0": n0, "n": n, "alpha": parse_number(alpha, "--alpha"), "batch_size": batch_size,
                          "seed": seed},
         seed=seed, device=device, dataset=dataset, split=split, limit=limit, skip=skip, chunk=chunk,
         data_root=data_root, out=out, radii=radii_v, plot=plot, as_json=as_json)


def _run(*, model: Path, weights: Path | None, defense: str, eps: float, attack: str, exhaustive: bool, prune: bool,
         attack_options: dict[str, Any],
         defense_options: dict[str, Any], seed: int, device: str, dataset: str | None, split: str, limit: int | None,
         skip: int, chunk: int, data_root: Path | None, out: Path | None, radii: list[float] | None,
         plot: Path | None, as_json: bool) -> None:
    from certaudit.attacks.degradation import AttackConfig, attacks_for
    from certaudit.audits.degradation import ROW_FORMAT, degrade_batch, fpr_curve, plot_fpr_curves, summarize_degradation
    from certaudit.data import load_dataset
    from certaudit.defenses.registry import build_defense
    from certaudit.audits.runner import run_rows
    from certaudit.distributed import device_for
    from certaudit.distributed import init as dist_init
    from certaudit.distributed import shutdown as dist_shutdown
    from certaudit.models import resolve_device

    check_output(out, "--out")
    check_output(plot, "--plot")
    env = dist_init()  # rank 0 of 1 unless launched by torchrun / accelerate
    dev = device_for(env, resolve_device(device))
    net, meta, info, model_sha = load_model_for_data(model, dataset, dev, weights)
    opts = {k: v for k, v in {**defense_options, "eps": eps}.items() if v is not None}  # each defense takes its own
    guard = build_defense(defense, net, meta, opts)
    names = attacks_for(guard, attack)  # refuses spgd on deterministic defenses early
    if prune and guard.proof_name is None:
        raise InputError(f"--prune needs a defense that proves non-degradability; {defense} "
                         f"({', '.join(f'{k}={v}' for k, v in guard.settings().items() if k == 'method') or 'this one'}) "
                         "has no such proof")
    # a radius that costs a search (interval bisection: ~11 bound passes per image) only for the --plot curve
    full_radius = not guard.radius_is_search or plot is not None
    cfg = AttackConfig.from_options(attack_options)
    x, y = load_dataset(info.name, split, data_root)
    if skip >= len(y):
        raise InputError(f"--skip {skip} is past the end of {info.name} {split} ({len(y)} images)")
    stop = len(y) if limit is None else min(len(y), skip + limit)
    wanted = list(range(skip, stop))
    settings = guard.settings()  # stable values only: computed constants are diagnostics, not in the hash
    config = {"verb": "degrade", "model_sha256": model_sha, "arch": meta.arch, "defense": defense,
              "settings": settings, "eps": eps, "attack": attack, "attacks": names, "exhaustive": exhaustive,
              "prune": prune, "attack_config": cfg.as_dict(), "seed": seed, "chunk": chunk, "dataset": info.name, "split": split,
              "row_format": ROW_FORMAT, "full_radius": full_radius,
              "device": dev.type}
    # attacks are seeded per batch: the run loop's fixed blocks keep the batches (hence the rows) the
    # same whatever the number of processes and however often the run resumed
    with progress_bar(enabled=env.is_main) as bar:
        task = bar.add_task(f"degrade ({defense}, {attack})", total=None)
        run = run_rows(lambda idx: degrade_batch(guard, x[idx], y[idx], eps, attack=attack, seed=seed, indices=idx,
                                                 exhaustive=exhaustive, prune=prune, full_radius=full_radius,
                                                 **cfg.as_dict()),
                       wanted, out=out, config=config, env=env, block=chunk,
                       progress=lambda done, total: bar.update(task, completed=done, total=total),
                       estimate=say_if_long(env.is_main and not as_json),
                       announce=None if as_json or not env.is_main else lambda k: err_console.print(
                           f"resuming {out}: {k} of {len(wanted)} images already audited"))
    dist_shutdown(env)
    if not env.is_main:
        return
    rows_all, new_images, wall = run.rows, run.new_images, run.wall_seconds

    summary = summarize_degradation(rows_all, eps, proof=guard.proof_name)
    radius_known = all(r.get("radius") is not None for r in rows_all)
    norm_name = guard.norm.value
    grid = radii if radii is not None else [eps / 2, eps, 1.5 * eps, 2 * eps]
    summary = {"model": str(model), "defense": defense, "norm": norm_name, "dataset": info.name, "split": split,
               "range": [skip, stop], "attack": attack, "attacks": names, "exhaustive": exhaustive,
               "prune": prune, "attack_config": cfg.as_dict(), "settings": settings, "device": str(dev), "new_images": new_images,
               "wall_seconds": round(wall, 3), **summary,
               "fpr_curve": fpr_curve(rows_all, grid) if plot is not None or radius_known else [],
               **({} if plot is not None or radius_known else
                  {"curve_note": "no FPR curve: the interval defense's radius is a bisection, run only with --plot"})}
    if env.distributed:
        summary["processes"] = env.world_size
    if new_images and wall > 0:
        summary["images_per_second_this_run"] = new_images / wall
    if out is not None:
        summary["out"] = str(out)
    if plot is not None:
        plot_fpr_curves({Path(model).stem: rows_all}, plot, radii=radii, eps=eps, norm=norm_name,
                        title=f"{Path(model).name}: {len(rows_all)} {split} images")
        summary["plot"] = str(plot)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)


def _from_log(paths: list[Path], eps: float, radii: list[float] | None, plot: Path | None, as_json: bool) -> None:
    from certaudit.audits.degradation import (
        default_curve_radii, fpr_curve, plot_fpr_curves, read_certification_log, upper_from_log,
    )

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
            grid = radii if radii is not None else default_curve_radii(rows, 20)
            entry["fpr_curve"] = fpr_curve(rows, grid)
        summaries.append(entry)
        name = path.name if path.name not in curves else str(path)
        curves[name] = rows
    if plot is not None:
        if any(not e["fpr_curve"] for e in summaries):
            raise InputError("--plot needs rows with radii (these hold checks at given radii only)")
        title = f"{paths[0].name}: {len(curves[next(iter(curves))])} images" if len(paths) == 1 else None
        plot_fpr_curves(curves, plot, radii=radii, eps=eps, title=title)
        for s in summaries:
            s["plot"] = str(plot)
    if as_json:
        print_json(summaries[0] if len(summaries) == 1 else {"logs": summaries})
        return
    for summary in summaries:
        _print_log_summary(summary, eps)
    if plot is not None:
        console.print(f"plot: {plot}")


def _print_log_summary(summary: dict[str, Any], eps: float) -> None:
    from rich.table import Table

    console.print(f"[bold]2ε check[/bold] from {summary['log']} ({summary['format']} format, "
                  f"{summary['test']} images), ε = {eps:.4g}")
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    for key in ("testR", "testA_2eps_check", "vra_eps", "vra_2eps", "fpr_2eps_check", "utility_reduction_2eps_check"):
        stats.add_row(key, _fmt(summary[key]))
    stats.add_row("certified at r from", summary.get("source", ""))
    console.print(stats)
    console.print("(the 2ε check, not a proven bound: a log says nothing about the certifier; `degrade --model` "
                  "gives the proven upper bound; see docs/degradation.md)")
    if summary["fpr_curve"]:
        _print_curve(summary["fpr_curve"])
    elif summary.get("curve_note"):
        console.print(summary["curve_note"])


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _print_curve(curve: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="FPR by the 2r check against radius (Fig. 2/3)")
    for col in ("radius", "testR", "testA (2r check)", "FPR (2r check)", "VRA(r)", "VRA(2r)", "from"):
        table.add_column(col, justify="right")
    for p in curve:
        table.add_row(f"{p['radius']:.4g}", str(p["testR"]), str(p["testA_2r_check"]), _fmt(p["fpr_2r_check"]),
                      _fmt(p["vra"]), _fmt(p["vra_2r"]), p.get("source", ""))
    console.print(table)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"[bold]degradation[/bold] of {s['defense']} on {s['dataset']} ({s['split']}), {s['test']} images, "
                  f"ε = {s['eps']:.4g} ({s['norm']}), attack {s['attack']}")
    table = Table()
    for col in ("bound", "baseline VRA", "false positive rate", "utility reduction", "|testA|", "of upper"):
        table.add_column(col, justify="right")
    vra = _pct(s["vra_eps"])
    table.add_row("lower (attacks)", vra, _pct(s["fpr_lower"]), _pct(s["utility_reduction_lower"]),
                  str(s["testA_lower"]), _pct(s["lower_over_upper"]))
    for name, d in s.get("per_attack", {}).items():
        if d["tried"]:
            table.add_row(f"  {name}", vra, _pct(d["fpr_lower"]), _pct(d["utility_reduction_lower"]),
                          str(d["succeeded"]), _pct(d["lower_over_upper"]))
    table.add_row("upper (proven)", vra, _pct(s["fpr_upper"]), _pct(s["utility_reduction_upper"]),
                  "n/a" if s["testA_upper"] is None else str(s["testA_upper"]),
                  "n/a" if s["testA_upper"] is None else "100.0")
    table.add_row("2ε check (run-time method)", vra, _pct(s["fpr_2eps_check"]), _pct(s["utility_reduction_2eps_check"]),
                  str(s["testA_2eps_check"]), "")
    console.print(table)
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    stats.add_row("testR (certified and correct at ε)", str(s["testR"]))
    stats.add_row(f"VRA at 2ε = {2 * s['eps']:.4g}", _pct(s["vra_2eps"]))
    stats.add_row("upper bound", s["upper_bound"])
    inv = s["invariant"]
    if inv["lower_subset_upper"] is None:
        verdict = "nothing to check (no proven upper bound)"
    else:
        verdict = "holds" if inv["lower_subset_upper"] else f"VIOLATED on {len(inv['violations'])} images (BUG)"
    stats.add_row("invariant testA_lower ⊆ testA_upper (proven)", verdict)
    if inv.get("outside_2eps_check"):
        stats.add_row("degraded although accepted at 2ε (non-monotone check)", str(len(inv["outside_2eps_check"])))
    if s.get("label_changed"):
        stats.add_row("certificate broken (x' accepted with another label)", str(s["label_changed"][:10]))
    stats.add_row("wall time (this run)", f"{s['wall_seconds']:.1f} s ({s['new_images']} new images)")
    if s.get("out"):
        stats.add_row("rows", s["out"])
    if s.get("plot"):
        stats.add_row("plot", s["plot"])
    console.print(stats)
    if not inv["lower_subset_upper"] and inv["bug"]:
        err_console.print("[bold red]bug:[/bold red] an input the defense had proven non-degradable was degraded. "
                          "Please report it with the rows file.")


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"
