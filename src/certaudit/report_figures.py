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
        _rate_axes(ax, norm, len(groups), f"radius r ({_norm_label(norm)})", "certified accuracy (VRA at r)", 7)
    fig.tight_layout()
    return _png(fig)


def _rate_axes(ax, norm: str, panels: int, xlabel: str, ylabel: str, legend_size: float) -> None:
    """Labels, a [0, 1.08] rate axis, grid and legend of one per-norm panel (titled when there are several)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if panels > 1:
        ax.set_title(f"{_norm_label(norm)} certificates", fontsize=9)


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
        _rate_axes(ax, norm, len(groups), f"radius ε of the run-time defense ({_norm_label(norm)})",
                   "false-positive rate |testA| / |testR|", 6.5)
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


# labels of the two success lines of the budget curve (the main one, and the all-images one drawn lighter)
SPOOF_MAIN_LABEL = "spoof success, naturally correct images"
SPOOF_ALL_LABEL = "spoof success, all attacked (incl. natural label already wrong)"


def budget_positions(sweep: Sequence[dict[str, Any]]) -> tuple[list[float], list[str], list[str]]:
    """Where each sweep entry sits on the budget curve's log₂ axis (×1/255), its tick label and its kind.

    Kinds: ``"linf"`` (a finite τ, at τ·255, with or without an SSIM bound), ``"ssim"`` (no ℓ∞ bound but
    an SSIM bound: a tick of its own, ``SSIM ≥ s only``, past the largest finite τ) and ``"none"`` (no bound
    at all, the unbounded attack: ``∞``, last). SSIM-only entries and the unbounded one never share a tick;
    each sits two octaves (×4) past the one before, room for its label."""
    finite = [255 * float(e["max_linf"]) for e in sweep if e.get("max_linf") is not None]
    x = 4 * (max(finite) if finite else 1.0)
    ssim_only = sorted({float(e["min_ssim"]) for e in sweep if e.get("max_linf") is None
                        and e.get("min_ssim") is not None}, reverse=True)  # tighter first
    at = {}
    for s in ssim_only:
        at[s] = x
        x *= 4
    xs, labels, kinds = [], [], []
    for e in sweep:
        if e.get("max_linf") is not None:
            xs.append(255 * float(e["max_linf"]))
            labels.append(f"{xs[-1]:g}")
            kinds.append("linf")
        elif e.get("min_ssim") is not None:
            xs.append(at[float(e["min_ssim"])])
            labels.append(f"SSIM ≥ {float(e['min_ssim']):g}\nonly")
            kinds.append("ssim")
        else:
            xs.append(x)
            labels.append("∞")
            kinds.append("none")
    return xs, labels, kinds


def budget_title(name: str, sweep: Sequence[dict[str, Any]]) -> str:
    """The curve's title: the audit, and what its points mean (the finite-τ points' SSIM bound, the
    SSIM-only point, ∞)."""
    finite_ssim = {e.get("min_ssim") for e in sweep if e.get("max_linf") is not None}
    parts = []
    if finite_ssim == {None}:
        parts.append("finite τ: ℓ∞ ≤ τ, no SSIM bound")
    elif len(finite_ssim) == 1:
        parts.append(f"finite τ: ℓ∞ ≤ τ and SSIM ≥ {float(finite_ssim.pop()):g}")
    elif finite_ssim:
        parts.append("finite τ: ℓ∞ ≤ τ (SSIM bounds differ)")
    if any(e.get("max_linf") is None and e.get("min_ssim") is not None for e in sweep):
        parts.append("SSIM only: no ℓ∞ bound")
    if any(e.get("max_linf") is None and e.get("min_ssim") is None for e in sweep):
        parts.append("∞: no bound")
    return name + ("" if not parts else "\n" + "; ".join(parts))


def _series(ax: Any, xs: Sequence[float], ys: Sequence[float], kinds: Sequence[str], **style: Any) -> None:
    """One series: a line through the finite-τ points; the SSIM-only and unbounded points as markers only (a
    gap, never a line: they are not further along the ℓ∞ axis)."""
    fin = [k == "linf" for k in kinds]
    ax.plot([x for x, f in zip(xs, fin) if f], [y for y, f in zip(ys, fin) if f], **style)
    if not all(fin):
        rest = {k: v for k, v in style.items() if k != "label"}
        ax.plot([x for x, f in zip(xs, fin) if not f], [y for y, f in zip(ys, fin) if not f],
                **{**rest, "linestyle": "none"})


def draw_spoof_budget(ax: Any, a: AuditData) -> Any:
    """One audit's panel of :func:`figure_spoof_budget` on ``ax``; returns the radius axis (``twinx``)."""
    sp = a.summary["spoofing"]
    sweep = sp["sweep"]
    xs, ticks, kinds = budget_positions(sweep)
    nan = (lambda v: np.nan if v is None else float(v))
    rate_ok = [nan(e.get("success_rate_natural_correct")) for e in sweep]
    rate_all = [nan(e.get("success_rate")) for e in sweep]
    rad = [nan(e.get("shadow_radius_mean")) for e in sweep]
    _series(ax, xs, rate_ok, kinds, marker="o", color="C3", label=SPOOF_MAIN_LABEL)
    _series(ax, xs, rate_all, kinds, marker="o", color="C3", alpha=0.35, linewidth=1, markersize=4,
            label=SPOOF_ALL_LABEL)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, ticks, fontsize=7)
    ax.minorticks_off()
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)  # room for the n= labels at both ends
    if "linf" in kinds and any(k != "linf" for k in kinds):  # where the ℓ∞ axis ends
        last = max(x for x, k in zip(xs, kinds) if k == "linf")
        ax.axvline(last * 2, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("ℓ∞ budget τ (×1/255)")
    ax.set_ylabel("spoof success (within budget)")
    head = sp.get("budget") or {}
    for x, e, r_ok, r_all in zip(xs, sweep, rate_ok, rate_all):
        primary = e.get("primary")
        if primary is None:  # summaries written before sweep entries carried it
            primary = e["max_linf"] == head.get("max_linf") and e["min_ssim"] == head.get("min_ssim")
        if primary:
            ax.plot([x], [r_ok if np.isfinite(r_ok) else r_all], marker="D", color="k", markersize=7,
                    linestyle="none", label=f"headline: {e['label']}")
    ax2 = ax.twinx()
    _series(ax2, xs, rad, kinds, marker="s", color="C0", linestyle="--", label="r̄ spoofed (n = successes)")
    nat_s = [nan(e.get("natural_radius_mean_successes")) for e in sweep]
    if any(np.isfinite(v) for v in nat_s):
        _series(ax2, xs, nat_s, kinds, marker="^", color="C0", linestyle=":", linewidth=1,
                label="r̄ natural (same images as r̄ spoofed)")
    elif sp.get("natural_radius_mean") is not None:  # older summaries: the natural mean over certified images
        ax2.axhline(sp["natural_radius_mean"], color="C0", linestyle=":", linewidth=1,
                    label="r̄ natural (spoof images, certified)")
        nat_s = [float(sp["natural_radius_mean"])]
    for x, e, y in zip(xs, sweep, rad):
        if e.get("successes") is not None and np.isfinite(y):
            ax2.annotate(f"n={int(e['successes'])}", (x, y), textcoords="offset points", xytext=(0, 5),
                         ha="center", fontsize=6, color="C0")
    top = max([v for v in rad + nat_s if np.isfinite(v)] + [0.0])
    ax2.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # headroom: the n= labels stay inside the frame
    ax2.set_ylabel(f"mean certified radius ({_norm_label(a.norm)})", fontsize=8)
    ax.set_title(budget_title(a.name, sweep), fontsize=8)
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6.5, loc="upper center",
              bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    ax.grid(alpha=0.3)
    return ax2


def figure_spoof_budget(audits: Sequence[AuditData]) -> str | None:
    """Per audit: spoof success against the budget of the sweep (:func:`budget_positions`: finite ℓ∞ τ on a
    log₂ axis, then the SSIM-only budget and ∞ = unbounded, each a tick of its own, not joined by a line).
    The main line is the success rate over the attacked images whose natural label was correct (real
    spoofs); the lighter line over all attacked images, incl. those the defense already labelled wrong
    before any attack. On the right axis: the mean spoofed radius of the successes (each point annotated
    with their number) and the mean natural radius of those same images; the headline's budget
    (``primary``) marked ◆."""
    have = [a for a in audits if (a.summary.get("spoofing") or {}).get("sweep")]
    if not have:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(have), 4.8, 5.2)
    for ax, a in zip(axes, have):
        draw_spoof_budget(ax, a)
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


def _natural_wrong(rec: dict[str, Any]) -> bool:
    """A spoof example whose natural image the defense already labelled wrong (False where unknown)."""
    return "natural_prediction" in rec and int(rec["natural_prediction"]) != int(rec["label"])


def example_records(a: AuditData, kind: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The saved examples of ``kind`` as one dict per image, in the order the grid shows them: index order,
    and for spoofs the naturally correct images (real spoofs) before those the defense already labelled
    wrong before any attack. At most ``limit``."""
    recs = []
    for chunk in a.examples.get(kind, []):
        for j in range(len(chunk["index"])):
            recs.append({k: chunk[k][j] for k in chunk})
    if kind == "spoof":
        recs.sort(key=_natural_wrong)  # stable: index order within each kind
    return recs if limit is None else recs[:limit]


def figure_examples(a: AuditData, kind: str, limit: int = 4, classes: Sequence[str] | None = None) -> str | None:
    """Grid: one row per example (:func:`example_records`); natural x with its label | the perturbation (colour
    scale in 8-bit steps, labelled) | the perturbed image with what the defense says about it. Spoofs: the
    naturally correct images (real spoofs) first, then those the defense already labelled wrong before any
    attack; each row says which it is."""
    recs = example_records(a, kind, limit)
    if not recs:
        return None
    classes = classes or a.summary["config"].get("classes")
    name = (lambda c: "⊥" if int(c) == -1 else (classes[int(c)] if classes else str(int(c))))
    norm = "∞" if a.norm == "linf" else "₂"
    plt = _plt()
    row_h = 2.65 if kind == "spoof" else 2.35  # spoofs: a third title line (which kind of success)
    fig, axes = plt.subplots(len(recs), 3, figsize=(6.6, row_h * len(recs)), squeeze=False,
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
            if _natural_wrong(rec):
                what = f"natural label already wrong\n({name(rec['natural_prediction'])}) before any attack"
            elif "natural_prediction" in rec:
                what = "natural label correct:\na real spoof"
            else:
                what = ""
            _show(row[0], nat, f"x (#{int(rec['index'])}): true {name(rec['label'])}" + (f"\n{what}" if what else ""))
            ssim = "" if "ssim" not in rec else f", SSIM {float(rec['ssim']):.3f}"
            _show_delta(fig, row[1], delta, f"δ: ‖δ‖∞ = {linf:.1f}/255{ssim}")
            _show(row[2], adv, f"x + δ: certified {name(rec['prediction'])}\nr = {float(rec['radius']):.3f} "
                               f"(wrong label)")
    top = 1.0
    if kind == "spoof":
        budget = (a.summary.get("spoofing") or {}).get("budget_label", "unbounded")
        fig.suptitle(f"{a.name}: spoofs within the budget {budget}\nnaturally correct images first, then images "
                     "whose natural label was already wrong", fontsize=8.5)
        top = 1 - 0.5 / (row_h * len(recs))
    else:
        fig.suptitle(f"{a.name}: degraded at {_norm_label(a.norm)} ε = {a.eps:.3g}", fontsize=8.5)
        top = 1 - 0.35 / (2.35 * len(recs))
    fig.tight_layout(rect=(0, 0, 1, top))
    return _png(fig)


__all__ = ["SPOOF_ALL_LABEL", "SPOOF_MAIN_LABEL", "budget_positions", "budget_title", "draw_spoof_budget",
           "example_records", "figure_certified_accuracy", "figure_fpr", "figure_radius_histograms", "figure_spoof_budget",
           "figure_examples"]
