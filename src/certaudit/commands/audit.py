"""``certaudit audit``: the whole question in one command -- what is this certificate worth?

Runs, in order and resumably (rerun the same command to continue after a crash or Ctrl-C),
clean accuracy → certification → degradation → spoofing on one defended model, then writes
``DIR/rows/*.jsonl``, ``DIR/summary.json``, ``DIR/report.html`` (one self-contained page) and
``DIR/report.md``. Example::

    certaudit audit --model gloro.safetensors --defense lipschitz --eps 0.3 --dataset fashion-mnist \\
        --limit 200 --out audit-gloro
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from certaudit.attacks.budget import check_linf, check_ssim, parse_linf_list
from certaudit.audits.audit_job import audit_job
from certaudit.audits.pipeline import AuditSettings
from certaudit.commands import options as o
from certaudit.commands._common import console, parse_number, print_json
from certaudit.report_text import print_headline


def register(app: typer.Typer) -> None:
    app.command("audit", help="One-command audit: clean accuracy, certification, degradation and spoofing, "
                              "resumable; writes rows, summary.json, report.html and report.md.")(audit_cmd)


def audit_cmd(
    model: o.Model, defense: o.Defense, weights: o.Weights = None,
    eps: str = typer.Option(..., "--eps", help="radius ε of the run-time defense (ℓ2, or ℓ∞ for interval); 2ε is "
                                               "checked too"),
    dataset: o.Dataset = None, limit: o.Limit = None,
    out: Path = typer.Option(..., "--out", help="output folder; rerun with the same folder to resume"),
    split: o.Split = "test", skip: o.Skip = 0, stride: o.Stride = 1,
    stages: str = typer.Option("clean,certify,degrade,spoof", "--stages", help="comma list of stages to run"),
    sigma: o.Sigma = None, n0: o.N0 = 100, n: o.N = 10_000, alpha: o.Alpha = "0.001", method: o.Method = None,
    attack: str = typer.Option("all", "--attack", help="degradation attacks: pgd, pgd-2eps, spgd, margin, a comma "
                                                       "list, or all"),
    attack_steps: int = typer.Option(50, "--attack-steps", help="PGD steps of the degradation attacks"),
    attack_restarts: int = typer.Option(1, "--attack-restarts", help="PGD restarts of the degradation attacks"),
    attack_samples: int = typer.Option(32, "--attack-samples", help="smoothing: noisy copies per SPGD/margin step"),
    spoof_images: Optional[int] = typer.Option(None, "--spoof-images", help="Shadow Attack on the first K audited "
                                                                            "images only (default: all)"),
    spoof_steps: Optional[int] = typer.Option(None, "--spoof-steps", help="Shadow Attack steps (paper: 300)"),
    spoof_samples: int = typer.Option(400, "--spoof-samples", help="smoothing: Gaussian copies in the spoofing loss"),
    spoof_select_n: int = typer.Option(200, "--spoof-select-n", help="smoothing: samples of the CERTIFY that picks "
                                                                     "the best target"),
    spoof_n: Optional[int] = typer.Option(None, "--spoof-n", help="smoothing: samples of the judging CERTIFY "
                                                                  "(default: --n)"),
    spoof_channels: int = typer.Option(1, "--spoof-channels", help="1: one grey δ for all channels; 3: one per channel"),
    spoof_max_linf: Optional[str] = typer.Option(None, "--spoof-max-linf", help="spoof budget: largest change of "
                                                                              "any pixel (default 16/255; none: no "
                                                                              "ℓ∞ bound)"),
    spoof_min_ssim: Optional[str] = typer.Option(None, "--spoof-min-ssim", help="spoof budget: SSIM(x, x+δ) >= s "
                                                                              "(default 0.9; none: no SSIM bound)"),
    spoof_sweep: Optional[str] = typer.Option(None, "--spoof-sweep", help="ℓ∞ budgets also attacked, in one batch, "
                                                                         "for the success-against-budget curve "
                                                                         "(default 4/255,8/255,16/255,32/255,64/255,"
                                                                         "none; none: unbounded); off: no sweep"),
    chunk: int = typer.Option(64, "--chunk", help="images per batch in every stage"),
    batch_size: o.BatchSize = None,
    examples: int = typer.Option(6, "--examples", help="images per example grid of the report"),
    seed: o.Seed = 0, device: o.Device = "auto", data_root: o.DataRoot = None,
    as_json: bool = typer.Option(False, "--json", help="print summary.json's headline as JSON"),
) -> None:
    settings = _settings(parse_number(eps, "--eps", positive=True, allow_zero=False), seed=seed, chunk=chunk,
                         sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size, method=method, attack=attack,
                         attack_steps=attack_steps, attack_restarts=attack_restarts, attack_samples=attack_samples,
                         spoof_images=spoof_images, spoof_steps=spoof_steps, spoof_samples=spoof_samples,
                         spoof_select_n=spoof_select_n, spoof_n=spoof_n, spoof_channels=spoof_channels,
                         examples=examples, stages=stages, **_spoof_budget(spoof_max_linf, spoof_min_ssim, spoof_sweep))
    summary = audit_job(model, defense=defense, settings=settings, out=out, weights=weights, dataset=dataset,
                        split=split, limit=limit, skip=skip, stride=stride, device=device, data_root=data_root,
                        quiet=as_json)
    if summary is None:  # not rank 0: rank 0 merged the rows and writes the report
        return
    if as_json:
        print_json({"out": str(out), **summary["headline"]})
    else:
        print_headline([(f"{defense.lower()} · {model.stem}", summary)])
        console.print(f"wrote {out}/report.html, report.md, summary.json and rows/ "
                      f"({summary['timings']['wall_seconds_this_run']:.1f} s this run)")


def _spoof_budget(max_linf: str | None, min_ssim: str | None, sweep: str | None) -> dict[str, Any]:
    """The spoof budget options given, as AuditSettings fields (``none`` → None; ``--spoof-sweep off`` → no sweep)."""
    none = ("none", "unbounded", "off")
    out: dict[str, Any] = {}
    if max_linf is not None:
        out["spoof_max_linf"] = None if max_linf.strip().lower() in none else check_linf(max_linf, "--spoof-max-linf")
    if min_ssim is not None:
        out["spoof_min_ssim"] = None if min_ssim.strip().lower() in none else check_ssim(min_ssim, "--spoof-min-ssim")
    if sweep is not None:
        out["spoof_sweep"] = None if sweep.strip().lower() == "off" else tuple(parse_linf_list(sweep, "--spoof-sweep"))
    return out


def _settings(eps: float, **kw: Any) -> AuditSettings:
    """AuditSettings from CLI values (numbers parsed, stages split)."""
    if kw.get("sigma") is not None:
        kw["sigma"] = parse_number(kw["sigma"], "--sigma", positive=True, allow_zero=False)
    kw["alpha"] = parse_number(kw["alpha"], "--alpha", positive=True, allow_zero=False)
    kw["stages"] = tuple(s for s in str(kw["stages"]).lower().replace(" ", "").split(",") if s)
    kw["attack"] = str(kw["attack"]).lower()
    if kw.get("method") is not None:
        kw["method"] = str(kw["method"]).lower()
    keep_none = ("spoof_images", "spoof_max_linf", "spoof_min_ssim", "spoof_sweep")
    return AuditSettings(eps=eps, **{k: v for k, v in kw.items() if v is not None or k in keep_none}).check()
