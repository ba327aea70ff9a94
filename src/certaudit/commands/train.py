"""``certaudit train``: train a model on a data set and save a certaudit checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from certaudit.commands._common import check_output, console, parse_number, print_json
from certaudit.data import dataset_info, load_dataset
from certaudit.errors import InputError
from certaudit.models import ModelMeta, build_model, resolve_device, save_checkpoint
from certaudit.train import TrainConfig, check_config, train


def register(app: typer.Typer) -> None:
    app.command("train", help="Train a model (standard, gaussian noise for smoothing, or a certified method).")(train_cmd)


def train_cmd(
    dataset: str = typer.Option(..., "--dataset", help="digits, mnist, fashion-mnist or cifar10"),
    arch: str = typer.Option("2c2f", "--arch", help="2c2f, 4c3f, 6c2f, resnet20, resnet110"),
    method: str = typer.Option("standard", "--method", help="standard, gaussian, or a certified method (gloro, ...)"),
    out: Path = typer.Option(..., "--out", help="checkpoint to write (.safetensors)"),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="Gaussian noise σ (method gaussian)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="certified training radius, e.g. 0.3 or 8/255"),
    eps_warmup: str = typer.Option("0.3", "--eps-warmup", help="fraction of training over which ε ramps up from 0 (certified methods)"),
    option: list[str] = typer.Option([], "--option", help="method option KEY=VALUE, repeatable (gloro: trades=λ, power_iters=k)"),
    epochs: int = typer.Option(10, "--epochs", help="passes over the training set"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: str = typer.Option("1e-3", "--lr", help="peak learning rate"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd"),
    weight_decay: str = typer.Option("0", "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, constant or step"),
    augment: str = typer.Option("none", "--augment", help="none or flipcrop"),
    seed: int = typer.Option(0, "--seed"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first K training images"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the data set files"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:

    check_output(out, "--out")  # before any training: a run must not end unable to save

    if out.exists() and out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file name like model.safetensors")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    config = TrainConfig(
        method=method, epochs=epochs, batch_size=batch_size, lr=parse_number(lr, "--lr"),
        optimizer=optimizer, weight_decay=parse_number(weight_decay, "--weight-decay"), schedule=schedule,
        sigma=None if sigma is None else parse_number(sigma, "--sigma"),
        eps=None if eps is None else parse_number(eps, "--eps"), augment=augment, seed=seed,
        eps_warmup=parse_number(eps_warmup, "--eps-warmup", positive=True, allow_zero=True),
        extra=_method_options(option),
    )
    if config.extra and method.lower() in ("standard", "gaussian"):
        raise InputError(f"--option is for certified methods (gloro, ibp, crown-ibp); method {method} takes none")
    m = check_config(config)  # validate before loading data
    info = dataset_info(dataset)
    dev = resolve_device(device)
    x_tr, y_tr = load_dataset(info.name, "train", data_root)
    x_te, y_te = load_dataset(info.name, "test", data_root)
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    torch_seed(seed)
    model = build_model(arch, info.shape, info.num_classes, info.mean, info.std)

    def report(row: dict) -> None:
        if not as_json:
            console.print(f"epoch {row['epoch']}: loss {row['loss']:.4f}  train acc {row['train_accuracy']:.4f}"
                          f"  test acc {row.get('test_accuracy', float('nan')):.4f}  ({row['seconds']:.1f}s)")

    result = train(model, x_tr, y_tr, config, x_te, y_te, device=dev, progress=not as_json, on_epoch=report)
    meta = ModelMeta(
        arch=arch.lower(), dataset=info.name, input_shape=list(info.shape), num_classes=info.num_classes,
        mean=list(info.mean), std=list(info.std), method=m.name, **m.meta(config),
        training={"config": result.config, "history": result.history, "test_accuracy": result.test_accuracy,
                  "seconds": round(result.seconds, 2), "train_size": int(len(y_tr)), "device": str(dev)},
    )
    save_checkpoint(out, model.cpu(), meta)
    summary = {"out": str(out), "arch": meta.arch, "dataset": info.name, "method": m.name,
               "test_accuracy": result.test_accuracy, "seconds": round(result.seconds, 2)}
    if as_json:
        print_json(summary)
    else:
        console.print(f"saved {out}: clean test accuracy {result.test_accuracy:.4f} in {result.seconds:.1f}s")


def torch_seed(seed: int) -> None:
    torch.manual_seed(seed)




def _method_options(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs for the method (numbers parsed, the method validates the keys)."""
    out: dict = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option must be KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_number(value, f"--option {key.strip()}", positive=True, allow_zero=True)
    return out
