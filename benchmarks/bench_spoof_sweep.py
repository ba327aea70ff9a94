"""The cost of a spoof budget sweep: B budgets in one batched attack against a loop over budgets.

The Shadow Attack under a budget sweep (docs/shadow.md) optimizes every (image, wrong class, budget)
as one batch (:func:`certaudit.attacks.shadow.shadow_attack` with per-pair ``max_linf``/``min_ssim``).
This script times, on the same random-weight model, images, steps, copies and seeds:

* ``unbounded``: one attack without a budget (the paper's);
* ``one budget``: one attack under ℓ∞ ≤ 16/255 and SSIM ≥ 0.9 (projection + SSIM penalty);
* ``sweep, batched``: the B budgets of ``--sweep`` in one call;
* ``sweep, loop``: one call per budget;

and prints the ratios and the largest difference between the batched and the looped perturbations
(each pair's result does not depend on the batch it shares).

    python benchmarks/bench_spoof_sweep.py --device cpu --images 2 --steps 5 --samples 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from certaudit.attacks.budget import parse_linf_list  # noqa: E402
from certaudit.attacks.shadow import ShadowConfig, SmoothedCrossEntropy, shadow_attack, wrong_class_pairs  # noqa: E402
from certaudit.models import build_model  # noqa: E402


def _timed(fn, dev: torch.device) -> tuple[float, torch.Tensor]:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model = build_model(args.arch, shape, 10).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((args.images, *shape), generator=gen).to(dev)
    y = torch.randint(0, 10, (args.images,), generator=gen).to(dev)
    loss = SmoothedCrossEntropy(model, 0.25, samples=args.samples)
    image, target = wrong_class_pairs(y, 10)
    taus = parse_linf_list(args.sweep, "--sweep")
    cfg = ShadowConfig(steps=args.steps)
    n_b, p0 = len(taus), int(target.shape[0])
    tau_p = torch.tensor([math.inf if t is None else t for t in taus], device=dev).repeat_interleave(p0)
    sim_p = torch.tensor([-math.inf if t is None else args.min_ssim for t in taus], device=dev).repeat_interleave(p0)

    def attack(t: torch.Tensor, s: torch.Tensor, reps: int) -> torch.Tensor:
        return shadow_attack(loss, x, target.repeat(reps), cfg, image=image.repeat(reps), max_linf=t, min_ssim=s,
                             seed=0).delta

    shadow_attack(loss, x[:1], target[:1], ShadowConfig(steps=1), seed=0)  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        runs = {
            "unbounded": lambda: attack(torch.full((p0,), math.inf, device=dev), torch.full((p0,), -math.inf, device=dev), 1),
            "one_budget": lambda: attack(torch.full((p0,), 16 / 255, device=dev), torch.full((p0,), args.min_ssim, device=dev), 1),
            "sweep_batched": lambda: attack(tau_p, sim_p, n_b),
            "sweep_loop": lambda: torch.cat([attack(tau_p[k * p0:(k + 1) * p0], sim_p[k * p0:(k + 1) * p0], 1)
                                             for k in range(n_b)]),
        }
        deltas = {}
        for name, fn in runs.items():
            sec, deltas[name] = _timed(fn, dev)
            best[name] = min(best.get(name, math.inf), sec)
    return {"device": str(dev), "arch": args.arch, "input": list(shape), "images": args.images, "pairs": p0,
            "budgets": [None if t is None else t * 255 for t in taus], "steps": args.steps, "samples": args.samples,
            "threads": torch.get_num_threads(), **{f"seconds_{k}": v for k, v in best.items()},
            "one_budget_over_unbounded": best["one_budget"] / best["unbounded"],
            "sweep_batched_over_unbounded": best["sweep_batched"] / best["unbounded"],
            "loop_over_batched": best["sweep_loop"] / best["sweep_batched"],
            "max_abs_delta_difference": float((deltas["sweep_batched"] - deltas["sweep_loop"]).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="2c2f", help="2c2f, 4c3f, 6c2f, resnet20 (random weights)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sweep", default="4/255,8/255,16/255,32/255,64/255,none")
    p.add_argument("--min-ssim", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"device {r['device']}, {r['arch']} on {tuple(r['input'])}, {r['images']} images x 9 targets = {r['pairs']} "
          f"pairs, {r['steps']} steps, {r['samples']} copies, {r['threads']} threads; sweep {r['budgets']} (/255)")
    print(f"unbounded attack       : {r['seconds_unbounded']:.2f} s")
    print(f"one budget (ℓ∞ + SSIM) : {r['seconds_one_budget']:.2f} s  ({r['one_budget_over_unbounded']:.2f}x unbounded)")
    print(f"sweep, batched         : {r['seconds_sweep_batched']:.2f} s  ({r['sweep_batched_over_unbounded']:.2f}x unbounded)")
    print(f"sweep, loop of calls   : {r['seconds_sweep_loop']:.2f} s  (batched is {r['loop_over_batched']:.2f}x faster; "
          f"max |δ_batched − δ_loop| = {r['max_abs_delta_difference']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
