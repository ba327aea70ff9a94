"""Terminal tables of the verbs' summaries (stdout; notices of bugs on stderr).

Each ``print_*`` takes the summary dict a verb returns (:mod:`certaudit.audits.certify_job`,
:mod:`~certaudit.audits.degrade_job`, :mod:`~certaudit.audits.spoof_job`, the audit pipeline)
and prints what it says, in the papers' terms; nothing here computes a figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from certaudit.audits.session import err_console
from certaudit.report import HEADLINE_COLUMNS, fmt

console = Console(stderr=False)


def print_certify(s: dict[str, Any]) -> None:

    console.print(f"[bold]{s['defense']}[/bold] on {s['dataset']} ({s['split']}), {s['images']} images")
    table = Table()
    table.add_column(f"radius ({s['norm']})", justify="right")
    table.add_column("certified accuracy", justify="right")
    table.add_column("from", justify="left")
    for item in s.get("certified_accuracy", []):
        acc = "n/a" if item["accuracy"] is None else f"{item['accuracy']:.4f}"
        table.add_row(f"{item['radius']:.4g}", acc, item.get("source", ""))
    console.print(table)
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    stats.add_row("model", Path(s["model"]).name)
    if s["images"]:
        if s["clean_accuracy"] is None:
            stats.add_row("clean accuracy, abstention", s.get("clean_note", "n/a"))
        else:
            stats.add_row("clean accuracy (certified label, radius >= 0)", f"{s['clean_accuracy']:.4f}")
            stats.add_row("abstention rate", f"{s['abstain_rate']:.4f}")
    if "eps" in s:
        def f4(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        stats.add_row(f"VRA at eps = {s['eps']:.4g} (check at ε)", f4(s["vra_eps"]))
        stats.add_row(f"VRA at 2 eps = {2 * s['eps']:.4g} (check at 2ε)", f4(s["vra_2eps"]))
        stats.add_row(f"clean rejection rate at eps = {s['eps']:.4g}", f4(s["rejection_rate_eps"]))
        if s.get("eps_note"):
            stats.add_row("note", s["eps_note"])
    if s.get("images_per_second_this_run"):
        stats.add_row("images/s (this run)", f"{s['images_per_second_this_run']:.3g}")
    if s.get("samples_per_second_this_run"):
        stats.add_row("noise samples/s (this run)", f"{s['samples_per_second_this_run']:.4g}")
    if "evaluations_per_image_mean" in s:
        stats.add_row("base-model evaluations per image (sequential)", f"{s['evaluations_per_image_mean']:.1f}")
    stats.add_row("wall time (this run)", f"{s['wall_seconds']:.1f} s ({s['new_images']} new images)")
    if s.get("out"):
        stats.add_row("rows", s["out"])
    console.print(stats)


def print_log_check(summary: dict[str, Any], eps: float) -> None:

    console.print(f"[bold]2ε check[/bold] from {summary['log']} ({summary['format']} format, "
                  f"{summary['test']} images), ε = {eps:.4g}")
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    for key in ("testR", "testA_2eps_check", "vra_eps", "vra_2eps", "fpr_2eps_check", "utility_reduction_2eps_check"):
        stats.add_row(key, _fmt4(summary[key]))
    stats.add_row("certified at r from", summary.get("source", ""))
    console.print(stats)
    console.print("(the 2ε check, not a proven bound: a log says nothing about the certifier; `degrade --model` "
                  "gives the proven upper bound; see docs/degradation.md)")
    if summary["fpr_curve"]:
        print_curve(summary["fpr_curve"])
    elif summary.get("curve_note"):
        console.print(summary["curve_note"])


def _fmt4(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def print_curve(curve: list[dict[str, Any]]) -> None:

    table = Table(title="FPR by the 2r check against radius (Fig. 2/3)")
    for col in ("radius", "testR", "testA (2r check)", "FPR (2r check)", "VRA(r)", "VRA(2r)", "from"):
        table.add_column(col, justify="right")
    for p in curve:
        table.add_row(f"{p['radius']:.4g}", str(p["testR"]), str(p["testA_2r_check"]), _fmt4(p["fpr_2r_check"]),
                      _fmt4(p["vra"]), _fmt4(p["vra_2r"]), p.get("source", ""))
    console.print(table)


def print_degrade(s: dict[str, Any]) -> None:

    console.print(f"[bold]degradation[/bold] of {s['defense']} on {s['dataset']} ({s['split']}), {s['test']} images, "
                  f"ε = {s['eps']:.4g} ({s['norm']}), attack {s['attack']}")
    table = Table()
    for col in ("bound", "baseline VRA", "false positive rate", "utility reduction", "|testA|", "of upper"):
        table.add_column(col, justify="right")
    vra = _pct(s["vra_eps"])
    table.add_row("lower (attacks)", vra, _pct(s["fpr_lower"]), _pct(s["utility_reduction_lower"]),
                  str(s["testA_lower"]), _pct(s["lower_over_upper"]))
    for name, d in s.get("per_attack", {}).items():
        if d["tried"]:
            table.add_row(f"  {name}", vra, _pct(d["fpr_lower"]), _pct(d["utility_reduction_lower"]),
                          str(d["succeeded"]), _pct(d["lower_over_upper"]))
    table.add_row("upper (proven)", vra, _pct(s["fpr_upper"]), _pct(s["utility_reduction_upper"]),
                  "n/a" if s["testA_upper"] is None else str(s["testA_upper"]),
                  "n/a" if s["testA_upper"] is None else "100.0")
    table.add_row("2ε check (run-time method)", vra, _pct(s["fpr_2eps_check"]), _pct(s["utility_reduction_2eps_check"]),
                  str(s["testA_2eps_check"]), "")
    console.print(table)
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    stats.add_row("testR (certified and correct at ε)", str(s["testR"]))
    stats.add_row(f"VRA at 2ε = {2 * s['eps']:.4g}", _pct(s["vra_2eps"]))
    stats.add_row("upper bound", s["upper_bound"])
    sp = s.get("bracket")
    if sp:
        by = ", ".join(f"{k} {v}" for k, v in sp["proven_by"].items()) or "none"
        stats.add_row("testR: degraded / proven non-degradable / undecided",
                      f"{sp['degraded']} / {sp['proven']} ({by}) / {sp['undecided']}")
        fl, at = sp.get("undecided_proof_floor_minus_eps"), sp.get("undecided_attack_radius_minus_eps")
        if fl:
            stats.add_row("undecided: proven radius floor − ε (median, 10–90 %)",
                          f"{fl['median']:+.3g} ({fl['q10']:+.3g} … {fl['q90']:+.3g})")
        if at:
            stats.add_row("undecided: smallest radius the attacks reached − ε (median, 10–90 %)",
                          f"{at['median']:+.3g} ({at['q10']:+.3g} … {at['q90']:+.3g})")
    sq = s.get("sequential_2eps")
    if sq:
        smp = sq.get("samples") or {}
        alpha = (s.get("settings") or {}).get("alpha")
        stats.add_row(f"2ε check, sequential test (budget {s.get('upper_n')}, each verdict at level α = {alpha}): "
                      "FPR upper bound of the smoothed classifier",
                      f"{_pct(sq['fpr_upper'])} % ({sq['testA_upper']} of {s['testR']}; samples median "
                      f"{smp.get('median', float('nan')):.0f}, max {smp.get('max', float('nan')):.0f})")
        stats.add_row("  meaning", sq["meaning"])
    inv = s["invariant"]
    if inv["lower_subset_upper"] is None:
        verdict = "nothing to check (no proven upper bound)"
    else:
        verdict = "holds" if inv["lower_subset_upper"] else f"VIOLATED on {len(inv['violations'])} images (BUG)"
    stats.add_row("invariant testA_lower ⊆ testA_upper (proven)", verdict)
    if inv.get("outside_2eps_check"):
        stats.add_row("degraded although accepted at 2ε (non-monotone check)", str(len(inv["outside_2eps_check"])))
    if s.get("label_changed"):
        stats.add_row("certificate broken (x' accepted with another label)", str(s["label_changed"][:10]))
    stats.add_row("wall time (this run)", f"{s['wall_seconds']:.1f} s ({s['new_images']} new images)")
    if s.get("out"):
        stats.add_row("rows", s["out"])
    if s.get("plot"):
        stats.add_row("plot", s["plot"])
    console.print(stats)
    if not inv["lower_subset_upper"] and inv["bug"]:
        err_console.print("[bold red]bug:[/bold red] an input the defense had proven non-degradable was degraded. "
                          "Please report it with the rows file.")


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _fmt3(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_spoof(s: dict[str, Any]) -> None:

    console.print(f"[bold]Shadow Attack[/bold] on {s['defense']} ({s['dataset']} {s['split']}), {s['images']} images, "
                  f"{s['shadow']['channels']}-channel, {s['shadow']['steps']} steps, budget: "
                  f"{s.get('budget_label', 'unbounded')}")
    t1 = Table(title="Table 1: certified radius")
    t1.add_column("")
    t1.add_column("mean", justify="right")
    t1.add_column("std", justify="right")
    t1.add_row(f"natural, certified r > 0 (n = {s.get('natural_certified', '-')})", _fmt3(s.get("natural_radius_mean")),
               _fmt3(s.get("natural_radius_std")))
    t1.add_row("shadow (successful, within budget)", _fmt3(s.get("shadow_radius_mean")),
               _fmt3(s.get("shadow_radius_std")))
    t1.add_row("natural, of the same successful images", _fmt3(s.get("natural_radius_mean_successes")), "")
    console.print(t1)
    stats = Table(show_header=False, box=None)
    stats.add_column("what")
    stats.add_column("value", justify="right")
    if s["images"]:
        stats.add_row("natural abstention rate", _fmt3(s.get("natural_abstain_rate"), ".4f"))
        stats.add_row("attacked (not abstained)", str(s.get("attacked")))
        stats.add_row(f"success rate (fresh CERTIFY gives a wrong label, {s.get('budget_label', 'unbounded')})",
                      _fmt3(s.get("success_rate"), ".4f"))
        if (s.get("unbounded") or {}).get("success_rate") is not None and s.get("budget_label") != "unbounded":
            stats.add_row("success rate, unbounded attack (not a perceptual spoof)",
                          _fmt3(s["unbounded"]["success_rate"], ".4f"))
        stats.add_row("of the successes: natural image already labelled wrong", str(s.get("successes_natural_wrong")))
        stats.add_row(f"success rate over images whose natural label was right (n = {s.get('attacked_natural_correct')})",
                      _fmt3(s.get("success_rate_natural_correct"), ".4f"))
        stats.add_row("spoofed radius >= natural radius", _fmt3(s.get("spoofed_beats_natural"), ".4f"))
        stats.add_row("mean ‖δ‖₂ / ‖δ‖∞ / TV", f"{_fmt3(s.get('l2_mean'))} / {_fmt3(s.get('linf_mean'))} / {_fmt3(s.get('tv_mean'))}")
        stats.add_row("SSIM(x, x+δ): mean / min", f"{_fmt3(s.get('ssim_mean'))} / {_fmt3(s.get('ssim_min'))}")
        stats.add_row("judged images within the budget", _fmt3(s.get("within_budget_rate"), ".4f"))
    if "eps" in s:
        stats.add_row(f"robust error, natural (eps = {s['eps']:.4g})", _fmt3(s.get("robust_error"), ".4f"))
        stats.add_row(f"attack error, shadow (eps = {s['eps']:.4g})", _fmt3(s.get("attack_error"), ".4f"))
    stats.add_row("wall time (this run)", f"{s['wall_seconds']:.1f} s ({s['new_images']} new images)")
    if s.get("out"):
        stats.add_row("rows", s["out"])
    if s.get("grid"):
        stats.add_row("grid", s["grid"])
    console.print(stats)
    if s.get("sweep"):
        print_sweep(s["sweep"], s.get("natural_radius_mean"))


def _pct_sign(v: Any) -> str:
    """A percentage with its sign ("12.5%"); the sweep table's (``_pct``, shared by other tables, has none)."""
    return "n/a" if v is None else f"{100 * v:.1f}%"


def print_sweep(sweep: list[dict[str, Any]], natural_mean: Any = None) -> None:
    """Spoof success against the perceptual budget: one line per budget of the sweep (an independent attack
    per budget); ◆ marks the headline's budget."""
    table = Table(title=f"Spoof success against budget, an independent attack per budget "
                        f"(r̄ natural, spoof images, certified = {_fmt3(natural_mean)}; ◆: the headline's budget)")
    for col in ("budget", "attacked", "success", "r̄ spoofed", "r̄ natural (same images)", "mean SSIM",
                "mean ‖δ‖∞ ×255", "within budget"):
        table.add_column(col, justify="right")
    for e in sweep:
        table.add_row(("◆ " if e.get("primary") else "") + e["label"], str(e["attacked"]),
                      _pct_sign(e.get("success_rate")), _fmt3(e.get("shadow_radius_mean")),
                      _fmt3(e.get("natural_radius_mean_successes")), _fmt3(e.get("ssim_mean")),
                      _fmt3(None if e.get("linf_mean") is None else 255 * e["linf_mean"], ".1f"),
                      _pct_sign(e.get("within_budget_rate")))
    console.print(table)


def print_glance(items: list[tuple[str, dict[str, Any]]]) -> None:
    """The at-a-glance headline table (the report's first table) on stdout, turned for a terminal: one
    column per audit, one row per figure."""
    from certaudit.report import glance_header, glance_row, shared_spoof_budget

    summaries = [s for _, s in items]
    header = glance_header(summaries)
    in_cell = shared_spoof_budget(summaries) is None  # the audits' budgets differ: each cell names its own
    rows = [glance_row(name, s, in_cell) for name, s in items]
    table = Table(title="certaudit: what is the certificate worth?")
    table.add_column("")
    for row in rows:
        table.add_column(row[0], justify="right")
    for i, title in enumerate(header[1:], start=1):
        table.add_row(title, *[row[i] for row in rows])
    console.print(table)


def print_headline(items: list[tuple[str, dict[str, Any]]]) -> None:
    """The headline table on stdout: one row per figure, one column per audit (fits a terminal)."""
    table = Table(title="certaudit: what is the certificate worth?")
    table.add_column("figure")
    for name, _ in items:
        table.add_column(name, justify="right")
    table.add_row("ε", *[f"{s['headline']['eps']:.4g} ({s['headline']['norm']})" for _, s in items])
    for key, title, kind in HEADLINE_COLUMNS:
        table.add_row(title, *[fmt(s["headline"].get(key), kind) for _, s in items])
    console.print(table)
    bad = [name for name, s in items if s["headline"].get("lower_subset_upper") is False
           and (s.get("degradation") or {}).get("invariant", {}).get("bug")]
    if bad:
        err_console.print(f"[bold red]bug:[/bold red] degraded inputs certified at 2ε on a monotone certifier: {bad}")
