"""``certaudit evaluate``: clean accuracy of a checkpoint on a data set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from certaudit.commands._common import MODEL_HELP, WEIGHTS_HELP, console, load_model_for_data, print_json
from certaudit.data import load_dataset
from certaudit.errors import InputError
from certaudit.models import resolve_device
from certaudit.train import accuracy


def register(app: typer.Typer) -> None:
    app.command("evaluate", help="Clean accuracy of a certaudit checkpoint on a data set split.")(evaluate_cmd)


def evaluate_cmd(
    model: Path = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data set (default: the model's own)"),
    split: str = typer.Option("test", "--split", help="train or test"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first K images only"),
    batch_size: int = typer.Option(1024, "--batch-size"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the data set files"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    net, meta, info, model_sha = load_model_for_data(model, dataset, dev, weights)
    x, y = load_dataset(info.name, split, data_root)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    t0 = time.perf_counter()
    acc = accuracy(net, x, y, batch_size=batch_size, device=dev)
    result = {"model": str(model), "arch": meta.arch, "method": meta.method, "dataset": info.name, "split": split,
              "images": int(len(y)), "clean_accuracy": acc, "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        print_json(result)
        return
    table = Table(title=f"{model.name} on {info.name} ({split})")
    for col in ("arch", "method", "images", "clean accuracy"):
        table.add_column(col)
    table.add_row(meta.arch, meta.method, str(len(y)), f"{acc:.4f}")
    console.print(table)
