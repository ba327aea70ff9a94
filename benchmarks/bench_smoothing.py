"""Throughput of batched CERTIFY against the hardware limit, the noise limit and Cohen et al.'s loop.

For each model (CIFAR ResNet-110 or ResNet-20 on 3x32x32, 2C2F on 1x28x28) and precision (fp32,
bf16), in one run on one device, this prints noise samples per second of:

* ``forward``: the raw forward pass of the same model on a fixed batch (no noise, no counting), at
  the batch size CERTIFY uses and at a sweep of batch sizes, each the better of one model call with
  all threads and (CPU) one call per noise worker thread (the best is the hardware limit);
* ``noise``: drawing the same Gaussian noise alone, as fast as CERTIFY could (``normal_`` into a
  reused batch-sized buffer, on CPU in CERTIFY's noise threads at once);
* ``noise limit``: the work CERTIFY cannot avoid, measured directly: draw a batch of noise and run
  the model on it, again and again (the better of one model call with all threads and one call per
  noise worker; the best over the batch sweep; ``_same_batch``: at CERTIFY's batch, measured just
  before and just after CERTIFY); ``noise_limit_from_rates`` = ``1 / (1/forward + 1/noise)`` as a
  cross-check;
* ``certify``: :meth:`SmoothedClassifier.certify` on ``--images`` images (n0 + n samples each);
* ``baseline``: a faithful one-image-at-a-time CERTIFY as in Cohen et al.'s ``core.py``
  (locuslab/smoothing): per image, per phase, batches of ``--baseline-batch`` (400, their default)
  ``x.repeat``, ``randn_like`` noise, ``argmax``, ``.cpu().numpy()`` (a host sync per batch) and
  Python counting of the predictions; same precision and layout;

(with ``--repeats`` > 1 they are measured in turn, repeatedly; figures are medians and ratios are
medians of the ratios within a repeat, since shared CPUs drift; every figure also by CPU time, which
a loaded machine disturbs less) and the ratios certify / noise limit,
certify / best forward, certify / forward at the same batch size, certify / baseline (same
precision) and certify / fp32 baseline. Weights are random (speed does not depend on them).
Targets (docs/smoothing.md, issue 17): GPU, N = 100,000: ≥ 0.9 of the best forward throughput and
≥ 2x the fp32 baseline; CPU: ≥ 0.9 of the noise limit on 2C2F, 1.00 of the forward on ResNet-20.

Runs::

    python benchmarks/bench_smoothing.py                        # CUDA if present, large defaults
    python benchmarks/bench_smoothing.py --device cpu --n 2000 --images 4 --models 2c2f,resnet20
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
from certaudit.defenses.smoothing_noise import noise_pool, noise_workers  # noqa: E402
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


class Timer:
    """Wall and process CPU seconds (all threads) of a ``with`` block."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def rates(samples: float, t: Timer, threads: int) -> dict:
    """Samples/s by the wall clock, and by CPU time spread over ``threads`` (what an idle machine with
    that many cores would give: time the process was descheduled by other jobs does not count)."""
    return {"wall": samples / t.wall, "cpu": samples * threads / max(t.cpu, 1e-9)}


def forward_rate(model, shape, batch: int, dev, precision: str, channels_last: bool, seconds: float) -> dict:
    """Samples/s of model(x) on a fixed batch (the hardware limit for this model and batch size)."""
    x = torch.rand((batch, *shape), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(dev, precision):
        for _ in range(2):
            model(x)
        sync(dev)
        reps = 0
        with Timer() as t:
            t0 = time.perf_counter()
            while True:
                model(x)
                reps += 1
                if reps % 4 == 0 or dev.type == "cpu":
                    sync(dev)
                    if time.perf_counter() - t0 >= seconds:
                        break
            sync(dev)
    return rates(reps * batch, t, torch.get_num_threads())


def on_workers(run, width: int, seconds: float) -> tuple[int, Timer]:
    """Run ``run(w, stop_time)`` (it returns samples done) in ``width`` noise-pool threads at once for
    ``seconds``, after a short warm-up: (samples, Timer)."""
    threads = torch.get_num_threads()
    try:
        list(noise_pool().map(lambda w: run(w, time.perf_counter() + 0.1), range(width)))
        with Timer() as t:
            stop = time.perf_counter() + seconds
            done = sum(noise_pool().map(lambda w: run(w, stop), range(width)))
    finally:
        torch.set_num_threads(threads)
    return done, t


def forward_rate_workers(model, shape, batch: int, dev, precision: str, seconds: float) -> dict:
    """CPU samples/s of ``W = noise_workers()`` threads each running model(x) on its own fixed batch with
    ``T / W`` intra-op threads (how CERTIFY's CPU sampler runs the model); 0 when ``W`` is 1."""
    threads = torch.get_num_threads()
    width = noise_workers() if dev.type == "cpu" and threads > 1 else 1
    if width == 1:
        return {"wall": 0.0, "cpu": 0.0}

    def run(_w: int, stop: float) -> int:
        torch.set_num_threads(max(1, threads // width))
        x, done = torch.rand((batch, *shape)), 0
        with torch.inference_mode(), autocast(dev, precision):
            while time.perf_counter() < stop:
                model(x).argmax(1)
                done += batch
        return done

    done, t = on_workers(run, width, seconds)
    return rates(done, t, threads)


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


def noise_rate(shape, batch: int, dev, seconds: float) -> dict:
    """Samples/s of drawing the noise alone, as fast as CERTIFY could: ``normal_`` of N(0, σ²) into a
    reused batch-sized buffer, on CPU in ``noise_workers()`` threads at once (one generator and
    buffer each, as CERTIFY's sampler), no image added, no copy, no hand-over between threads."""
    threads = torch.get_num_threads()
    width = noise_workers() if dev.type == "cpu" and threads > 1 else 1

    def run(w: int, stop: float) -> int:
        buf = torch.empty((batch, *shape), device=dev)
        gen = torch.Generator(device=dev).manual_seed(w)
        done = 0
        with torch.inference_mode():
            while True:
                for _ in range(8):
                    buf.normal_(0.0, SIGMA, generator=gen)
                done += 8 * batch
                sync(dev)
                if time.perf_counter() >= stop:
                    return done

    if width > 1:
        done, t = on_workers(run, width, seconds)
    else:
        run(0, time.perf_counter() + 0.1)
        with Timer() as t:
            done = run(0, time.perf_counter() + seconds)
    return rates(done, t, threads)


def limit(forward: float, noise: float) -> float:
    """Samples/s of a forward pass plus drawing its noise, one after the other, from the two rates."""
    return 1.0 / (1.0 / forward + 1.0 / noise)


def noise_limit_rate(model, shape, batch: int, dev, precision: str, channels_last: bool, seconds: float,
                     per_worker: bool) -> dict:
    """Samples/s of the work CERTIFY cannot avoid, measured directly: draw a batch of N(0, σ²) noise
    (``normal_`` into a reused buffer) and run the model on it, again and again (no image added, no
    counting, no lanes). ``per_worker`` (CPU): in ``W = noise_workers()`` threads at once with
    ``T / W`` intra-op threads each, as CERTIFY's sampler; else one model call with all threads,
    its noise drawn in ``W`` slices by the noise threads (0 when ``per_worker`` and ``W`` is 1)."""
    threads = torch.get_num_threads()
    width = noise_workers() if dev.type == "cpu" and threads > 1 else 1
    if per_worker and width == 1:
        return {"wall": 0.0, "cpu": 0.0}
    gens = [torch.Generator(device=dev).manual_seed(w) for w in range(width)]

    def draw(buf: torch.Tensor, w: int, parts: int) -> None:
        with torch.inference_mode():
            q = -(-batch // parts)
            buf[w * q:(w + 1) * q].normal_(0.0, SIGMA, generator=gens[w])

    def run(w: int, stop: float) -> int:
        if per_worker:
            torch.set_num_threads(max(1, threads // width))
        buf, done = torch.empty((batch, *shape), device=dev), 0
        with torch.inference_mode(), autocast(dev, precision):
            while True:
                if per_worker or width == 1:
                    draw(buf, 0 if width == 1 else w, 1)
                else:
                    list(noise_pool().map(lambda v: draw(buf, v, width), range(width)))
                model(buf.contiguous(memory_format=torch.channels_last) if channels_last else buf).argmax(1)
                done += batch
                if dev.type == "cpu" or done % (8 * batch) == 0:
                    sync(dev)
                    if time.perf_counter() >= stop:
                        return done

    if per_worker:
        done, t = on_workers(run, width, seconds)
    else:
        run(0, time.perf_counter() + 0.1)
        with Timer() as t:
            done = run(0, time.perf_counter() + seconds)
    return rates(done, t, threads)


def measure_once(model, sc, x, shape, sweep, args, dev, precision: str, channels_last: bool, k: int) -> dict:
    """One repeat: forward sweep (both ways), noise alone, noise limit sweep, batched CERTIFY (between
    two measurements of the noise limit at its batch, averaged) and the one-image baseline, in turn;
    {"wall": figures, "cpu": figures}."""
    batch, threads = sc.resolve_batch_size(shape), torch.get_num_threads()
    fwd = {bb: forward_rate(model, shape, bb, dev, precision, channels_last, args.seconds) for bb in sweep}
    fwd_w = {bb: forward_rate_workers(model, shape, bb, dev, precision, args.seconds) for bb in sweep}
    noise = noise_rate(shape, batch, dev, args.seconds)

    def lim_at(bb: int) -> dict:  # the better of the two ways to run it
        return max((noise_limit_rate(model, shape, bb, dev, precision, channels_last, args.seconds, way)
                    for way in (False, True)), key=lambda v: v["wall"])

    lim = {bb: lim_at(bb) for bb in sweep if bb != batch}
    per_image = args.n0 + args.n
    before = lim_at(batch)  # CERTIFY is measured between two measurements of the limit at its batch
    with Timer() as t_cert:
        sc.certify(x, seed=0)
        sync(dev)
    after = lim_at(batch)
    lim[batch] = {clock: (before[clock] + after[clock]) / 2 for clock in before}
    with Timer() as t_base:
        cohen_certify(model, x[:k], args.n0, args.n, 0.001, args.baseline_batch, dev, precision, channels_last)
        sync(dev)
    cert, base = rates(args.images * per_image, t_cert, threads), rates(k * per_image, t_base, threads)
    return {clock: {"forward": {bb: v[clock] for bb, v in fwd.items()},
                    "forward_workers": {bb: v[clock] for bb, v in fwd_w.items()},
                    "noise": noise[clock], "limit": {bb: v[clock] for bb, v in lim.items()},
                    "certify": cert[clock], "baseline": base[clock]} for clock in ("wall", "cpu")}


def bench_model(name: str, args, dev: torch.device) -> list[dict]:
    shape = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, shape, NUM_CLASSES).to(dev).eval()
    channels_last = dev.type == "cuda" and not args.no_channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand((args.images, *shape), generator=torch.Generator().manual_seed(1))
    results = []
    baseline_fp32 = None
    for precision in args.precisions:
        sc = SmoothedClassifier(model, NUM_CLASSES, SIGMA, batch_size=args.batch_size, precision=precision,
                                channels_last=channels_last, n0=args.n0, n=args.n, alpha=0.001)
        batch = sc.resolve_batch_size(shape)
        sweep = sorted({max(1, batch // 4), max(1, batch // 2), batch, 2 * batch, *args.forward_batches})
        k = max(1, min(args.baseline_images, args.images))
        sc.certify(x[:1], n0=args.n0, n=min(args.n, 2 * batch), seed=0)  # warm-up (and batch-size probe)
        cohen_certify(model, x[:1], args.n0, min(args.n, args.baseline_batch), 0.001, args.baseline_batch, dev,
                      precision, channels_last)
        # one measurement of each quantity per repeat, taken in turn
        reps = [measure_once(model, sc, x, shape, sweep, args, dev, precision, channels_last, k)
                for _ in range(args.repeats)]
        row = {"model": name, "device": describe(dev), "precision": precision, "channels_last": channels_last,
               "n0": args.n0, "n": args.n, "images": args.images, "baseline_images": k, "batch": batch,
               "baseline_batch": args.baseline_batch, "repeats": args.repeats, "threads": torch.get_num_threads(),
               **summarize([r["wall"] for r in reps], batch, precision, baseline_fp32),
               "cpu_time": summarize([r["cpu"] for r in reps], batch, precision, None)}
        if precision == "fp32":
            baseline_fp32 = row["baseline"]
        results.append(row)
        print_row(row)
    return results


def summarize(reps: list[dict], batch: int, precision: str, baseline_fp32: float | None) -> dict:
    """Medians of the figures, and medians over repeats of the ratios within a repeat (robust to a
    drifting machine). A forward figure is the better of the two ways to run it (one model call with
    all threads, or one call per worker thread)."""
    med = lambda values: float(np.median(values))  # noqa: E731
    sweep = list(reps[0]["forward"])
    both = lambda r, bb: max(r["forward"][bb], r["forward_workers"][bb])  # noqa: E731
    best = lambda r: max(both(r, bb) for bb in sweep)  # noqa: E731
    fwd_med = {bb: med([both(r, bb) for r in reps]) for bb in sweep}
    best_b = max(fwd_med, key=fwd_med.get)
    certify_rate = med([r["certify"] for r in reps])
    baseline_rate = med([r["baseline"] for r in reps])
    if precision == "fp32":
        baseline_fp32 = baseline_rate
    lim_best = [max(r["limit"].values()) for r in reps]
    lim_same = [r["limit"][batch] for r in reps]
    keyed = ("forward", "forward_workers", "limit")
    return {
        "per_repeat": [{**r, **{key: {str(bb): v for bb, v in r[key].items()} for key in keyed}} for r in reps],
        "forward_one_call": {str(bb): med([r["forward"][bb] for r in reps]) for bb in sweep},
        "forward_per_worker": {str(bb): med([r["forward_workers"][bb] for r in reps]) for bb in sweep},
        "forward_at_batch": fwd_med[batch], "forward_best": fwd_med[best_b], "forward_best_batch": best_b,
        "noise": med([r["noise"] for r in reps]), "noise_limit": med(lim_best), "noise_limit_same_batch": med(lim_same),
        "noise_limit_by_batch": {str(bb): med([r["limit"][bb] for r in reps]) for bb in sweep},
        # the same limit from the separate rates, 1 / (1/forward + 1/noise), as a cross-check
        "noise_limit_from_rates": med([limit(best(r), r["noise"]) for r in reps]),
        "certify": certify_rate, "baseline": baseline_rate,
        "certify_over_forward_best": med([r["certify"] / best(r) for r in reps]),
        "certify_over_forward_same_batch": med([r["certify"] / both(r, batch) for r in reps]),
        "certify_over_noise_limit": med([r["certify"] / lim for r, lim in zip(reps, lim_best)]),
        "certify_over_noise_limit_same_batch": med([r["certify"] / lim for r, lim in zip(reps, lim_same)]),
        # fastest of repeats: each quantity at its best moment (a loaded machine only slows things down)
        "certify_over_noise_limit_fastest": max(r["certify"] for r in reps) / max(lim_best),
        "certify_over_baseline": med([r["certify"] / r["baseline"] for r in reps]),
        "certify_over_fp32_baseline": None if baseline_fp32 is None else certify_rate / baseline_fp32,
    }


def describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_row(r: dict) -> None:
    fp32 = "" if r["certify_over_fp32_baseline"] is None else f" (fp32 baseline: {r['certify_over_fp32_baseline']:.2f}x)"
    print(f"{r['model']:>9} {r['precision']:>4} batch {r['batch']:>5} | forward best {r['forward_best']:>9.0f}/s "
          f"(batch {r['forward_best_batch']}), at CERTIFY's batch {r['forward_at_batch']:>9.0f}/s | noise alone "
          f"{r['noise']:>10.0f}/s | noise limit {r['noise_limit']:>9.0f}/s | certify {r['certify']:>9.0f}/s "
          f"| baseline (batch {r['baseline_batch']}) {r['baseline']:>9.0f}/s", flush=True)
    print(f"{'':>9} {'':>4} certify = {r['certify_over_noise_limit']:.3f} of the noise limit "
          f"({r['certify_over_noise_limit_same_batch']:.3f} at its batch, {r['certify_over_noise_limit_fastest']:.3f} "
          f"fastest of repeats), {r['certify_over_forward_best']:.3f} of best "
          f"forward ({r['certify_over_forward_same_batch']:.3f} at its batch), {r['certify_over_baseline']:.2f}x the "
          f"baseline{fp32}", flush=True)
    c = r["cpu_time"]
    print(f"{'':>9} {'':>4} by CPU time: certify = {c['certify_over_noise_limit']:.3f} of the noise limit "
          f"({c['certify_over_noise_limit_same_batch']:.3f} at its batch), {c['certify_over_forward_best']:.3f} of best "
          f"forward ({c['certify_over_forward_same_batch']:.3f} at its batch), {c['certify_over_baseline']:.2f}x the "
          f"baseline", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--models", default="resnet110,2c2f", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (fp32 first for the ratio)")
    p.add_argument("--n", type=int, default=None, help="estimation samples per image (default 100000 CUDA, 2000 CPU)")
    p.add_argument("--n0", type=int, default=100, help="selection samples per image")
    p.add_argument("--images", type=int, default=None, help="images for batched CERTIFY (default 16 CUDA, 4 CPU)")
    p.add_argument("--baseline-images", type=int, default=None, help="images for the slow baseline (default: --images)")
    p.add_argument("--baseline-batch", type=int, default=400,
                   help="samples per forward pass of the one-image baseline (default 400, locuslab/smoothing's)")
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
