"""``certaudit certify``: certify every image of a data set split with a defense; rows + summary.

Rows (one JSON object per image, written as produced, resumed after a crash): ``index``,
``label``, ``prediction`` (ABSTAIN = -1), ``radius``, ``correct``, ``seconds`` and the defense's
extras (for smoothing: ``counts_selection``, ``counts``, ``p_lower``). The summary is computed by
:mod:`certaudit.audits.certified` from all rows of the selected range, old and new.

Example (randomized smoothing, Cohen et al.'s settings)::

    certaudit certify --model m.safetensors --defense smoothing --sigma 0.25 \\
        --n0 100 --n 100000 --alpha 0.001 --dataset cifar10 --limit 500 --out rows.jsonl

Several processes (:mod:`certaudit.distributed`; gloo on CPU, one GPU per process with CUDA): each
rank certifies its share of the images into ``rows.jsonl.rank{K}``, rank 0 merges them into
``--out`` and prints the summary; the rows are the same as with one process::

    torchrun --nproc_per_node 2 -m certaudit certify --model m.safetensors --out rows.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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



def register(app: typer.Typer) -> None:
    app.command("certify", help="Certify a data set split with a defense (smoothing, lipschitz, interval); "
                                "write one row per image and print certified accuracy at radii.")(certify_cmd)


def certify_cmd(
    model: Path = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    defense: str = typer.Option("smoothing", "--defense", help="smoothing, lipschitz or interval"),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="smoothing noise σ (default: the model's training σ)"),
    n0: int = typer.Option(100, "--n0", help="smoothing: selection samples per image"),
    n: int = typer.Option(100_000, "--n", help="smoothing: estimation samples per image"),
    alpha: str = typer.Option("0.001", "--alpha", help="smoothing: failure probability of each certificate"),
    method: Optional[str] = typer.Option(None, "--method", help="interval: ibp, crown-ibp or crown (default: crown)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="also report VRA at ε and 2ε and the clean rejection rate at ε"),
    sequential: bool = typer.Option(False, "--sequential", help="smoothing: only decide certification at --eps, with an "
                                    "anytime-valid test that stops per image when decided (--n is the budget)"),
    radii: Optional[str] = typer.Option(None, "--radii", help="comma list of radii for the table, e.g. 0,0.25,0.5 or 0,2/255 "
                                        "(each checked exactly by the defense)"),
    full_radius: bool = typer.Option(False, "--full-radius", help="interval: also find each image's largest certified "
                                     "radius by bisection (default only without --eps and --radii)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="samples per forward pass (default: from memory)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (bf16: certificate about the bf16 model)"),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels-last memory layout (CUDA speed-up)"),
    seed: int = typer.Option(0, "--seed", help="noise seed; image i's noise derives from (seed, i)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data set (default: the model's own)"),
    split: str = typer.Option("test", "--split", help="train or test"),
    limit: Optional[int] = typer.Option(None, "--limit", help="certify K images"),
    skip: int = typer.Option(0, "--skip", help="start at image J"),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="images per certify call (default: automatic)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the data set files"),
    out: Optional[Path] = typer.Option(None, "--out", help="rows file (.jsonl); rerun with the same path to resume"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of certified accuracy against radius"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:

    from certaudit.audits.certified import certification_rows, default_radii, summarize
    from certaudit.audits.runner import run_rows
    from certaudit.data import load_dataset
    from certaudit.defenses.registry import build_defense, defense_class
    from certaudit.distributed import device_for
    from certaudit.distributed import init as dist_init
    from certaudit.distributed import shutdown as dist_shutdown
    from certaudit.models import resolve_device

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise InputError(f"--plot must name a .png file, got {plot}")
    if skip < 0:
        raise InputError(f"--skip must be >= 0, got {skip}")
    if chunk is not None and chunk < 1:
        raise InputError(f"--chunk must be >= 1, got {chunk}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    cls = defense_class(defense)  # its declared capabilities decide which options apply
    eps_v = None if eps is None else parse_number(eps, "--eps", positive=True, allow_zero=False)
    if sequential and (eps_v is None or not cls.sequential_test):
        raise InputError("--sequential needs a defense with a sequential test (smoothing) and --eps (the radius "
                         "to decide)")
    radii_v = None if radii is None else _parse_radii(radii)
    if sequential and (radii_v is not None or full_radius or plot is not None):
        raise InputError("--sequential decides certification at --eps only: it gives no radius for --radii, "
                         "--full-radius or --plot")
    if full_radius and not cls.radius_is_search:
        raise InputError(f"--full-radius applies to defenses whose radius is a search (interval); {defense} "
                         "always gives the radius")
    if method is not None and not cls.methods:
        raise InputError(f"--method applies to --defense interval only (its bound methods); {defense} has none")
    # the defense's own checks at exactly these radii (ε, 2ε and the table's radii): figures at a radius come
    # from them; a radius that costs a search (interval bisection) is computed only when asked for
    check_radii = sorted({r for r in ([eps_v, 2 * eps_v] if eps_v is not None else []) + (radii_v or []) if r > 0})
    if sequential:
        check_radii = [eps_v]  # the sequential test decides one radius
    want_radius = not sequential and (not cls.radius_is_search or full_radius or (eps_v is None and radii_v is None))
    if plot is not None and not want_radius:
        raise InputError("--plot draws certified accuracy against the radius: add --full-radius (bisection) "
                         "for the interval defense")
    options: dict[str, Any] = {
        "sigma": None if sigma is None else parse_number(sigma, "--sigma"),
        "n0": n0, "n": n, "alpha": parse_number(alpha, "--alpha"), "eps": eps_v, "batch_size": batch_size,
        "precision": precision, "channels_last": channels_last or None, "seed": seed, "method": method,
        "sequential": sequential or None,
    }
    options = {k: v for k, v in options.items() if v is not None}

    check_output(out, "--out")
    check_output(plot, "--plot")
    env = dist_init()  # rank 0 of 1 unless launched by torchrun / accelerate
    dev = device_for(env, resolve_device(device))
    net, meta, info, model_sha = load_model_for_data(model, dataset, dev, weights)
    guard = build_defense(defense, net, meta, options)
    x, y = load_dataset(info.name, split, data_root)
    if skip >= len(y):
        raise InputError(f"--skip {skip} is past the end of {info.name} {split} ({len(y)} images)")
    stop = len(y) if limit is None else min(len(y), skip + limit)
    wanted = list(range(skip, stop))

    settings = guard.settings()
    if sequential:
        from certaudit.defenses.sequential import SEQ_BLOCK, SEQ_GROWTH

        settings = {**settings, "sequential_eps": eps_v, "sequential": f"beta-mixture-block{SEQ_BLOCK}-growth{SEQ_GROWTH}",
                    "rows": "radius-null-decision"}  # rows before carried radius = ε
    from certaudit.defenses.base import radius_key

    config = {"verb": "certify", "model_sha256": model_sha, "arch": meta.arch, "defense": defense.lower(),
              "settings": settings, "dataset": info.name, "split": split, "device": dev.type}
    if check_radii or not want_radius:  # rows carry checks at these radii (older files without them stay resumable)
        config["checks"] = [radius_key(r) for r in check_radii]
        config["full_radius"] = want_radius
    per_call = chunk or guard.images_per_chunk(tuple(info.shape), full_radius=want_radius)
    with progress_bar(enabled=env.is_main) as bar:
        task = bar.add_task(f"certify ({defense})", total=None)
        # one call per block: a sequential defense answers its one radius with its sequential test
        run = run_rows(lambda idx: certification_rows(guard, x, y, idx, check_radii, full_radius=want_radius,
                                                      device=dev),
                       wanted, out=out, config=config, env=env, block=per_call,
                       progress=lambda done, total: bar.update(task, completed=done, total=total),
                       estimate=say_if_long(env.is_main and not as_json),
                       announce=None if as_json or not env.is_main else lambda k: err_console.print(
                           f"resuming {out}: {k} of {len(wanted)} images already certified"))
    dist_shutdown(env)
    if not env.is_main:
        return
    rows_all, new_images, wall = run.rows, run.new_images, run.wall_seconds

    norm_name = guard.norm.value
    if radii_v is not None:
        grid = list(radii_v)
    elif want_radius and not sequential:
        grid = _trim(default_radii(norm_name), rows_all)
    else:
        grid = [0.0]
    if eps_v is not None:  # the table always shows the requested radii
        grid = sorted(set(grid) | {eps_v} | (set() if sequential else {2 * eps_v}))
    summary = summarize(rows_all, grid, eps_v)
    summary = {"model": str(model), "defense": defense.lower(), "norm": norm_name, "dataset": info.name,
               "split": split, "range": [skip, stop], "settings": {**settings, **guard.diagnostics()},
               "device": str(dev),
               "new_images": new_images, "wall_seconds": round(wall, 3), **summary}
    if env.distributed:
        summary["processes"] = env.world_size
    if sequential:
        evals = [r["samples"] for r in rows_all if "samples" in r]
        summary["evaluations_per_image_mean"] = sum(evals) / max(1, len(evals))
    if new_images and wall > 0:
        summary["images_per_second_this_run"] = new_images / wall
        if "n0" in settings and "n" in settings and not sequential:
            summary["samples_per_second_this_run"] = new_images * (settings["n0"] + settings["n"]) / wall
    if out is not None:
        summary["out"] = str(out)
    if plot is not None:
        from certaudit.audits.certified import plot_certified_accuracy

        plot_certified_accuracy({f"{defense.lower()} ({info.name})": rows_all}, plot, norm=norm_name, eps=eps_v,
                                title=f"{Path(model).name}: {len(rows_all)} {split} images")
        summary["plot"] = str(plot)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)


def _parse_radii(text: str) -> list[float]:
    parts = str(text).replace(" ", "").split(",")
    if not any(parts):
        raise InputError("--radii needs at least one radius, e.g. 0,0.25,0.5")
    if not all(parts):
        raise InputError(f"--radii has an empty entry: {text!r} (write e.g. 0,0.25,0.5)")
    values = [parse_number(p, "--radii", positive=True, allow_zero=True) for p in parts]
    if len(set(values)) != len(values):
        raise InputError(f"--radii lists a radius twice: {text!r}")
    return sorted(values)


def _trim(radii: tuple[float, ...], rows: list[dict[str, Any]]) -> list[float]:
    """Drop the default grid's radii beyond the first one that no row reaches (all zeros after it)."""
    top = max((float(r["radius"]) for r in rows if r.get("radius") is not None), default=0.0)
    out = []
    for r in radii:
        out.append(r)
        if r > top:
            break
    return out


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"[bold]{s['defense']}[/bold] on {s['dataset']} ({s['split']}), {s['images']} images")
    table = Table()
    table.add_column(f"radius ({s['norm']})", justify="right")
    table.add_column("certified accuracy", justify="right")
    table.add_column("from", justify="left")
    for item in s.get("certified_accuracy", []):
        acc = "n/a" if item["accuracy"] is None else f"{item['accuracy']:.4f}"
        table.add_row(f"{item['radius']:.4g}", acc, item.get("source", ""))
    console.print(table)
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    stats.add_row("model", Path(s["model"]).name)
    if s["images"]:
        if s["clean_accuracy"] is None:
            stats.add_row("clean accuracy, abstention", s.get("clean_note", "n/a"))
        else:
            stats.add_row("clean accuracy (certified label, radius >= 0)", f"{s['clean_accuracy']:.4f}")
            stats.add_row("abstention rate", f"{s['abstain_rate']:.4f}")
    if "eps" in s:
        def f4(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        stats.add_row(f"VRA at eps = {s['eps']:.4g} (check at ε)", f4(s["vra_eps"]))
        stats.add_row(f"VRA at 2 eps = {2 * s['eps']:.4g} (check at 2ε)", f4(s["vra_2eps"]))
        stats.add_row(f"clean rejection rate at eps = {s['eps']:.4g}", f4(s["rejection_rate_eps"]))
        if s.get("eps_note"):
            stats.add_row("note", s["eps_note"])
    if s.get("images_per_second_this_run"):
        stats.add_row("images/s (this run)", f"{s['images_per_second_this_run']:.3g}")
    if s.get("samples_per_second_this_run"):
        stats.add_row("noise samples/s (this run)", f"{s['samples_per_second_this_run']:.4g}")
    if "evaluations_per_image_mean" in s:
        stats.add_row("base-model evaluations per image (sequential)", f"{s['evaluations_per_image_mean']:.1f}")
    stats.add_row("wall time (this run)", f"{s['wall_seconds']:.1f} s ({s['new_images']} new images)")
    if s.get("out"):
        stats.add_row("rows", s["out"])
    console.print(stats)
