"""Images per second of the batched untargeted Shadow Attack against a loop over images and targets.

The batched attack (:func:`certaudit.attacks.shadow.shadow_attack` on every (image, wrong class)
pair at once, the (pair × copy) batch cut into memory-sized chunks) is timed against the structure
of the authors' code (``BreakingCertifiableDefenses/RandomizedSmoothing/certify.py``): a Python
loop over images and, inside it, over target classes, one attack of one (image, target) pair at a
time with its ``samples`` noise copies as the batch. Same model, steps, samples and seeds: the two
compute the same perturbations (the script prints the largest difference).

Usage::

    # CPU, small settings (about a minute on 2 cores)
    python benchmarks/bench_shadow.py --device cpu --arch 2c2f --images 4 --steps 5 --samples 32
    # CUDA, the paper's 400 copies
    python benchmarks/bench_shadow.py --device cuda --arch resnet20 --images 16 --steps 10 --samples 400
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from certaudit.attacks.shadow import ShadowConfig, SmoothedCrossEntropy, shadow_attack, wrong_class_pairs  # noqa: E402
from certaudit.models import build_model  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.channels_in, args.size, args.size)
    model = build_model(args.arch, shape, args.classes).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((args.images, *shape), generator=gen).to(dev)
    y = torch.randint(0, args.classes, (args.images,), generator=gen).to(dev)
    config = ShadowConfig(steps=args.steps, channels=args.channels)
    loss = SmoothedCrossEntropy(model, args.sigma, samples=args.samples, noise=args.noise)
    image, target = wrong_class_pairs(y, args.classes)
    pairs = int(target.shape[0])

    def batched() -> torch.Tensor:
        return shadow_attack(loss, x, target, config, image=image, seed=0).delta

    def looped() -> torch.Tensor:
        out = []
        for i in range(args.images):  # the authors' structure: for image, for target, attack
            for t in range(args.classes):
                if t == int(y[i]):
                    continue
                res = shadow_attack(loss, x[i:i + 1], torch.tensor([t], device=dev), config, indices=[i], seed=0)
                out.append(res.delta)
        return torch.cat(out)

    shadow_attack(loss, x[:1], target[:1], ShadowConfig(steps=1, channels=args.channels), seed=0)  # warm-up
    times = {"batched": [], "loop": []}
    deltas = {}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("loop", looped)):
            _sync(dev)
            t0 = time.perf_counter()
            deltas[name] = fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    # the hardware limit: one forward + backward per (pair, copy, step) at the attack's chunk size,
    # nothing else (no noise, no penalties, no bookkeeping)
    rows_total = pairs * args.samples * args.steps
    chunk_rows = max(1, min(pairs * args.samples, loss.rows_per_chunk(shape)))
    xb = torch.rand((chunk_rows, *shape), device=dev, requires_grad=True)
    for prm in model.parameters():  # the attack differentiates in the input only
        prm.requires_grad_(False)
    model(xb).sum().backward()  # warm-up
    reps, t_fb = 0, 0.0
    while reps < 3 or t_fb < 1.0:
        _sync(dev)
        t0 = time.perf_counter()
        xb.grad = None
        model(xb).sum().backward()
        _sync(dev)
        t_fb += time.perf_counter() - t0
        reps += 1
    limit_seconds = rows_total / (reps * chunk_rows / t_fb)
    result = {
        "device": str(dev), "arch": args.arch, "input": list(shape), "classes": args.classes, "images": args.images,
        "pairs": pairs, "steps": args.steps, "samples": args.samples, "channels": args.channels,
        "threads": torch.get_num_threads(), "rows_per_chunk": loss.rows_per_chunk(shape),
        "seconds_batched": best["batched"], "seconds_loop": best["loop"],
        "images_per_second_batched": args.images / best["batched"], "images_per_second_loop": args.images / best["loop"],
        "speedup": best["loop"] / best["batched"],
        "seconds_fwd_bwd_limit": limit_seconds, "batched_fraction_of_limit": limit_seconds / best["batched"],
        "max_abs_delta_difference": float((deltas["batched"] - deltas["loop"]).abs().max()),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="2c2f", help="2c2f, 4c3f, 6c2f, resnet20, resnet110 (random weights)")
    p.add_argument("--channels-in", type=int, default=3, help="image channels (3: CIFAR-like)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1- or 3-channel attack")
    p.add_argument("--noise", default="fixed", choices=("fixed", "fresh"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    r = run(args)
    print(f"device {r['device']}, {r['arch']} on {tuple(r['input'])}, {r['images']} images x {r['classes'] - 1} targets "
          f"= {r['pairs']} pairs, {r['steps']} steps, {r['samples']} copies, {r['channels']}-channel, "
          f"{r['threads']} threads, {r['rows_per_chunk']} rows per chunk")
    print(f"batched untargeted : {r['images_per_second_batched']:.4g} images/s ({r['seconds_batched']:.2f} s)")
    print(f"loop over targets  : {r['images_per_second_loop']:.4g} images/s ({r['seconds_loop']:.2f} s)")
    print(f"speed-up           : {r['speedup']:.2f}x   (max |δ_batched − δ_loop| = {r['max_abs_delta_difference']:.2e})")
    print(f"fwd+bwd limit      : {r['seconds_fwd_bwd_limit']:.2f} s; batched runs at "
          f"{r['batched_fraction_of_limit']:.2f} of it")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
