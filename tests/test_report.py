"""The HTML/Markdown report: every section, figures inlined, no external resource; Chromium render."""

import base64
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certaudit import zoo
from certaudit.audits.pipeline import AuditSettings, AuditSource, run_audit
from certaudit.models import load_checkpoint
from certaudit.report import SECTIONS, AuditData, fmt, glance_rows, headline_rows, load_audit, write_report

pytestmark = pytest.mark.usefixtures("one_thread_module")

ROOT = Path(__file__).resolve().parents[1]


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
    crop = tmp_path / "budget.png"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(paths["html"]),
                          "--png", str(png), "--min-images", "3", "--crop-alt", "spoof success against the ℓ∞ budget",
                          "--crop-png", str(crop)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    assert png.is_file() and "images rendered" in res.stdout
    from PIL import Image

    with Image.open(crop) as im:  # the budget curve as Chromium drew it: a figure-sized, non-blank region
        assert 300 < im.width <= 1200 and im.height > 200
        assert len(np.unique(np.asarray(im.convert("L")))) > 10


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
    for title in ("spoof budget", "spoof success (within budget; naturally correct images; wrong label certified at "
                  "any radius > 0)", "spoof success (within budget; all attacked, incl. natural label already wrong)",
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


def test_headline_gives_spoof_success_over_naturally_correct_images_first(report):
    """The at-a-glance spoof cell: the rate over the naturally correct images with their n first, then the rate
    over all attacked images, named (it counts images the defense labelled wrong before any attack)."""
    _, folders = report
    audit = load_audit(folders[0], "GloRo ε")
    sp, head = audit.summary["spoofing"], audit.summary["headline"]
    assert head["spoof_attacked_natural_correct"] == sp["attacked_natural_correct"]
    header, rows = glance_rows([audit])
    col = next(i for i, h in enumerate(header) if h.startswith("spoof success within budget"))
    assert "naturally correct" in header[col] and "already wrong" in header[col]
    cell = rows[0][col]
    assert cell == (f"{fmt(sp['success_rate_natural_correct'], 'pct')} (n = {sp['attacked_natural_correct']} "
                    f"naturally correct); {fmt(sp['success_rate'], 'pct')} incl. already wrong (n = {sp['attacked']})")
    assert rows[0][-1] == fmt(head["spoof_success_rate_unbounded"], "pct")  # the unbounded column stays


def _sweep_entry(tau, s, rate_ok, rate_all, successes, radius, primary=False):
    from certaudit.attacks.budget import Budget

    return {"max_linf": tau, "min_ssim": s, "label": Budget(tau, s).label, "primary": primary, "attacked": 10,
            "success_rate_natural_correct": rate_ok, "success_rate": rate_all, "successes": successes,
            "shadow_radius_mean": radius, "natural_radius_mean_successes": radius / 2}


def _budget_audit(sweep, budget):
    return AuditData(name="synthetic", folder=Path("."), summary={
        "headline": {"eps": 0.25, "norm": "l2"}, "spoofing": {"budget": budget, "sweep": sweep}})


def test_budget_curve_gives_ssim_only_budgets_their_own_tick(tmp_path):
    """An SSIM-only main budget (no ℓ∞ bound) sits on a tick of its own, apart from ∞ (no bound at all); no
    line joins the finite τ to either; the main line is the naturally-correct success, the all-images one
    lighter; the title says what the finite-τ points are; every n= label stays inside the frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from certaudit.report_figures import (
        SPOOF_ALL_LABEL,
        SPOOF_MAIN_LABEL,
        budget_positions,
        draw_spoof_budget,
        figure_spoof_budget,
    )

    sweep = [_sweep_entry(4 / 255, 0.9, 0.1, 0.3, 3, 0.2), _sweep_entry(16 / 255, 0.9, 0.2, 0.4, 4, 0.9),
             _sweep_entry(None, 0.9, 0.5, 0.6, 6, 1.4, primary=True), _sweep_entry(None, None, 0.9, 1.0, 10, 1.5)]
    xs, ticks, kinds = budget_positions(sweep)
    assert kinds == ["linf", "linf", "ssim", "none"] and ticks[2:] == ["SSIM ≥ 0.9\nonly", "∞"]
    assert xs[0] < xs[1] < xs[2] < xs[3]  # the SSIM-only point and ∞ never share a tick
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax2 = draw_spoof_budget(ax, _budget_audit(sweep, {"max_linf": None, "min_ssim": 0.9}))
    fig.tight_layout()
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "16", "SSIM ≥ 0.9\nonly", "∞"]
    title = ax.get_title()
    assert "finite τ: ℓ∞ ≤ τ and SSIM ≥ 0.9" in title and "SSIM only: no ℓ∞ bound" in title and "∞: no bound" in title
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    main, light = lines[SPOOF_MAIN_LABEL], lines[SPOOF_ALL_LABEL]
    assert list(main.get_ydata()) == [0.1, 0.2] and list(light.get_ydata()) == [0.3, 0.4]
    assert (light.get_alpha() or 1.0) < (main.get_alpha() or 1.0)
    finite = set(xs[:2])
    for ln in ax.get_lines() + ax2.get_lines():  # a drawn line runs through finite τ only (a gap to the rest)
        x = set(float(v) for v in ln.get_xdata())
        if ln.get_linestyle() not in ("None", "none", "") and len(x) > 1:
            assert x <= finite, (ln.get_label(), x)
    marks = [ln for ln in ax.get_lines() if ln.get_linestyle() in ("None", "none")
             and set(float(v) for v in ln.get_xdata()) == set(xs[2:])]
    assert marks, "the SSIM-only and ∞ points are drawn as markers"
    frame = ax.get_window_extent()
    labels = [t for t in ax2.texts if t.get_text().startswith("n=")]
    assert len(labels) == 4
    for t in labels:
        box = t.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
    plt.close(fig)
    # ℓ∞ bounds without SSIM, and unbounded: the title says so
    plain = [_sweep_entry(8 / 255, None, 0.1, 0.2, 2, 0.3, primary=True), _sweep_entry(None, None, 0.4, 0.5, 5, 1.0)]
    fig, ax = plt.subplots()
    draw_spoof_budget(ax, _budget_audit(plain, {"max_linf": 8 / 255, "min_ssim": None}))
    assert "finite τ: ℓ∞ ≤ τ, no SSIM bound" in ax.get_title() and "SSIM only" not in ax.get_title()
    plt.close(fig)
    assert figure_spoof_budget([_budget_audit(sweep, {"max_linf": None, "min_ssim": 0.9})])  # a PNG


def test_spoof_examples_prefer_naturally_correct_images(tmp_path):
    """The audit keeps successful spoofs on naturally correct images first: images already labelled wrong fill
    up only while there is room, and never crowd out a later chunk's real spoofs; the grid shows the real
    spoofs first and says which kind each row is."""
    from types import SimpleNamespace

    from certaudit.audits.pipeline import _count_spoof_examples, _keep_spoof_examples, load_examples
    from certaudit.report_figures import example_records, figure_examples

    def chunk(first, kinds):
        rows = [{"index": first + j, "label": 1, "natural_prediction": 2 if k == "wrong" else 1, "natural_radius": 0.5,
                 "success": k != "fail", "spoofed_prediction": 3, "spoofed_radius": 0.4, "l2": 1.0, "ssim": 0.95,
                 "linf": 0.05} for j, k in enumerate(kinds)]
        x = torch.rand(len(kinds), 1, 8, 8, generator=torch.Generator().manual_seed(first))
        return SimpleNamespace(rows=rows, natural=x, x_adv=(x + 0.05).clamp(0, 1))

    (tmp_path / "images").mkdir()
    kept = [0, 0]
    assert _keep_spoof_examples(tmp_path, chunk(0, ["wrong", "wrong", "wrong", "fail"]), 0, kept, 2) == 2
    assert kept == [0, 2]  # room for two, no real spoof yet: the others fill it
    assert _keep_spoof_examples(tmp_path, chunk(10, ["wrong", "ok", "fail", "ok", "ok"]), 10, kept, 2) == 2
    assert kept == [2, 2] and _count_spoof_examples(tmp_path) == [2, 2]  # the real spoofs are kept all the same
    mixed = tmp_path / "mixed"
    (mixed / "images").mkdir(parents=True)
    kept = [0, 0]
    assert _keep_spoof_examples(mixed, chunk(20, ["wrong", "ok", "wrong", "wrong"]), 20, kept, 3) == 3
    assert kept == [1, 2]
    audit = AuditData(name="x", folder=tmp_path, summary={
        "headline": {"eps": 0.25, "norm": "l2"}, "config": {},
        "spoofing": {"budget_label": "ℓ∞ ≤ 16/255, SSIM ≥ 0.9"}}, examples={"spoof": load_examples(tmp_path, "spoof")})
    assert [int(r["index"]) for r in example_records(audit, "spoof", 3)] == [11, 13, 0]
    assert figure_examples(audit, "spoof", classes=[str(i) for i in range(10)])
