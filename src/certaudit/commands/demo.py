"""``certaudit demo``: the main job on the embedded default (no download, no GPU, about a minute).

Runs the full audit (clean accuracy → certification → degradation → spoofing) of the tiny models
shipped in :mod:`certaudit.zoo` (2C2F on 8×8 digits, trained by ``scripts/train_zoo.py``) on the
shipped test images:

* randomized smoothing (CERTIFY of Cohen et al.) on the Gaussian-noise model;
* the Lipschitz (GloRo) defense at ε on the GloRo model trained at ε;
* the same defense at ε on the GloRo model trained at 2ε (§4.1 of the degradation paper);

the spoof stage reports success within the audit's default budget (ℓ∞ ≤ 16/255, SSIM ≥ 0.9) and,
as a separate column, without any budget, and sweeps ℓ∞ ∈ {8, 16, 64}/255 and unbounded;

prints the headline table and writes ``OUT/report.html`` (one self-contained page), ``OUT/report.md``
and, per audit, ``OUT/<audit>/`` with rows and ``summary.json``. The sample counts and attack
budgets are smaller than the papers' so that it runs in about a minute on 2 CPU cores; rerunning
with the same ``--out`` resumes (and, when everything is done, only rewrites the report).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

import typer

from certaudit import zoo
from certaudit.audits.audit_job import die_with_parent, run_demo_audit
from certaudit.commands._common import console, err_console, parse_number, print_json
from certaudit.models import resolve_device
from certaudit.report import write_report
from certaudit.report_text import print_headline
from certaudit.errors import InputError

# The spoof budget is the audit's default (ℓ∞ ≤ 16/255, SSIM ≥ 0.9). Every budget of the sweep costs one
# more attack (batched): the demo sweeps four ℓ∞ budgets instead of the audit's six, with 50 steps and
# 10 / 20 attacked images, so that it stays near a minute.
DEMO_SWEEP = (8 / 255, 16 / 255, 64 / 255, None)
# (folder, zoo model, defense, display name, settings beyond the shared ones)
DEMO_AUDITS: tuple[tuple[str, str, str, str, dict[str, Any]], ...] = (
    ("smoothing", "digits_gaussian", "smoothing", "smoothing σ=0.25 (Gaussian-noise model)",
     {"n0": 100, "n": 1000, "attack_samples": 16, "spoof_images": 10, "spoof_samples": 32, "spoof_select_n": 200,
      "spoof_sweep": DEMO_SWEEP}),
    ("gloro-eps", "digits_gloro_eps", "lipschitz", "GloRo trained at ε", {"spoof_images": 20, "spoof_sweep": DEMO_SWEEP}),
    ("gloro-2eps", "digits_gloro_2eps", "lipschitz", "GloRo trained at 2ε", {"spoof_images": 20,
                                                                             "spoof_sweep": DEMO_SWEEP}),
)


def register(app: typer.Typer) -> None:
    app.command("demo", help="Run the full audit on the embedded default (tiny shipped digits models: randomized "
                             "smoothing and GloRo at ε and 2ε); print the headline table, write report.html.")(demo_cmd)


def demo_cmd(
    out: Path = typer.Option(Path("certaudit-demo"), "--out", help="output folder (report.html, report.md, one "
                                                                   "sub-folder of rows per audit)"),
    limit: int = typer.Option(200, "--limit", help="shipped test images to audit (at most 360)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="ℓ2 radius ε (default: the zoo's, 0.25)"),
    attack_steps: int = typer.Option(20, "--attack-steps", help="PGD steps of the degradation attacks"),
    spoof_steps: int = typer.Option(50, "--spoof-steps", help="Shadow Attack steps (paper: 300; its Sec. 4: 10 "
                                                             "converge on CIFAR-10)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, auto"),
    workers: Optional[int] = typer.Option(None, "--workers", help="audits run in parallel processes (default: 2 "
                                                                  "when the machine has 2 cores or more, else 1)"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads per process (the tiny models run fastest on "
                                                     "one, and one thread is robust to a busy machine)"),
    as_json: bool = typer.Option(False, "--json", help="print the headline figures as JSON"),
) -> None:
    t0 = time.perf_counter()
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    n_workers = (2 if (os.cpu_count() or 1) >= 2 else 1) if workers is None else workers
    if n_workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    man = zoo.manifest()
    eps_v = float(man["eps"]) if eps is None else parse_number(eps, "--eps", positive=True, allow_zero=False)
    n_images = int(man["data"]["images"])
    if not 1 <= limit <= n_images:
        raise InputError(f"--limit must lie in [1, {n_images}], got {limit}")
    if attack_steps < 1 or spoof_steps < 1:
        raise InputError("--attack-steps and --spoof-steps must be >= 1")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    dev = str(resolve_device(device))
    if dev.startswith("cuda"):
        n_workers = 1  # one process owns the GPU
    jobs = [dict(out=str(out / folder), model_name=model_name, defense=defense, title=title, extra=extra,
                 eps=eps_v, limit=limit, attack_steps=attack_steps, spoof_steps=spoof_steps, seed=seed, device=dev,
                 threads=threads) for folder, model_name, defense, title, extra in DEMO_AUDITS]
    summaries: dict[str, dict[str, Any]] = {}
    if n_workers == 1:
        for job in jobs:
            summaries[job["title"]] = run_demo_audit(job, progress=not as_json)
    else:
        # the smoothing audit is the longest: this process runs it while the workers run the others
        with ProcessPoolExecutor(max_workers=min(n_workers - 1, len(jobs) - 1),
                                 mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(run_demo_audit, job): job["title"] for job in jobs[1:]}
            summaries[jobs[0]["title"]] = run_demo_audit(jobs[0])
            if not as_json:
                err_console.print(f"done: {jobs[0]['title']} ({time.perf_counter() - t0:.0f} s)")
            for fut in as_completed(futures):
                summaries[futures[fut]] = fut.result()
                if not as_json:
                    err_console.print(f"done: {futures[fut]} ({time.perf_counter() - t0:.0f} s)")
    results = [(job["title"], summaries[job["title"]]) for job in jobs]
    paths = write_report([Path(job["out"]) for job in jobs], out, names=[job["title"] for job in jobs],
                         title=f"certaudit demo: 2C2F on digits ({limit} test images), ℓ2, ε = {eps_v:g}")
    wall = time.perf_counter() - t0
    if as_json:
        print_json({"out": str(out), "report": str(paths["html"]), "seconds": round(wall, 2), "workers": n_workers,
                    "audits": {name: s["headline"] for name, s in results}})
        return
    print_headline(results)
    console.print(f"wrote {paths['html']} and {paths['md']} ({wall:.1f} s in all, {n_workers} process(es)); rows and "
                  f"summary.json per audit under {out}/")
