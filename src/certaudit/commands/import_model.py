"""``certaudit import``: turn a published checkpoint into a certaudit checkpoint.

The formats (``cohen``: Cohen et al.'s smoothing models; ``kw``: Wong & Kolter's ℓ∞ models and
cascade stages) and what is read from each are described in :mod:`certaudit.importers`; files are
read without ever running code from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from certaudit.commands._common import check_output, console, parse_number, print_json
from certaudit.errors import InputError
from certaudit.importers import IMPORTERS
from certaudit.models import count_parameters, read_state_dict, save_checkpoint


def register(app: typer.Typer) -> None:
    app.command("import", help="Convert a published checkpoint (--format cohen or kw) into a certaudit checkpoint.")(import_cmd)


def import_cmd(
    file: Path = typer.Argument(..., help="the published checkpoint, e.g. noise_0.25/checkpoint.pth.tar"),
    fmt: str = typer.Option(..., "--format", help="checkpoint format: cohen (randomized smoothing) or kw (Wong & Kolter, ℓ∞)"),
    out: Path = typer.Option(..., "--out", help="certaudit checkpoint to write (.safetensors)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data set the model was trained on (default: from the file)"),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="training noise σ (default: parsed from a noise_<σ> path)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture, for files that do not name it"),
    stage: Optional[int] = typer.Option(None, "--stage", help="kw cascade files: which model of the cascade (default 0)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="kw: the certified ℓ∞ radius to record, in pixel space "
                                                         "(default: 0.1 for (Fashion-)MNIST, <k>/255 from a <k>px name)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:

    key = fmt.strip().lower()
    if key not in IMPORTERS:
        raise InputError(f"unknown format {fmt!r}; choose one of: {', '.join(IMPORTERS)}")
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file name like model.safetensors")
    check_output(out, "--out")
    sigma_v = None if sigma is None else parse_number(sigma, "--sigma", positive=True, allow_zero=False)
    extra: dict[str, Any] = {}
    if key == "kw":
        if stage is not None and stage < 0:
            raise InputError(f"--stage must be >= 0, got {stage}")
        extra = {"stage": 0 if stage is None else stage,
                 "eps": None if eps is None else parse_number(eps, "--eps", positive=True, allow_zero=False)}
    else:
        for flag, value in (("--stage", stage), ("--eps", eps)):
            if value is not None:
                raise InputError(f"{flag} applies to --format kw only")
    raw = read_state_dict(file)
    model, meta = IMPORTERS[key](raw, source=file, dataset=dataset, sigma=sigma_v, arch=arch, **extra)
    save_checkpoint(out, model, meta)
    result = {"out": str(out), "format": key, "arch": meta.arch, "dataset": meta.dataset, "sigma": meta.sigma,
              "parameters": count_parameters(model), "source": str(file)}
    if key == "kw":
        result.update({"eps": meta.eps, "norm": meta.norm, "stage": meta.training.get("stage"),
                       "mean": meta.mean, "std": meta.std})
    if as_json:
        print_json(result)
    else:
        s = "" if meta.sigma is None else f", σ = {meta.sigma:g}"
        if key == "kw":
            s = f", stage {meta.training.get('stage')}" + ("" if meta.eps is None else f", ℓ∞ ε = {meta.eps:.6g}")
        console.print(f"imported {file} ({key}: {meta.arch} on {meta.dataset}{s}) -> {out}")
