"""Data sets as float32 NCHW tensors in [0, 1] with int64 labels.

``load_dataset(name, split, root=None)`` reads:

* ``digits``: scikit-learn's embedded 8x8 digits (values 0..16 scaled to [0, 1]); a fixed, seeded
  80/20 train/test split (1437 / 360 images).
* ``fashion-mnist-1k``: 1,000 images of the official Fashion-MNIST test set shipped inside the
  package (:mod:`certaudit.zoo`: the first 100 of each class in index order; MIT licence, © Zalando
  SE); a test split only, never read from outside the package.
* ``mnist`` and ``fashion-mnist``: the four IDX files (gzipped or not) from ``root``; else, for
  Fashion-MNIST, Debian's ``dataset-fashion-mnist`` location; else the cache folder; else a download
  checked against the official SHA-256 sums.
* ``cifar10``: the official python batches (``cifar-10-batches-py``) or the official
  ``cifar-10-python.tar.gz`` from ``root`` or the cache (downloaded with a SHA-256 check), or, when
  ``root`` holds ``train.npz``/``test.npz`` with ``jpeg``/``offsets``/``labels`` arrays, that JPEG
  copy. The pickled batches are read with an unpickler that admits only NumPy arrays.

The cache folder is ``$CERTAUDIT_DATA`` or ``~/.cache/certaudit``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from certaudit.errors import DataNotFoundError, InputError

SPLITS = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # suggested in-model normalization
    std: tuple[float, ...]


@dataclass(frozen=True)
class Remote:
    """A file of an official release: where to get it and its SHA-256."""

    filename: str
    sha256: str
    urls: tuple[str, ...]


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


def _idx_remotes(mirrors: tuple[str, ...], sums: dict[str, str]) -> dict[str, Remote]:
    return {f: Remote(f, s, tuple(m + f for m in mirrors)) for f, s in sums.items()}


# Official releases and their SHA-256 sums. Tests point these at a loopback server.
SOURCES: dict[str, dict[str, Remote]] = {
    "mnist": _idx_remotes(_MNIST_MIRRORS, {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    }),
    "fashion-mnist": _idx_remotes(_FASHION_MIRRORS, {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    }),
    "cifar10": {
        "cifar-10-python.tar.gz": Remote(
            "cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        )
    },
}

_GREY = ((0.0,), (1.0,))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
EMBEDDED_FASHION = "fashion-mnist-1k"
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", (1, 8, 8), 10, tuple(str(i) for i in range(10)), *_GREY),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, tuple(str(i) for i in range(10)), *_GREY),
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, _FASHION_CLASSES, *_GREY),
    EMBEDDED_FASHION: DatasetInfo(EMBEDDED_FASHION, (1, 28, 28), 10, _FASHION_CLASSES, *_GREY),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),  # Cohen et al.'s CIFAR normalization
    ),
    "imagenet": DatasetInfo(
        "imagenet", (3, 224, 224), 1000, tuple(str(i) for i in range(1000)),
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),  # the torchvision / Cohen et al. normalization
    ),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar": "cifar10",
            "fashion_mnist_1k": EMBEDDED_FASHION, "fmnist-1k": EMBEDDED_FASHION}


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS[canonical_name(name)]


def cache_dir() -> Path:
    return Path(os.environ.get("CERTAUDIT_DATA") or Path.home() / ".cache" / "certaudit")


def load_dataset(name: str, split: str = "test", root: str | os.PathLike | None = None,
                 download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64 of a data set split."""
    key = canonical_name(name)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataNotFoundError(f"data root {root} does not exist")
    try:
        images, labels = _LOADERS[key](split, root, download)
    except (InputError, DataNotFoundError):
        raise
    except Exception as exc:  # damaged or foreign files: truncated archives, non-JPEG bytes, wrong dtypes
        known = (zipfile.BadZipFile, UnidentifiedImageError, ValueError, TypeError, KeyError, IndexError,
                 EOFError, OSError)
        if not isinstance(exc, known):
            raise
        if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, zipfile.BadZipFile):
            raise DataNotFoundError(f"{key} {split}: {exc.filename or ''}: {exc.strerror} (check --data-root and "
                                    "$CERTAUDIT_DATA)") from None
        what = f"{getattr(exc, 'filename', None) or ''} ".lstrip()
        raise DataNotFoundError(f"{key} {split}: {what}the data files are damaged or not in the expected format "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    info = DATASETS[key]
    if images.shape[1:] != info.shape or images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"{key} {split}: unexpected array shapes {images.shape} / {labels.shape}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataNotFoundError(f"{key} {split}: labels outside [0, {info.num_classes})")
    return images, labels


# --------------------------------------------------------------------------------------- digits

def _load_digits(split: str, root: Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32) / 16.0  # (1797, 8, 8), values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.RandomState(0).permutation(len(y))
    n_test = 360
    idx = order[n_test:] if split == "train" else np.sort(order[:n_test])
    if split == "train":
        idx = np.sort(idx)
    return torch.from_numpy(x[idx][:, None].copy()), torch.from_numpy(y[idx].copy())


def _load_embedded_fashion(split: str, root: Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 Fashion-MNIST test images shipped in :mod:`certaudit.zoo` (checked against its manifest)."""
    if split != "test":
        raise InputError(f"{EMBEDDED_FASHION} is the 1,000-image subset of the Fashion-MNIST test set shipped with "
                         "certaudit: it has a test split only (train on `fashion-mnist`)")
    from certaudit import zoo  # the package's own files; zoo imports nothing of this module

    return zoo.load_data("fashion-mnist")


# ------------------------------------------------------------------------------------ IDX files

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def parse_idx(raw: bytes, what: str = "IDX file") -> np.ndarray:
    """Parse an IDX array of unsigned bytes (magic 0x0000 08 ndim), validating the header."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataNotFoundError(f"{what}: corrupt gzip ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataNotFoundError(f"{what}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim < 1 or len(raw) < head:
        raise DataNotFoundError(f"{what}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    if len(raw) - head != count:
        raise DataNotFoundError(f"{what}: expected {count} bytes of data for shape {dims}, got {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        p = folder / cand
        if p.is_file():
            return p
    return None


def _idx_loader(key: str) -> Callable[[str, Path | None, bool], tuple[torch.Tensor, torch.Tensor]]:
    def load(split: str, root: Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        stems = _IDX_FILES[split]
        candidates: list[Path] = []
        if root is not None:
            candidates += [root, root / key, root / key / "raw"]
        else:
            if key == "fashion-mnist":
                candidates.append(DEBIAN_FASHION_MNIST)
            candidates.append(cache_dir() / key)
        for folder in candidates:
            found = [_find_idx(folder, s) for s in stems]
            if all(found):
                return _read_idx_pair(found[0], found[1], key, split)
        target = root if root is not None else cache_dir() / key
        if not download:
            raise _missing(key, candidates)
        paths = [fetch(SOURCES[key][s + ".gz"], target, missing_hint=_missing(key, candidates)) for s in stems]
        return _read_idx_pair(paths[0], paths[1], key, split)

    return load


def _read_idx_pair(img_path: Path, lbl_path: Path, key: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = parse_idx(img_path.read_bytes(), str(img_path))
    labels = parse_idx(lbl_path.read_bytes(), str(lbl_path))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"{key} {split}: image file {images.shape} and label file {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _missing(key: str, looked: list[Path]) -> DataNotFoundError:
    where = ", ".join(str(p) for p in looked) or "nowhere"
    extra = " or `apt-get install dataset-fashion-mnist`" if key == "fashion-mnist" else ""
    return DataNotFoundError(
        f"{key} not found (looked in {where}); pass --data-root DIR with the official files{extra}, "
        f"or allow a download (needs network; files are checked against SHA-256)"
    )


# ------------------------------------------------------------------------------------ download

def fetch(remote: Remote, folder: Path, missing_hint: Exception | None = None, timeout: float = 30.0) -> Path:
    """Download ``remote`` into ``folder`` (trying each mirror), verify SHA-256, return the path.

    An existing file with the right checksum is reused; a wrong checksum is never kept.
    """
    folder = Path(folder)
    dest = folder / remote.filename
    if dest.is_file() and sha256_file(dest) == remote.sha256:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in remote.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=remote.filename + ".", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != remote.sha256:
                errors.append(f"{url}: SHA-256 mismatch (got {digest.hexdigest()[:12]}..., expected {remote.sha256[:12]}...)")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        finally:
            if tmp.exists():
                tmp.unlink()
    detail = "; ".join(errors)
    if missing_hint is not None:
        raise DataNotFoundError(f"{missing_hint} -- download failed: {detail}")
    raise DataNotFoundError(f"cannot download {remote.filename}: {detail}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- CIFAR-10

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches: admits NumPy array reconstruction, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes written under pickle protocol 2; builds bytes, runs nothing else
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only NumPy arrays are allowed")


def read_cifar_batch(raw: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 python batch -> (N, 3, 32, 32) uint8, (N,) labels."""
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DataNotFoundError(f"{what}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise DataNotFoundError(f"{what}: not a CIFAR-10 python batch (no data/labels)")
    data = np.asarray(obj[b"data"], dtype=np.uint8)
    labels = np.asarray(obj[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"{what}: unexpected shapes {data.shape} / {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _load_cifar10(split: str, root: Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    places = [root] if root is not None else [cache_dir() / "cifar10"]
    for base in places:
        if (base / f"{split}.npz").is_file():
            return read_cifar_jpeg(base / f"{split}.npz")
        for folder in (base, base / "cifar-10-batches-py"):
            if all((folder / b).is_file() for b in _CIFAR_BATCHES[split]):
                return _read_cifar_folder(folder, split)
        if (base / "cifar-10-python.tar.gz").is_file():
            return _read_cifar_tar(base / "cifar-10-python.tar.gz", split)
    target = places[0]
    hint = DataNotFoundError(
        f"cifar10 not found in {target}; pass --data-root DIR holding cifar-10-batches-py/, "
        "cifar-10-python.tar.gz or a JPEG copy (train.npz/test.npz), or allow a download (needs network)"
    )
    if not download:
        raise hint
    tar_path = fetch(SOURCES["cifar10"]["cifar-10-python.tar.gz"], target, missing_hint=hint)
    return _read_cifar_tar(tar_path, split)


def _read_cifar_folder(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar_batch((folder / b).read_bytes(), str(folder / b)) for b in _CIFAR_BATCHES[split]]
    return _cifar_tensors(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _read_cifar_tar(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the batches straight from the archive (no extraction, so no path-traversal risk)."""
    wanted = {f"cifar-10-batches-py/{b}": b for b in _CIFAR_BATCHES[split]}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[wanted[member.name]] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataNotFoundError(f"{path}: corrupt archive ({exc})") from None
    missing = [b for b in _CIFAR_BATCHES[split] if b not in found]
    if missing:
        raise DataNotFoundError(f"{path}: archive lacks {', '.join(missing)}")
    parts = [read_cifar_batch(found[b], f"{path}:{b}") for b in _CIFAR_BATCHES[split]]
    return _cifar_tensors(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def read_cifar_jpeg(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The JPEG copy format: ``jpeg`` (all files concatenated), ``offsets`` (n+1), ``labels``."""

    try:
        with np.load(path, allow_pickle=False) as z:
            blob, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
    except (KeyError, ValueError, OSError) as exc:
        raise DataNotFoundError(f"{path}: not a JPEG-copy file with jpeg/offsets/labels arrays ({exc})") from None
    n = len(labels)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) <= 0):
        raise DataNotFoundError(f"{path}: offsets do not index the JPEG blob")
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    view = memoryview(blob)
    for i in range(n):  # decoding is per file by nature; done once per load
        with Image.open(io.BytesIO(view[offsets[i]:offsets[i + 1]])) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape != (32, 32, 3):
            raise DataNotFoundError(f"{path}: image {i} has shape {arr.shape}, expected 32x32x3")
        out[i] = arr
    return _cifar_tensors(out.transpose(0, 3, 1, 2), np.asarray(labels, dtype=np.int64))


def _cifar_tensors(data: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(data).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------- imagenet

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _load_imagenet(split: str, root: Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageNet-style folder: ``root/<split>/<class>/*.JPEG`` (or ``root/<class>/...``).

    Classes are the sorted sub-folder names (the torchvision ``ImageFolder`` convention the
    published models were trained with, so label k is the k-th synset). Each image is resized so its
    shorter side is 256 and center-cropped to 224 (Cohen et al.'s test transform). ImageNet cannot be
    downloaded without an account: point ``root`` at the images to audit (all are loaded into
    memory, so a subset such as every 100th validation image, as in Cohen et al.).
    """

    if root is None:
        raise DataNotFoundError("imagenet needs --data-root DIR holding <split>/<class>/*.JPEG (or <class>/*.JPEG); "
                                "it cannot be downloaded without an account")
    base = root / ("val" if split == "test" and (root / "val").is_dir() else split)
    base = base if base.is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((base / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not files:
        raise DataNotFoundError(f"imagenet: no images under {base} (expected <class>/*.JPEG sub-folders)")
    if len(classes) > 1000:
        raise DataNotFoundError(f"imagenet: {base} has {len(classes)} class folders, at most 1000 expected")
    out = np.empty((len(files), 3, 224, 224), dtype=np.uint8)
    for i, (f, _) in enumerate(files):  # decoding is per file by nature; done once per load
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = 256 / min(w, h)
                im = im.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - 224) // 2, (h - 224) // 2
                out[i] = np.asarray(im.crop((left, top, left + 224, top + 224))).transpose(2, 0, 1)
        except OSError as exc:
            raise DataNotFoundError(f"imagenet: cannot read {f} ({exc})") from None
    return _cifar_tensors(out, np.array([k for _, k in files], dtype=np.int64))


_LOADERS: dict[str, Callable[[str, Path | None, bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "digits": _load_digits,
    "mnist": _idx_loader("mnist"),
    "fashion-mnist": _idx_loader("fashion-mnist"),
    EMBEDDED_FASHION: _load_embedded_fashion,
    "cifar10": _load_cifar10,
    "imagenet": _load_imagenet,
}

