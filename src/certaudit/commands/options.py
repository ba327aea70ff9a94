"""Typer option definitions shared by the verbs (one wording and one default meaning per flag).

Use as ``model: options.Model`` (required) or ``weights: options.Weights = None``; a verb whose flag
means something narrower writes its own ``typer.Option`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MODEL_HELP = ("certaudit checkpoint (.safetensors), or a Python factory package.module:function returning an "
              "nn.Module that takes [0,1] images (with --weights and --dataset)")
WEIGHTS_HELP = ("with a factory --model: its weights (safetensors, or a PyTorch state dict read with "
                "weights_only=True; never unpickled code)")

Model = Annotated[Path, typer.Option("--model", help=MODEL_HELP)]
OptionalModel = Annotated[Optional[Path], typer.Option("--model", help=MODEL_HELP)]
Weights = Annotated[Optional[Path], typer.Option("--weights", help=WEIGHTS_HELP)]
Defense = Annotated[str, typer.Option("--defense", help="smoothing, lipschitz or interval")]
Sigma = Annotated[Optional[str], typer.Option("--sigma", help="smoothing noise σ (default: the model's training σ)")]
N0 = Annotated[int, typer.Option("--n0", help="smoothing: selection samples of CERTIFY")]
N = Annotated[int, typer.Option("--n", help="smoothing: estimation samples of CERTIFY")]
Alpha = Annotated[str, typer.Option("--alpha", help="smoothing: failure probability of each certificate")]
Method = Annotated[Optional[str], typer.Option("--method", help="interval: ibp, crown-ibp or crown (default: crown)")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="samples per forward pass (default: from memory)")]
Seed = Annotated[int, typer.Option("--seed", help="seed of every random draw (noise, attacks); image i's draws "
                                                  "derive from (seed, i)")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="data set (default: the model's own)")]
Split = Annotated[str, typer.Option("--split", help="train or test")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="process K images")]
Skip = Annotated[int, typer.Option("--skip", help="start at image J")]
Stride = Annotated[int, typer.Option("--stride", help="take every S-th image (CIFAR files are sorted by class)")]
DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="folder with the data set files")]
Out = Annotated[Optional[Path], typer.Option("--out", help="rows file (.jsonl); rerun with the same path to resume")]
Json = Annotated[bool, typer.Option("--json", help="print the summary as JSON")]
