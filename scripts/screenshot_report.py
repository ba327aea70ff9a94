#!/usr/bin/env python
"""Render a certaudit ``report.html`` in headless Chromium and check that every figure rendered.

Usage::

    .venv/bin/python scripts/screenshot_report.py certaudit-demo/report.html --png report.png

Two checks, both with Chromium (Debian package ``chromium``; ``--chromium PATH`` for another):

1. ``--dump-dom`` of a copy of the page with a small inline script appended, which records every
   ``<img>``'s ``complete`` flag and ``naturalWidth``/``naturalHeight`` after load: every image
   must have decoded to a non-empty bitmap, and the page must have at least ``--min-images``.
2. ``--screenshot`` of the page itself: the PNG must be non-blank (enough non-white pixels) and show
   colour (the plots' lines and the example grids' diverging maps), not only text.

Exit status 0 when both pass, 1 otherwise (with the reason on stderr), 2 when Chromium is missing.
The page is opened from a ``file://`` URL with networking irrelevant: the report has no external
resource, so nothing is fetched.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var info = imgs.map(function (im) {
    var r = im.getBoundingClientRect();
    return {alt: im.alt, complete: im.complete, w: im.naturalWidth, h: im.naturalHeight,
            top: r.top + window.scrollY, left: r.left + window.scrollX, width: r.width, height: r.height};
  });
  var pre = document.createElement('pre');
  pre.id = 'certaudit-probe';
  pre.textContent = JSON.stringify({images: info, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>
"""


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    base = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", "--mute-audio", "--disable-extensions"]
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(base + [f"--user-data-dir={profile}"] + args, capture_output=True, text=True,
                              timeout=timeout)


def probe_images(binary: str, report: Path, timeout: float = 120.0, width: int = 1200, height: int = 6000) -> dict:
    """Load a copy of the page with the probe script; return ``{"images": [one record per <img>], "height": px}``."""
    text = report.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "probe.html"
        copy.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE,
                        encoding="utf-8")
        # the same window width as the screenshot, so that the recorded positions are the screenshot's
        res = _chromium(binary, [f"--window-size={width},{height}", "--virtual-time-budget=15000", "--dump-dom",
                                 copy.as_uri()], timeout)
    m = re.search(r'<pre id="certaudit-probe">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium returned no probe output (exit {res.returncode}): {res.stderr.strip()[-400:]}")
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def screenshot(binary: str, report: Path, png: Path, width: int = 1200, height: int = 6000,
               timeout: float = 120.0) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    res = _chromium(binary, [f"--window-size={width},{height}", "--virtual-time-budget=15000",
                             f"--screenshot={png.resolve()}", report.resolve().as_uri()], timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr.strip()[-400:]}")
    return png


def pixel_stats(png: Path) -> dict[str, float]:
    """Fraction of non-white pixels and of clearly coloured (non-grey) pixels of a screenshot."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    non_white = (arr.min(axis=2) < 235).mean()
    colour = ((arr.max(axis=2) - arr.min(axis=2)) > 60).mean()
    return {"width": arr.shape[1], "height": arr.shape[0], "non_white": float(non_white), "colour": float(colour)}


def crop_figure(png: Path, images: list[dict], alt: str, out: Path, pad: int = 60) -> Path:
    """Crop the page screenshot to the first image whose alt text contains ``alt`` (plus ``pad`` pixels
    around it, for its heading and caption): the figure as the report shows it in Chromium."""
    from PIL import Image

    hits = [im for im in images if alt in (im.get("alt") or "")]
    if not hits:
        raise AssertionError(f"no image with alt text containing {alt!r}; alts: {[im.get('alt') for im in images]}")
    im = hits[0]
    page = Image.open(png)
    box = (max(0, int(im["left"]) - pad), max(0, int(im["top"]) - pad),
           min(page.width, int(im["left"] + im["width"]) + pad), min(page.height, int(im["top"] + im["height"]) + pad))
    out.parent.mkdir(parents=True, exist_ok=True)
    page.crop(box).save(out)
    return out


def check(report: Path, png: Path, binary: str, min_images: int = 1) -> dict:
    """Run both checks; return the evidence, raise ``AssertionError`` with the reason on failure."""
    probe = probe_images(binary, report)
    images = probe["images"]
    if len(images) < min_images:
        raise AssertionError(f"{len(images)} images on the page, expected at least {min_images}")
    broken = [im for im in images if not im["complete"] or im["w"] <= 0 or im["h"] <= 0]
    if broken:
        raise AssertionError(f"{len(broken)} of {len(images)} images did not render: {[b['alt'] for b in broken]}")
    screenshot(binary, report, png, height=min(30000, max(800, int(probe["height"]) + 50)))
    stats = pixel_stats(png)
    if stats["non_white"] < 0.02:
        raise AssertionError(f"screenshot is (nearly) blank: {stats}")
    if stats["colour"] < 0.001:
        raise AssertionError(f"screenshot shows no coloured figure pixels: {stats}")
    return {"images": images, "screenshot": str(png), **stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render a certaudit report in headless Chromium and check its figures.")
    ap.add_argument("report", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="screenshot path (default: next to the report)")
    ap.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    ap.add_argument("--min-images", type=int, default=1)
    ap.add_argument("--crop-alt", default=None, help="also save the rendered figure whose alt text contains this")
    ap.add_argument("--crop-png", type=Path, default=None, help="where to save that crop (default: <png>-crop.png)")
    args = ap.parse_args(argv)
    binary = find_chromium(args.chromium)
    if binary is None:
        print("chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.report.is_file():
        print(f"no such report: {args.report}", file=sys.stderr)
        return 1
    png = args.png or args.report.with_suffix(".png")
    try:
        res = check(args.report, png, binary, args.min_images)
    except (AssertionError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    if args.crop_alt:
        try:
            crop = crop_figure(png, res["images"], args.crop_alt, args.crop_png or png.with_name(png.stem + "-crop.png"))
        except AssertionError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"crop: {crop}")
    sizes = ", ".join(f"{im['w']}x{im['h']}" for im in res["images"])
    print(f"ok: {len(res['images'])} images rendered (natural sizes {sizes}); screenshot {res['screenshot']} "
          f"{res['width']}x{res['height']}, {100 * res['non_white']:.1f}% non-white, {100 * res['colour']:.2f}% colour")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
