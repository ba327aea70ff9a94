"""``certaudit check-detector``: do detector claims imply implausible robust classifiers?

Tramèr (ICML 2022, Theorem 4): robust accuracy with detection ``a`` at radius ε implies an
(inefficient) classifier with robust accuracy ``≥ a`` at ε/2. Each claim is compared with a
reference table of the best known robust classification accuracy at ε/2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from certaudit.commands._common import console, parse_number, print_json
from certaudit.detection import (
    ClaimKind,
    DetectorClaim,
    check_claims,
    load_claims,
    load_example_claims,
    load_reference,
    summarize_verdicts,
)
from certaudit.detection.claims import claim_cell, reference_cells
from certaudit.errors import InputError

_HELP = (
    "Check detector robustness claims against the best known robust classification at eps/2.\n\n"
    "A claim comes from a file (--claims, CSV or JSON), a shipped example (--example table1), or the "
    "flags --dataset, --norm, --eps plus --robust-accuracy or all of --fpr, --fnr, --clean-error "
    "(Equation 4 then bounds the robust accuracy with detection by 1 - FPR - FNR - clean error).\n\n"
    "Verdicts: FLAGGED (the implied classifier beats the reference; margin shown), not flagged, or "
    "no reference (no row applies; nothing is guessed). See docs/detection.md."
)


def _claim_from_flags(dataset, norm, eps, robust_accuracy, fpr, fnr, clean_error, defense, certified):
    missing = [name for name, v in (("--dataset", dataset), ("--norm", norm), ("--eps", eps)) if v is None]
    if missing:
        raise InputError(f"give --claims FILE, --example NAME, or a claim with {', '.join(missing)}")
    eps_value = parse_number(eps, "--eps")
    if not eps_value > 0:
        raise InputError(f"--eps must be > 0, got {eps!r}")
    rates = {"--fpr": fpr, "--fnr": fnr, "--clean-error": clean_error}
    if robust_accuracy is None and all(v is None for v in rates.values()):
        raise InputError("give --robust-accuracy, or all of --fpr, --fnr and --clean-error")
    if robust_accuracy is not None and any(v is not None for v in rates.values()):
        raise InputError("give either --robust-accuracy or --fpr/--fnr/--clean-error, not both")
    if robust_accuracy is None and any(v is None for v in rates.values()):
        raise InputError("Equation (4) needs all of --fpr, --fnr and --clean-error; missing "
                         + ", ".join(k for k, v in rates.items() if v is None))
    try:
        return DetectorClaim(dataset=dataset, norm=norm, eps=eps_value, eps_text=str(eps).strip(),
                             robust_accuracy=robust_accuracy, fpr=fpr, fnr=fnr, clean_error=clean_error,
                             defense=defense or "", kind=ClaimKind.CERTIFIED if certified else ClaimKind.EMPIRICAL)
    except InputError as exc:
        message = str(exc)
        for field, flag in (("robust_accuracy", "--robust-accuracy"), ("clean_error", "--clean-error"),
                            ("fpr", "--fpr"), ("fnr", "--fnr"), ("eps", "--eps")):
            message = message.replace(field, flag)
        raise InputError(message) from None


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%" if abs(100 * v - round(100 * v)) < 1e-9 else f"{100 * v:.1f}%"


def _print_table(verdicts, reference_source: str) -> None:
    table = Table(title="Detector claims vs best known robust classification at eps/2 (Tramèr, Thm. 4)",
                  box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
    table.add_column("Defense", min_width=12, overflow="fold")
    table.add_column("Data", no_wrap=True)
    table.add_column("Norm eps", justify="right", no_wrap=True)
    table.add_column("Claim", justify="right", no_wrap=True)
    table.add_column("eps/2", justify="right", no_wrap=True)
    table.add_column("Best", justify="right", no_wrap=True)
    table.add_column("Margin", justify="right", no_wrap=True)
    table.add_column("ClaimVerdict", min_width=9)
    bests, refs = reference_cells(verdicts, _fmt_pct, dash="-", at=" @")
    for i, (v, best) in enumerate(zip(verdicts, bests), start=1):
        c = v.claim
        claim_text = claim_cell(c, _fmt_pct, " c")
        margin = "-" if v.margin is None else f"{100 * v.margin:+.0f}" if abs(
            100 * v.margin - round(100 * v.margin)) < 1e-9 else f"{100 * v.margin:+.1f}"
        verdict = {"flagged": "[bold red]FLAGGED[/]", "not flagged": "[green]not flagged[/]",
                   "no reference": "[yellow]no reference[/]"}[v.status]
        table.add_row(f"{i}. {c.defense or '-'}", c.dataset, f"{c.norm.value} {c.eps_text}", claim_text,
                      c.implied_eps_text, best, margin, verdict)
    console.print(table)
    console.print("Claim: robust accuracy with detection at eps (>= from Equation 4, c = certified); "
                  "Best: best known robust classification accuracy at eps/2 [reference]; Margin: Claim - Best, "
                  "in points.", highlight=False, markup=False, soft_wrap=True)
    for i, v in enumerate(verdicts, start=1):
        console.print(f"  {i:>2}. {v.status}: {v.explanation}", highlight=False, soft_wrap=True)
    if refs:
        console.print(f"References (from {reference_source}):", highlight=False)
        for i, r in enumerate(refs, start=1):
            console.print(f"  [{i}] {r}", highlight=False, markup=False, soft_wrap=True)
    s = summarize_verdicts(verdicts)
    console.print(
        f"{s['flagged']} of {s['claims']} claims flagged ({s['defenses_flagged']} of {s['defenses']} defenses), "
        f"{s['not_flagged']} not flagged, {s['no_reference']} without reference.", highlight=False)


def check_detector(
    claims: Annotated[Optional[Path], typer.Option(
        "--claims", help="CSV or JSON file of claims (see docs/detection.md).")] = None,
    example: Annotated[Optional[str], typer.Option(
        "--example", help="Shipped claims: table1 (Tramèr's Table 1, 16 claims) or table2 (certified).")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Data set of a single claim, e.g. CIFAR-10, MNIST, ImageNet.")] = None,
    norm: Annotated[Optional[str], typer.Option(
        "--norm", help="Threat-model norm: l2 or linf.")] = None,
    eps: Annotated[Optional[str], typer.Option(
        "--eps", help="Detection radius of the claim, e.g. 2.9 or 8/255.")] = None,
    robust_accuracy: Annotated[Optional[str], typer.Option(
        "--robust-accuracy", help="Claimed robust accuracy WITH detection: 0.75 or 75%.")] = None,
    fpr: Annotated[Optional[str], typer.Option(
        "--fpr", help="Detector false-positive rate (with --fnr and --clean-error: Equation 4).")] = None,
    fnr: Annotated[Optional[str], typer.Option(
        "--fnr", help="Detector false-negative rate under attack.")] = None,
    clean_error: Annotated[Optional[str], typer.Option(
        "--clean-error", help="Test error on natural inputs.")] = None,
    defense: Annotated[Optional[str], typer.Option(
        "--defense", help="Name of the defense (for the report).")] = None,
    certified: Annotated[bool, typer.Option(
        "--certified", help="The claim is certified (compared with certified classifiers if any).")] = False,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="Your own reference table (CSV or JSON; columns in docs/detection.md).")] = None,
    exact_only: Annotated[bool, typer.Option(
        "--exact-only", help="Use only reference rows at exactly eps/2 (no smaller-radius flags).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON list, one object per claim.")] = False,
) -> int:

    flags = (dataset, norm, eps, robust_accuracy, fpr, fnr, clean_error, defense)
    single = any(v is not None for v in flags) or certified
    sources = sum([claims is not None, example is not None, single])
    if sources > 1:
        raise InputError("give claims one way: --claims FILE, --example NAME, or the single-claim flags")
    if claims is not None:
        claim_list = load_claims(claims)
    elif example is not None:
        claim_list = load_example_claims(example)
    else:
        claim_list = [_claim_from_flags(dataset, norm, eps, robust_accuracy, fpr, fnr, clean_error, defense, certified)]
    table = load_reference(reference)
    verdicts = check_claims(claim_list, table, exact_only=exact_only)
    if as_json:
        print_json([v.to_dict() for v in verdicts])
    else:
        _print_table(verdicts, table.source)
    return 0


def register(app: typer.Typer) -> None:
    app.command("check-detector", help=_HELP)(check_detector)
