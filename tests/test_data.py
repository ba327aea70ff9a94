import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from certaudit import data as D
from certaudit.errors import DataNotFoundError, InputError

from conftest import shared_path


def _check(x, y, n, shape):
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (n, *shape) and y.shape == (n,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_digits_split_is_fixed_and_disjoint():
    x_tr, y_tr = D.load_dataset("digits", "train")
    x_te, y_te = D.load_dataset("digits", "test")
    _check(x_tr, y_tr, 1437, (1, 8, 8))
    _check(x_te, y_te, 360, (1, 8, 8))
    x2, y2 = D.load_dataset("digits", "test")
    assert torch.equal(x_te, x2) and torch.equal(y_te, y2)
    assert float(x_tr.max()) == 1.0
    # no test image appears in the training split
    tr = {tuple(v.flatten().tolist()) for v in x_tr}
    dup = sum(tuple(v.flatten().tolist()) in tr for v in x_te)
    assert dup <= 2  # the raw digits set itself holds a couple of exact duplicates


def test_fashion_mnist_from_debian_location():
    if not (D.DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    x, y = D.load_dataset("fashion-mnist", "test")
    _check(x, y, 10000, (1, 28, 28))
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _fake_idx_files(n=5):
    rng = np.random.RandomState(1)
    imgs = rng.randint(0, 256, size=(n, 28, 28))
    labels = rng.randint(0, 10, size=(n,))
    return imgs, labels, {
        "t10k-images-idx3-ubyte.gz": gzip.compress(_idx(imgs)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(_idx(labels)),
        "train-images-idx3-ubyte.gz": gzip.compress(_idx(imgs)),
        "train-labels-idx1-ubyte.gz": gzip.compress(_idx(labels)),
    }


def test_idx_from_root_gz_and_raw(tmp_path):
    imgs, labels, files = _fake_idx_files()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(gzip.decompress(files["t10k-images-idx3-ubyte.gz"]))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"])
    x, y = D.load_dataset("mnist", "test", root=tmp_path, download=False)
    _check(x, y, 5, (1, 28, 28))
    assert torch.equal(y, torch.from_numpy(labels))
    assert torch.allclose(x[:, 0] * 255, torch.from_numpy(imgs).float())


def test_corrupt_idx_is_a_clear_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + b"\x00" * 10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DataNotFoundError):
        D.load_dataset("mnist", "test", root=tmp_path, download=False)


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server serving files the test writes into ``served``."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def _point_sources_at(monkeypatch, key, base, files, bad=()):
    remotes = {}
    for name, blob in files.items():
        digest = hashlib.sha256(blob).hexdigest()
        if name in bad:
            digest = "0" * 64
        remotes[name] = D.Remote(name, digest, (base + "missing/" + name, base + name))  # first mirror 404s
    monkeypatch.setitem(D.SOURCES, key, remotes)


def test_download_with_checksum_from_loopback(http_server, monkeypatch, tmp_path):
    served, base = http_server
    imgs, labels, files = _fake_idx_files()
    for name, blob in files.items():
        (served / name).write_bytes(blob)
    _point_sources_at(monkeypatch, "mnist", base, files)
    x, y = D.load_dataset("mnist", "test")  # nothing local: downloads into the cache
    _check(x, y, 5, (1, 28, 28))
    assert torch.equal(y, torch.from_numpy(labels))
    cached = tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert cached.read_bytes() == files["t10k-images-idx3-ubyte.gz"]
    # second call is served from the cache even with the server gone
    monkeypatch.setitem(D.SOURCES, "mnist", {})
    x2, _ = D.load_dataset("mnist", "test")
    assert torch.equal(x, x2)


def test_download_checksum_mismatch_keeps_nothing(http_server, monkeypatch, tmp_path):
    served, base = http_server
    _, _, files = _fake_idx_files()
    for name, blob in files.items():
        (served / name).write_bytes(blob)
    _point_sources_at(monkeypatch, "mnist", base, files, bad={"t10k-images-idx3-ubyte.gz"})
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataNotFoundError, match="SHA-256 mismatch"):
        D.load_dataset("mnist", "test", root=root)
    assert not (root / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(root.glob("*.part"))


def test_missing_data_names_the_options(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="--data-root") as err:
        D.load_dataset("fashion-mnist", "test", download=False)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    monkeypatch.setitem(D.SOURCES, "fashion-mnist", {
        k: D.Remote(r.filename, r.sha256, ("http://127.0.0.1:9/" + r.filename,))
        for k, r in D.SOURCES["fashion-mnist"].items()})
    with pytest.raises(DataNotFoundError, match="download failed"):
        D.load_dataset("fashion-mnist", "test")


def _cifar_batch(n, seed):
    rng = np.random.RandomState(seed)
    data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
    labels = rng.randint(0, 10, size=n).tolist()
    blob = pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a"] * n}, protocol=2)
    return data, labels, blob


def test_cifar_python_batches_folder_and_archive(tmp_path, http_server, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    blobs = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]):
        data, labels, blob = _cifar_batch(4, i)
        blobs[name] = (data, labels, blob)
        (folder / name).write_bytes(blob)
    x, y = D.load_dataset("cifar10", "test", root=tmp_path, download=False)
    _check(x, y, 4, (3, 32, 32))
    data, labels, _ = blobs["test_batch"]
    assert torch.equal(y, torch.tensor(labels))
    assert torch.allclose(x.reshape(4, -1) * 255, torch.from_numpy(data).float())
    x_tr, _ = D.load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert x_tr.shape[0] == 20
    # the official archive, downloaded from loopback with a checksum, read without extraction
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, (_, _, blob) in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    served, base = http_server
    (served / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    _point_sources_at(monkeypatch, "cifar10", base, {"cifar-10-python.tar.gz": buf.getvalue()})
    x2, y2 = D.load_dataset("cifar10", "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_cifar_batches_with_code_are_refused(tmp_path):
    folder = tmp_path
    for name in ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": __import__("os").getcwd, b"labels": []}))
    with pytest.raises(DataNotFoundError, match="refused"):
        D.load_dataset("cifar10", "test", root=folder, download=False)


def test_cifar_jpeg_copy_format(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 255, 32)
    imgs = np.stack([np.stack(np.broadcast_arrays(ramp[:, None] * 0 + k * 60, ramp[None, :], ramp[:, None]), -1)
                     for k in range(3)]).astype(np.uint8)  # smooth images: JPEG keeps them close
    parts = []
    for im in imgs:
        b = io.BytesIO()
        Image.fromarray(im).save(b, format="JPEG", quality=95)
        parts.append(b.getvalue())
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    np.savez(tmp_path / "test.npz", jpeg=np.frombuffer(b"".join(parts), dtype=np.uint8), offsets=offsets,
             labels=np.array([3, 1, 4], dtype=np.uint8))
    x, y = D.load_dataset("cifar10", "test", root=tmp_path)
    _check(x, y, 3, (3, 32, 32))
    assert y.tolist() == [3, 1, 4]
    # JPEG is lossy but close
    assert float((x.permute(0, 2, 3, 1) * 255 - torch.from_numpy(imgs).float()).abs().mean()) < 4


def test_shared_cifar_jpeg_copy():
    root = shared_path("data", "cifar10-jpeg")
    x, y = D.load_dataset("cifar10", "test", root=root)
    _check(x, y, 10000, (3, 32, 32))
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


def test_unknown_names_and_missing_root(tmp_path):
    with pytest.raises(InputError, match="unknown dataset"):
        D.load_dataset("imagenet-21k", "test")
    with pytest.raises(InputError, match="unknown split"):
        D.load_dataset("digits", "validation")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        D.load_dataset("mnist", "test", root=tmp_path / "nope")
    assert D.dataset_info("Fashion_MNIST").name == "fashion-mnist"
