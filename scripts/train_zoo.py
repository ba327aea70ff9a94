#!/usr/bin/env python
"""Train the tiny models shipped in ``certaudit/zoo`` (the embedded default of ``certaudit demo``).

Rerunnable by anyone (CPU, about a minute on 2 cores)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_zoo.py            # writes src/certaudit/zoo/
    .venv/bin/python scripts/train_zoo.py --out /tmp/zoo --epochs 5      # elsewhere, quicker

Data: scikit-learn's embedded 8×8 digits with certaudit's fixed split (1437 train / 360 test).
Models (2C2F, ℓ2, in-model normalization):

* ``digits_gaussian`` -- Gaussian-noise training with σ (the base model of randomized smoothing);
* ``digits_gloro_eps`` -- GloRo training at ε (certified at ε by the Lipschitz defense);
* ``digits_gloro_2eps`` -- GloRo training at 2ε, certified at ε: the double-radius defense of §4.1
  of the degradation paper (fewer false positives, lower clean VRA).

Also writes ``digits_test.npz`` (the test images, raw 0..16 intensities as uint8, their labels and
indices into ``load_dataset("digits", "test")``) and ``manifest.json`` (file names, SHA-256, the
training settings and the test accuracy of every model). Everything is seeded: the same torch
version on the same CPU gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from certaudit.data import dataset_info, load_dataset  # noqa: E402
from certaudit.models import ModelMeta, build_model, save_checkpoint  # noqa: E402
from certaudit.train import TrainConfig, get_method, train  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "certaudit" / "zoo")
    ap.add_argument("--eps", type=float, default=0.25, help="ℓ2 radius ε of the audit (GloRo models at ε and 2ε)")
    ap.add_argument("--sigma", type=float, default=0.25, help="Gaussian-noise σ of the smoothing model")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    info = dataset_info("digits")
    x_tr, y_tr = load_dataset("digits", "train")
    x_te, y_te = load_dataset("digits", "test")

    specs = [
        ("digits_gaussian", "gaussian", {"sigma": args.sigma}, {"lr": 3e-3}),
        ("digits_gloro_eps", "gloro", {"eps": args.eps}, {"lr": 3e-3, "eps_warmup": 0.3}),
        ("digits_gloro_2eps", "gloro", {"eps": 2 * args.eps}, {"lr": 3e-3, "eps_warmup": 0.3}),
    ]
    manifest: dict = {"dataset": "digits", "arch": "2c2f", "eps": args.eps, "sigma": args.sigma,
                      "torch": torch.__version__, "script": "scripts/train_zoo.py", "models": {}}
    for name, method, radius, opts in specs:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = build_model("2c2f", info.shape, info.num_classes, info.mean, info.std)
        cfg = TrainConfig(method=method, epochs=args.epochs, batch_size=64, seed=args.seed, **radius, **opts)
        res = train(model, x_tr, y_tr, cfg, x_te, y_te, progress=False)
        m = get_method(method)
        path = out / f"{name}.safetensors"
        save_checkpoint(path, model, ModelMeta(
            arch="2c2f", dataset="digits", input_shape=list(info.shape), num_classes=info.num_classes,
            mean=list(info.mean), std=list(info.std), method=m.name, **m.meta(cfg),
            training={"epochs": args.epochs, "seed": args.seed, "lr": cfg.lr, "test_accuracy": res.test_accuracy,
                      "source": "scripts/train_zoo.py"}))
        manifest["models"][name] = {"file": path.name, "sha256": sha256(path), "method": method, **radius,
                                    "test_accuracy": res.test_accuracy, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: test accuracy {res.test_accuracy:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    raw = np.rint(x_te.numpy() * 16.0).astype(np.uint8)  # digits are integers 0..16 scaled by 1/16
    if not np.allclose(raw.astype(np.float32) / 16.0, x_te.numpy()):
        raise SystemExit("digits test images are not multiples of 1/16: the loader changed")
    data_path = out / "digits_test.npz"
    np.savez_compressed(data_path, x=raw, scale=np.float32(16.0), y=y_te.numpy().astype(np.int64),
                        index=np.arange(len(y_te), dtype=np.int64))
    manifest["data"] = {"file": data_path.name, "sha256": sha256(data_path), "images": int(len(y_te)),
                        "source": 'load_dataset("digits", "test")'}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
