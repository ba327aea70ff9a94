"""``certaudit certify``: certify every image of a data set split with a defense; rows + summary.

The work is :func:`certaudit.audits.certify_job.certify_job`; this module parses options and prints.
Example (randomized smoothing, Cohen et al.'s settings)::

    certaudit certify --model m.safetensors --defense smoothing --sigma 0.25 \\
        --n0 100 --n 100000 --alpha 0.001 --dataset cifar10 --limit 500 --out rows.jsonl

Several processes (:mod:`certaudit.distributed`; gloo on CPU, one GPU per process with CUDA): each
rank certifies its share of the images into ``rows.jsonl.rank{K}``, rank 0 merges them into
``--out`` and prints the summary; the rows are the same as with one process::

    torchrun --nproc_per_node 2 -m certaudit certify --model m.safetensors --out rows.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from certaudit.audits.certify_job import certify_job
from certaudit.commands import options as o
from certaudit.commands._common import parse_list, parse_number, print_json
from certaudit.report_text import print_certify


def register(app: typer.Typer) -> None:
    app.command("certify", help="Certify a data set split with a defense (smoothing, lipschitz, interval); "
                                "write one row per image and print certified accuracy at radii.")(certify_cmd)


def certify_cmd(
    model: o.Model, weights: o.Weights = None, defense: o.Defense = "smoothing", sigma: o.Sigma = None,
    n0: o.N0 = 100, n: o.N = 100_000, alpha: o.Alpha = "0.001", method: o.Method = None,
    eps: Optional[str] = typer.Option(None, "--eps", help="also report VRA at ε and 2ε and the clean rejection rate at ε"),
    sequential: bool = typer.Option(False, "--sequential", help="smoothing: only decide certification at --eps, with an "
                                    "anytime-valid test that stops per image when decided (--n is the budget)"),
    radii: Optional[str] = typer.Option(None, "--radii", help="comma list of radii for the table, e.g. 0,0.25,0.5 or 0,2/255 "
                                        "(each checked exactly by the defense)"),
    full_radius: bool = typer.Option(False, "--full-radius", help="interval: also find each image's largest certified "
                                     "radius by bisection (default only without --eps and --radii)"),
    batch_size: o.BatchSize = None,
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (bf16: certificate about the bf16 model)"),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels-last memory layout (CUDA speed-up)"),
    seed: o.Seed = 0, device: o.Device = "auto", dataset: o.Dataset = None, split: o.Split = "test",
    limit: o.Limit = None, skip: o.Skip = 0,
    chunk: Optional[int] = typer.Option(None, "--chunk", help="images per certify call (default: automatic)"),
    data_root: o.DataRoot = None, out: o.Out = None,
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of certified accuracy against radius"),
    as_json: o.Json = False,
) -> None:
    summary = certify_job(
        model, weights=weights, defense=defense, eps=None if eps is None else parse_number(eps, "--eps", positive=True,
                                                                                         allow_zero=False),
        options={"sigma": None if sigma is None else parse_number(sigma, "--sigma"), "n0": n0, "n": n,
                 "alpha": parse_number(alpha, "--alpha"), "method": method, "batch_size": batch_size,
                 "precision": precision, "channels_last": channels_last or None, "seed": seed},
        sequential=sequential, radii=None if radii is None else parse_list(radii, "--radii"), full_radius=full_radius,
        chunk=chunk, device=device, dataset=dataset, split=split, limit=limit, skip=skip, data_root=data_root,
        out=out, plot=plot, quiet=as_json)
    if summary is not None:
        print_json(summary) if as_json else print_certify(summary)
