"""``certaudit spoof``: the Shadow Attack against a certified defense; rows, Table 1/2 summary, grid.

For every image: a natural CERTIFY, the untargeted Shadow Attack (all wrong classes at once), a
selection CERTIFY of every candidate and a fresh judging CERTIFY of the chosen one (see
:mod:`certaudit.audits.spoofing`). Rows are written as produced; rerun with the same ``--out`` to
resume. Example (the paper's smoothing setting on CIFAR-10)::

    certaudit spoof --model m.safetensors --defense smoothing --sigma 0.25 --channels 1 \\
        --steps 300 --samples 400 --dataset cifar10 --limit 100 --stride 100 --out rows.jsonl --grid fig2.png
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

MAX_SAMPLES_PER_STEP = 1 << 16  # noisy copies per image and step: more cannot be allocated for any image
PRESETS = ("smoothing", "crown-ibp")  # ShadowConfig() and ShadowConfig.crown_ibp(), in this order


def register(app: typer.Typer) -> None:
    app.command("spoof", help="Shadow Attack (Ghiasi et al. 2020): spoof certificates for wrong labels; "
                              "natural vs spoofed radii, success rate, robust vs attack error.")(spoof_cmd)


def spoof_cmd(
    model: Path = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    defense: str = typer.Option("smoothing", "--defense", help="smoothing, lipschitz or interval"),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="smoothing noise σ (default: the model's training σ)"),
    channels: int = typer.Option(1, "--channels", help="1: one grey δ for all channels (Dissim = 0); 3: a δ per channel"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimization steps (paper: 300)"),
    samples: int = typer.Option(400, "--samples", help="Gaussian copies in the smoothing loss (paper: 400)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="smoothing (paper Sec. 3) or crown-ibp (Sec. 5); "
                                                                "default: smoothing for --defense smoothing, else crown-ibp"),
    lr: Optional[str] = typer.Option(None, "--lr", help="step size (smoothing preset 0.1, crown-ibp 200)"),
    lambda_tv: Optional[str] = typer.Option(None, "--lambda-tv", help="TV weight (0.3 / 9e-6)"),
    lambda_c: Optional[str] = typer.Option(None, "--lambda-c", help="colour weight (1.0 / 0.02)"),
    lambda_s: Optional[str] = typer.Option(None, "--lambda-s", help="dissimilarity weight, 3-channel only (0.5)"),
    color: Optional[str] = typer.Option(None, "--color", help="mean_abs (paper Sec. 3) or l2 (‖δ‖₂, Sec. 5)"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (plain gradient ascent, as the authors) or adam"),
    noise: str = typer.Option("fixed", "--noise", help="fixed: one set of copies per image for the whole run "
                                                      "(authors' code); fresh: new copies every step"),
    init: str = typer.Option("0.5", "--init", help="random start δ0 ~ U(−init, init); 0 starts at δ = 0"),
    loss_name: Optional[str] = typer.Option(None, "--loss", help="ce (smoothing: mean cross-entropy over copies), "
                                                                  "margin (the defense's certificate margin at --eps) or "
                                                                  "robust-ce (interval: the IBP/CROWN-IBP training loss term)"),
    method: Optional[str] = typer.Option(None, "--method", help="interval: bound used to certify and in the loss "
                                                               "(ibp, crown-ibp, crown; default crown)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="radius for Table 2 (robust vs attack error) and the margin loss"),
    targets: Optional[str] = typer.Option(None, "--targets", help="comma list of candidate target classes (default: all)"),
    n0: int = typer.Option(100, "--n0", help="smoothing: selection samples of CERTIFY"),
    n: int = typer.Option(100_000, "--n", help="smoothing: estimation samples of the natural and judging CERTIFY"),
    alpha: str = typer.Option("0.001", "--alpha", help="smoothing: failure probability of each certificate"),
    select_n: int = typer.Option(200, "--select-n", help="smoothing: estimation samples of the CERTIFY that picks the "
                                                         "best target (authors: 2·n0)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="samples per forward pass (default: from memory)"),
    seed: int = typer.Option(0, "--seed", help="seed of the attack and certificate noise"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data set (default: the model's own)"),
    split: str = typer.Option("test", "--split", help="train or test"),
    limit: Optional[int] = typer.Option(None, "--limit", help="attack K images"),
    skip: int = typer.Option(0, "--skip", help="start at image J"),
    stride: int = typer.Option(1, "--stride", help="take every S-th image (CIFAR files are sorted by class)"),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="images per batched attack (default: from memory)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the data set files"),
    out: Optional[Path] = typer.Option(None, "--out", help="rows file (.jsonl); rerun with the same path to resume"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG grid natural | δ | x+δ (images attacked in this run)"),
    grid_images: int = typer.Option(8, "--grid-images", help="rows of the grid"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    import torch

    from certaudit.attacks.shadow import DefenseMargin, ShadowConfig, SmoothedCrossEntropy
    from certaudit.audits.spoofing import is_randomized, save_grid, spoof_batch, summarize
    from certaudit.data import load_dataset
    from certaudit.defenses.base import ABSTAIN
    from certaudit.defenses.registry import build_defense, defense_class
    from certaudit.audits.runner import run_rows
    from certaudit.distributed import device_for
    from certaudit.distributed import init as dist_init
    from certaudit.distributed import shutdown as dist_shutdown
    from certaudit.models import resolve_device

    # ---- validate everything before loading anything
    for name, value, low in (("--limit", limit, 1), ("--chunk", chunk, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    if skip < 0:
        raise InputError(f"--skip must be >= 0, got {skip}")
    if stride < 1:
        raise InputError(f"--stride must be >= 1, got {stride}")
    if not 1 <= samples <= MAX_SAMPLES_PER_STEP:
        raise InputError(f"--samples must lie in [1, {MAX_SAMPLES_PER_STEP:,}] (noisy copies per step), got {samples}")
    if grid_images < 1:
        raise InputError(f"--grid-images must be >= 1, got {grid_images}")
    if select_n < 1:
        raise InputError(f"--select-n must be >= 1, got {select_n}")
    defense_name = defense.lower()
    cls = defense_class(defense_name)  # its declared capabilities decide defaults and what applies
    preset_name = (preset or ("smoothing" if cls.randomized else "crown-ibp")).lower()
    if preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = (ShadowConfig, ShadowConfig.crown_ibp)[PRESETS.index(preset_name)]()
    changes: dict[str, Any] = {"channels": channels, "optimizer": optimizer.lower(),
                               "init": parse_number(init, "--init")}
    if steps is not None:
        changes["steps"] = steps
    for key, text, flag in (("lr", lr, "--lr"), ("lambda_tv", lambda_tv, "--lambda-tv"),
                            ("lambda_c", lambda_c, "--lambda-c"), ("lambda_s", lambda_s, "--lambda-s")):
        if text is not None:
            changes[key] = parse_number(text, flag)
    if color is not None:
        changes["color"] = color.lower()
    config = base.with_(**changes)  # raises InputError on bad values
    loss_kind = (loss_name or ("ce" if cls.randomized else "margin")).lower()
    if loss_kind not in ("ce", "margin", "robust-ce"):
        raise InputError(f"unknown loss {loss_name!r}; choose ce, margin or robust-ce")
    if loss_kind == "robust-ce" and "ce" not in cls.margin_reductions:
        raise InputError("--loss robust-ce is the interval defense's training loss; use --defense interval")
    if method is not None and not cls.methods:
        raise InputError(f"--method applies to --defense interval only (its bound methods); {defense_name} has none")
    if loss_kind == "ce" and not cls.randomized:
        raise InputError("--loss ce is the randomized-smoothing loss; use --loss margin for other defenses")
    eps_v = None if eps is None else parse_number(eps, "--eps", positive=True, allow_zero=False)
    if loss_kind in ("margin", "robust-ce") and eps_v is None and not cls.randomized:
        raise InputError("--loss margin needs --eps: the radius at which the spoofed label should be certified")
    if noise.lower() not in ("fixed", "fresh"):
        raise InputError(f"unknown --noise {noise!r}; choose fixed or fresh")
    cand = None if targets is None else _parse_classes(targets)

    options: dict[str, Any] = {
        "sigma": None if sigma is None else parse_number(sigma, "--sigma"), "n0": n0, "n": n,
        "alpha": parse_number(alpha, "--alpha"), "eps": eps_v, "batch_size": batch_size, "seed": seed,
    }
    if method is not None:
        options["method"] = method
    options = {k: v for k, v in options.items() if v is not None}
    check_output(out, "--out")
    check_output(grid, "--grid")
    env = dist_init()  # rank 0 of 1 unless launched by torchrun / accelerate
    dev = device_for(env, resolve_device(device))
    net, meta, info, model_sha = load_model_for_data(model, dataset, dev, weights)
    if cand is not None and max(cand) >= info.num_classes:
        raise InputError(f"--targets must lie in [0, {info.num_classes}), got {cand}")
    guard = build_defense(defense_name, net, meta, options)
    randomized = is_randomized(guard)  # noise in CERTIFY: skip abstentions, re-draw to judge
    if loss_kind == "ce":
        loss: Any = SmoothedCrossEntropy(net, guard.noise_sigma, samples=samples, noise=noise.lower())
    else:
        kwargs = {"n_samples": samples} if randomized else {}
        if loss_kind == "robust-ce":
            kwargs["reduction"] = "ce"
        loss = DefenseMargin(guard, eps_v or 0.0, **kwargs)
    x_all, y_all = load_dataset(info.name, split, data_root)
    if skip >= len(y_all):
        raise InputError(f"--skip {skip} is past the end of {info.name} {split} ({len(y_all)} images)")
    wanted = list(range(skip, len(y_all), stride))
    if limit is not None:
        wanted = wanted[:limit]

    cert_opts = {"n0": n0, "n": n} if randomized else {}
    sel_opts = {"n0": n0, "n": select_n} if randomized else {}
    settings = guard.settings()
    loss_settings = loss.settings()
    config_row = {"verb": "spoof", "model_sha256": model_sha, "arch": meta.arch, "defense": defense_name,
                  "settings": settings, "shadow": config.as_dict(), "spoof_loss": loss_settings,
                  "select": sel_opts, "targets": cand, "seed": seed, "eps": eps_v, "skip_abstained": randomized,
                  "checks": "eps" if eps_v is not None else None,
                  "dataset": info.name, "split": split, "device": dev.type}
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, str]]] = []
    per_call = chunk or _auto_chunk(loss, tuple(info.shape))
    n_targets = len(cand) if cand is not None else info.num_classes - 1
    steps_per_image = n_targets * config.steps

    def work(idx: list[int]) -> list[dict[str, Any]]:
        result = spoof_batch(guard, loss, x_all[idx].to(dev), y_all[idx], config, indices=idx, seed=seed,
                             candidates=cand, certify_options=cert_opts, select_options=sel_opts,
                             skip_abstained=randomized, on_step=lambda k: bar.advance(task, k), eps=eps_v)
        if grid is not None:
            for b, row in enumerate(result.rows):
                if row["attacked"] and len(shown) < grid_images:
                    nat_txt = _caption(row["label"], row["natural_prediction"], row["natural_radius"], info, ABSTAIN)
                    adv_txt = _caption(row["label"], row["spoofed_prediction"], row["spoofed_radius"], info, ABSTAIN)
                    shown.append((result.natural[b].cpu(), result.delta[b].cpu(), result.x_adv[b].cpu(),
                                  (nat_txt, adv_txt)))
        return result.rows

    # every draw is keyed by (seed, image index); the run loop's fixed blocks also keep the batches, hence
    # the last floating-point bits, the same for any number of processes
    with progress_bar(enabled=env.is_main) as bar:
        task = bar.add_task(f"shadow attack ({defense_name}, {config.channels}-channel)", total=None)
        run = run_rows(work, wanted, out=out, config=config_row, env=env, block=per_call,
                       progress=lambda done, total: bar.update(task, completed=done * steps_per_image,
                                                               total=max(1, total * steps_per_image)),
                       estimate=say_if_long(env.is_main and not as_json),
                       announce=None if as_json or not env.is_main else lambda k: err_console.print(
                           f"resuming {out}: {k} of {len(wanted)} images already attacked"))
    dist_shutdown(env)
    if not env.is_main:
        return  # the grid shows rank 0's images
    rows_all, new_images, wall = run.rows, run.new_images, run.wall_seconds

    summary = summarize(rows_all, eps_v)
    summary = {"model": str(model), "defense": defense_name, "dataset": info.name, "split": split,
               "images_selected": len(wanted), "settings": settings, "shadow": config.as_dict(),
               "spoof_loss": loss_settings, "device": str(dev), "new_images": new_images,
               "wall_seconds": round(wall, 3), **summary}
    if env.distributed:
        summary["processes"] = env.world_size
    if new_images and wall > 0:
        summary["images_per_second_this_run"] = new_images / wall
    if out is not None:
        summary["out"] = str(out)
    if grid is not None:
        if shown:
            save_grid(grid, torch.stack([s[0] for s in shown]), torch.stack([s[1] for s in shown]),
                      torch.stack([s[2] for s in shown]), [s[3] for s in shown])
            summary["grid"] = str(grid)
        elif not as_json:
            err_console.print("no image was attacked in this run: no grid written")
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)


def _parse_classes(text: str) -> list[int]:
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        out = sorted(set(int(p) for p in parts))
    except ValueError:
        raise InputError(f"--targets must be a comma list of class numbers, got {text!r}") from None
    if not out or min(out) < 0:
        raise InputError(f"--targets must be class numbers >= 0, got {text!r}")
    return out


def _auto_chunk(loss: Any, shape: tuple[int, ...]) -> int:
    return max(1, min(256, int(loss.max_images(shape))))


def _caption(label: int, pred: Any, radius: Any, info: Any, abstain: int) -> str:
    if pred is None:
        return "not attacked"
    name = "abstain" if pred == abstain else info.classes[int(pred)]
    mark = "" if pred in (label, abstain) else " (wrong)"
    return f"{name}{mark}, r={float(radius or 0.0):.3f}"




def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"[bold]Shadow Attack[/bold] on {s['defense']} ({s['dataset']} {s['split']}), {s['images']} images, "
                  f"{s['shadow']['channels']}-channel, {s['shadow']['steps']} steps")
    t1 = Table(title="Table 1: certified radius")
    t1.add_column("")
    t1.add_column("mean", justify="right")
    t1.add_column("std", justify="right")
    t1.add_row("natural (not abstained)", _fmt(s.get("natural_radius_mean")), _fmt(s.get("natural_radius_std")))
    t1.add_row("shadow (successful)", _fmt(s.get("shadow_radius_mean")), _fmt(s.get("shadow_radius_std")))
    console.print(t1)
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    if s["images"]:
        stats.add_row("natural abstention rate", _fmt(s.get("natural_abstain_rate"), ".4f"))
        stats.add_row("attacked (not abstained)", str(s.get("attacked")))
        stats.add_row("success rate (fresh CERTIFY gives a wrong label)", _fmt(s.get("success_rate"), ".4f"))
        stats.add_row("spoofed radius >= natural radius", _fmt(s.get("spoofed_beats_natural"), ".4f"))
        stats.add_row("mean ‖δ‖₂ / ‖δ‖∞ / TV", f"{_fmt(s.get('l2_mean'))} / {_fmt(s.get('linf_mean'))} / {_fmt(s.get('tv_mean'))}")
    if "eps" in s:
        stats.add_row(f"robust error, natural (eps = {s['eps']:.4g})", _fmt(s.get("robust_error"), ".4f"))
        stats.add_row(f"attack error, shadow (eps = {s['eps']:.4g})", _fmt(s.get("attack_error"), ".4f"))
    stats.add_row("wall time (this run)", f"{s['wall_seconds']:.1f} s ({s['new_images']} new images)")
    if s.get("out"):
        stats.add_row("rows", s["out"])
    if s.get("grid"):
        stats.add_row("grid", s["grid"])
    console.print(stats)
