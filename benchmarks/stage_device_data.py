"""Stage what ``benchmarks/gpu_suite.py`` needs beyond the repository into one git-ignored folder.

The device machine sees the working tree and the paths named in ``carry`` (64 MiB in all), not
``../shared``, and it has no package registry. One command copies the rest into ``.device/``
(ignored by ``.gitignore``, about 33 MiB)::

    PYTHONPATH=src .venv/bin/python benchmarks/stage_device_data.py

It writes

* ``cifar10/train.npz``, ``cifar10/test.npz``: ``--train-images`` / ``--test-images`` images of a
  seeded permutation of the CIFAR-10 JPEG copy (``../shared/data/cifar10-jpeg``), in that copy's own
  format (``jpeg``, ``offsets``, ``labels``, plus ``source_index``: the image's position in the
  copy), so ``certaudit.data.load_dataset("cifar10", split, root=".device/cifar10")`` reads them;
  any prefix of either file is a uniform random sample of its split. JPEG bytes are about a third
  of the raw pixels, so 30,000 training images fit in ~28 MiB;
* ``fashion-mnist/t10k-*-ubyte.gz``: the first ``--fmnist-images`` Fashion-MNIST test images (IDX),
  read with certaudit's loader from Debian's ``dataset-fashion-mnist`` where installed;
* ``kw/fashion_mnist.pth``, ``kw/cifar_small_8px.pth``: Wong & Kolter's models (copied as they are);
* ``site/``: pure-Python packages that the device image lacks, copied from this environment:
  ``pytorch_msssim`` (imported by ``certaudit.attacks``), ``convex_adversarial`` (the interval
  baseline) and auto_LiRPA with ``appdirs``, ``graphviz`` and ``tqdm`` (from ``$HOME/.cache/alirpa/site``, see
  ``benchmarks/README.md``) where found; the suite appends ``site/`` to ``sys.path`` *after* the
  machine's own packages;
* ``MANIFEST.json``: what was staged, with sizes and SHA-256 sums.

Every staged data file is read back with certaudit's own loaders (``load_dataset``, ``convert_kw``)
before the command succeeds, and the folder must stay under ``--max-mib`` (default 48: the
working tree travels in the same 64 MiB). ``synthetic(folder)`` writes a tiny folder of the same
layout from random pixels and weights: ``gpu_suite.py --smoke`` runs on it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ALIRPA_SITE = Path.home() / ".cache" / "alirpa" / "site"
SITE_PACKAGES = ("pytorch_msssim", "convex_adversarial", "auto_LiRPA", "appdirs", "graphviz", "tqdm")
KW_FILES = ("fashion_mnist.pth", "cifar_small_8px.pth")
FMNIST_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def subset_jpeg_copy(src: Path, dst: Path, count: int, seed: int) -> int:
    """Write ``count`` images of a seeded permutation of the JPEG copy ``src`` to ``dst`` (same format)."""
    with np.load(src, allow_pickle=False) as z:
        blob, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
    n = len(labels)
    pick = np.random.default_rng(seed).permutation(n)[:min(int(count), n)]
    parts = [blob[offsets[i]:offsets[i + 1]] for i in pick]
    new_offsets = np.zeros(len(pick) + 1, dtype=np.int64)
    new_offsets[1:] = np.cumsum([len(p) for p in parts])
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, jpeg=np.concatenate(parts).astype(np.uint8), offsets=new_offsets,
             labels=np.asarray(labels)[pick].astype(np.uint8), source_index=pick.astype(np.int64))
    return len(pick)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped), the format of (Fashion-)MNIST."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(head + arr.tobytes(), mtime=0))


def stage_fmnist(dst: Path, count: int) -> int | None:
    """The first ``count`` Fashion-MNIST test images as IDX files, or None where none is installed."""
    from certaudit.data import load_dataset
    from certaudit.errors import DataNotFoundError

    try:
        x, y = load_dataset("fashion-mnist", "test", download=False)
    except DataNotFoundError as exc:
        print(f"fashion-mnist: not staged ({exc})", file=sys.stderr)
        return None
    k = min(int(count), len(y))
    write_idx(dst / FMNIST_TEST[0], np.rint(x[:k, 0].numpy() * 255.0))
    write_idx(dst / FMNIST_TEST[1], y[:k].numpy())
    return k


def copy_package(name: str, site: Path, extra_paths: list[Path]) -> str | None:
    """Copy the pure-Python package or module ``name`` (from this environment or ``extra_paths``) into ``site``."""
    old = list(sys.path)
    sys.path.extend(str(p) for p in extra_paths if p.is_dir())
    try:
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = old
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    site.mkdir(parents=True, exist_ok=True)
    if origin.name == "__init__.py":
        target = site / origin.parent.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(origin.parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    else:
        target = site / origin.name
        shutil.copy2(origin, target)
    return str(origin.parent if origin.name == "__init__.py" else origin)


def synthetic(dst: Path, train_images: int = 192, test_images: int = 64, fmnist_images: int = 16,
              seed: int = 0) -> Path:
    """A tiny staged folder of the real layout from random pixels and random 2C2F weights (for --smoke)."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("test", test_images)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        # class-dependent colour plus noise, so a few training steps see some signal
        base = rng.uniform(0, 255, size=(10, 1, 1, 3))
        pix = np.clip(base[labels] + rng.normal(0, 40, size=(count, 32, 32, 3)), 0, 255).astype(np.uint8)
        parts = []
        for img in pix:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            parts.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        offsets = np.zeros(count + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        (dst / "cifar10").mkdir(parents=True, exist_ok=True)
        np.savez(dst / "cifar10" / f"{split}.npz", jpeg=np.concatenate(parts), offsets=offsets, labels=labels,
                 source_index=np.arange(count, dtype=np.int64))
    write_idx(dst / "fashion-mnist" / FMNIST_TEST[0], rng.integers(0, 256, size=(fmnist_images, 28, 28)))
    write_idx(dst / "fashion-mnist" / FMNIST_TEST[1], np.arange(fmnist_images) % 10)
    gen = torch.Generator().manual_seed(seed)

    def kw_state(channels: int, side: int) -> dict:  # Wong & Kolter's 2C2F state-dict layout
        shapes = {"0": ((16, channels, 4, 4), 16), "2": ((32, 16, 4, 4), 32),
                  "5": ((100, 32 * (side // 4) ** 2), 100), "7": ((10, 100), 10)}
        out = {}
        for k, (w, b) in shapes.items():
            fan_in = int(np.prod(w[1:]))
            out[f"{k}.weight"] = torch.randn(w, generator=gen) / fan_in ** 0.5
            out[f"{k}.bias"] = torch.zeros(b)
        return out

    (dst / "kw").mkdir(parents=True, exist_ok=True)
    torch.save(kw_state(1, 28), dst / "kw" / KW_FILES[0])
    torch.save({"state_dict": [kw_state(3, 32)], "err": 0.0, "epoch": 0}, dst / "kw" / KW_FILES[1])
    return dst


def verify(dst: Path) -> dict:
    """Read every staged data file back with certaudit's loaders; returns what each holds."""
    from certaudit.data import load_dataset
    from certaudit.defenses.interval import convert_kw

    out: dict = {}
    for split in ("train", "test"):
        if (dst / "cifar10" / f"{split}.npz").is_file():
            x, y = load_dataset("cifar10", split, root=dst / "cifar10", download=False)
            out[f"cifar10_{split}"] = {"images": int(y.shape[0]), "classes": int(y.unique().numel())}
    if all((dst / "fashion-mnist" / f).is_file() for f in FMNIST_TEST):
        x, y = load_dataset("fashion-mnist", "test", root=dst / "fashion-mnist", download=False)
        out["fashion_mnist_test"] = {"images": int(y.shape[0])}
    for name in KW_FILES:
        if (dst / "kw" / name).is_file():
            model, meta = convert_kw(dst / "kw" / name)
            out[f"kw_{name}"] = {"dataset": meta.dataset, "eps": meta.eps}
    return out


def folder_bytes(dst: Path) -> int:
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".device", help="staging folder (default: .device, git-ignored)")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (default: ../shared)")
    p.add_argument("--train-images", type=int, default=30_000, help="CIFAR-10 training images (JPEG, ~0.93 KiB each)")
    p.add_argument("--test-images", type=int, default=1_000, help="CIFAR-10 test images")
    p.add_argument("--fmnist-images", type=int, default=1_000, help="Fashion-MNIST test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the image permutation")
    p.add_argument("--max-mib", type=float, default=48.0, help="refuse a folder larger than this")
    p.add_argument("--synthetic", action="store_true", help="write the tiny random folder that --smoke uses")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    dst = args.out
    dst.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"purpose": "benchmarks/gpu_suite.py (issue 20); carry this folder to the device machine",
                      "command": " ".join(["benchmarks/stage_device_data.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.synthetic:
        synthetic(dst)
        manifest["synthetic"] = True
    else:
        cifar = args.shared / "data" / "cifar10-jpeg"
        if not (cifar / "train.npz").is_file():
            print(f"stage_device_data: no CIFAR-10 JPEG copy at {cifar}", file=sys.stderr)
            return 1
        manifest["cifar10"] = {
            "source": str(cifar), "seed": args.seed,
            "train": subset_jpeg_copy(cifar / "train.npz", dst / "cifar10" / "train.npz", args.train_images, args.seed),
            "test": subset_jpeg_copy(cifar / "test.npz", dst / "cifar10" / "test.npz", args.test_images, args.seed + 1),
        }
        manifest["fashion_mnist_test"] = stage_fmnist(dst / "fashion-mnist", args.fmnist_images)
        (dst / "kw").mkdir(exist_ok=True)
        for name in KW_FILES:
            src = args.shared / "models" / "kw" / name
            if src.is_file():
                shutil.copy2(src, dst / "kw" / name)
            else:
                print(f"kw: {src} not found, not staged", file=sys.stderr)
        manifest["site"] = {name: copy_package(name, dst / "site", [ALIRPA_SITE]) for name in SITE_PACKAGES}
        for name, origin in manifest["site"].items():
            if origin is None:
                print(f"site: {name} not found here, not staged (the suite says so and skips what needs it)",
                      file=sys.stderr)
    manifest["read_back"] = verify(dst)
    files = sorted(p for p in dst.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest["files"] = {str(f.relative_to(dst)): {"bytes": f.stat().st_size,
                                                    "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                         for f in files if f.suffix in (".npz", ".gz", ".pth")}
    total = folder_bytes(dst)
    manifest["total_bytes"] = total
    (dst / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"staged {dst}: {total / 2**20:.1f} MiB ({len(files)} files); read back: "
          + ", ".join(f"{k} {v}" for k, v in manifest["read_back"].items()))
    if total > args.max_mib * 2**20:
        print(f"stage_device_data: {total / 2**20:.1f} MiB exceeds --max-mib {args.max_mib:g} (the working tree "
              "travels in the same 64 MiB); lower --train-images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
