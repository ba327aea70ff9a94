"""``certaudit degrade``: degradation attacks against a certified run-time defense, and the §3.3 audit.

Two modes:

* with ``--model``: certify every image at ε and 2ε, attack the ones certified at ε, re-check every
  candidate (distance, box, the real Algorithm 2.1, fresh noise for smoothing) and write one row
  per image (resumable); print the Tables 1–2 columns (baseline VRA, FPR, utility reduction) for
  the lower bound (attacks), the proven upper bound (the defense's proof of non-degradability) and
  the run-time method's 2ε check, per attack;
* with ``--from-log FILE``: the 2ε check and its FPR-against-radius curve (Figures 2–3) from an
  existing certification log (our certify rows or Cohen et al.'s tab-separated logs), no model run;
  a log proves nothing about monotonicity, so these are not called bounds.

Examples::

    certaudit degrade --model gloro.safetensors --defense lipschitz --eps 0.3 --attack all \\
        --dataset fashion-mnist --out rows.jsonl --plot fpr.png
    certaudit degrade --from-log data/certify/cifar10/resnet110/noise_0.25/test/sigma_0.25 --eps 0.5
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from certaudit.audits.degrade_job import degrade_from_logs, degrade_job
from certaudit.commands import options as o
from certaudit.commands._common import console, parse_list, parse_number, print_json
from certaudit.errors import InputError
from certaudit.report_text import print_degrade, print_log_check


def register(app: typer.Typer) -> None:
    app.command("degrade", help="Degradation attacks (forced rejections of certified inputs): lower bounds by "
                                "attack, proven upper bounds and the 2ε check; or the 2ε check from a certification "
                                "log.")(degrade_cmd)


def degrade_cmd(
    model: o.OptionalModel = None, weights: o.Weights = None, defense: o.Defense = "lipschitz",
    eps: str = typer.Option(..., "--eps", help="attack radius ε (norm of the defense: ℓ2, or ℓ∞ for interval)"),
    attack: str = typer.Option("all", "--attack", help="pgd (Alg 3.1), pgd-2eps (Alg B.1), spgd (Alg 3.2, smoothing), "
                                                       "margin (certificate-aware), a comma list, or all; the first "
                                                       "success counts; identity (x' = x) is a control"),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="with several attacks: run every attack on every "
                                                                 "certified image (per-attack lower bounds)"),
    prune: bool = typer.Option(False, "--prune", help="lipschitz / interval: do not attack inputs the defense proves "
                                                       "non-degradable (2ε check, or IBP at 2ε for CROWN)"),
    proofs: Optional[str] = typer.Option(None, "--proofs", help="comma list of the defense's proofs of "
                                                                 "non-degradability to run (lipschitz: 2eps,local,"
                                                                 "milp; interval: 2eps,milp) or all; default: all "
                                                                 "but milp (branch and bound, seconds per input). "
                                                                 "The costly ones run only on inputs the attacks "
                                                                 "and the 2ε proof leave undecided"),
    proof_budget: Optional[str] = typer.Option(None, "--proof-budget", help="seconds per input for a proof that "
                                                                         "searches (milp: branch and bound over the "
                                                                         "ReLU phases, with the `exact` extra, small "
                                                                         "networks only); default 10"),
    upper_n: Optional[int] = typer.Option(None, "--upper-n", help="smoothing: the 2ε check of testR through the "
                                                                   "sequential test with this sample budget per input "
                                                                   "(e.g. 1000000; stops early away from the threshold)"),
    steps: int = typer.Option(50, "--steps", help="PGD steps per restart"),
    restarts: int = typer.Option(1, "--restarts", help="PGD restarts (margin on lipschitz: targeted runner-ups)"),
    step_size: Optional[str] = typer.Option(None, "--step-size", help="PGD step (default 2.5·radius/steps)"),
    samples: int = typer.Option(32, "--samples", help="smoothing: noisy copies per SPGD/margin step"),
    check_every: int = typer.Option(1, "--check-every", help="deterministic defenses: ask Algorithm 2.1 every K "
                                                             "steps whether the iterate is rejected (early stop)"),
    method: o.Method = None,
    sigma: o.Sigma = None, n0: o.N0 = 100,
    n: int = typer.Option(10_000, "--n", help="smoothing: estimation samples of CERTIFY (clean and re-check)"),
    alpha: o.Alpha = "0.001",
    batch_size: o.BatchSize = None,
    seed: o.Seed = 0, device: o.Device = "auto", dataset: o.Dataset = None, split: o.Split = "test",
    limit: o.Limit = None, skip: o.Skip = 0,
    chunk: Optional[int] = typer.Option(None, "--chunk", help="images per batched attack and per write of rows "
                                                               "(default 256; smoothing 20)"),
    data_root: o.DataRoot = None, out: o.Out = None,
    from_log: Optional[List[Path]] = typer.Option(None, "--from-log", help="certification log (certaudit rows or "
                                                                           "Cohen et al.'s TSV): the 2ε check without a "
                                                                           "model; repeat to compare models (one plot)"),
    radii: Optional[str] = typer.Option(None, "--radii", help="comma list of radii for the FPR curve"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: the FPR's 2r check and VRA against radius"),
    as_json: o.Json = False,
) -> None:
    eps_v = parse_number(eps, "--eps", positive=True, allow_zero=False)
    radii_v = None if radii is None else parse_list(radii, "--radii", allow_zero=False)
    if from_log:
        if model is not None:
            raise InputError("give either --model (run attacks) or --from-log (the 2ε check from a log), not both")
        summaries = degrade_from_logs(from_log, eps_v, radii=radii_v, plot=plot)
        if as_json:
            return print_json(summaries[0] if len(summaries) == 1 else {"logs": summaries})
        for entry in summaries:
            print_log_check(entry, eps_v)
        if plot is not None:
            console.print(f"plot: {plot}")
        return None
    if model is None:
        raise InputError("--model is required (or --from-log FILE for the 2ε check from a certification log)")
    summary = degrade_job(
        model, eps=eps_v, weights=weights, defense=defense, attack=attack, exhaustive=exhaustive, prune=prune,
        proofs=None if proofs is None else [p for p in proofs.split(",")], upper_n=upper_n,
        proof_budget=None if proof_budget is None else parse_number(proof_budget, "--proof-budget", positive=True,
                                                                    allow_zero=False),
        attack_options={"steps": steps, "restarts": restarts, "samples": samples, "check_every": check_every,
                        "step_size": None if step_size is None else parse_number(step_size, "--step-size",
                                                                                 positive=True, allow_zero=False)},
        defense_options={"method": method, "sigma": None if sigma is None else parse_number(sigma, "--sigma"),
                         "n0": n0, "n": n, "alpha": parse_number(alpha, "--alpha"), "batch_size": batch_size},
        seed=seed, device=device, dataset=dataset, split=split, limit=limit, skip=skip, chunk=chunk,
        data_root=data_root, out=out, radii=radii_v, plot=plot, quiet=as_json)
    if summary is not None:
        print_json(summary) if as_json else print_degrade(summary)
