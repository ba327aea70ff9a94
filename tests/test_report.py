"""The HTML/Markdown report: every section, figures inlined, no external resource; Chromium render."""

import base64
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certaudit import zoo
from certaudit.audits.pipeline import AuditSettings, AuditSource, run_audit
from certaudit.models import load_checkpoint
from certaudit.report import SECTIONS, headline_rows, load_audit, write_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two small audits (GloRo at ε and at 2ε) and one combined report."""
    base = tmp_path_factory.mktemp("report")
    x, y = zoo.load_data()
    folders = []
    for name in ("digits_gloro_eps", "digits_gloro_2eps"):
        net, meta = load_checkpoint(zoo.model_path(name))
        src = AuditSource(model=name, model_sha256=None, defense="lipschitz", dataset="digits", split="test",
                          indices=list(range(8)), arch=meta.arch)
        run_audit(base / name, net, meta, src, x, y,
                  AuditSettings(eps=0.25, chunk=8, attack_steps=5, spoof_steps=5, spoof_images=2, examples=2),
                  class_names=[str(i) for i in range(10)])
        folders.append(base / name)
    paths = write_report(folders, base, names=["GloRo ε", "GloRo 2ε"], title="test report")
    return paths, folders


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_has_every_section_and_inlined_figures(report):
    paths, _ = report
    page = paths["html"].read_text(encoding="utf-8")
    for sid, title in SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    imgs = re.findall(r"<img\b[^>]*>", page)
    # certified accuracy, FPR, radius histograms, and an example grid per audit and kind (some may be empty)
    assert len(imgs) >= 3
    for tag in imgs:
        src = re.search(r'src="([^"]*)"', tag).group(1)
        assert src.startswith("data:image/png;base64,")
        w, h = _png_size(base64.b64decode(src.split(",", 1)[1]))
        assert w > 100 and h > 100
    for needle in ("ε·√d", "pointwise", "2ε"):
        assert needle in page


def test_html_has_no_external_resource(report):
    paths, _ = report
    page = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"<script\b", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert not re.search(r"@import|url\(", page, re.I)
    assert not re.search(r"<(iframe|object|embed)\b", page, re.I)


def test_markdown_has_the_same_headline_table(report):
    paths, folders = report
    md = paths["md"].read_text(encoding="utf-8")
    page = paths["html"].read_text(encoding="utf-8")
    audits = [load_audit(f, n) for f, n in zip(folders, ["GloRo ε", "GloRo 2ε"])]
    header, body = headline_rows(audits)
    assert "| " + " | ".join(header) + " |" in md
    for row in body:
        assert "| " + " | ".join(row) + " |" in md
        for cell in row:
            assert cell in page
    # the numbers are the summaries' numbers
    vra = audits[0].summary["headline"]["vra_eps"]
    assert f"{100 * vra:.1f}%" in body[0]


def test_single_audit_report_goes_into_its_folder(report, tmp_path):
    _, folders = report
    target = tmp_path / "copy"
    shutil.copytree(folders[0], target)
    paths = write_report(target)
    assert paths["html"].parent == target and paths["md"].is_file()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) not installed")
def test_chromium_renders_every_figure(report, tmp_path):
    paths, _ = report
    png = tmp_path / "shot.png"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(paths["html"]),
                          "--png", str(png), "--min-images", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    assert png.is_file() and "images rendered" in res.stdout


def test_report_states_the_spoof_budget_and_draws_the_curve(report):
    """The headline's spoof success is at a stated budget, the unbounded figure is a column of its own,
    and the spoof-budget section has the success-against-budget figure."""
    paths, folders = report
    page = paths["html"].read_text(encoding="utf-8")
    md = paths["md"].read_text(encoding="utf-8")
    audit = load_audit(folders[0], "GloRo ε")
    head = audit.summary["headline"]
    assert head["spoof_budget"] == "ℓ∞ ≤ 16/255, SSIM ≥ 0.9"
    assert head["spoof_success_rate_unbounded"] is not None
    header, body = headline_rows([audit])
    for title in ("spoof budget", "spoof success (within budget; wrong label certified at any radius > 0)",
                  "spoof success (unbounded: any picture)"):
        assert title in header
    assert "ℓ∞ ≤ 16/255, SSIM ≥ 0.9" in body[0]
    for text in (page, md):
        assert "ℓ∞ ≤ 16/255, SSIM ≥ 0.9" in text and "Spoof success against budget" in text and "SSIM" in text
    section = page.split('<section id="spoof-budget">', 1)[1].split("</section>", 1)[0]
    assert "data:image/png;base64," in section
    sweep = audit.summary["spoofing"]["sweep"]
    assert [e["label"] for e in sweep][-1] == "unbounded" and len(sweep) == 6
    for e in sweep[:-1]:
        assert e["linf_max"] is None or e["linf_max"] <= e["max_linf"] + 1e-6
