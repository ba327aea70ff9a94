"""The one-call Python API: audit any ``nn.Module`` on your own images.

    import certaudit
    summary = certaudit.audit(model, x, y, defense="smoothing", eps=0.5, sigma=0.25, out="audit-dir")

``model`` maps float32 NCHW images in [0, 1] to logits (put its input normalization inside it, so
every radius is in pixel space); ``x`` (N, C, H, W) in [0, 1] and ``y`` (N,) are the images to audit.
The call runs the resumable four-stage audit of :func:`certaudit.audits.pipeline.run_audit` (clean
accuracy, certification, degradation, spoofing), writes rows, ``summary.json`` and (``report=True``)
``report.html`` / ``report.md`` into ``out``, and returns the summary. Rerunning with the same ``out``
resumes; another model, other images or other settings are refused rather than mixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from certaudit.defenses.base import check_eps, check_images, check_labels
from certaudit.defenses.registry import defense_class
from certaudit.errors import InputError
from certaudit.models import ModelMeta
from certaudit.report import write_report


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes, bytes): what binds an
    audit folder to these weights, as a checkpoint's file hash does on the command line."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim buffers too
    return h.hexdigest()


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor | Sequence[int], *, defense: str = "smoothing",
          eps: float, out: str | Path, sigma: float | None = None, method: str | None = None,
          indices: Sequence[int] | None = None, dataset: str = "custom", class_names: Sequence[str] | None = None,
          device: str | torch.device = "cpu", report: bool = True, name: str | None = None,
          **settings: Any) -> dict[str, Any]:
    """Audit ``model`` under ``defense`` at radius ``eps`` on ``x[indices]`` (default: all images).

    ``sigma``: the smoothing noise level (required for ``defense="smoothing"``); ``method``: the
    interval bound (``ibp``, ``crown-ibp``, ``crown``). Further keyword arguments are fields of
    :class:`~certaudit.audits.pipeline.AuditSettings` (``n``, ``n0``, ``alpha``, ``attack``,
    ``attack_steps``, ``spoof_images``, ``spoof_steps``, ``seed``, ``stages``, ...). Returns the
    summary (also in ``out/summary.json``).
    """
    from certaudit.audits.pipeline import AuditSettings, AuditSource, run_audit

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cls = defense_class(defense)
    eps = check_eps(eps)
    if cls.randomized and sigma is None:
        raise InputError("randomized smoothing needs sigma= (the noise level the model was trained with)")
    known = {f.name for f in fields(AuditSettings)} - {"eps", "sigma", "method"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown audit setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    x = check_images(x)
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"y must have one label per image ({x.shape[0]},), got {tuple(y.shape)}")
    dev = torch.device(device)
    model = model.to(dev).eval()
    with torch.no_grad():
        probe = model(x[:1].to(dev))
    if probe.dim() != 2:
        raise InputError(f"model must return (B, classes) logits, got shape {tuple(probe.shape)}")
    num_classes = int(probe.shape[1])
    y = check_labels(y, x.shape[0], num_classes, "y")
    idx = list(range(x.shape[0])) if indices is None else [int(i) for i in indices]
    if class_names is not None and len(class_names) != num_classes:
        raise InputError(f"class_names must name {num_classes} classes, got {len(class_names)}")
    meta = ModelMeta(arch=type(model).__name__, dataset=dataset, input_shape=[int(s) for s in x.shape[1:]],
                     num_classes=num_classes, mean=[0.0], std=[1.0],
                     method="gaussian" if sigma is not None else "standard", sigma=sigma)
    source = AuditSource(model=name or type(model).__name__, model_sha256=weights_sha256(model), defense=defense,
                         dataset=dataset, split="test", indices=idx, arch=meta.arch)
    config = AuditSettings(eps=eps, sigma=sigma, method=method, **settings)
    summary = run_audit(out, model, meta, source, x, y, config, device=dev, class_names=class_names)
    if report and summary is not None:
        write_report(out)
    return summary  # type: ignore[return-value]


__all__ = ["audit", "weights_sha256"]
