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

from certaudit.commands._common import MODEL_HELP, WEIGHTS_HELP, check_output, console, err_console, load_model_for_data, parse_number, print_json
from certaudit.errors import InputError


def register(app: typer.Typer) -> None:
    app.command("audit", help="One-command audit: clean accuracy, certification, degradation and spoofing, "
                              "resumable; writes rows, summary.json, report.html and report.md.")(audit_cmd)


def audit_cmd(
    model: Path = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    defense: str = typer.Option(..., "--defense", help="smoothing, lipschitz or interval"),
    eps: str = typer.Option(..., "--eps", help="radius ε of the run-time defense (ℓ2, or ℓ∞ for interval); 2ε is "
                                               "checked too"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data set (default: the model's own)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="audit K images"),
    out: Path = typer.Option(..., "--out", help="output folder; rerun with the same folder to resume"),
    split: str = typer.Option("test", "--split", help="train or test"),
    skip: int = typer.Option(0, "--skip", help="start at image J"),
    stride: int = typer.Option(1, "--stride", help="take every S-th image"),
    stages: str = typer.Option("clean,certify,degrade,spoof", "--stages", help="comma list of stages to run"),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="smoothing σ (default: the model's training σ)"),
    n0: int = typer.Option(100, "--n0", help="smoothing: selection samples of CERTIFY"),
    n: int = typer.Option(10_000, "--n", help="smoothing: estimation samples of CERTIFY"),
    alpha: str = typer.Option("0.001", "--alpha", help="smoothing: failure probability of each certificate"),
    method: Optional[str] = typer.Option(None, "--method", help="interval: ibp, crown-ibp or crown"),
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
    chunk: int = typer.Option(64, "--chunk", help="images per batch in every stage"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="samples per forward pass (default: from memory)"),
    examples: int = typer.Option(6, "--examples", help="images per example grid of the report"),
    seed: int = typer.Option(0, "--seed", help="seed of every random draw (noise, attacks)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the data set files"),
    as_json: bool = typer.Option(False, "--json", help="print summary.json's headline as JSON"),
) -> None:
    from certaudit.audits.pipeline import AuditSettings, AuditSource
    from certaudit.data import load_dataset
    from certaudit.distributed import device_for
    from certaudit.distributed import init as dist_init
    from certaudit.distributed import shutdown as dist_shutdown
    from certaudit.models import resolve_device

    eps_v = parse_number(eps, "--eps", positive=True, allow_zero=False)
    settings = _settings(AuditSettings, eps_v, seed=seed, chunk=chunk, sigma=sigma, n0=n0, n=n, alpha=alpha,
                         batch_size=batch_size, method=method, attack=attack, attack_steps=attack_steps,
                         attack_restarts=attack_restarts, attack_samples=attack_samples, spoof_images=spoof_images,
                         spoof_steps=spoof_steps, spoof_samples=spoof_samples, spoof_select_n=spoof_select_n,
                         spoof_n=spoof_n, spoof_channels=spoof_channels, examples=examples, stages=stages)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if skip < 0:
        raise InputError(f"--skip must be >= 0, got {skip}")
    if stride < 1:
        raise InputError(f"--stride must be >= 1, got {stride}")
    from certaudit.defenses.registry import defense_class

    defense_class(defense)  # an unknown name is refused here, before any loading, with the registry's list
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    check_output(out, "--out", folder=True)
    env = dist_init()  # rank 0 of 1 unless launched by torchrun / accelerate
    dev = device_for(env, resolve_device(device))
    net, meta, info, model_sha = load_model_for_data(model, dataset, dev, weights)
    x, y = load_dataset(info.name, split, data_root)
    if skip >= len(y):
        raise InputError(f"--skip {skip} is past the end of {info.name} {split} ({len(y)} images)")
    wanted = list(range(skip, len(y), stride))
    if limit is not None:
        wanted = wanted[:limit]
    source = AuditSource(model=str(model), model_sha256=model_sha, defense=defense.lower(),
                         dataset=info.name, split=split, indices=wanted, arch=meta.arch)
    summary = run_and_report(out, net, meta, source, x, y, settings, dev, classes=info.classes,
                             quiet=as_json or not env.is_main, env=env)
    dist_shutdown(env)
    if summary is None:  # not rank 0: rank 0 merged the rows and writes the report
        return
    if as_json:
        print_json({"out": str(out), **summary["headline"]})
    else:
        print_headline([(f"{defense.lower()} · {model.stem}", summary)])
        console.print(f"wrote {out}/report.html, report.md, summary.json and rows/ "
                      f"({summary['timings']['wall_seconds_this_run']:.1f} s this run)")


def _settings(cls: Any, eps: float, **kw: Any) -> Any:
    """AuditSettings from CLI values (numbers parsed, stages split)."""
    kw = dict(kw)
    if kw.get("sigma") is not None:
        kw["sigma"] = parse_number(kw["sigma"], "--sigma", positive=True, allow_zero=False)
    kw["alpha"] = parse_number(kw["alpha"], "--alpha", positive=True, allow_zero=False)
    kw["stages"] = tuple(s for s in str(kw["stages"]).lower().replace(" ", "").split(",") if s)
    kw["attack"] = str(kw["attack"]).lower()
    if kw.get("method") is not None:
        kw["method"] = str(kw["method"]).lower()
    return cls(eps=eps, **{k: v for k, v in kw.items() if v is not None or k in ("spoof_images",)}).check()


def run_and_report(out: Path, net: Any, meta: Any, source: Any, x: Any, y: Any, settings: Any, dev: Any, *,
                   classes: Any = None, quiet: bool = False, name: str | None = None,
                   report: bool = True, env: Any = None) -> dict[str, Any] | None:
    """Run the audit with a progress bar on stderr, then (``report``) write report.html and report.md into ``out``.

    Under several processes (``env``) only rank 0 gets the summary and writes the report; the other
    ranks return ``None``."""
    from certaudit.audits.pipeline import run_audit
    from certaudit.report import write_report

    with _Bar(enabled=not quiet) as bar:
        summary = run_audit(out, net, meta, source, x, y, settings, device=dev, progress=bar.update,
                            class_names=classes, env=env)
    if summary is None:
        return None
    if report:
        write_report(out, names=[name] if name else None,
                     title=f"certaudit audit: {source.defense} on {source.dataset} ({Path(source.model).name})")
    return summary


class _Bar:
    """A rich progress bar per stage on stderr (transient), started at the first update: an error
    raised before any stage runs (bad settings) stays a single line on stderr."""

    def __init__(self, enabled: bool):
        from certaudit.commands._common import progress_bar

        self.progress = progress_bar(enabled)
        self.tasks: dict[str, Any] = {}
        self.started = False

    def update(self, stage: str, done: int, total: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"audit: {stage}", total=max(total, 1))
        self.progress.update(self.tasks[stage], completed=done if total else 1)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.progress.stop()


def print_headline(items: list[tuple[str, dict[str, Any]]]) -> None:
    """The headline table on stdout: one row per figure, one column per audit (fits a terminal)."""
    from rich.table import Table

    from certaudit.report import HEADLINE_COLUMNS, fmt

    table = Table(title="certaudit: what is the certificate worth?")
    table.add_column("figure")
    for name, _ in items:
        table.add_column(name, justify="right")
    table.add_row("ε", *[f"{s['headline']['eps']:.4g} ({s['headline']['norm']})" for _, s in items])
    for key, title, kind in HEADLINE_COLUMNS:
        table.add_row(title, *[fmt(s["headline"].get(key), kind) for _, s in items])
    console.print(table)
    bad = [name for name, s in items if s["headline"].get("lower_subset_upper") is False
           and (s.get("degradation") or {}).get("invariant", {}).get("bug")]
    if bad:
        err_console.print(f"[bold red]bug:[/bold red] degraded inputs certified at 2ε on a monotone certifier: {bad}")
