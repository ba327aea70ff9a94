"""benchmarks/gpu_suite.py (issue 20): the CPU smoke run of every part, the no-CUDA exit, the pieces.

The smoke run (one subprocess, every part in its own process, < 1 min on 2 cores) keeps the suite's
code paths alive between the sessions that have a GPU.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402
import stage_device_data  # noqa: E402

ROW_FIELDS = ("key", "what", "unit", "ours", "baseline", "limit", "ours_over_baseline", "ours_over_limit",
              "higher_is_better", "baseline_kind", "limit_kind", "note")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, env=_env(), timeout=900)
    return proc, out


def test_smoke_runs_every_part(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / gpu_suite.JSON_NAME).read_text())
    assert doc["mode"] == "smoke" and doc["exit_code"] == 0 and doc["finished"]
    assert list(doc["parts"]) == [p.name for p in gpu_suite.PARTS]
    for name, part in doc["parts"].items():
        assert part["status"] == "ok", (name, part["reason"], part["details"].get("traceback"))
        assert part["seconds"] is not None and part["budget_s"] > 0
        assert part["rows"], name
        for row in part["rows"]:
            assert set(ROW_FIELDS) <= set(row), (name, row)
            assert row["ours"] is not None and row["ours"] >= 0, (name, row)
        # every part measures itself against the hardware limit; all but interval (whose baselines are
        # optional libraries) against a baseline of the same run
        assert any(r["ours_over_limit"] is not None for r in part["rows"]), name
        if name != "interval" or importlib.util.find_spec("convex_adversarial"):
            assert any(r["ours_over_baseline"] is not None for r in part["rows"]), name


def test_smoke_figures_are_consistent(smoke):
    _, out = smoke
    parts = json.loads((out / gpu_suite.JSON_NAME).read_text())["parts"]
    cifar = {r["key"]: r for r in parts["smoothing_cifar"]["rows"]}
    assert {"certify_bf16", "certify_fp32", "certify_bf16_vs_fp32_baseline"} <= set(cifar)
    r = cifar["certify_fp32"]
    assert r["ours_over_baseline"] == pytest.approx(r["ours"] / r["baseline"])
    assert {r["key"] for r in parts["smoothing_imagenet"]["rows"]} >= {"certify_bf16", "certify_fp32"}
    shadow = parts["shadow"]
    assert shadow["details"]["timed"]["max_abs_delta_difference"] < 1e-4  # batched == the authors' loop
    (row,) = shadow["rows"]
    assert row["unit"] == "s/image" and not row["higher_is_better"]
    assert row["ours_over_baseline"] == pytest.approx(row["baseline"] / row["ours"])
    assert {r["key"] for r in parts["interval"]["rows"]} >= {"2c2f_ibp", "2c2f_crown-ibp", "2c2f_crown", "cifar_cnn_ibp"}
    acc = parts["train_certify"]["details"]["certified_accuracy"]
    assert set(acc["table"]) == {"0", "0.25", "0.5", "0.75"} and acc["cohen"]["0.25"] == 0.60
    assert "Cohen et al." in acc["gap"]
    keys = {r["key"] for r in parts["sequential"]["rows"]}
    assert {"evaluations_eps0.25", "wall_eps0.25"} <= keys
    assert "trained by train_certify" in parts["sequential"]["details"]["setup"]["model"]


def test_smoke_writes_markdown_and_log(smoke):
    proc, out = smoke
    md = (out / gpu_suite.MD_NAME).read_text()
    assert md.startswith("# GPU suite (issue 20): smoke run")
    for part in gpu_suite.PARTS:
        assert f"| {part.name} | ok |" in md
    assert "| part | figure | unit | ours | baseline | ours/baseline | limit | ours/limit | note |" in md
    assert "Cohen et al." in md
    assert "[smoothing_cifar]" in (out / gpu_suite.LOG_NAME).read_text()
    assert md.strip().splitlines()[0] in proc.stdout  # the table is printed last, for the device's output tail


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_full_run_without_cuda_exits_2_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_spent_budget_skips_with_reason(tmp_path):
    """A part whose share is spent is recorded as skipped, with the reason, and is not a failure."""
    (tmp_path / "data").mkdir()
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--budget-s", "1", "--parts", "smoothing_cifar,shadow",
                           "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "o" / gpu_suite.JSON_NAME).read_text())
    assert list(doc["parts"]) == ["smoothing_cifar", "shadow"]
    for part in doc["parts"].values():
        assert part["status"] == "skipped" and "budget spent" in part["reason"]
    assert "budget spent" in (tmp_path / "o" / gpu_suite.MD_NAME).read_text()


def test_run_child_kills_a_part_past_its_share(tmp_path):
    log = io.StringIO()
    code = "import time; print('started', flush=True); time.sleep(60)"
    rc, timed_out = gpu_suite.run_child([sys.executable, "-c", code], dict(os.environ), 1.5, log)
    assert timed_out and rc != 0
    assert "started" in log.getvalue()


def test_ratios_plans_and_shares():
    assert gpu_suite.ratio(300.0, 100.0, True) == pytest.approx(3.0)
    assert gpu_suite.ratio(2.0, 6.0, False) == pytest.approx(3.0)  # a time: baseline / ours
    assert gpu_suite.ratio(None, 1.0, True) is None and gpu_suite.ratio(1.0, 0.0, True) is None
    # fewer images first, then a smaller N, never below min_n
    assert gpu_suite.plan_samples(4, 100, 100_000, 100_000.0, 10.0, 10_000) == (4, 100_000)
    assert gpu_suite.plan_samples(4, 100, 100_000, 100_000.0, 2.5, 10_000) == (2, 100_000)
    assert gpu_suite.plan_samples(1, 100, 100_000, 10_000.0, 3.0, 10_000) == (1, 29_900)
    assert gpu_suite.plan_samples(1, 100, 100_000, 1_000.0, 1.0, 10_000) == (1, 10_000)
    names = [p.name for p in gpu_suite.PARTS]
    shares = gpu_suite.plan_shares(480, names)
    required = sum(v for n, v in shares.items() if not gpu_suite.PART_BY_NAME[n].optional)
    assert required == pytest.approx(480 - gpu_suite.RESERVE_S)
    assert sum(p.plan_s for p in gpu_suite.PARTS if not p.optional) == pytest.approx(480 - gpu_suite.RESERVE_S)


def test_precision_module_runs_bf16_channels_last():
    from certaudit.models import build_model

    torch.manual_seed(0)
    inner = build_model("2c2f", (3, 8, 8), 10).to(memory_format=torch.channels_last)
    net = gpu_suite._precision_module(inner, "bf16", True)
    x = torch.rand(4, 3, 8, 8)
    out = net(x)
    assert out.dtype == torch.float32 and out.shape == (4, 10)
    assert torch.allclose(out, inner(x), atol=0.1)  # bf16 rounding only
    out.sum().backward()
    assert all(p.grad is not None for p in inner.parameters())
    assert gpu_suite._precision_module(inner, "fp32", False)(x).equal(inner(x))


def test_stage_subset_reads_back_with_certaudit_loader(tmp_path):
    from certaudit.data import load_dataset

    src = stage_device_data.synthetic(tmp_path / "src", train_images=30, test_images=10, fmnist_images=4)
    n = stage_device_data.subset_jpeg_copy(src / "cifar10" / "train.npz", tmp_path / "dst" / "train.npz", 12, seed=3)
    assert n == 12
    x_all, y_all = load_dataset("cifar10", "train", root=src / "cifar10", download=False)
    x, y = load_dataset("cifar10", "train", root=tmp_path / "dst", download=False)
    import numpy as np

    pick = np.load(tmp_path / "dst" / "train.npz")["source_index"]
    assert torch.equal(x, x_all[torch.from_numpy(pick)]) and torch.equal(y, y_all[torch.from_numpy(pick)])
    assert len(set(pick.tolist())) == 12
    got = stage_device_data.verify(src)
    assert got["cifar10_train"]["images"] == 30 and got["fashion_mnist_test"]["images"] == 4
    assert got["kw_cifar_small_8px.pth"]["dataset"] == "cifar10"
    assert got["kw_fashion_mnist.pth"]["dataset"] == "fashion-mnist"
