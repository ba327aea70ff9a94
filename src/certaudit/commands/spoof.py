"""``certaudit spoof``: the Shadow Attack against a certified defense; rows, Table 1/2 summary, grid.

The work is :func:`certaudit.audits.spoof_job.spoof_job`; this module parses options and prints.
Rerun with the same ``--out`` to resume. Example (the paper's smoothing setting on CIFAR-10)::

    certaudit spoof --model m.safetensors --defense smoothing --sigma 0.25 --channels 1 \\
        --steps 300 --samples 400 --dataset cifar10 --limit 100 --stride 100 --out rows.jsonl --grid fig2.png

With a perceptual budget (success only within it) and a sweep over ℓ∞ budgets::

    certaudit spoof ... --max-linf 16/255 --min-ssim 0.9 --sweep-linf 4/255,8/255,16/255,32/255,64/255,none
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from certaudit.attacks.budget import check_linf, check_ssim, parse_linf_list
from certaudit.audits.spoof_job import spoof_job
from certaudit.commands import options as o
from certaudit.commands._common import parse_number, print_json
from certaudit.errors import InputError
from certaudit.report_text import print_spoof


def register(app: typer.Typer) -> None:
    app.command("spoof", help="Shadow Attack (Ghiasi et al. 2020): spoof certificates for wrong labels; "
                              "natural vs spoofed radii, success rate, robust vs attack error.")(spoof_cmd)


def spoof_cmd(
    model: o.Model, weights: o.Weights = None, defense: o.Defense = "smoothing", sigma: o.Sigma = None,
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
    n0: o.N0 = 100,
    n: int = typer.Option(100_000, "--n", help="smoothing: estimation samples of the natural and judging CERTIFY"),
    alpha: o.Alpha = "0.001",
    select_n: int = typer.Option(200, "--select-n", help="smoothing: estimation samples of the CERTIFY that picks the "
                                                         "best target (authors: 2·n0)"),
    batch_size: o.BatchSize = None, seed: o.Seed = 0, device: o.Device = "auto", dataset: o.Dataset = None,
    split: o.Split = "test", limit: o.Limit = None, skip: o.Skip = 0, stride: o.Stride = 1,
    chunk: Optional[int] = typer.Option(None, "--chunk", help="images per batched attack and per write of rows "
                                                             "(default: from memory, at most 10 for smoothing)"),
    data_root: o.DataRoot = None, out: o.Out = None,
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG grid natural | δ | x+δ (images attacked in this run)"),
    grid_images: int = typer.Option(8, "--grid-images", help="rows of the grid"),
    max_linf: Optional[str] = typer.Option(None, "--max-linf", help="perceptual budget: largest change of any pixel, "
                                                                     "e.g. 16/255, in [1e-6, 1] (δ projected and "
                                                                     "steps capped at τ/4); default: none"),
    min_ssim: Optional[str] = typer.Option(None, "--min-ssim", help="perceptual budget: SSIM(x, x+δ) >= s, s in "
                                                                     "(0, 1] (a penalty, and a check of the judged "
                                                                     "image); default: none"),
    lambda_ssim: Optional[str] = typer.Option(None, "--lambda-ssim", help="weight of the SSIM penalty (10); only "
                                                                           "with --min-ssim"),
    sweep_linf: Optional[str] = typer.Option(None, "--sweep-linf", help="also attack under each of these ℓ∞ "
                                                                         "budgets (with --min-ssim), batched: e.g. "
                                                                         "4/255,8/255,16/255,32/255,64/255,none; "
                                                                         "an entry equal to --max-linf is that "
                                                                         "budget"),
    as_json: o.Json = False,
) -> None:
    shadow = {"channels": channels, "optimizer": optimizer.lower(),
              "init": parse_number(init, "--init", positive=True), "steps": steps,
              "color": None if color is None else color.lower(),
              "lr": None if lr is None else parse_number(lr, "--lr", positive=True, allow_zero=False)}
    # the weights are >= 0; checked here so that the message names the flag
    for key, text, flag in (("lambda_tv", lambda_tv, "--lambda-tv"), ("lambda_c", lambda_c, "--lambda-c"),
                            ("lambda_s", lambda_s, "--lambda-s"), ("lambda_ssim", lambda_ssim, "--lambda-ssim")):
        shadow[key] = None if text is None else parse_number(text, flag, positive=True)
    # the budget is checked here, naming the flag, before any model or data is loaded
    if max_linf is not None:
        shadow["max_linf"] = check_linf(max_linf, "--max-linf")
    if min_ssim is not None:
        shadow["min_ssim"] = check_ssim(min_ssim, "--min-ssim")
    sweep = None if sweep_linf is None else parse_linf_list(sweep_linf, "--sweep-linf")
    summary = spoof_job(
        model, weights=weights, defense=defense, shadow=shadow, preset=preset, loss=loss_name, samples=samples,
        noise=noise, method=method, eps=None if eps is None else parse_number(eps, "--eps", positive=True,
                                                                              allow_zero=False),
        targets=None if targets is None else _parse_classes(targets),
        defense_options={"sigma": None if sigma is None else parse_number(sigma, "--sigma"), "n0": n0, "n": n,
                         "alpha": parse_number(alpha, "--alpha"), "batch_size": batch_size},
        select_n=select_n, seed=seed, device=device, dataset=dataset, split=split, limit=limit, skip=skip,
        stride=stride, chunk=chunk, data_root=data_root, out=out, grid=grid, grid_images=grid_images,
        sweep=sweep, quiet=as_json)
    if summary is not None:
        print_json(summary) if as_json else print_spoof(summary)


def _parse_classes(text: str) -> list[int]:
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        out = sorted(set(int(p) for p in parts))
    except ValueError:
        raise InputError(f"--targets must be a comma list of class numbers, got {text!r}") from None
    if not out or min(out) < 0:
        raise InputError(f"--targets must be class numbers >= 0, got {text!r}")
    return out
