#!/usr/bin/env python
"""Train the small models shipped in ``certaudit/zoo`` (the embedded data of ``certaudit demo`` and the tests).

Two zoos, each rerunnable by anyone on a CPU with one thread (``manifest.json`` records the time)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_zoo.py --dataset fashion-mnist   # the demo's zoo
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_zoo.py --dataset digits          # the tests' tiny zoo
    .venv/bin/python scripts/train_zoo.py --dataset fashion-mnist --only fmnist_crown_ibp --out /tmp/zoo

``--dataset fashion-mnist`` (the embedded default of ``certaudit demo``): 2C2F networks trained on the
60,000 Fashion-MNIST training images (read by ``certaudit.data``: Debian's ``dataset-fashion-mnist``,
``--data-root`` or a checked download), audited on ``fashion_mnist_1k.npz``, a fixed class-balanced
subset of the official test set (the first 100 test images of each class in index order, kept in
index order; uint8; data set name ``fashion-mnist-1k``):

* ``fmnist_gaussian`` -- Gaussian-noise training, σ = 0.25 (the base model of randomized smoothing);
* ``fmnist_gloro_eps`` -- GloRo training at ε = 0.3 (ℓ2; the degradation paper's MNIST radius for its 2C2F);
* ``fmnist_gloro_2eps`` -- GloRo training at 2ε = 0.6, certified at ε: the double-radius defense of
  §4.1 of the degradation paper;
* ``fmnist_crown_ibp`` -- CROWN-IBP training at ε = 0.1 (ℓ∞; Wong & Kolter's and Zhang et al.'s
  Fashion-MNIST radius), with a short ε schedule.

``--dataset digits`` (the tests' fixture): the same 2C2F on scikit-learn's 8×8 digits (1437 train /
360 test): ``digits_gaussian``, ``digits_gloro_eps`` (ε = 0.25), ``digits_gloro_2eps``, and
``digits_test.npz``.

``manifest.json`` holds one section per zoo (``zoos.<dataset>``): per model the file, SHA-256, method,
σ or ε, norm, epochs, learning rate, test accuracy (and certified accuracy at ε where the defense is
cheap to run on the whole test set), seconds; and the data file with its provenance (indices into the
official test set, SHA-256 of the source files). A run rewrites only its own zoo's section; ``--only``
retrains some models and keeps the others' entries. Everything is seeded: the same torch version on
the same CPU with the same thread count gives the same files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from certaudit.data import SOURCES, dataset_info, load_dataset  # noqa: E402
from certaudit.models import ModelMeta, build_model, save_checkpoint  # noqa: E402
from certaudit.train import TrainConfig, get_method, train  # noqa: E402

FMNIST_PER_CLASS = 100
FMNIST_DATA_FILE = "fashion_mnist_1k.npz"
FMNIST_LICENCE = {
    "attribution": "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747), Zalando Research",
    "licence": "MIT",
    "copyright": "Copyright (c) 2017 Zalando SE, https://tech.zalando.com",
    "url": "https://github.com/zalandoresearch/fashion-mnist",
    "licence_file": "FASHION_MNIST_LICENSE.txt",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so the same arrays give the same bytes (and SHA-256)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=9)
    path.write_bytes(buf.getvalue())


def _specs(dataset: str, args: argparse.Namespace) -> list[tuple[str, str, dict[str, float], dict[str, Any]]]:
    """(name, method, radius, TrainConfig fields) per model of a zoo."""
    if dataset == "digits":
        ep = args.epochs or 30
        common = {"lr": 3e-3, "batch_size": 64, "epochs": ep}
        return [
            ("digits_gaussian", "gaussian", {"sigma": args.sigma}, dict(common)),
            ("digits_gloro_eps", "gloro", {"eps": args.eps}, {**common, "eps_warmup": 0.3}),
            ("digits_gloro_2eps", "gloro", {"eps": 2 * args.eps}, {**common, "eps_warmup": 0.3}),
        ]
    common = {"lr": 1e-3, "batch_size": 128}
    return [
        ("fmnist_gaussian", "gaussian", {"sigma": args.sigma}, {**common, "epochs": args.epochs or 10}),
        ("fmnist_gloro_eps", "gloro", {"eps": args.eps}, {**common, "epochs": args.epochs or 12, "eps_warmup": 0.3}),
        ("fmnist_gloro_2eps", "gloro", {"eps": 2 * args.eps},
         {**common, "epochs": args.epochs or 12, "eps_warmup": 0.3}),
        # CROWN-IBP (Zhang et al. 2020) with a short ε schedule, as CROWN bounds are slow on a CPU: one epoch
        # of clean training, one epoch over which ε (0 → ε), β (1 → 0: CROWN-IBP → IBP bounds) and κ (1 → 0)
        # ramp linearly, then four epochs at ε with IBP bounds (β = 0) and the robust loss only (κ = 0)
        ("fmnist_crown_ibp", "crown-ibp", {"eps": args.eps_linf},
         {**common, "epochs": args.epochs or 6, "eps_warmup": 1 / 6, "extra": {"ramp_start": 1 / 6}}),
    ]


@torch.no_grad()
def _certified_accuracy(model: torch.nn.Module, meta: ModelMeta, defense: str, x: torch.Tensor, y: torch.Tensor,
                        eps: float, method: str | None = None, chunk: int = 1000) -> float:
    """Fraction of (x, y) the defense certifies with the correct label at exactly ``eps`` (Algorithm 2.1)."""
    from certaudit.defenses.registry import build_defense

    guard = build_defense(defense, model, meta, {"eps": eps, **({"method": method} if method else {})})
    hits = 0
    for i in range(0, len(y), chunk):
        hits += int((guard.accept(x[i:i + chunk], eps) == y[i:i + chunk]).sum())
    return hits / len(y)


def _certified(name: str, method: str, model: torch.nn.Module, meta: ModelMeta, x: torch.Tensor, y: torch.Tensor,
               args: argparse.Namespace) -> dict[str, Any]:
    """Certified accuracy on the whole test set at the audit's radius, where it is cheap (not smoothing)."""
    if method == "gloro":
        return {"norm": "l2", "eps": args.eps, "lipschitz": _certified_accuracy(model, meta, "lipschitz", x, y, args.eps)}
    if method in ("crown-ibp", "ibp"):
        return {"norm": "linf", "eps": args.eps_linf,
                "crown-ibp": _certified_accuracy(model, meta, "interval", x, y, args.eps_linf, "crown-ibp"),
                "ibp": _certified_accuracy(model, meta, "interval", x, y, args.eps_linf, "ibp")}
    return {}


def _fashion_subset(out: Path, root: Path | None) -> dict[str, Any]:
    """Write the embedded test subset (first 100 of each class in index order) and return its manifest entry."""
    from certaudit.data import DEBIAN_FASHION_MNIST, _find_idx, cache_dir, parse_idx

    folders = [root, root / "fashion-mnist", root / "fashion-mnist" / "raw"] if root else \
        [DEBIAN_FASHION_MNIST, cache_dir() / "fashion-mnist"]
    stems = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    found = None
    for folder in folders:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            found = paths
            break
    if found is None:
        load_dataset("fashion-mnist", "test", root)  # downloads (checked) into the cache, or says where to look
        folder = root or cache_dir() / "fashion-mnist"
        found = [_find_idx(folder, s) for s in stems]
    images = parse_idx(found[0].read_bytes(), str(found[0]))  # (10000, 28, 28) uint8
    labels = parse_idx(found[1].read_bytes(), str(found[1])).astype(np.int64)
    x_chk, y_chk = load_dataset("fashion-mnist", "test", root)
    if not (np.array_equal(labels, y_chk.numpy()) and np.allclose(images[:, None] / 255.0, x_chk.numpy())):
        raise SystemExit("the IDX files read here differ from certaudit's loader")
    index = np.sort(np.concatenate([np.flatnonzero(labels == k)[:FMNIST_PER_CLASS] for k in range(10)]))
    path = out / FMNIST_DATA_FILE
    write_npz(path, x=images[index][:, None].copy(), scale=np.float32(255.0), y=labels[index],
              index=index.astype(np.int64))
    source_files = {}
    for p in found:
        raw = p.read_bytes()
        idx_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        key = p.name if p.name.endswith(".gz") else p.name + ".gz"
        source_files[p.name] = {"sha256": hashlib.sha256(raw).hexdigest(),
                                "sha256_uncompressed": hashlib.sha256(idx_bytes).hexdigest(),
                                "sha256_official_gz": SOURCES["fashion-mnist"][key].sha256}
    return {"file": path.name, "sha256": sha256(path), "images": int(len(index)), "name": "fashion-mnist-1k",
            "source": "Fashion-MNIST official test set (t10k, 10,000 images)",
            "rule": f"the first {FMNIST_PER_CLASS} test images of each class in index order, kept in index order",
            "read_from": str(found[0].parent), "source_files": source_files,
            "note": "Debian's dataset-fashion-mnist re-compresses the official files: its .gz SHA-256 differ from "
                    "the official release's, the IDX contents (sha256_uncompressed) are the data",
            "class_counts": np.bincount(labels[index], minlength=10).tolist(), **FMNIST_LICENCE,
            "indices": index.tolist()}


def _digits_subset(out: Path, x_te: torch.Tensor, y_te: torch.Tensor) -> dict[str, Any]:
    raw = np.rint(x_te.numpy() * 16.0).astype(np.uint8)  # digits are integers 0..16 scaled by 1/16
    if not np.allclose(raw.astype(np.float32) / 16.0, x_te.numpy()):
        raise SystemExit("digits test images are not multiples of 1/16: the loader changed")
    data_path = out / "digits_test.npz"
    write_npz(data_path, x=raw, scale=np.float32(16.0), y=y_te.numpy().astype(np.int64),
              index=np.arange(len(y_te), dtype=np.int64))
    return {"file": data_path.name, "sha256": sha256(data_path), "images": int(len(y_te)),
            "source": 'load_dataset("digits", "test")'}


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"script": "scripts/train_zoo.py", "demo": "fashion-mnist", "zoos": {}}
    man = json.loads(path.read_text(encoding="utf-8"))
    if "zoos" not in man:  # the single-zoo manifest of earlier versions (digits only)
        man = {"script": "scripts/train_zoo.py", "demo": "fashion-mnist", "zoos": {man.get("dataset", "digits"): man}}
    return man


def dump_manifest(manifest: dict[str, Any]) -> str:
    """JSON with two spaces of indent, index lists on one line each (1,000 indices are not 1,000 lines)."""
    text = json.dumps(manifest, indent=2)
    return re.sub(r'("(?:indices|class_counts)": )\[([\s\d,]*)\]', lambda m: m.group(1) + "[" + ", ".join(re.findall(r"\d+", m.group(2))) + "]", text) + "\n"


def _write_manifest(path: Path, manifest: dict[str, Any], key: str, zoo: dict[str, Any], names: list[str]) -> None:
    """The manifest with this zoo's section replaced: models in spec order, each this run's entry or (not
    retrained yet, or not by an ``--only`` run) its earlier one."""
    old = manifest["zoos"].get(key, {}).get("models", {})
    section = dict(zoo)
    section["models"] = {n: zoo["models"].get(n, old.get(n)) for n in names if zoo["models"].get(n, old.get(n))}
    out = {**manifest, "zoos": {**manifest["zoos"], key: section}}
    out.setdefault("demo", "fashion-mnist")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_manifest(out), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "certaudit" / "zoo")
    ap.add_argument("--eps", type=float, default=None,
                    help="ℓ2 radius ε of the audit (GloRo models at ε and 2ε); default 0.3 (fashion-mnist), 0.25 (digits)")
    ap.add_argument("--eps-linf", type=float, default=0.1, help="ℓ∞ radius of the CROWN-IBP model (fashion-mnist)")
    ap.add_argument("--sigma", type=float, default=0.25, help="Gaussian-noise σ of the smoothing model")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every model (default: per model)")
    ap.add_argument("--only", action="append", default=[], help="train only this model (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible and robust to load)")
    ap.add_argument("--data-root", type=Path, default=None, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.eps is None:
        args.eps = 0.25 if args.dataset == "digits" else 0.3
    torch.set_num_threads(max(1, args.threads))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    key = args.dataset
    info = dataset_info(key)
    t_data = time.perf_counter()
    x_tr, y_tr = load_dataset(key, "train", args.data_root)
    x_te, y_te = load_dataset(key, "test", args.data_root)
    specs = _specs(key, args)
    unknown = sorted(set(args.only) - {s[0] for s in specs})
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; {key} has {[s[0] for s in specs]}")

    man_path = out / "manifest.json"
    manifest = _read_manifest(man_path)
    zoo: dict[str, Any] = {"dataset": key, "arch": "2c2f", "eps": args.eps, "sigma": args.sigma,
                           **({"eps_linf": args.eps_linf} if key == "fashion-mnist" else {}),
                           "torch": torch.__version__, "script": "scripts/train_zoo.py", "models": {}}
    if key == "fashion-mnist":
        zoo.update({"threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "timing": "seconds: wall-clock time of training alone (not data loading or certification) with "
                              "`threads` torch threads; it grows with other load on the machine",
                    "train_data": f"Fashion-MNIST train set ({len(y_tr)} images)"})
        zoo["data"] = _fashion_subset(out, args.data_root)
        x_sub = torch.from_numpy(np.load(out / FMNIST_DATA_FILE)["x"].astype(np.float32) / 255.0)
        y_sub = torch.from_numpy(np.load(out / FMNIST_DATA_FILE)["y"])
    else:
        zoo["data"] = _digits_subset(out, x_te, y_te)
        x_sub = y_sub = None
    print(f"data: {time.perf_counter() - t_data:.1f} s", flush=True)

    for name, method, radius, opts in specs:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = build_model("2c2f", info.shape, info.num_classes, info.mean, info.std)
        cfg = TrainConfig(method=method, seed=args.seed, **radius, **opts)
        res = train(model, x_tr, y_tr, cfg, x_te, y_te, progress=False,
                    on_epoch=lambda row, n=name: print(f"  {n} epoch {row['epoch']}: loss {row['loss']:.4f}, test "
                                                      f"acc {row.get('test_accuracy', 0):.4f} ({row['seconds']:.1f} s)",
                                                      flush=True))
        train_seconds = time.perf_counter() - t0
        m = get_method(method)
        path = out / f"{name}.safetensors"
        meta = ModelMeta(arch="2c2f", dataset=key, input_shape=list(info.shape), num_classes=info.num_classes,
                         mean=list(info.mean), std=list(info.std), method=m.name, **m.meta(cfg),
                         training={"epochs": cfg.epochs, "seed": args.seed, "lr": cfg.lr,
                                   "test_accuracy": res.test_accuracy, "source": "scripts/train_zoo.py"})
        save_checkpoint(path, model, meta)
        path.chmod(0o644)  # shipped in the package: readable by all
        entry: dict[str, Any] = {"file": path.name, "sha256": sha256(path), "method": method, **radius,
                                 "norm": m.meta(cfg).get("norm", "l2"), "epochs": cfg.epochs, "lr": cfg.lr,
                                 "batch_size": cfg.batch_size, "test_accuracy": res.test_accuracy,
                                 "seconds": round(train_seconds, 1)}
        if method != "gaussian":
            entry["eps_warmup"] = cfg.eps_warmup
        if cfg.extra:
            entry["options"] = dict(cfg.extra)
        if key == "fashion-mnist":
            model.eval()
            with torch.no_grad():
                entry["subset_accuracy"] = int((model(x_sub).argmax(1) == y_sub).sum()) / len(y_sub)
            cert = _certified(name, method, model, meta, x_te, y_te, args)
            if cert:
                entry["certified_accuracy"] = cert
        zoo["models"][name] = entry
        _write_manifest(man_path, manifest, key, zoo, [sp[0] for sp in specs])  # after every model: an interrupted run keeps what it made
        print(f"{name}: test accuracy {res.test_accuracy:.4f}, {entry.get('certified_accuracy', '')} "
              f"({train_seconds:.1f} s training)", flush=True)

    _write_manifest(man_path, manifest, key, zoo, [sp[0] for sp in specs])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
