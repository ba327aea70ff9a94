"""The audit verb as library calls: clean accuracy → certification → degradation → spoofing, with a report.

:func:`run_and_report` runs :func:`certaudit.audits.pipeline.run_audit` with a progress bar per
stage and writes ``report.html``/``report.md``; :func:`audit_job` adds what the ``audit`` command
needs around it (the launch, the model checked against the data set, the image selection).
:func:`run_demo_audit` is one audit of ``certaudit demo`` on the shipped zoo (a module-level
function, so a worker process can run it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from certaudit import zoo
from certaudit.audits.pipeline import AuditSettings, AuditSource, run_audit
from certaudit.audits.session import Session, check_output, check_range, progress_bar
from certaudit.data import dataset_info, sha256_file
from certaudit.defenses.registry import defense_class
from certaudit.errors import InputError
from certaudit.models import load_checkpoint
from certaudit.report import write_report


class StageBar:
    """A rich progress bar per stage on stderr (transient), started at the first update: an error
    raised before any stage runs (bad settings) stays a single line on stderr."""

    def __init__(self, enabled: bool):
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

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.progress.stop()


def run_and_report(out: Path, net: Any, meta: Any, source: AuditSource, x: Any, y: Any, settings: AuditSettings,
                   dev: Any, *, classes: Any = None, quiet: bool = False, name: str | None = None,
                   report: bool = True, env: Any = None) -> dict[str, Any] | None:
    """Run the audit with a progress bar on stderr, then (``report``) write report.html and report.md into ``out``.

    Under several processes (``env``) only rank 0 gets the summary and writes the report; the other
    ranks return ``None``."""
    with StageBar(enabled=not quiet) as bar:
        summary = run_audit(out, net, meta, source, x, y, settings, device=dev, progress=bar.update,
                            class_names=classes, env=env)
    if summary is None:
        return None
    if report:
        write_report(out, names=[name] if name else None,
                     title=f"certaudit audit: {source.defense} on {source.dataset} ({Path(source.model).name})")
    return summary


def audit_job(model: Any, *, defense: str, settings: AuditSettings, out: Any, weights: Any = None,
              dataset: str | None = None, split: str = "test", limit: int | None = None, skip: int = 0,
              stride: int = 1, device: str = "auto", data_root: Any = None,
              quiet: bool = False) -> dict[str, Any] | None:
    """Audit images ``skip, skip+stride, ...`` (at most ``limit``) into the folder ``out`` (resumable);
    the summary (``None`` on the ranks other than 0 of a multi-process launch)."""
    check_range(limit, skip, stride)
    defense_class(defense)  # an unknown name is refused here, before any loading, with the registry's list
    check_output(out, "--out", folder=True)
    s = Session.open(model, weights=weights, dataset=dataset, device=device, quiet=quiet)
    x, y, wanted = s.data(split, data_root, skip=skip, limit=limit, stride=stride)
    source = AuditSource(model=str(model), model_sha256=s.model_sha, defense=defense.lower(),
                         dataset=s.info.name, split=split, indices=wanted, arch=s.meta.arch)
    summary = run_and_report(Path(out), s.net, s.meta, source, x, y, settings, s.device, classes=s.info.classes,
                             quiet=s.quiet, env=s.env)
    s.close()
    return summary


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the worker dies when the demo process dies (SIGKILL included), so no
    orphan keeps writing rows next to a rerun. Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; then a
    check that the parent did not die before the call (the signal would never come)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: rely on the row lock
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def run_demo_audit(job: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """One audit of the demo on the shipped zoo model ``job["model_name"]`` of the zoo ``job["zoo"]`` (default
    ``digits``) on that zoo's shipped test images (no report: the demo writes one)."""
    torch.set_num_threads(int(job["threads"]))
    key = zoo.zoo_key(job.get("zoo"))
    man = zoo.manifest(key)
    data = man["data"]
    info = dataset_info(data.get("name") or man["dataset"])  # fashion-mnist-1k; digits
    x, y = zoo.load_data(key)
    path = zoo.model_path(job["model_name"])
    dev = torch.device(job["device"])
    net, meta = load_checkpoint(path, dev)
    settings = AuditSettings(eps=job["eps"], seed=job["seed"], chunk=200, attack_steps=job["attack_steps"],
                             spoof_steps=job["spoof_steps"], examples=4, **job["extra"]).check()
    extra = {"data": f"certaudit/zoo/{data['file']}", "data_sha256": data["sha256"], "zoo_model": job["model_name"],
             "training": {k: v for k, v in man["models"][job["model_name"]].items() if k not in ("file", "sha256")}}
    if data.get("rule"):
        extra["data_rule"] = f"{data['source']}: {data['rule']}"
    source = AuditSource(model=f"zoo:{job['model_name']}", model_sha256=sha256_file(path), defense=job["defense"],
                         dataset=info.name, split="test", indices=list(range(job["limit"])), arch=meta.arch,
                         extra=extra)
    summary = run_and_report(Path(job["out"]), net, meta, source, x, y, settings, dev, classes=info.classes,
                             quiet=not progress, name=job["title"], report=False)
    if summary is None:
        raise InputError("the demo runs in one process per audit")
    return summary


__all__ = ["StageBar", "audit_job", "die_with_parent", "run_and_report", "run_demo_audit"]
