"""The report's figures, drawn with matplotlib (Agg) and returned as base64 PNGs for the self-contained
HTML page of :mod:`certaudit.report`: certified accuracy against radius, the FPR's 2r check with the
bounds at ε, natural against spoofed radii, spoof success against the ℓ∞ budget, and example grids
(natural | perturbation | perturbed)."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # the report module imports this one; AuditData is only an annotation here
    from certaudit.report import AuditData


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _norm_label(norm: str) -> str:
    return "ℓ∞" if norm == "linf" else "ℓ2"


def _by_norm(audits: Sequence[AuditData]) -> list[tuple[str, list[AuditData]]]:
    """Audits grouped by norm (ℓ2 first): radii of different norms never share an axis."""
    norms = sorted({a.norm for a in audits}, key=lambda n: (n != "l2", n))
    return [(n, [a for a in audits if a.norm == n]) for n in norms]


def _grid(plt: Any, n: int, w: float, h: float) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels: one row up to 3, else 2 columns; the unused panels hidden."""
    cols = n if n <= 3 else 2
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _colors(audits: Sequence[AuditData]) -> dict[int, str]:
    """One colour per audit, the same in every panel."""
    return {id(a): f"C{k}" for k, a in enumerate(audits)}


def figure_certified_accuracy(audits: Sequence[AuditData]) -> str | None:
    from certaudit.audits.certified import accuracy_curve

    have = [a for a in audits if a.rows.get("certify")]
    if not have:
        return None
    plt = _plt()
    groups = _by_norm(have)
    color = _colors(audits)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 3.8), squeeze=False)
    for ax, (norm, group) in zip(axes[0], groups):
        for a in group:
            grid, acc = accuracy_curve(a.rows["certify"])
            ax.step(grid, acc, where="post", label=a.name, color=color[id(a)])
        for e in sorted({a.eps for a in group}):
            ax.axvline(e, color="grey", linestyle="--", linewidth=1)
            ax.axvline(2 * e, color="grey", linestyle=":", linewidth=1)
            ax.text(e, 1.01, " ε", fontsize=8, color="grey", va="bottom")
            ax.text(2 * e, 1.01, " 2ε", fontsize=8, color="grey", va="bottom")
        ax.set_xlabel(f"radius r ({_norm_label(norm)})")
        ax.set_ylabel("certified accuracy (VRA at r)")
        ax.set_ylim(0, 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if len(groups) > 1:
            ax.set_title(f"{_norm_label(norm)} certificates", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def figure_fpr(audits: Sequence[AuditData]) -> str | None:
    """The FPR's 2r check against radius (line) and, at ε, the lower bound by attack and the proven
    upper bound (markers); one panel per norm."""
    have = [a for a in audits if a.summary.get("fpr_curve")]
    if not have:
        return None
    plt = _plt()
    groups = _by_norm(have)
    color = _colors(audits)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 3.8), squeeze=False)
    for ax, (norm, group) in zip(axes[0], groups):
        for a in group:
            c = color[id(a)]
            pts = a.summary["fpr_curve"]
            ax.plot([p["radius"] for p in pts],
                    [np.nan if p.get("fpr_2r_check") is None else p["fpr_2r_check"] for p in pts],
                    color=c, label=f"{a.name}: 2r check")
            d = a.summary.get("degradation") or {}
            if d.get("fpr_lower") is not None:
                ax.plot([a.eps], [d["fpr_lower"]], marker="v", color=c, linestyle="none", markersize=8,
                        label=f"{a.name}: lower bound at ε (attacks)")
            if d.get("fpr_upper") is not None:
                ax.plot([a.eps], [d["fpr_upper"]], marker="^", color=c, linestyle="none", markersize=8,
                        markerfacecolor="none")
        for e in sorted({a.eps for a in group}):
            ax.axvline(e, color="grey", linestyle="--", linewidth=1)
            ax.text(e, 1.01, " ε", fontsize=8, color="grey", va="bottom")
        ax.set_xlabel(f"radius ε of the run-time defense ({_norm_label(norm)})")
        ax.set_ylabel("false-positive rate |testA| / |testR|")
        ax.set_ylim(0, 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
        if len(groups) > 1:
            ax.set_title(f"{_norm_label(norm)} certificates", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def figure_radius_histograms(audits: Sequence[AuditData]) -> str | None:
    have = [a for a in audits if a.rows.get("spoof")]
    if not have:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(have), 4.2, 3.3)
    for ax, a in zip(axes, have):
        r = a.rows["spoof"]
        nat = [float(x["natural_radius"]) for x in r
               if int(x["natural_prediction"]) != -1 and float(x["natural_radius"]) > 0]  # as natural_certified
        adv = [float(x["spoofed_radius"]) for x in r if x.get("success")]
        top = max(nat + adv + [1e-6])
        bins = np.linspace(0, top * 1.02, 16)
        ax.hist(nat, bins=bins, alpha=0.6, label=f"natural, certified r > 0 (n={len(nat)})", color="C0")
        ax.hist(adv, bins=bins, alpha=0.6, label=f"spoofed within budget, wrong label (n={len(adv)})", color="C3")
        ax.axvline(a.eps, color="grey", linestyle="--", linewidth=1)
        ax.set_title(a.name, fontsize=8)
        ax.set_xlabel(f"certified radius ({_norm_label(a.norm)})")
        ax.set_ylabel("images")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    return _png(fig)


def figure_spoof_budget(audits: Sequence[AuditData]) -> str | None:
    """Per audit: spoof success and mean spoofed radius against the ℓ∞ budget of the sweep (∞ = unbounded),
    each point annotated with its number of successes, and the mean natural radius of those same successful
    images per budget; the headline's budget (``primary``) marked."""
    have = [a for a in audits if (a.summary.get("spoofing") or {}).get("sweep")]
    if not have:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(have), 4.8, 4.2)
    for ax, a in zip(axes, have):
        sp = a.summary["spoofing"]
        sweep = sp["sweep"]
        finite = [e["max_linf"] * 255 for e in sweep if e["max_linf"] is not None]
        top = max(finite) if finite else 1.0
        xs = [e["max_linf"] * 255 if e["max_linf"] is not None else 2 * top for e in sweep]
        rate = [np.nan if e.get("success_rate") is None else e["success_rate"] for e in sweep]
        rad = [np.nan if e.get("shadow_radius_mean") is None else e["shadow_radius_mean"] for e in sweep]
        ax.plot(xs, rate, marker="o", color="C3", label="spoof success")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" if e["max_linf"] is not None else "∞" for x, e in zip(xs, sweep)], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("ℓ∞ budget τ (×1/255); ∞ = unbounded")
        ax.set_ylabel("spoof success (within budget)")
        head = sp.get("budget") or {}
        for x, e, r in zip(xs, sweep, rate):
            primary = e.get("primary")
            if primary is None:  # summaries written before sweep entries carried it
                primary = e["max_linf"] == head.get("max_linf") and e["min_ssim"] == head.get("min_ssim")
            if primary:
                ax.plot([x], [r], marker="D", color="k", markersize=7, linestyle="none", label=f"headline: {e['label']}")
        ax2 = ax.twinx()
        ax2.plot(xs, rad, marker="s", color="C0", linestyle="--", label="r̄ spoofed (n = successes)")
        for x, e, y in zip(xs, sweep, rad):
            if e.get("successes") is not None and np.isfinite(y):
                ax2.annotate(f"n={int(e['successes'])}", (x, y), textcoords="offset points", xytext=(0, 5),
                             ha="center", fontsize=6, color="C0")
        nat_s = [np.nan if e.get("natural_radius_mean_successes") is None else e["natural_radius_mean_successes"]
                 for e in sweep]
        if any(np.isfinite(v) for v in nat_s):
            ax2.plot(xs, nat_s, marker="^", color="C0", linestyle=":", linewidth=1,
                     label="r̄ natural (same images as r̄ spoofed)")
        elif sp.get("natural_radius_mean") is not None:  # older summaries: the natural mean over certified images
            ax2.axhline(sp["natural_radius_mean"], color="C0", linestyle=":", linewidth=1,
                        label="r̄ natural (spoof images, certified)")
        ax2.set_ylabel(f"mean certified radius ({_norm_label(a.norm)})", fontsize=8)
        ax2.set_ylim(bottom=0)
        ssim_s = next((e["min_ssim"] for e in sweep if e["min_ssim"] is not None), None)
        ax.set_title(a.name + ("" if ssim_s is None else f" (finite τ: SSIM ≥ {ssim_s:g})"), fontsize=8)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6.5, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _show(ax: Any, img: np.ndarray, title: str) -> None:
    """An image in [0, 1] (C, H, W), pixels as squares, with a title."""
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.transpose(img[:3], (1, 2, 0)).clip(0, 1), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _show_delta(fig: Any, ax: Any, delta: np.ndarray, title: str) -> None:
    """The perturbation (mean over channels) in 8-bit steps (×255) on a symmetric diverging scale, with its
    colour bar: red brightens a pixel, blue darkens it; the bar says by how much."""
    d = delta.mean(axis=0) * 255.0  # (H, W) in 1/255 steps
    top = float(np.abs(d).max()) or 1.0
    im = ax.imshow(d, cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=6.5)
    bar.set_label("change (×1/255)", fontsize=6.5)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def figure_examples(a: AuditData, kind: str, limit: int = 4, classes: Sequence[str] | None = None) -> str | None:
    """Grid: one row per example; natural x with its label | the perturbation (colour scale in 8-bit
    steps, labelled) | the perturbed image with what the defense says about it."""
    recs = []
    for chunk in a.examples.get(kind, []):
        for j in range(len(chunk["index"])):
            recs.append({k: chunk[k][j] for k in chunk})
    recs = recs[:limit]
    if not recs:
        return None
    classes = classes or a.summary["config"].get("classes")
    name = (lambda c: "⊥" if int(c) == -1 else (classes[int(c)] if classes else str(int(c))))
    norm = "∞" if a.norm == "linf" else "₂"
    plt = _plt()
    fig, axes = plt.subplots(len(recs), 3, figsize=(6.6, 2.35 * len(recs)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.22, 1]})
    for row, rec in zip(axes, recs):
        nat, adv = rec["natural"].astype(np.float32), rec["adv"].astype(np.float32)
        delta = adv - nat
        linf = 255 * float(np.abs(delta).max())
        if kind == "degrade":
            r = float(rec["radius"])
            cert = f"certified, r = {r:.3f}" if r > 0 else f"certified at ε = {a.eps:.3g}"  # no radius: checks only
            _show(row[0], nat, f"x (#{int(rec['index'])}): {name(rec['prediction'])}\n{cert}")
            _show_delta(fig, row[1], delta, f"x′ − x: ‖·‖{norm} = {float(rec['distance']):.3f}\n"
                                            f"largest pixel change {linf:.1f}/255")
            _show(row[2], adv, f"x′ (within ε = {a.eps:.3g}):\nrejected (⊥)")
        else:
            wrong = "natural_prediction" in rec and int(rec["natural_prediction"]) != int(rec["label"])
            _show(row[0], nat, f"x (#{int(rec['index'])}): true {name(rec['label'])}"
                               + (f"\n(natural already wrong: {name(rec['natural_prediction'])})" if wrong else ""))
            ssim = "" if "ssim" not in rec else f", SSIM {float(rec['ssim']):.3f}"
            _show_delta(fig, row[1], delta, f"δ: ‖δ‖∞ = {linf:.1f}/255{ssim}")
            _show(row[2], adv, f"x + δ: certified {name(rec['prediction'])}\nr = {float(rec['radius']):.3f} "
                               f"(wrong label)")
    top = 1.0
    if kind == "spoof":
        budget = (a.summary.get("spoofing") or {}).get("budget_label", "unbounded")
        fig.suptitle(f"{a.name}: spoofs within the budget {budget}", fontsize=8.5)
        top = 1 - 0.35 / (2.35 * len(recs))
    else:
        fig.suptitle(f"{a.name}: degraded at {_norm_label(a.norm)} ε = {a.eps:.3g}", fontsize=8.5)
        top = 1 - 0.35 / (2.35 * len(recs))
    fig.tight_layout(rect=(0, 0, 1, top))
    return _png(fig)


__all__ = ["figure_certified_accuracy", "figure_fpr", "figure_radius_histograms", "figure_spoof_budget",
           "figure_examples"]
