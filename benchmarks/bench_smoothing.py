"""Throughput of batched CERTIFY against the hardware limit and against Cohen et al.'s loop.

For each model (CIFAR ResNet-110 on 3x32x32, 2C2F on 1x28x28) and precision (fp32, bf16), in one
run on one device, this prints noise samples per second of:

* ``forward``: the raw forward pass of the same model on a fixed batch (no noise, no counting), at
  the batch size CERTIFY uses and at a sweep of batch sizes (the best is the hardware limit);
* ``certify``: :meth:`SmoothedClassifier.certify` on ``--images`` images (n0 + n samples each);
* ``baseline``: a faithful one-image-at-a-time CERTIFY as in Cohen et al.'s ``core.py``: per image,
  per phase, batches of ``x.repeat``, ``randn_like`` noise, ``argmax``, ``.cpu().numpy()`` (a host
  sync per batch) and Python counting of the predictions; same batch size, precision and layout;

(with ``--repeats`` > 1 the three are measured in turn, repeatedly; figures are medians and ratios
are medians of the ratios within a repeat, since shared CPUs drift) and the ratios certify / best forward, certify / forward at the same batch size, certify /
baseline (same precision) and certify / fp32 baseline. Weights are random (speed does not depend
on them). Targets (docs/smoothing.md): GPU, N = 100,000: ≥ 0.9 of the best forward throughput and
≥ 2x the fp32 baseline; CPU: ≥ 0.8 of the forward throughput.

Runs::

    python benchmarks/bench_smoothing.py                        # CUDA if present, large defaults
    python benchmarks/bench_smoothing.py --device cpu --n 2000 --images 4 --models 2c2f,resnet110
    python benchmarks/bench_smoothing.py --json results.json    # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from certaudit.defenses.smoothing import SmoothedClassifier, clopper_pearson_lower  # noqa: E402
from certaudit.models import build_model  # noqa: E402

MODELS = {"resnet110": (3, 32, 32), "2c2f": (1, 28, 28), "resnet20": (3, 32, 32)}
SIGMA = 0.25
NUM_CLASSES = 10


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=dev.type, enabled=False)


def forward_rate(model, shape, batch: int, dev, precision: str, channels_last: bool, seconds: float) -> float:
    """Samples/s of model(x) on a fixed batch (the hardware limit for this model and batch size)."""
    x = torch.rand((batch, *shape), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(dev, precision):
        for _ in range(2):
            model(x)
        sync(dev)
        reps, t0 = 0, time.perf_counter()
        while True:
            model(x)
            reps += 1
            if reps % 4 == 0 or dev.type == "cpu":
                sync(dev)
                if time.perf_counter() - t0 >= seconds:
                    break
        sync(dev)
        return reps * batch / (time.perf_counter() - t0)


def cohen_certify(model, x, n0: int, n: int, alpha: float, batch: int, dev, precision: str, channels_last: bool):
    """One image at a time, as in Cohen et al.'s core.py (per-batch host sync, Python counting)."""

    def count_arr(arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:  # Cohen's per-prediction loop
            counts[idx] += 1
        return counts

    def sample_noise(img: torch.Tensor, num: int) -> np.ndarray:
        counts = np.zeros(NUM_CLASSES, dtype=int)
        remaining = num
        with torch.no_grad(), autocast(dev, precision):
            for _ in range(math.ceil(num / batch)):
                this = min(batch, remaining)
                remaining -= this
                b = img.repeat((this, 1, 1, 1))
                noise = torch.randn_like(b, device=dev) * SIGMA
                inp = b + noise
                if channels_last:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                predictions = model(inp).argmax(1)
                counts += count_arr(predictions.cpu().numpy(), NUM_CLASSES)
        return counts

    out = []
    for img in x.to(dev):
        c0 = sample_noise(img, n0)
        c_hat = int(c0.argmax())
        c = sample_noise(img, n)
        p_lo = float(clopper_pearson_lower([c[c_hat]], n, alpha)[0])
        out.append((c_hat if p_lo >= 0.5 else -1, p_lo))
    return out


def bench_model(name: str, args, dev: torch.device) -> list[dict]:
    shape = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, shape, NUM_CLASSES).to(dev).eval()
    channels_last = dev.type == "cuda" and not args.no_channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand((args.images, *shape), generator=torch.Generator().manual_seed(1))
    per_image = args.n0 + args.n
    results = []
    baseline_fp32 = None
    for precision in args.precisions:
        sc = SmoothedClassifier(model, NUM_CLASSES, SIGMA, batch_size=args.batch_size, precision=precision,
                                channels_last=channels_last, n0=args.n0, n=args.n, alpha=0.001)
        batch = sc.resolve_batch_size(shape)
        sweep = sorted({max(1, batch // 4), max(1, batch // 2), batch, *args.forward_batches})
        k = max(1, min(args.baseline_images, args.images))
        sc.certify(x[:1], n0=args.n0, n=min(args.n, 2 * batch), seed=0)  # warm-up (and batch-size probe)
        cohen_certify(model, x[:1], args.n0, min(args.n, batch), 0.001, batch, dev, precision, channels_last)
        reps = []  # one measurement of each quantity per repeat, taken in turn
        for _ in range(args.repeats):
            fwd = {bb: forward_rate(model, shape, bb, dev, precision, channels_last, args.seconds) for bb in sweep}
            t0 = time.perf_counter()
            sc.certify(x, seed=0)
            t_cert = time.perf_counter() - t0
            sync(dev)
            t0 = time.perf_counter()
            cohen_certify(model, x[:k], args.n0, args.n, 0.001, batch, dev, precision, channels_last)
            sync(dev)
            t_base = time.perf_counter() - t0
            reps.append({"forward": fwd, "certify": args.images * per_image / t_cert,
                         "baseline": k * per_image / t_base})
        med = lambda values: float(np.median(values))  # noqa: E731
        fwd_med = {bb: med([r["forward"][bb] for r in reps]) for bb in sweep}
        best_b = max(fwd_med, key=fwd_med.get)
        certify_rate = med([r["certify"] for r in reps])
        baseline_rate = med([r["baseline"] for r in reps])
        if precision == "fp32":
            baseline_fp32 = baseline_rate
        row = {
            "model": name, "device": describe(dev), "precision": precision, "channels_last": channels_last,
            "n0": args.n0, "n": args.n, "images": args.images, "baseline_images": k, "batch": batch,
            "repeats": args.repeats, "per_repeat": [{**r, "forward": {str(bb): v for bb, v in r["forward"].items()}}
                                                    for r in reps],
            "forward_at_batch": fwd_med[batch], "forward_best": fwd_med[best_b], "forward_best_batch": best_b,
            "certify": certify_rate, "baseline": baseline_rate,
            # ratios: median over repeats of the ratio within a repeat (robust to a drifting machine)
            "certify_over_forward_best": med([r["certify"] / max(r["forward"].values()) for r in reps]),
            "certify_over_forward_same_batch": med([r["certify"] / r["forward"][batch] for r in reps]),
            "certify_over_baseline": med([r["certify"] / r["baseline"] for r in reps]),
            "certify_over_fp32_baseline": None if baseline_fp32 is None else certify_rate / baseline_fp32,
        }
        results.append(row)
        print_row(row)
    return results


def describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_row(r: dict) -> None:
    fp32 = "" if r["certify_over_fp32_baseline"] is None else f"  vs fp32 baseline {r['certify_over_fp32_baseline']:.2f}x"
    print(f"{r['model']:>9} {r['precision']:>4} batch {r['batch']:>6} | forward best {r['forward_best']:>10.0f}/s "
          f"(batch {r['forward_best_batch']}) at batch {r['forward_at_batch']:>10.0f}/s | certify {r['certify']:>10.0f}/s "
          f"= {r['certify_over_forward_best']:.2f} of best forward, {r['certify_over_forward_same_batch']:.2f} of same-batch "
          f"| baseline {r['baseline']:>10.0f}/s -> {r['certify_over_baseline']:.2f}x{fp32}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--models", default="resnet110,2c2f", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (fp32 first for the ratio)")
    p.add_argument("--n", type=int, default=None, help="estimation samples per image (default 100000 CUDA, 2000 CPU)")
    p.add_argument("--n0", type=int, default=100, help="selection samples per image")
    p.add_argument("--images", type=int, default=None, help="images for batched CERTIFY (default 16 CUDA, 4 CPU)")
    p.add_argument("--baseline-images", type=int, default=None, help="images for the slow baseline (default: --images)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward pass (default: from memory)")
    p.add_argument("--forward-batches", default="", help="extra batch sizes for the forward sweep, comma list")
    p.add_argument("--seconds", type=float, default=None, help="time per forward measurement (default 3 CUDA, 2 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repetitions, medians reported (default 1 CUDA, 5 CPU)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = dev.type == "cuda"
    args.n = args.n or (100_000 if gpu else 2000)
    args.images = args.images or (16 if gpu else 4)
    args.baseline_images = args.baseline_images or args.images
    args.seconds = args.seconds or (3.0 if gpu else 2.0)
    args.repeats = args.repeats or (1 if gpu else 5)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    args.forward_batches = [int(s) for s in args.forward_batches.split(",") if s.strip()]
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")
    print(f"# bench_smoothing: {describe(dev)}, torch {torch.__version__}, n0={args.n0}, n={args.n}, "
          f"images={args.images}, baseline images={args.baseline_images}", flush=True)
    results = []
    for m in models:
        results += bench_model(m, args, dev)
    if args.json:
        args.json.write_text(json.dumps({"device": describe(dev), "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
