"""``certaudit demo``: the main job on the embedded default (no download, no GPU).

Trains a small 2C2F on scikit-learn's embedded digits under Gaussian noise, certifies every test
image with randomized smoothing (CERTIFY of Cohen et al.), and, when the Lipschitz defense is
available, trains a GloRo model and certifies it at ε and 2ε. Prints the headline table and
writes checkpoints, rows and ``summary.json`` under ``--out``.
"""

from __future__ import annotations

import importlib.util
import platform
import time
from pathlib import Path

import typer

from certaudit.commands._common import console, print_json
from certaudit.errors import InputError


def register(app: typer.Typer) -> None:
    app.command("demo", help="Run the main job on the embedded default data (digits): train, certify, summarize.")(demo_cmd)


def demo_cmd(
    out: Path = typer.Option(Path("certaudit-demo"), "--out", help="folder for checkpoints, rows and summary.json"),
    sigma: float = typer.Option(0.25, "--sigma", help="smoothing noise σ"),
    eps: float = typer.Option(0.25, "--eps", help="ℓ2 radius ε at which certificates are judged (and 2ε)"),
    n: int = typer.Option(2000, "--n", help="CERTIFY estimation samples per image"),
    n0: int = typer.Option(100, "--n0", help="CERTIFY selection samples per image"),
    alpha: float = typer.Option(0.001, "--alpha", help="CERTIFY failure probability"),
    epochs: int = typer.Option(15, "--epochs", help="training epochs for the demo models"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    import torch
    from rich.table import Table

    from certaudit.audits.certified import summarize
    from certaudit.data import dataset_info, load_dataset
    from certaudit.defenses.smoothing import SmoothedClassifier
    from certaudit.models import ModelMeta, build_model, save_checkpoint
    from certaudit.results import RowWriter, write_json_atomic
    from certaudit.train import TrainConfig, get_method, train

    for name, value in (("--sigma", sigma), ("--eps", eps)):
        if not value > 0 or value != value:
            raise InputError(f"{name} must be > 0, got {value}")
    if epochs < 1 or n < 1 or n0 < 1:
        raise InputError("--epochs, --n and --n0 must be >= 1")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = dataset_info("digits")
    x_tr, y_tr = load_dataset("digits", "train")
    x_te, y_te = load_dataset("digits", "test")
    radii = [0.0, eps / 2, eps, 2 * eps, 3 * eps]
    results: list[dict] = []

    def fit(method: str, **kw) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build_model("2c2f", info.shape, info.num_classes, info.mean, info.std)
        cfg = TrainConfig(method=method, epochs=epochs, lr=3e-3, batch_size=64, seed=seed, **kw)
        res = train(model, x_tr, y_tr, cfg, x_te, y_te, progress=not as_json)
        m = get_method(method)
        save_checkpoint(out / f"digits_2c2f_{method}.safetensors", model, ModelMeta(
            arch="2c2f", dataset="digits", input_shape=list(info.shape), num_classes=10, mean=list(info.mean),
            std=list(info.std), method=m.name, **m.meta(cfg), training={"test_accuracy": res.test_accuracy}))
        return model

    def certify_rows(defense, name: str, config: dict, certify_fn) -> dict:
        t0 = time.perf_counter()
        path = out / f"rows_{name}.jsonl"
        if path.exists():
            path.unlink()  # the demo retrains, so old rows do not describe the new model
        with RowWriter(path, config) as writer:
            chunk = 120
            for lo in range(0, len(y_te), chunk):
                tc = time.perf_counter()
                cert = certify_fn(x_te[lo:lo + chunk], lo)
                dt = (time.perf_counter() - tc) / len(cert)
                writer.write_many([
                    {"index": lo + i, "label": int(y_te[lo + i]), "prediction": int(cert.label[i]),
                     "radius": float(cert.radius[i]), "correct": bool(int(cert.label[i]) == int(y_te[lo + i])),
                     "seconds": dt} for i in range(len(cert))])
            rows = writer.rows
        summary = summarize(rows, radii, eps=eps)
        summary.update({"defense": name, "rows": str(path), "wall_seconds": time.perf_counter() - t0})
        return summary

    # randomized smoothing on a Gaussian-noise model
    model = fit("gaussian", sigma=sigma)
    smooth = SmoothedClassifier(model, 10, sigma, n0=n0, n=n, alpha=alpha, seed=seed)
    results.append(certify_rows(smooth, "smoothing", {"defense": "smoothing", **smooth.settings()},
                                lambda xb, lo: smooth.certify(xb, seed=seed, indices=range(lo, lo + len(xb)))))

    # GloRo / Lipschitz margin, when that defense is part of this installation
    if importlib.util.find_spec("certaudit.defenses.lipschitz") is not None:
        from certaudit.defenses.lipschitz import LipschitzDefense

        gmodel = fit("gloro", eps=eps)
        lip = LipschitzDefense(gmodel, 10)
        results.append(certify_rows(lip, "lipschitz", {"defense": "lipschitz", "eps": eps},
                                    lambda xb, lo: lip.certify(xb)))

    summary = {
        "dataset": "digits", "test_images": int(len(y_te)), "arch": "2c2f", "eps": eps, "sigma": sigma,
        "seed": seed, "results": results, "seconds": time.perf_counter() - t_start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    write_json_atomic(out / "summary.json", summary)
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"certaudit demo: 2C2F on digits ({len(y_te)} test images), ℓ2, ε = {eps}")
    table.add_column("defense")
    table.add_column("clean acc", justify="right")
    for r in radii:
        table.add_column(f"cert acc r={r:g}", justify="right")
    table.add_column("rejected at ε", justify="right")
    table.add_column("s", justify="right")
    for res in results:
        cells = [f"{c['accuracy']:.3f}" for c in res["certified_accuracy"]]
        table.add_row(res["defense"], f"{res['clean_accuracy']:.3f}", *cells, f"{res['rejection_rate_eps']:.3f}",
                      f"{res['wall_seconds']:.1f}")
    console.print(table)
    console.print(f"wrote {out}/summary.json, rows and checkpoints ({summary['seconds']:.1f}s in all)")
