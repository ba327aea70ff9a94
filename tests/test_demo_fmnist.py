"""`certaudit demo` on the embedded Fashion-MNIST subset: four audits (three defense families) and the
detector-claims section in one report; the shipped data set and zoo match their manifest."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certaudit import zoo
from certaudit.cli import main
from certaudit.data import dataset_info, load_dataset
from certaudit.errors import InputError
from certaudit.models import load_checkpoint
from certaudit.report import DETECTOR_SECTION, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
AUDITS = {  # folder -> (defense in the summary, norm)
    "smoothing": ("smoothing", "l2"),
    "gloro-eps": ("lipschitz", "l2"),
    "gloro-2eps": ("lipschitz", "l2"),
    "interval": ("interval", "linf"),
}
# tiny knobs: the demo's whole path (worker process, four audits, report, detector claims) in well under a minute
TINY = ["--limit", "12", "--n", "100", "--attack-steps", "3", "--spoof-steps", "3", "--spoof-images", "2",
        "--workers", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc = main(["demo", "--out", str(out), *TINY, "--json"])
    assert rc == 0
    return out


def test_demo_report_has_four_defense_sections_and_detector_claims(demo):
    page = (demo / "report.html").read_text(encoding="utf-8")
    md = (demo / "report.md").read_text(encoding="utf-8")
    for sid, _ in SECTIONS + (DETECTOR_SECTION,):
        assert f'<section id="{sid}"' in page, sid
    for folder, (defense, norm) in AUDITS.items():
        summary = json.loads((demo / folder / "summary.json").read_text(encoding="utf-8"))
        assert summary["headline"]["defense"] == defense and summary["headline"]["norm"] == norm
        assert summary["config"]["dataset"] == "fashion-mnist-1k" and summary["headline"]["images"] == 12
        assert f'<section id="audit-{folder}" class="audit">' in page, folder
    # one section per defense family, each with its own detail tables
    families = re.findall(r'<section id="audit-[^"]+" class="audit"><h2>Audit: ([^<]+)</h2><p class="note">'
                          r'Defense: ([^,(]+)', page)
    assert len(families) == 4
    assert {f[1].strip() for f in families} == {"randomized smoothing", "Lipschitz margin", "interval bounds"}
    assert "ℓ∞ ε = 0.1" in page and "ℓ2 ε = 0.3" in page
    # the headline table across defenses holds every model, in the page and in the Markdown
    glance = page.split('<div class="wide glance">', 1)[1].split("</table>", 1)[0]
    for name in ("smoothing σ=0.25", "GloRo trained at ε", "GloRo trained at 2ε", "CROWN-IBP model, IBP check"):
        assert name in glance and f"| {name} |" in md, name
    for column in ("clean accuracy", "certified accuracy at ε", "false-positive rate at ε", "spoof success within "
                   "budget (ℓ∞ ≤ 16/255, SSIM ≥ 0.9)", "spoof success unbounded"):
        assert column in glance
    # the detector-claims section: Tramèr's reduction and the Table 1 verdicts
    det = page.split(f'<section id="{DETECTOR_SECTION[0]}">', 1)[1].split("</section>", 1)[0]
    assert "ε/2" in det and "Theorem 4" in det and det.count("FLAGGED") >= 14 and "not flagged" in det
    assert "Grosse et al. (2017)" in det and f"## {DETECTOR_SECTION[1]}" in md
    claims = json.loads((demo / "detector_claims.json").read_text(encoding="utf-8"))
    assert claims["summary"]["claims"] == 16 and claims["summary"]["flagged"] == 14


def test_demo_report_figures_are_inlined_and_labelled(demo):
    page = (demo / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page)
    assert any(a.startswith("certified accuracy") for a in imgs) and any(a.startswith("false-positive") for a in imgs)
    assert "colour scale" in page and "1/255" in page
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) not installed")
def test_demo_report_renders_in_chromium(demo, tmp_path):
    png = tmp_path / "demo.png"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(demo / "report.html"),
                          "--png", str(png), "--min-images", "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    assert png.is_file()


def test_demo_rerun_resumes_and_refuses_bad_knobs(demo, capsys):
    rc = main(["demo", "--out", str(demo), *TINY, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out["audits"]) == {"smoothing σ=0.25", "GloRo trained at ε", "GloRo trained at 2ε",
                                              "CROWN-IBP model, IBP check"}
    assert out["detector_claims"]["flagged"] == 14
    for args, needle in ((["--limit", "1001"], "--limit"), (["--dataset", "cifar10"], "--dataset"),
                         (["--interval-method", "milp"], "--interval-method"), (["--eps-linf", "0"], "--eps-linf")):
        rc = main(["demo", "--out", str(demo / "bad"), *args])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, (args, err)


def test_embedded_fashion_mnist_matches_its_manifest():
    man = zoo.manifest("fashion-mnist")
    data = man["data"]
    x, y, index = zoo.load_data("fashion-mnist", with_index=True)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
    assert np.bincount(y.numpy(), minlength=10).tolist() == [100] * 10
    assert index.tolist() == data["indices"] and bool((index[1:] > index[:-1]).all())
    assert data["name"] == "fashion-mnist-1k" and data["licence"] == "MIT"
    assert (zoo.ZOO_DIR / data["licence_file"]).is_file()
    assert (zoo.ZOO_DIR / data["file"]).stat().st_size < 1_000_000
    for f in data["source_files"].values():
        assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) and re.fullmatch(r"[0-9a-f]{64}", f["sha256_uncompressed"])
    # its own data set name, loadable anywhere, test split only
    xd, yd = load_dataset("fashion-mnist-1k", "test")
    assert torch.equal(xd, x) and torch.equal(yd, y)
    assert dataset_info("fashion-mnist-1k").classes[9] == "Ankle boot"
    with pytest.raises(InputError, match="test split only"):
        load_dataset("fashion-mnist-1k", "train")


def test_embedded_subset_is_the_official_test_set_where_installed():
    from certaudit.data import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
    x_all, y_all = load_dataset("fashion-mnist", "test")
    x, y, index = zoo.load_data("fashion-mnist", with_index=True)
    assert torch.equal(x_all[index], x) and torch.equal(y_all[index], y)
    for k in range(10):  # the first 100 of each class, in index order
        assert index[y == k].tolist() == torch.nonzero(y_all == k).flatten()[:100].tolist()
    for name, f in zoo.manifest("fashion-mnist")["data"]["source_files"].items():
        p = DEBIAN_FASHION_MNIST / name
        if p.is_file():
            assert hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]


def test_fashion_zoo_models_match_the_manifest():
    man = zoo.manifest("fashion-mnist")
    assert set(man["models"]) == {"fmnist_gaussian", "fmnist_gloro_eps", "fmnist_gloro_2eps", "fmnist_crown_ibp"}
    total = sum((zoo.ZOO_DIR / e["file"]).stat().st_size for e in man["models"].values())
    assert total < 4 * 2**20  # a few MB in all
    x, y = zoo.load_data("fashion-mnist")
    for name, entry in man["models"].items():
        net, meta = load_checkpoint(zoo.model_path(name))
        assert meta.dataset == "fashion-mnist" and meta.method == entry["method"] and entry["seconds"] > 0
        assert meta.norm == entry["norm"] and 0.6 < entry["test_accuracy"] <= 1
        if "sigma" in entry:
            assert meta.sigma == pytest.approx(entry["sigma"])
        else:
            assert meta.eps == pytest.approx(entry["eps"])
        with torch.no_grad():
            acc = float((net(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(entry["subset_accuracy"], abs=1e-6)
    assert man["models"]["fmnist_gloro_2eps"]["eps"] == pytest.approx(2 * man["eps"])
    assert man["models"]["fmnist_crown_ibp"]["norm"] == "linf"
    assert man["models"]["fmnist_crown_ibp"]["certified_accuracy"]["crown-ibp"] > 0.3
