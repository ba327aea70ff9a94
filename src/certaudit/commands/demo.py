"""``certaudit demo``: the main job on the embedded default (no download, no GPU, under two minutes).

Audits the small models shipped in :mod:`certaudit.zoo` (2C2F on Fashion-MNIST, trained by
``scripts/train_zoo.py``) on the shipped test images (``fashion-mnist-1k``: 1,000 images of the
official test set) -- all three defense families, four models:

* randomized smoothing (CERTIFY of Cohen et al., σ = 0.25) on the Gaussian-noise model, ℓ2 ε = 0.3;
* the Lipschitz (GloRo) defense at ε on the GloRo model trained at ε;
* the same defense at ε on the GloRo model trained at 2ε (§4.1 of the degradation paper);
* interval bounds (IBP by default, ``--interval-method``) at ℓ∞ ε = 0.1 on the CROWN-IBP model
  (Table 2 of the Shadow Attack paper; Appendix C of the degradation paper);

each through the full audit (clean accuracy → certification → degradation → spoofing: the spoof
stage reports success within the audit's default budget ℓ∞ ≤ 16/255, SSIM ≥ 0.9 and, as a separate
column, without any budget, and sweeps ℓ∞ ∈ {8, 16, 64}/255 and unbounded) on the first 100 images
(CERTIFY with n = 1000, 20 PGD steps, 20 Shadow Attack steps on 10 resp. 20 images); then checks Tramèr's
Table 1 of robust-detector claims (the fourth part: a detector claim at ε implies a classifier at
ε/2). Prints the headline table and writes ``OUT/report.html`` (one self-contained page),
``OUT/report.md``, ``OUT/detector_claims.json`` and, per audit, ``OUT/<audit>/`` with rows and
``summary.json``. Sample counts and attack budgets are smaller than the papers' so that it runs in
under two minutes on 2 CPU cores; the options make it shorter or longer. Rerunning with the same
``--out`` resumes (and, when everything is done, only rewrites the report). ``--dataset digits``
runs the tests' tiny 8×8 zoo (three audits, no interval model).
"""

from __future__ import annotations

import json
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
from certaudit.errors import InputError
from certaudit.models import resolve_device
from certaudit.report import write_report
from certaudit.report_text import print_glance, print_headline

# The spoof budget is the audit's default (ℓ∞ ≤ 16/255, SSIM ≥ 0.9). Every budget of the sweep costs one
# more attack (batched): the demo sweeps four ℓ∞ budgets instead of the audit's six.
DEMO_SWEEP = (8 / 255, 16 / 255, 64 / 255, None)
INTERVAL_METHODS = ("ibp", "crown-ibp", "crown")

# (folder, zoo model, defense, display name, norm of its ε, settings beyond the shared ones, demo knobs it takes:
# "n" = --n (CERTIFY samples), "method" = --interval-method); the first audit of a zoo is the longest
# (smoothing): the demo's own process runs it while a worker runs the others.
_SMOOTHING = {"n0": 100, "attack_samples": 16, "spoof_samples": 32, "spoof_select_n": 200, "spoof_images": 10}
_DETERMINISTIC = {"spoof_images": 20}
DEMO_AUDITS: dict[str, tuple[tuple[str, str, str, str, str, dict[str, Any], tuple[str, ...]], ...]] = {
    "fashion-mnist": (
        ("smoothing", "fmnist_gaussian", "smoothing", "smoothing σ=0.25", "l2", _SMOOTHING, ("n",)),
        ("gloro-eps", "fmnist_gloro_eps", "lipschitz", "GloRo trained at ε", "l2", _DETERMINISTIC, ()),
        ("gloro-2eps", "fmnist_gloro_2eps", "lipschitz", "GloRo trained at 2ε", "l2", _DETERMINISTIC, ()),
        ("interval", "fmnist_crown_ibp", "interval", "CROWN-IBP model", "linf", _DETERMINISTIC, ("method",)),
    ),
    "digits": (
        ("smoothing", "digits_gaussian", "smoothing", "smoothing σ=0.25 (Gaussian-noise model)", "l2", _SMOOTHING,
         ("n",)),
        ("gloro-eps", "digits_gloro_eps", "lipschitz", "GloRo trained at ε", "l2", _DETERMINISTIC, ()),
        ("gloro-2eps", "digits_gloro_2eps", "lipschitz", "GloRo trained at 2ε", "l2", _DETERMINISTIC, ()),
    ),
}
# Sizes that keep the default demo under two minutes on 2 idle cores (28×28 images cost ~12× the 8×8 digits)
DEMO_DEFAULTS = {"fashion-mnist": {"limit": 100, "spoof_steps": 20}, "digits": {"limit": 200, "spoof_steps": 50}}
_DATASETS = {"fashion-mnist-1k": "fashion-mnist", "fashion-mnist": "fashion-mnist", "fmnist": "fashion-mnist",
             "digits": "digits"}
_TITLES = {"fashion-mnist": "Fashion-MNIST", "digits": "8×8 digits"}


def register(app: typer.Typer) -> None:
    app.command("demo", help="Run the full audit on the embedded default: four small shipped Fashion-MNIST models "
                             "(randomized smoothing, GloRo at ε and 2ε, CROWN-IBP with interval bounds) on 1,000 "
                             "shipped test images, plus Tramèr's detector claims; print the headline table, write "
                             "report.html.")(demo_cmd)


def demo_cmd(
    out: Path = typer.Option(Path("certaudit-demo"), "--out", help="output folder (report.html, report.md, one "
                                                                   "sub-folder of rows per audit)"),
    dataset: str = typer.Option("fashion-mnist-1k", "--dataset", help="fashion-mnist-1k (default: 1,000 shipped "
                                "Fashion-MNIST test images, four models) or digits (the tests' tiny 8×8 zoo)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="shipped test images to audit (default 100, at most "
                                        "1000; digits: default 200, at most 360)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="ℓ2 radius ε of smoothing and GloRo (default: the zoo's, "
                                                          "0.3; digits 0.25)"),
    eps_linf: Optional[str] = typer.Option(None, "--eps-linf", help="ℓ∞ radius of the interval audit (default: "
                                                                    "the zoo's, 0.1)"),
    interval_method: str = typer.Option("ibp", "--interval-method", help="the interval defense's run-time check: "
                                        "ibp (default: fast, with a proof of non-degradability), crown-ibp or crown"),
    n: int = typer.Option(1000, "--n", help="CERTIFY noise samples of randomized smoothing (paper: 100,000)"),
    attack_steps: int = typer.Option(20, "--attack-steps", help="PGD steps of the degradation attacks"),
    spoof_steps: Optional[int] = typer.Option(None, "--spoof-steps", help="Shadow Attack steps (default 20; digits: "
                                              "50; paper: 300; its Sec. 4: 10 converge on CIFAR-10)"),
    spoof_images: Optional[int] = typer.Option(None, "--spoof-images", help="images attacked by the Shadow Attack "
                                               "per audit (default: 10 for smoothing, 20 for the others)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, auto"),
    workers: Optional[int] = typer.Option(None, "--workers", help="audits run in parallel processes (default: 2 "
                                                                  "when the machine has 2 cores or more, else 1)"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads per process (the small models run fastest "
                                                     "on one, and one thread is robust to a busy machine)"),
    as_json: bool = typer.Option(False, "--json", help="print the headline figures as JSON"),
) -> None:
    t0 = time.perf_counter()
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    n_workers = (2 if (os.cpu_count() or 1) >= 2 else 1) if workers is None else workers
    if n_workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    key = _DATASETS.get(dataset.strip().lower())
    if key is None:
        raise InputError(f"--dataset must be fashion-mnist-1k or digits, got {dataset!r}")
    man = zoo.manifest(key)
    limit = DEMO_DEFAULTS[key]["limit"] if limit is None else limit
    spoof_steps = DEMO_DEFAULTS[key]["spoof_steps"] if spoof_steps is None else spoof_steps
    eps_l2 = float(man["eps"]) if eps is None else parse_number(eps, "--eps", positive=True, allow_zero=False)
    eps_inf = (float(man.get("eps_linf", 0.1)) if eps_linf is None
               else parse_number(eps_linf, "--eps-linf", positive=True, allow_zero=False))
    method = interval_method.strip().lower()
    if method not in INTERVAL_METHODS:
        raise InputError(f"--interval-method must be one of {', '.join(INTERVAL_METHODS)}, got {interval_method!r}")
    n_images = int(man["data"]["images"])
    if not 1 <= limit <= n_images:
        raise InputError(f"--limit must lie in [1, {n_images}], got {limit}")
    if attack_steps < 1 or spoof_steps < 1 or n < 1:
        raise InputError("--attack-steps, --spoof-steps and --n must be >= 1")
    if spoof_images is not None and spoof_images < 1:
        raise InputError(f"--spoof-images must be >= 1, got {spoof_images}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    dev = str(resolve_device(device))
    if dev.startswith("cuda"):
        n_workers = 1  # one process owns the GPU
    jobs = []
    for folder, model_name, defense, title, norm, extra, knobs in DEMO_AUDITS[key]:
        extra = {"spoof_sweep": DEMO_SWEEP, **extra}
        if "n" in knobs:
            extra["n"] = n
        if "method" in knobs:
            extra["method"] = method
            title = f"{title}, {_METHOD_NAMES[method]} check"
        if spoof_images is not None:
            extra["spoof_images"] = spoof_images
        jobs.append(dict(out=str(out / folder), zoo=key, model_name=model_name, defense=defense, title=title,
                         norm=norm, extra=extra, eps=eps_l2 if norm == "l2" else eps_inf, limit=limit,
                         attack_steps=attack_steps, spoof_steps=spoof_steps, seed=seed, device=dev, threads=threads))
    summaries = _run_jobs(jobs, n_workers, progress=not as_json, t0=t0)
    results = [(job["title"], summaries[job["title"]]) for job in jobs]
    verdicts = detector_verdicts(out)
    title = (f"certaudit demo: 2C2F on {_TITLES[key]} ({limit} shipped test images), ℓ2 ε = {eps_l2:g}"
             + (f", ℓ∞ ε = {eps_inf:g}" if any(j["norm"] == "linf" for j in jobs) else ""))
    paths = write_report([Path(job["out"]) for job in jobs], out, names=[job["title"] for job in jobs],
                         title=title, detector=verdicts)
    wall = time.perf_counter() - t0
    if as_json:
        print_json({"out": str(out), "report": str(paths["html"]), "seconds": round(wall, 2), "workers": n_workers,
                    "audits": {name: s["headline"] for name, s in results},
                    "detector_claims": _verdict_counts(verdicts)})
        return
    print_glance(results)
    print_headline(results)
    c = _verdict_counts(verdicts)
    console.print(f"detector claims (Tramèr's Table 1): {c['flagged']} of {c['claims']} claims flagged "
                  f"({c['defenses_flagged']} of {c['defenses']} defenses): each implies a robust classifier at ε/2 "
                  f"beyond the best known; see the report's detector-claims section")
    console.print(f"wrote {paths['html']} and {paths['md']} ({wall:.1f} s in all, {n_workers} process(es)); rows and "
                  f"summary.json per audit under {out}/")


_METHOD_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}


def _run_jobs(jobs: list[dict[str, Any]], n_workers: int, *, progress: bool, t0: float) -> dict[str, dict[str, Any]]:
    """Run the audits: one by one, or the first (the longest) here while worker processes run the others."""
    summaries: dict[str, dict[str, Any]] = {}
    if n_workers == 1 or len(jobs) == 1:
        for job in jobs:
            summaries[job["title"]] = run_demo_audit(job, progress=progress)
        return summaries
    with ProcessPoolExecutor(max_workers=min(n_workers - 1, len(jobs) - 1), mp_context=mp.get_context("spawn"),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_demo_audit, job): job["title"] for job in jobs[1:]}
        summaries[jobs[0]["title"]] = run_demo_audit(jobs[0])
        if progress:
            err_console.print(f"done: {jobs[0]['title']} ({time.perf_counter() - t0:.0f} s)")
        for fut in as_completed(futures):
            summaries[futures[fut]] = fut.result()
            if progress:
                err_console.print(f"done: {futures[fut]} ({time.perf_counter() - t0:.0f} s)")
    return summaries


def detector_verdicts(out: Path | None = None) -> list[Any]:
    """Tramèr's Table 1 claims checked against the shipped reference table (written to
    ``out/detector_claims.json`` when ``out`` is given)."""
    from certaudit.detection import check_claims, load_example_claims, load_reference

    table = load_reference()
    verdicts = check_claims(load_example_claims("table1"), table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "detector_claims.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"claims": "Tramèr 2022, Table 1 (certaudit check-detector --example table1)",
                                   "reference": table.source, "summary": _verdict_counts(verdicts),
                                   "verdicts": [v.to_dict() for v in verdicts]}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return verdicts


def _verdict_counts(verdicts: list[Any]) -> dict[str, int]:
    from certaudit.detection import summarize_verdicts

    return summarize_verdicts(verdicts)
