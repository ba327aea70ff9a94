"""Bad input through every verb: exit code 2, one line on stderr, no traceback, and every file that
was there before is byte-identical afterwards (issue 16). Each case runs the CLI in a fresh
subprocess (`python -m certaudit`) on the embedded digits data and tiny zoo models."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from certaudit import zoo

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))

GAUSS = str(zoo.model_path("digits_gaussian"))
GLORO = str(zoo.model_path("digits_gloro_eps"))


def _bad_meta_checkpoint(folder: Path, name: str, **changes) -> str:
    """A copy of the GloRo zoo checkpoint whose JSON metadata is edited (weights unchanged)."""
    from safetensors import safe_open

    with safe_open(GLORO, "pt") as fh:
        meta = dict(fh.metadata())
    raw = json.loads(meta["certaudit"]) if "certaudit" in meta else None
    key = "certaudit" if raw is not None else next(iter(meta))
    raw = json.loads(meta[key])
    raw.update(changes)
    out = folder / name
    save_file(load_file(GLORO), str(out), metadata={**meta, key: json.dumps(raw)})
    return str(out)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_inputs(d: Path) -> None:
    (d / "notes.txt").write_text("a text file\nwithout a final newline")
    (d / "model_copy.safetensors").write_bytes(Path(GLORO).read_bytes())
    (d / "afile").write_text("x")
    (d / "cifar").mkdir()
    (d / "cifar" / "test.npz").write_bytes(b"PK\x03\x04 truncated zip")
    buf = io.BytesIO()
    np.savez(buf, jpeg=np.frombuffer(b"not a jpeg at all", dtype=np.uint8), offsets=np.array([0, 17]),
             labels=np.array([3]))
    (d / "cifar2").mkdir()
    (d / "cifar2" / "test.npz").write_bytes(buf.getvalue())
    rows = d / "rows_bad.jsonl"
    header = {"kind": "header", "config": {}, "config_hash": "x"}
    rows.write_text(json.dumps(header) + "\n" + "[1, 2, 3]\n")
    (d / "nonutf8.jsonl").write_bytes(b"\xff\xfe{\"kind\": \"header\"}\n")
    (d / "corrupt.jsonl").write_text(json.dumps(header) + "\n{not json\n")
    (d / "nan.jsonl").write_text(json.dumps(header) + "\n" + '{"index": 0, "label": 1, "prediction": 1, "radius": NaN}\n')
    (d / "empty.pth").write_bytes(b"")
    (d / "trunc.pth").write_bytes(Path(GLORO).read_bytes()[:120])
    (d / "bad.csv").write_text('dataset,norm,eps\n"cifar10,l2,0.5\n')
    import torch

    torch.save({"0.weight": torch.zeros(2, 2, dtype=torch.complex64)}, d / "complex.pth")
    torch.save({"state_dict": [], "err": 0.5}, d / "emptycascade.pth")


CASES = [
    # --- outputs that cannot be written, checked before any work
    (["certify", "--model", GAUSS, "--n", "100", "--limit", "2", "--out", "/dev/full"], "not a regular file"),
    (["certify", "--model", GAUSS, "--n", "100", "--limit", "2", "--plot", "{d}/afile/p.png"], "is not a folder"),
    (["certify", "--model", GAUSS, "--n", "100", "--limit", "2", "--out", "{d}/notes.txt"], "not a certaudit results file"),
    (["certify", "--model", GLORO, "--defense", "lipschitz", "--limit", "2", "--out", "{d}/model_copy.safetensors"],
     "not a certaudit results file"),
    (["degrade", "--model", GLORO, "--defense", "lipschitz", "--eps", "0.25", "--limit", "2", "--out", "{d}/cifar"],
     "folder"),
    (["spoof", "--model", GLORO, "--defense", "lipschitz", "--eps", "0.25", "--limit", "1", "--grid", "{d}/cifar"],
     "folder"),
    (["audit", "--model", GLORO, "--defense", "lipschitz", "--eps", "0.25", "--limit", "2", "--out", "{d}/afile"],
     "not a folder"),
    # --- checkpoint metadata of the wrong type or size
    (["certify", "--model", "@input_shape=abc", "--defense", "lipschitz", "--limit", "2"], "input_shape"),
    (["certify", "--model", "@num_classes=ten", "--defense", "lipschitz", "--limit", "2"], "num_classes"),
    (["certify", "--model", "@num_classes=None", "--defense", "lipschitz", "--limit", "2"], "num_classes"),
    (["certify", "--model", "@method=123", "--defense", "lipschitz", "--limit", "2"], "method"),
    (["certify", "--model", "@input_shape=huge", "--defense", "lipschitz", "--limit", "2"], "input_shape"),
    # --- sizes that cannot be allocated or finished
    (["certify", "--model", GAUSS, "--limit", "2", "--n", "100", "--batch-size", "1000000000000"], "batch_size"),
    (["certify", "--model", GAUSS, "--limit", "2", "--n", "1000000000000"], "samples per image"),
    (["spoof", "--model", GAUSS, "--limit", "1", "--samples", "1000000000000"], "--samples"),
    (["degrade", "--model", GAUSS, "--defense", "smoothing", "--eps", "0.25", "--limit", "1", "--samples",
      "1000000000000"], "samples"),
    # --- numbers beyond the float range (10^400 as an integer or a fraction): one shortened line
    (["spoof", "--model", GAUSS, "--limit", "1", "--max-linf", "1" + "0" * 400 + "/1"], "--max-linf must be a finite"),
    (["spoof", "--model", GAUSS, "--limit", "1", "--eps", "1" + "0" * 400], "--eps must be a finite"),
    (["spoof", "--model", GAUSS, "--limit", "1", "--alpha", "1" + "0" * 400 + "/3"], "--alpha"),
    (["audit", "--model", GLORO, "--defense", "lipschitz", "--eps", "1" + "0" * 400 + "/1", "--out", "{d}/a400"],
     "--eps must be a finite"),
    (["audit", "--model", GLORO, "--defense", "lipschitz", "--eps", "0.25", "--spoof-min-ssim", "1" + "0" * 400,
      "--out", "{d}/a400"], "--spoof-min-ssim"),
    # --- results files
    (["degrade", "--from-log", "{d}/rows_bad.jsonl", "--eps", "0.1"], "JSON object"),
    (["degrade", "--from-log", "{d}/nonutf8.jsonl", "--eps", "0.1"], "not a certaudit"),
    (["degrade", "--from-log", "{d}/corrupt.jsonl", "--eps", "0.1"], "corrupt row"),
    (["degrade", "--from-log", "{d}/nan.jsonl", "--eps", "0.1"], "NaN"),
    # --- messages
    (["audit", "--model", GLORO, "--defense", "lipschitz", "--eps", "0.25", "--stages", "", "--out", "{d}/a"], "stage"),
    (["train", "--dataset", "digits", "--epochs", "1", "--eps-warmup", "2", "--out", "{d}/t.safetensors"], "warm-up"),
    (["import", "--format", "cohen", "{d}/empty.pth", "--out", "{d}/x.safetensors"], "is empty"),
    (["import", "--format", "kw", "{d}/trunc.pth", "--out", "{d}/x.safetensors"], "truncated or not a PyTorch file"),
    (["import", "--format", "kw", "{d}/complex.pth", "--dataset", "fashion-mnist", "--out", "{d}/x.safetensors"],
     "complex"),
    (["import", "--format", "kw", "{d}/emptycascade.pth", "--out", "{d}/x.safetensors"], "holds no model"),
    (["check-detector", "--claims", "{d}/bad.csv"], "line 2"),
    # --- a leftover WORLD_SIZE, and a stale rendezvous address (times out with a message, never hangs)
    (["certify", "--model", GLORO, "--defense", "lipschitz", "--limit", "2"], "MASTER_ADDR",
     {"WORLD_SIZE": "2", "RANK": "1"}),
    (["certify", "--model", GLORO, "--defense", "lipschitz", "--limit", "2"], "cannot join",
     {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29987",
      "CERTAUDIT_DIST_TIMEOUT": "3"}),
    (["train", "--dataset", "digits", "--epochs", "1", "--out", "/dev/full"], "not a regular file"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    _make_inputs(d)
    return d


@pytest.mark.parametrize("argv, needle, extra_env",
                         [(c[0], c[1], c[2] if len(c) > 2 else {}) for c in CASES],
                         ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_leaves_files_alone(argv, needle, extra_env, inputs):
    d = inputs
    argv = [a.replace("{d}", str(d)) for a in argv]
    if any(a.startswith("@") for a in argv):  # a checkpoint with edited metadata
        i = next(k for k, a in enumerate(argv) if a.startswith("@"))
        field, value = argv[i][1:].split("=")
        bad = {"abc": "abc", "ten": "ten", "None": None, "123": 123, "huge": [1, 10**7, 10**7]}[value]
        argv[i] = _bad_meta_checkpoint(d, f"bad_{field}_{value}.safetensors", **{field: bad})
    before = _files(d)
    env = dict(ENV, **extra_env)
    done = subprocess.run([sys.executable, "-m", "certaudit", *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    rc, err = done.returncode, done.stderr.strip()
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, (needle, err)
    assert "0" * 100 not in err, err  # a long input is shown shortened
    after = _files(d)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier file byte-identical


def test_a_damaged_cifar_copy_is_one_line(inputs, capsys, tmp_path):
    """Truncated npz and non-JPEG bytes in the CIFAR JPEG copy (read by the loader directly: no model needed)."""
    from certaudit.data import load_dataset
    from certaudit.errors import InputError

    assert zipfile.is_zipfile(inputs / "cifar2" / "test.npz")  # a real npz whose bytes are not JPEG
    for folder in ("cifar", "cifar2"):
        with pytest.raises(InputError, match="damaged|not a JPEG-copy"):
            load_dataset("cifar10", "test", inputs / folder, download=False)
    with pytest.raises(InputError):  # a data root that is a file
        load_dataset("fashion-mnist", "test", inputs / "afile", download=False)
    # float offsets and string data in the JPEG copy
    for name, arrays in (("float_offsets", dict(jpeg=np.zeros(4, np.uint8), offsets=np.array([0.0, 4.0]),
                                                 labels=np.array([1]))),
                         ("strings", dict(jpeg=np.array(["abc"]), offsets=np.array([0, 1]), labels=np.array(["x"])))):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(folder / "test.npz", **arrays)
        with pytest.raises(InputError):
            load_dataset("cifar10", "test", folder, download=False)


def test_a_cache_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    from certaudit.data import load_dataset
    from certaudit.errors import InputError

    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("x")
    monkeypatch.setenv("CERTAUDIT_DATA", str(blocker))
    with pytest.raises(InputError, match="Not a directory"):
        load_dataset("mnist", "test")  # the cache is made before any download is tried
