"""Interval / CROWN bounds: speed and memory against the convex_adversarial oracle; verified error.

Two modes:

``speed`` (default) -- bounds per second and peak extra memory for IBP, CROWN-IBP and CROWN on a
2C2F at batch 256 (ε = 0.1, Fashion-MNIST test images when available, else random images), ours
against ``convex_adversarial`` 0.4.4 (Wong & Kolter's dual bound, the same linear relaxation as our
``crown`` with ``pure=True, lower_slope="parallel"``). Each measurement runs in a fresh
subprocess so its peak resident memory (CPU) is its own; on CUDA ``max_memory_allocated``::

    PYTHONPATH=src python benchmarks/bench_interval.py speed [--device cuda] [--batch 256]

``verify`` -- clean and verified error of a model over a data set split (the must-show numbers)::

    PYTHONPATH=src python benchmarks/bench_interval.py verify \\
        --model ../shared/models/kw/fashion_mnist.pth --eps 0.1 --methods ibp,crown-ibp,crown --oracle

``--model`` is a Wong & Kolter ``.pth`` (converted with ``convert_kw``) or a certaudit checkpoint.
A "bound" is one image's K − 1 = 9 margin lower bounds; verified = all nine > 0 and correct.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KW_FMNIST = SHARED / "models" / "kw" / "fashion_mnist.pth"
CASES = ("ours:ibp", "ours:crown-ibp", "ours:crown", "ours:crown-kw", "oracle:kw")


def _load_model(path: str | None, device: torch.device):
    from certaudit.defenses.interval import convert_kw
    from certaudit.models import build_model, load_checkpoint

    if path is None:
        if KW_FMNIST.is_file():
            path = str(KW_FMNIST)
        else:
            torch.manual_seed(0)
            return build_model("2c2f", (1, 28, 28), 10).eval().to(device), "fashion-mnist", "random 2c2f"
    if path.endswith(".safetensors"):
        model, meta = load_checkpoint(path, device)
        return model, meta.dataset, Path(path).name
    model, meta = convert_kw(path)
    return model.to(device), meta.dataset, Path(path).name


def _images(dataset: str, n: int, split: str = "test"):
    from certaudit.data import load_dataset
    from certaudit.errors import DataNotFoundError

    try:
        x, y = load_dataset(dataset, split, download=False)
        return x[:n], y[:n], True
    except DataNotFoundError:
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), False


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _lower(case: str, net, model, x, y, eps):
    from certaudit.defenses.interval import margin_bounds, spec_bounds, specification

    who, what = case.split(":")
    if who == "oracle":
        from convex_adversarial import DualNetwork

        c, _ = specification(y, 10, x.dtype)
        return DualNetwork(model[1:], x, eps, bounded_input=True)(c)
    if what == "crown-kw":
        c, _ = specification(y, 10, x.dtype)
        return spec_bounds(net, x, eps, c, "crown", pure=True, lower_slope="parallel")
    return margin_bounds(net, x, eps, y, what)


def run_one(case: str, batch: int, device: str, eps: float, reps: int) -> dict:
    """One measurement in this process (called in a subprocess by :func:`speed`)."""
    from certaudit.defenses.interval import compile_network

    warnings.filterwarnings("ignore")
    dev = torch.device(device)
    model, dataset, name = _load_model(None, dev)
    x, y, real = _images(dataset, batch)
    x, y = x.to(dev), y.to(dev)
    net = compile_network(model, x.shape[1:])
    with torch.no_grad():
        _lower(case, net, model, x[:4], y[:4], eps)  # warm-up (allocators, kernels)
        base = _rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base_gpu = torch.cuda.memory_allocated(dev)
        times = []
        for _ in range(reps):
            _sync(dev)
            t0 = time.perf_counter()
            low = _lower(case, net, model, x, y, eps)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    best = min(times)
    low = low.double()
    out = {"case": case, "batch": batch, "device": str(dev), "model": name, "real_images": real, "eps": eps,
           "seconds": best, "images_per_s": batch / best, "bounds_per_s": batch * 9 / best,
           "verified_in_batch": int(((low.min(1).values if low.dim() == 2 else low) > 0).sum()),
           "peak_extra_mb": _rss_mb() - base, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated(dev) - base_gpu) / 2**20
    return out


def speed(args) -> list[dict]:
    rows = []
    for case in args.cases.split(","):
        if case.startswith("oracle"):
            try:
                import convex_adversarial  # noqa: F401
            except ImportError:
                print(f"{case}: convex_adversarial not installed, skipped", file=sys.stderr)
                continue
        reps = args.reps if "crown" not in case and "kw" not in case else max(1, args.reps // 3)
        cmd = [sys.executable, __file__, "_one", case, "--batch", str(args.batch), "--device", args.device,
               "--eps", str(args.eps), "--reps", str(reps)] + (["--threads", str(args.threads)] if args.threads else [])
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"{case} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    oracle = next((r for r in rows if r["case"] == "oracle:kw"), None)
    if args.json:
        print(json.dumps(rows, indent=1))
        return rows
    head = rows[0]
    print(f"model {head['model']}, batch {args.batch}, eps {args.eps}, device {head['device']}, "
          f"{head['threads']} threads, {'Fashion-MNIST test images' if head['real_images'] else 'random images'}")
    print(f"{'case':16} {'s/batch':>9} {'images/s':>9} {'bounds/s':>9} {'peak MB':>8} {'verified':>8} {'vs oracle':>9}")
    for r in rows:
        ratio = f"{oracle['seconds'] / r['seconds']:.2f}x" if oracle else "-"
        print(f"{r['case']:16} {r['seconds']:9.3f} {r['images_per_s']:9.1f} {r['bounds_per_s']:9.0f} "
              f"{r['peak_extra_mb']:8.0f} {r['verified_in_batch']:8d} {ratio:>9}")
    return rows


def verify(args) -> dict:
    """Clean error and verified error over a split, per bound method (and the oracle)."""
    from certaudit.data import load_dataset
    from certaudit.defenses.interval import IntervalDefense, compile_network, specification

    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    model, dataset, name = _load_model(args.model, dev)
    x, y = load_dataset(args.dataset or dataset, args.split)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    n = len(y)
    out: dict = {"model": name, "dataset": args.dataset or dataset, "split": args.split, "images": n, "eps": args.eps,
                 "device": str(dev), "threads": torch.get_num_threads()}
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000].to(dev)).argmax(1).cpu() for i in range(0, n, 1000)])
    correct = pred == y
    out["clean_error"] = 1 - float(correct.float().mean())
    for method in [m for m in args.methods.split(",") if m]:
        d = IntervalDefense(model, 10, method, batch_size=args.batch)
        t0 = time.perf_counter()
        acc = torch.cat([d.accept(x[i:i + args.batch].to(dev), args.eps).cpu() for i in range(0, n, args.batch)])
        dt = time.perf_counter() - t0
        out[method] = {"verified_error": 1 - float((acc == y).float().mean()), "seconds_per_image": dt / n,
                       "abstain_rate": float((acc == -1).float().mean()),
                       "load_average": os.getloadavg()[0]}
        print(json.dumps({method: out[method]}), file=sys.stderr, flush=True)
    if args.oracle:
        from convex_adversarial import DualNetwork

        net = compile_network(model, x.shape[1:])  # noqa: F841 (same model the oracle gets, minus Normalize)
        mean, std = model[0].mean, model[0].std
        if bool((mean != 0).any()) or bool((std != 1).any()):
            raise SystemExit("the oracle comparison needs a model without normalization")
        for bounded in (False, True) if args.oracle_clipped else (False,):
            t0 = time.perf_counter()
            ok = []
            with torch.no_grad():
                for i in range(0, n, 50):
                    xb, yb = x[i:i + 50].to(dev), y[i:i + 50].to(dev)
                    c, _ = specification(yb, 10, xb.dtype)
                    low = DualNetwork(model[1:], xb, args.eps, bounded_input=bounded)(c)
                    ok.append((low.min(1).values > 0).cpu())
            dt = time.perf_counter() - t0
            ok_t = torch.cat(ok)
            key = "oracle_kw" + ("_clipped" if bounded else "")
            out[key] = {"verified_error": 1 - float((ok_t & correct).float().mean()), "seconds_per_image": dt / n}
            print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode")
    s = sub.add_parser("speed", help="bounds/s and peak memory, ours vs the oracle")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--device", default="cpu")
    s.add_argument("--eps", type=float, default=0.1)
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--cases", default=",".join(CASES))
    s.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="clean and verified error over a split")
    v.add_argument("--model", default=str(KW_FMNIST))
    v.add_argument("--dataset", default=None)
    v.add_argument("--split", default="test")
    v.add_argument("--eps", type=float, default=0.1)
    v.add_argument("--methods", default="ibp,crown-ibp,crown")
    v.add_argument("--oracle", action="store_true", help="also the convex_adversarial bound (models without normalization)")
    v.add_argument("--oracle-clipped", action="store_true", help="oracle also with bounded_input=True (inputs clipped to [0,1])")
    v.add_argument("--limit", type=int, default=None)
    v.add_argument("--batch", type=int, default=256)
    v.add_argument("--device", default="cpu")
    one = sub.add_parser("_one")
    one.add_argument("case")
    one.add_argument("--batch", type=int, default=256)
    one.add_argument("--device", default="cpu")
    one.add_argument("--eps", type=float, default=0.1)
    one.add_argument("--reps", type=int, default=3)
    for q in (s, v, one):
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.mode == "_one":
        print(json.dumps(run_one(args.case, args.batch, args.device, args.eps, args.reps)))
    elif args.mode == "verify":
        verify(args)
    else:
        if args.mode is None:
            args = p.parse_args(["speed", *(argv or sys.argv[1:])])
        speed(args)


if __name__ == "__main__":
    main()
