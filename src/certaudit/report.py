"""Audit reports: one self-contained HTML page (figures inlined as base64 PNG) and Markdown tables.

:func:`write_report` reads one or more audit folders (written by
:func:`certaudit.audits.pipeline.run_audit`: ``summary.json``, ``rows/*.jsonl``, ``images/*.npz``)
and writes ``report.html`` and ``report.md``. The page has no external resource (no scripts,
stylesheets, fonts or images fetched from anywhere), so a reviewer can open it offline. Sections
(:data:`SECTIONS`, always there): the headline tables (one row per audit at a glance, then every
headline figure); then one section per audit (``audit-<folder>``: what was audited and its detail
tables); certified accuracy against radius with ε and 2ε marked (one panel per norm); the
false-positive-rate bounds against radius (Figs. 2/3 of the degradation paper); natural against
spoofed certified radii (Fig. 9 of the Shadow Attack paper); example grids of successful
degradation and spoofing; with ``detector=`` (verdicts of :mod:`certaudit.detection`), the
detector-claims section (:data:`DETECTOR_SECTION`: Tramèr's reduction and the verdicts); what the
certificate does and does not cover; the configuration.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from certaudit.audits.pipeline import STAGES, expand_ranges, load_examples
from certaudit.errors import InputError
from certaudit.report_figures import (  # noqa: F401 (re-exported)
    figure_certified_accuracy, figure_examples, figure_fpr, figure_radius_histograms, figure_spoof_budget,
)
from certaudit.report_meanings import FIGURE_MEANINGS, PAPERS
from certaudit.results import read_rows

SECTIONS: tuple[tuple[str, str], ...] = (
    ("headline", "Headline figures"),
    ("certified-accuracy", "Certified accuracy against radius"),
    ("fpr", "False-positive rate of the run-time defense against radius"),
    ("spoofed-radii", "Natural against spoofed certified radii"),
    ("spoof-budget", "Spoof success against perturbation budget"),
    ("degradation-examples", "Degradation examples"),
    ("spoofing-examples", "Spoofing examples"),
    ("coverage", "What the certificate covers, and what it does not"),
    ("figures", "What every figure means"),
    ("configuration", "Configuration, versions and timings"),
)

# (key of the headline dict, column title, kind) -- kind: pct, int, num
HEADLINE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("images", "images", "int"),
    ("clean_accuracy", "clean acc. (model)", "pct"),
    ("certified_clean_accuracy", "clean acc. (defense)", "pct"),
    ("vra_eps", "VRA@ε", "pct"),
    ("vra_2eps", "VRA@2ε", "pct"),
    ("rejection_rate_eps", "rejected@ε", "pct"),
    ("fpr_lower", "FPR lower", "pct"),
    ("fpr_upper", "FPR upper (proven)", "pct"),
    ("fpr_2eps_check", "FPR 2ε check", "pct"),
    ("utility_reduction_lower", "utility red. lower", "pct"),
    ("utility_reduction_upper", "utility red. upper (proven)", "pct"),
    ("spoof_budget", "spoof budget", "text"),
    ("spoof_attacked", "spoof attacked", "int"),
    ("spoof_attacked_natural_correct", "spoof attacked, natural label correct", "int"),
    ("spoof_success_rate_natural_correct", "spoof success (within budget; naturally correct images; wrong label "
                                           "certified at any radius > 0)", "pct"),
    ("spoof_success_rate", "spoof success (within budget; all attacked, incl. natural label already wrong)", "pct"),
    ("spoof_successes_natural_wrong", "of which natural already wrong", "int"),
    ("natural_radius_mean", "r̄ natural (spoof images, certified)", "num"),
    ("natural_radius_mean_successes", "r̄ natural (same images as r̄ spoofed)", "num"),
    ("shadow_radius_mean", "r̄ spoofed (within budget)", "num"),
    ("spoof_success_rate_unbounded", "spoof success (unbounded: any picture)", "pct"),
    ("shadow_radius_mean_unbounded", "r̄ spoofed (unbounded)", "num"),
)

DETECTOR_SECTION = ("detector-claims", "Detector claims: Tramèr's reduction")
"""The section written when :func:`write_report` gets detector verdicts (``certaudit demo`` does)."""

DETECTOR_REDUCTION = (
    "By Tramèr's reduction (ICML 2022, Theorem 4), a detector robust at radius ε on x (x itself is classified "
    "correctly and not rejected, and every input within ε of x is classified correctly or rejected) yields a "
    "classifier robust at ε/2 with at least the same robust accuracy: an inefficient one, which searches the ε/2 "
    "ball, but it exists. So a detector claim at ε is a claim about robust classification at ε/2, and one that beats "
    "the best known robust classifier there (FLAGGED) implies a classifier beyond the state of the art: the "
    "detector's evaluation is then the likelier to be wrong."
)

_METHOD_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "α-CROWN"}


def _smoothing_label(st: dict[str, Any]) -> str:
    """σ, n, α and the largest radius CERTIFY can give with them, σ·Φ⁻¹(α^(1/n)) (all n samples on the top
    class): figures at radii near or above it are capped by n, not by the model."""
    sigma = st.get("sigma")
    if sigma is None:
        return "randomized smoothing"
    n, alpha = st.get("n"), st.get("alpha")
    extra = ""
    if n is not None and alpha is not None:
        cap = float(sigma) * NormalDist().inv_cdf(float(alpha) ** (1.0 / int(n)))
        extra = f", α = {float(alpha):g}; largest certifiable radius {cap:.3g}"
    return f"randomized smoothing (σ = {float(sigma):g}, n = {n}{extra})"


# display names only (the report reads summaries; nothing here talks to a defense)
_DEFENSE_LABELS: dict[str, Any] = {
    "smoothing": _smoothing_label,
    "lipschitz": lambda st: "Lipschitz margin (GloRo)",
    "interval": lambda st: f"interval bounds ({_METHOD_NAMES.get(str(st.get('method')), st.get('method'))})",
}


def defense_label(summary: dict[str, Any]) -> str:
    """The defense of an audit in words, from its summary: family and run-time check."""
    cfg = summary.get("config") or {}
    d = str(cfg.get("defense", summary.get("headline", {}).get("defense", "")))
    label = _DEFENSE_LABELS.get(d)
    return d if label is None else label(cfg.get("defense_settings") or {})


def _norm_sym(norm: str) -> str:
    return "ℓ∞" if norm == "linf" else "ℓ2"


def shared_spoof_budget(summaries: Sequence[dict[str, Any]]) -> str | None:
    """The spoof budget all audits share (None where they differ, or where one has no spoof stage)."""
    budgets = {s["headline"].get("spoof_budget") for s in summaries}
    return budgets.pop() if len(budgets) == 1 and None not in budgets else None


def glance_header(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Header of the one-row-per-audit headline table; the spoof budget is named in it when all audits share it
    (else each spoof-success cell names its own, :func:`glance_row`)."""
    shared = shared_spoof_budget(summaries)
    budget = "" if shared is None else f" ({shared})"
    return ["audit", "defense", "ε", "clean accuracy", "certified accuracy at ε (VRA)",
            "false-positive rate at ε: lower (attacks) – upper (proven)",
            f"spoof success within budget{budget}: wrong label certified (any radius > 0), over the naturally "
            "correct images; then over all attacked, incl. those whose natural label was already wrong",
            "of which natural already wrong", "spoof success unbounded (any picture)"]


def spoof_cell(summary: dict[str, Any]) -> str:
    """The headline's spoof success at the stated budget: the rate over the attacked images whose natural label
    was correct (real spoofs) with their number first, then the rate over all attacked images, named (it also
    counts images the defense labelled wrong before any attack). ``–`` without a spoof stage."""
    h = summary["headline"]
    if h.get("spoof_success_rate") is None and h.get("spoof_success_rate_natural_correct") is None:
        return "–"
    n_ok = h.get("spoof_attacked_natural_correct")
    if n_ok is None:  # summaries written before the headline carried it
        n_ok = (summary.get("spoofing") or {}).get("attacked_natural_correct")
    return (f"{fmt(h.get('spoof_success_rate_natural_correct'), 'pct')} (n = {fmt(n_ok, 'int')} naturally correct); "
            f"{fmt(h.get('spoof_success_rate'), 'pct')} incl. already wrong (n = {fmt(h.get('spoof_attacked'), 'int')})")


def glance_row(name: str, summary: dict[str, Any], budget_in_cell: bool = False) -> list[str]:
    """One audit's row of the at-a-glance headline table (strings). ``budget_in_cell``: the audits' spoof
    budgets differ (the header names none), so the spoof-success cell appends its own budget."""
    h = summary["headline"]
    upper = "no proof" if h.get("fpr_upper") is None else fmt(h.get("fpr_upper"), "pct")
    fpr = "–" if h.get("fpr_lower") is None and h.get("fpr_upper") is None else f"{fmt(h.get('fpr_lower'), 'pct')} – {upper}"
    spoof = spoof_cell(summary)
    if budget_in_cell and h.get("spoof_budget") is not None and spoof != "–":
        spoof += f" ({h['spoof_budget']})"
    return [name, defense_label(summary), f"{float(h['eps']):.4g} ({_norm_sym(h['norm'])})",
            fmt(h.get("clean_accuracy"), "pct"), fmt(h.get("vra_eps"), "pct"), fpr,
            spoof, fmt(h.get("spoof_successes_natural_wrong"), "int"),
            fmt(h.get("spoof_success_rate_unbounded"), "pct")]


def glance_rows(audits: Sequence["AuditData"]) -> tuple[list[str], list[list[str]]]:
    """The at-a-glance headline table: one row per audit, across defenses."""
    summaries = [a.summary for a in audits]
    in_cell = shared_spoof_budget(summaries) is None
    return glance_header(summaries), [glance_row(a.name, a.summary, in_cell) for a in audits]


@dataclass
class AuditData:
    """One audit folder, loaded: its summary, stage rows, saved examples and a display name."""

    name: str
    folder: Path
    summary: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    @property
    def eps(self) -> float:
        return float(self.summary["headline"]["eps"])

    @property
    def norm(self) -> str:
        return str(self.summary["headline"]["norm"])


def load_audit(folder: str | os.PathLike, name: str | None = None) -> AuditData:
    """Read ``summary.json``, the stage rows of the audited images and the example images."""
    folder = Path(folder)
    path = folder / "summary.json"
    if not path.is_file():
        raise InputError(f"{folder} holds no summary.json (run `certaudit audit` first)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg})") from None
    if summary.get("kind") != "certaudit-audit":
        raise InputError(f"{path} is not a certaudit audit summary")
    wanted = set(expand_ranges(summary["config"]["indices"]))
    rows: dict[str, list[dict[str, Any]]] = {}
    for stage in STAGES:
        f = folder / "rows" / f"{stage}.jsonl"
        if stage in summary.get("stages", []) and f.is_file():
            _, r = read_rows(f)
            rows[stage] = sorted((x for x in r if x.get("index") in wanted), key=lambda x: x["index"])
    examples = {k: load_examples(folder, k) for k in ("degrade", "spoof")}
    if name is None:
        cfg = summary["config"]
        name = f"{cfg['defense']} · {Path(str(cfg['model'])).stem}"
    return AuditData(name=name, folder=folder, summary=summary, rows=rows, examples=examples)


# ---------------------------------------------------------------------------------- formatting

def fmt(v: Any, kind: str = "num") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if kind == "pct":
        return f"{100 * float(v):.1f}%"
    if kind == "int":
        return str(int(v))
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def eps_text(a: AuditData) -> str:
    return f"{a.eps:.4g} ({'ℓ∞' if a.norm == 'linf' else 'ℓ2'})"


def headline_rows(audits: Sequence[AuditData]) -> tuple[list[str], list[list[str]]]:
    """The headline table as strings: header and one row per audit."""
    header = ["audit", "defense", "ε"] + [title for _, title, _ in HEADLINE_COLUMNS]
    body = []
    for a in audits:
        h = a.summary["headline"]
        body.append([a.name, h["defense"], eps_text(a)] + [fmt(h.get(k), kind) for k, _, kind in HEADLINE_COLUMNS])
    return header, body


def _detail_tables(a: AuditData) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per-audit tables: certified accuracy at radii, degradation bounds, spoofing (Tables 1/2)."""
    s = a.summary
    out = []
    cert = s.get("certification") or {}
    if cert.get("certified_accuracy"):
        pts = []
        for p in cert["certified_accuracy"]:  # up to the first radius nobody reaches
            pts.append(p)
            if p["radius"] > 0 and not p["accuracy"]:
                break
        out.append(("Certified accuracy (VRA) at radius r; 'from' says whether the figure is the defense's own check at "
                    "exactly r or read off certified radii (bisection radii with their tolerance)",
                    ["r", "certified accuracy", "from"],
                    [[f"{p['radius']:.4g}", fmt(p["accuracy"], "pct"), str(p.get("source", "radius"))] for p in pts]))
    d = s.get("degradation")
    if d and d.get("test"):
        rows = [["lower bound (attacks)", fmt(d.get("vra_eps"), "pct"), str(d.get("testA_lower")),
                 fmt(d.get("fpr_lower"), "pct"), fmt(d.get("utility_reduction_lower"), "pct")]]
        for name, p in (d.get("per_attack") or {}).items():
            if p.get("tried"):
                rows.append([f"  degraded by {name} (first to find it: {p.get('first')})", "", str(p.get("succeeded")),
                             fmt(p.get("fpr_lower"), "pct"),
                             fmt(p.get("utility_reduction_lower"), "pct")])
        rows.append(["upper bound (proven: not proven non-degradable)", fmt(d.get("vra_eps"), "pct"),
                     fmt(d.get("testA_upper")), fmt(d.get("fpr_upper"), "pct"),
                     fmt(d.get("utility_reduction_upper"), "pct")])
        sp = d.get("bracket")
        if sp and d.get("testR"):
            by = ", ".join(f"{k}: {v}" for k, v in (sp.get("proven_by") or {}).items()) or "none"
            rows.append([f"  proven non-degradable (by {by}; {fmt(sp.get('proven_share'), 'pct')} of testR)", "",
                         str(sp.get("proven")), "", ""])
            fl, at = sp.get("undecided_proof_floor_minus_eps"), sp.get("undecided_attack_radius_minus_eps")
            gap = ""
            if fl and at:
                gap = (f"; median radius floor proven ε{fl['median']:+.3g}, smallest radius attacks reached "
                       f"ε{at['median']:+.3g}")
            rows.append([f"  undecided (neither degraded nor proven; {fmt(sp.get('undecided_share'), 'pct')} of "
                         f"testR{gap})", "", str(sp.get("undecided")), "", ""])
        if d.get("testA_2eps_check") is not None:
            rows.append(["2ε check of the run-time method (not certified at 2ε)", fmt(d.get("vra_eps"), "pct"),
                         str(d.get("testA_2eps_check")), fmt(d.get("fpr_2eps_check"), "pct"),
                         fmt(d.get("utility_reduction_2eps_check"), "pct")])
        out.append((f"Degradation at ε = {eps_text(a)}: |testR| = {d.get('testR')} of {d.get('test')} "
                    f"(lower ⊆ proven upper: {fmt((d.get('invariant') or {}).get('lower_subset_upper'))}). "
                    f"Upper bound: {d.get('upper_bound', '2ε check')}",
                    ["bound", "VRA@ε", "|testA|", "false-positive rate", "utility reduction"], rows))
    sp = s.get("spoofing")
    if sp and sp.get("images"):
        out += _spoof_tables(sp)
    return out


def _spoof_tables(sp: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Tables 1/2 of the Shadow Attack paper at the budget, and success against budget (the sweep)."""
    unb = sp.get("unbounded") or {}
    out = [(f"Spoofing (Shadow Attack) on {sp.get('images')} images, {sp.get('attacked')} attacked; budget: "
            f"{sp.get('budget_label', 'unbounded')}",
            ["figure", "value"],
            [[f"success rate over images whose natural label was right (within budget; fresh certificate of a "
              f"wrong label; n = {fmt(sp.get('attacked_natural_correct'), 'int')})",
              fmt(sp.get("success_rate_natural_correct"), "pct")],
             [f"success rate over all attacked images, incl. natural label already wrong (within budget; n = "
              f"{fmt(sp.get('attacked'), 'int')})", fmt(sp.get("success_rate"), "pct")],
             ["success rate, unbounded attack (any picture: not a perceptual spoof), naturally correct / all",
              f"{fmt(unb.get('success_rate_natural_correct'), 'pct')} / {fmt(unb.get('success_rate'), 'pct')}"],
             [f"certified radius, natural, certified r > 0 (n = {fmt(sp.get('natural_certified'), 'int')}): "
              "mean ± std", f"{fmt(sp.get('natural_radius_mean'))} ± {fmt(sp.get('natural_radius_std'))}"],
             ["certified radius, spoofed within budget: mean ± std", f"{fmt(sp.get('shadow_radius_mean'))} ± "
                                                                      f"{fmt(sp.get('shadow_radius_std'))}"],
             ["certified radius, natural, of the same successful images: mean",
              fmt(sp.get("natural_radius_mean_successes"))],
             ["of the successes: natural image already labelled wrong (before any attack)",
              fmt(sp.get("successes_natural_wrong"), "int")],
             ["spoofed radius ≥ natural radius", fmt(sp.get("spoofed_beats_natural"), "pct")],
             ["robust error at ε (natural)", fmt(sp.get("robust_error"), "pct")],
             ["attack error at ε (spoofed, within budget)", fmt(sp.get("attack_error"), "pct")],
             ["mean ‖δ‖₂ / ‖δ‖∞ (×255) / largest ‖δ‖∞ (×255)",
              f"{fmt(sp.get('l2_mean'))} / {_x255(sp.get('linf_mean'))} / {_x255(sp.get('linf_max'))}"],
             ["SSIM(x, x+δ): mean / min", f"{fmt(sp.get('ssim_mean'))} / {fmt(sp.get('ssim_min'))}"]])]
    if sp.get("sweep"):
        out.append((f"Spoof success against budget (an independent attack per budget, one batch; ◆: the headline's "
                    f"budget); r̄ natural (spoof images, certified) = {fmt(sp.get('natural_radius_mean'))}",
                    ["budget", "attacked", "success, naturally correct (n)", "success, all attacked",
                     "of which natural already wrong", "r̄ spoofed", "r̄ natural (same images)", "mean SSIM",
                     "mean ‖δ‖∞ (×255)"],
                    [[("◆ " if e.get("primary") else "") + e["label"], str(e["attacked"]),
                      f"{fmt(e.get('success_rate_natural_correct'), 'pct')} "
                      f"({fmt(e.get('attacked_natural_correct'), 'int')})",
                      fmt(e.get("success_rate"), "pct"), fmt(e.get("successes_natural_wrong"), "int"),
                      fmt(e.get("shadow_radius_mean")), fmt(e.get("natural_radius_mean_successes")),
                      fmt(e.get("ssim_mean")), _x255(e.get("linf_mean"))] for e in sp["sweep"]]))
    return out


def _x255(v: Any) -> str:
    return "–" if v is None else f"{255 * float(v):.1f}"


# --------------------------------------------------------------------------------- coverage

def coverage_text(a: AuditData) -> list[str]:
    """Plain sentences on what an ε-certificate of this audit covers (norm, dimension, pointwise)."""
    c = a.summary.get("coverage") or {}
    d = int(c.get("input_dim") or a.summary["config"]["input_dim"])
    e = a.eps
    root = math.sqrt(d)
    lines = []
    if a.norm == "l2":
        lines.append(f"{a.name}: the certificate is an ℓ2 ball of radius ε = {e:.4g} around each input (d = {d}). "
                     f"It covers every ℓ∞ perturbation only up to ε/√d = {e / root:.4g} ({e / root * 255:.2f}/255), "
                     f"because the ℓ∞ ball of radius ε contains points at ℓ2 distance ε·√d = {e * root:.4g}.")
    else:
        lines.append(f"{a.name}: the certificate is an ℓ∞ ball of radius ε = {e:.4g} (d = {d}); it contains the ℓ2 ball "
                     f"of radius ε but reaches ℓ2 distance ε·√d = {e * root:.4g} at its corners.")
    return lines


# ------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.02em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figcaption{font-size:.85em;color:#444}img{max-width:100%;height:auto}
.note{font-size:.9em;color:#444}.wide{overflow-x:auto}.wide table{font-size:.78em}code{background:#f5f5f5;padding:0 .2em}
dl dt{font-weight:600;margin-top:.4em}dl dd{margin-left:1.2em}
.glance table{font-size:.9em}.glance td{white-space:nowrap}.glance td:nth-child(-n+2){white-space:normal}.glance td:nth-child(-n+2),.glance th:nth-child(-n+2){text-align:left}
.claims td:nth-child(-n+4),.claims th:nth-child(-n+4){text-align:left}.claims td{white-space:nowrap}
.claims td:nth-child(2){white-space:normal}tr.flag td:last-child{color:#b00;font-weight:600}
section.audit h2{font-size:1.12em}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:0 1.5em}
"""


def _table_html(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _img(b64: str | None, alt: str, caption: str) -> str:
    if b64 is None:
        return f'<p class="note">({html.escape(alt)}: no data in this audit.)</p>'
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def render_html(audits: Sequence[AuditData], title: str = "certaudit report", detector: Sequence[Any] | None = None) -> str:
    """The self-contained page: every section of :data:`SECTIONS`, in order, figures inlined; one section
    per audit after the headline; the detector-claims section when ``detector`` verdicts are given."""
    if not audits:
        raise InputError("no audits to report")
    parts = _html_head(audits, title, detector is not None)
    parts += _headline_section(audits)
    parts += _audit_sections(audits)
    parts += _figure_sections(audits)
    parts += _example_sections(audits)
    if detector is not None:
        parts += _detector_section(detector)
    parts += _coverage_section(audits)
    parts += _meanings_section()
    parts += _configuration_section(audits)
    return "\n".join(parts)


_TITLES = dict(SECTIONS + (DETECTOR_SECTION,))


def _open_section(sid: str) -> str:
    return f'<section id="{sid}"><h2>{_TITLES[sid]}</h2>'


def audit_section_ids(audits: Sequence[AuditData]) -> list[str]:
    """One section id per audit, ``audit-<folder name>`` (letters, digits and dashes; made unique)."""
    ids: list[str] = []
    for k, a in enumerate(audits, start=1):
        slug = re.sub(r"[^a-z0-9]+", "-", a.folder.name.lower()).strip("-") or str(k)
        sid, j = f"audit-{slug}", 2
        while sid in ids or sid in _TITLES:
            sid, j = f"audit-{slug}-{j}", j + 1
        ids.append(sid)
    return ids


def _toc(audits: Sequence[AuditData], detector: bool) -> list[tuple[str, str]]:
    toc = [SECTIONS[0]] + [(sid, f"Audit: {a.name}") for sid, a in zip(audit_section_ids(audits), audits)]
    rest = list(SECTIONS[1:])
    if detector:
        at = [sid for sid, _ in rest].index("coverage")
        rest.insert(at, DETECTOR_SECTION)
    return toc + rest


def _html_head(audits: Sequence[AuditData], title: str, detector: bool = False) -> list[str]:
    """Document head, title, what was audited, and the table of contents."""
    first = audits[0].summary
    return [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
            f'<p class="note">{len(audits)} audit(s) of {html.escape(str(first["config"]["dataset"]))} '
            f'({html.escape(str(first["config"]["split"]))} split); certaudit {html.escape(str(first["versions"]["certaudit"]))}, '
            f'torch {html.escape(str(first["versions"]["torch"]))}, device {html.escape(str(first["device"]["type"]))}.</p>',
            '<nav><ul>' + "".join(f'<li><a href="#{sid}">{html.escape(t)}</a></li>' for sid, t in _toc(audits, detector))
            + "</ul></nav>"]


_GLANCE_NOTE = ("One row per audit. Certified accuracy: certified with the correct label at ε by the defense's own "
                "check. False-positive rate: of the correctly certified images, those an ε-bounded degradation attack "
                "made the run-time defense reject (lower bound), and those the defense did not prove non-degradable "
                "(upper bound; 'no proof': the defense has none). Spoof success: fresh certificates of a wrong label "
                "after the Shadow Attack, within the stated perceptual budget and without any budget; at the "
                "budget, first over the attacked images whose natural label was correct (real spoofs, n of them), "
                "then over all attacked images, which also counts images the defense labelled wrong before any "
                "attack.")


def _headline_section(audits: Sequence[AuditData]) -> list[str]:
    """The at-a-glance table (one row per audit), then every headline figure."""
    gh, gb = glance_rows(audits)
    header, body = headline_rows(audits)
    return [_open_section("headline"), f'<p class="note">{html.escape(_GLANCE_NOTE)}</p>',
            '<div class="wide glance">' + _table_html(gh, gb) + "</div>",
            "<h3>Every headline figure</h3>", '<div class="wide">' + _table_html(header, body) + "</div>",
            "</section>"]


def audit_description(a: AuditData) -> str:
    """What one audit audited, in a sentence: defense, radius, model (and its training), images."""
    cfg = a.summary["config"]
    extra = cfg.get("extra") or {}
    train = extra.get("training") or {}
    trained = ""
    if train:
        radius = (f"σ = {train['sigma']:g}" if train.get("sigma") is not None else
                  f"ε = {train['eps']:g} ({_norm_sym(str(train.get('norm', a.norm)))})" if train.get("eps") is not None
                  else "")
        acc = "" if train.get("test_accuracy") is None else f", test accuracy {fmt(train['test_accuracy'], 'pct')}"
        trained = f"; trained with {train.get('method', '?')} {radius}{acc}".rstrip()
    sha = str(cfg.get("model_sha256") or "")
    return (f"Defense: {defense_label(a.summary)}, {_norm_sym(a.norm)} ε = {a.eps:.4g}. Model: {cfg.get('model')} "
            f"({cfg.get('arch') or '?'}{', SHA-256 ' + sha[:12] + '…' if sha else ''}{trained}). Images: "
            f"{cfg.get('images')} of {cfg.get('dataset')} ({cfg.get('split')})"
            + (f"; {extra['data_rule']}" if extra.get("data_rule") else "") + ".")


def _audit_sections(audits: Sequence[AuditData]) -> list[str]:
    """One section per audit: what was audited, then its detail tables."""
    parts = []
    for sid, a in zip(audit_section_ids(audits), audits):
        parts.append(f'<section id="{sid}" class="audit"><h2>Audit: {html.escape(a.name)}</h2>'
                     f'<p class="note">{html.escape(audit_description(a))}</p>')
        for cap, h, b in _detail_tables(a):
            parts.append(f'<p class="note">{html.escape(cap)}</p>' + _table_html(h, b))
        parts.append("</section>")
    return parts


def _figure_sections(audits: Sequence[AuditData]) -> list[str]:
    """Certified accuracy, the FPR against radius, and natural against spoofed radii."""
    return [
        _open_section("certified-accuracy"),
        _img(figure_certified_accuracy(audits), "certified accuracy against radius",
             "Fraction of images certified with the correct label at radius ≥ r. Dashed: ε; dotted: 2ε."),
        "</section>",
        _open_section("fpr"),
        _img(figure_fpr(audits), "false-positive rate against radius",
             "Line: the 2r check of the false-positive rate if the defense were run at radius r (correctly "
             "certified images not certified at 2r; the paper's Figs. 2–3, a heuristic for non-monotone "
             "checks). Filled ▼: lower bound at ε, found by the degradation attacks; open ▲: proven upper "
             "bound at ε (the defense's proof of non-degradability; absent where it has none)."),
        "</section>",
        _open_section("spoofed-radii"),
        _img(figure_radius_histograms(audits), "natural vs spoofed radius histograms",
             "Certified radii of the natural images of the spoof stage (natural, certified r > 0: not abstained "
             "and a radius above 0) and of the Shadow Attack images within the spoof budget whose fresh "
             "certificate names a wrong label. Dashed: ε."),
        "</section>",
        _open_section("spoof-budget"),
        _img(figure_spoof_budget(audits), "spoof success against the ℓ∞ budget",
             "Per audit: the Shadow Attack under each ℓ∞ budget τ of the sweep (with the SSIM bound named in "
             "the panel's title), under an SSIM bound alone where the sweep has one ('SSIM ≥ s only': no ℓ∞ "
             "bound) and unbounded (∞: no bound at all), in one batch. The SSIM-only and ∞ points have ticks of "
             "their own, right of the dotted line, and are not joined to the ℓ∞ curve. Each budget is an "
             "independent attack (its own candidates only), so the curve need not rise. Red: spoof success "
             "(fresh certificate of a wrong label, image within the budget) over the images whose natural label "
             "was correct; light red: over all attacked images, incl. those the defense already labelled wrong "
             "before any attack. Blue, dashed: mean certified radius of the successful spoofs (n: their number); "
             "dotted: mean certified radius of the natural images of those same successful spoofs, per budget. "
             "◆: the headline's budget."),
        "</section>",
    ]


_EXAMPLE_SECTIONS = (
    ("degradation-examples", "degrade",
     "Each row: a correctly certified image x with its label and certified radius; the perturbation x′−x on its "
     "own colour scale (the bar, in 8-bit steps of 1/255: red brightens a pixel, blue darkens it); and x′, within "
     "ε of x, which the run-time defense rejects (re-found for display and re-checked)."),
    ("spoofing-examples", "spoof",
     "Each row: a natural image with its true label; the Shadow Attack perturbation δ on its own colour scale "
     "(the bar, in 8-bit steps of 1/255), its largest pixel change and SSIM(x, x+δ); and x+δ with the wrong label "
     "the defense certifies for it and the certified radius. Successful spoofs within the budget named above "
     "each grid; images whose natural label was correct (real spoofs) first, then, where there are too few, "
     "images the defense already labelled wrong before any attack; each row says which."),
)


def _example_sections(audits: Sequence[AuditData]) -> list[str]:
    """The example grids of degradation and spoofing, one per audit, side by side where the page is wide."""
    parts = []
    for sid, kind, what in _EXAMPLE_SECTIONS:
        parts.append(_open_section(sid) + f'<p class="note">{html.escape(what)}</p><div class="examples">')
        for a in audits:
            parts.append(f"<div><h3>{html.escape(a.name)}</h3>"
                         + _img(figure_examples(a, kind), f"{kind} examples of {a.name}", "") + "</div>")
        parts.append("</div></section>")
    return parts


_CERTIFICATE_LIMITS = (
    "<li>The certificate is <b>pointwise</b>: it is a statement about one input x and the ball around it, "
    "not a uniform guarantee over the data distribution or over a region. Points x' near a certified x "
    "need not be certified themselves (that is what a degradation attack exploits: x' is within ε of x, "
    "yet the run-time defense rejects it).</li>"
    "<li>It says the <b>label is constant</b> on the ball, not that the label is <b>correct</b>: an "
    "input far from any natural image can be certified with a large radius for a wrong label (the "
    "spoofed certificates of the Shadow Attack).</li>"
    "<li>For randomized smoothing every certificate is <b>probabilistic</b>: it holds except with "
    "probability α (per image) over the Monte-Carlo noise, and it certifies the smoothed classifier, "
    "not the base network.</li>"
    "<li>Only the threat model's norm ball is covered: rotations, colour shifts, blur or any semantic "
    "change of large ℓp size are not (the Shadow Attack's perturbations are smooth but large).</li></ul>"
)


def detector_rows(verdicts: Sequence[Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """The detector-claims table: header, one row per claim, and the references the rows cite ([k])."""
    header = ["#", "detector (claim)", "data", "norm, ε", "claimed robust accuracy with detection at ε", "ε/2",
              "best known robust classification at ε/2", "margin (points)", "verdict"]
    from certaudit.detection.claims import claim_cell, reference_cells

    def pct(v: float) -> str:
        return fmt(v, "pct")

    bests, refs = reference_cells(verdicts, pct)
    body = []
    for i, (v, best) in enumerate(zip(verdicts, bests), start=1):
        c = v.claim
        claim = claim_cell(c, pct, " (certified)", ge="≥ ")
        margin = "–" if v.margin is None else f"{100 * v.margin:+.1f}"
        verdict = {"flagged": "FLAGGED", "not flagged": "not flagged", "no reference": "no reference"}[v.status]
        body.append([str(i), c.defense or "–", c.dataset, f"{_norm_sym(c.norm.value)} {c.eps_text}", claim,
                     c.implied_eps_text, best, margin, verdict])
    return header, body, refs


def _detector_counts(verdicts: Sequence[Any]) -> str:
    from certaudit.detection import summarize_verdicts

    c = summarize_verdicts(verdicts)
    return (f"{c['flagged']} of {c['claims']} claims flagged ({c['defenses_flagged']} of {c['defenses']} detector "
            f"defenses), {c['not_flagged']} not flagged, {c['no_reference']} without a reference row. Claims: "
            "Tramèr 2022, Table 1 (certaudit check-detector --example table1); '≥': bounded from the reported "
            "FPR, FNR and clean error by Equation 4. Your own claims: certaudit check-detector --claims FILE.")


def _detector_section(verdicts: Sequence[Any]) -> list[str]:
    """Tramèr's reduction in two sentences, the verdicts on the claims, the references."""
    header, body, refs = detector_rows(verdicts)
    trs = []
    for row in body:
        cls = ' class="flag"' if row[-1] == "FLAGGED" else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return [_open_section(DETECTOR_SECTION[0]), f"<p>{html.escape(DETECTOR_REDUCTION)}</p>",
            f'<p class="note">{html.escape(_detector_counts(verdicts))}</p>',
            f'<div class="wide claims"><table><thead><tr>{th}</tr></thead><tbody>{"".join(trs)}</tbody></table></div>',
            '<p class="note">References (best known robust classification):</p><ol class="note">'
            + "".join(f"<li>{html.escape(r)}</li>" for r in refs) + "</ol></section>"]


def _coverage_section(audits: Sequence[AuditData]) -> list[str]:
    """What each audit's certificate covers, then what no certificate covers."""
    parts = [_open_section("coverage") + "<ul>"]
    for a in audits:
        for line in coverage_text(a):
            parts.append(f"<li>{html.escape(line)}</li>")
    parts += [_CERTIFICATE_LIMITS, "</section>"]
    return parts


def _meanings_section() -> list[str]:
    """What every figure means, and the papers they come from."""
    parts = [_open_section("figures") + "<dl>"]
    for term, meaning in FIGURE_MEANINGS:
        parts.append(f"<dt>{html.escape(term)}</dt><dd>{html.escape(meaning)}</dd>")
    parts.append("</dl><h3>Papers</h3><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in PAPERS) + "</ul></section>")
    return parts


def _configuration_section(audits: Sequence[AuditData]) -> list[str]:
    """Each audit's configuration, seed, device, versions and timings, as JSON; closes the page."""
    parts = [_open_section("configuration")]
    for a in audits:
        s = a.summary
        cfg = {k: v for k, v in s["config"].items() if k not in ("classes",)}
        block = {"config": cfg, "seed": s.get("seed"), "device": s.get("device"), "versions": s.get("versions"),
                 "timings": s.get("timings")}
        parts.append(f"<h3>{html.escape(a.name)}</h3><pre>{html.escape(json.dumps(block, indent=1))}</pre>")
    parts.append("</section></body></html>")
    return parts


# --------------------------------------------------------------------------------- Markdown

def _table_md(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = (lambda c: str(c).replace("|", "\\|"))
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def render_markdown(audits: Sequence[AuditData], title: str = "certaudit report",
                    detector: Sequence[Any] | None = None) -> str:
    if not audits:
        raise InputError("no audits to report")
    out = [f"# {title}", "", "## Headline figures", "", _GLANCE_NOTE, ""]
    gh, gb = glance_rows(audits)
    out += [_table_md(gh, gb), "", "### Every headline figure", ""]
    header, body = headline_rows(audits)
    out += [_table_md(header, body), ""]
    for a in audits:
        out += [f"## Audit: {a.name}", "", audit_description(a), ""]
        for cap, h, b in _detail_tables(a):
            out += [f"**{cap}**", "", _table_md(h, b), ""]
        out += ["What the certificate covers: " + " ".join(coverage_text(a)), ""]
    if detector is not None:
        dh, db, refs = detector_rows(detector)
        out += [f"## {DETECTOR_SECTION[1]}", "", DETECTOR_REDUCTION, "", _detector_counts(detector), "",
                _table_md(dh, db), ""]
        out += [f"{k}. {r}" for k, r in enumerate(refs, start=1)] + [""]
    out += ["## What every figure means", ""]
    out += [f"- **{t}**: {m}" for t, m in FIGURE_MEANINGS]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- write

def write_report(folders: Sequence[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike | None = None, *,
                 names: Sequence[str] | None = None, title: str = "certaudit report",
                 detector: Sequence[Any] | None = None) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` for one audit folder (into it) or several (into ``out``);
    ``detector``: verdicts of :func:`certaudit.detection.check_claims` for the detector-claims section."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    folders = [Path(f) for f in folders]
    if not folders:
        raise InputError("no audit folders given")
    names = list(names) if names is not None else [None] * len(folders)  # type: ignore[list-item]
    audits = [load_audit(f, n) for f, n in zip(folders, names)]
    dest = Path(out) if out is not None else folders[0]
    dest.mkdir(parents=True, exist_ok=True)
    paths = {"html": dest / "report.html", "md": dest / "report.md"}
    for key, text in (("html", render_html(audits, title, detector)), ("md", render_markdown(audits, title, detector))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[key])
    return paths


__all__ = ["SECTIONS", "DETECTOR_SECTION", "DETECTOR_REDUCTION", "AuditData", "audit_section_ids", "audit_description",
           "defense_label", "glance_header", "shared_spoof_budget", "glance_row", "glance_rows", "detector_rows", "load_audit", "render_html", "render_markdown", "write_report", "headline_rows",
           "figure_certified_accuracy", "figure_fpr", "figure_radius_histograms", "figure_examples",
           "figure_spoof_budget", "FIGURE_MEANINGS", "PAPERS"]
