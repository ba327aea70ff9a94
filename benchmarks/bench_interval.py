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
        --model ../shared/models/kw/fashion_mnist.pth --eps 0.1 --methods ibp,crown-ibp,crown --oracle \\
        --out runs/interval/kw_fmnist_verify.jsonl --time-limit 1500    # rerun to resume

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
    """Clean error and verified error over a split, per bound method (and the oracle).

    With ``--out rows.jsonl`` every chunk of ``--batch`` images is written as rows (index, label,
    prediction, per method: verified at ε, worst margin bound, seconds per image) as soon as it is
    done, and a rerun with the same file resumes (a long CROWN run can be cut into pieces with
    ``--time-limit``); the summary is computed from all rows of the file.
    """
    from certaudit.data import load_dataset
    from certaudit.defenses.interval import IntervalDefense, specification
    from certaudit.results import RowWriter, read_rows

    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    model, dataset, name = _load_model(args.model, dev)
    x, y = load_dataset(args.dataset or dataset, args.split)
    stop = len(y) if not args.limit else min(len(y), args.skip + args.limit)
    wanted = list(range(args.skip, stop))
    methods = [m for m in args.methods.split(",") if m]
    if args.oracle:
        mean, std = model[0].mean, model[0].std
        if bool((mean != 0).any()) or bool((std != 1).any()):
            raise SystemExit("the oracle comparison needs a model without normalization")
        methods.append("oracle")
    defenses = {m: IntervalDefense(model, 10, m, batch_size=args.batch) for m in methods if m != "oracle"}
    config = {"bench": "interval-verify", "model": name, "dataset": args.dataset or dataset, "split": args.split,
              "eps": args.eps, "methods": methods}
    writer = RowWriter(args.out, config) if args.out else None
    done = writer.done() if writer else set()
    todo = [i for i in wanted if i not in done]
    rows: list[dict] = []
    t_start = time.perf_counter()
    try:
        for a in range(0, len(todo), args.batch):
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                print(f"time limit reached: {len(todo) - a} images left; rerun with the same --out to resume",
                      file=sys.stderr, flush=True)
                break
            idx = todo[a:a + args.batch]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            with torch.no_grad():
                pred = model(xb).argmax(1)
            chunk = [{"index": i, "label": int(yb[j]), "prediction": int(pred[j])} for j, i in enumerate(idx)]
            for m in methods:
                t0 = time.perf_counter()
                if m == "oracle":
                    from convex_adversarial import DualNetwork

                    with torch.no_grad():
                        c, _ = specification(pred, 10, xb.dtype)
                        low = torch.cat([DualNetwork(model[1:], xb[k:k + 50], args.eps, bounded_input=False)(c[k:k + 50])
                                         for k in range(0, len(idx), 50)]).double()
                else:
                    low = defenses[m].bounds(xb, args.eps, target=pred).min(1).values
                low = low.min(1).values if low.dim() == 2 else low
                dt = (time.perf_counter() - t0) / len(idx)
                for j, r in enumerate(chunk):
                    r[f"margin_{m}"] = float(low[j])
                    r[f"verified_{m}"] = bool(low[j] > 0) and r["prediction"] == r["label"]
                    r[f"seconds_{m}"] = dt
            for r in chunk:
                r["load_average"] = os.getloadavg()[0]
            if writer:
                writer.write_many(chunk)
            rows.extend(chunk)
            print(f"{a + len(idx)}/{len(todo)} images", file=sys.stderr, flush=True)
    finally:
        if writer:
            writer.close()
    if args.out:
        _, rows = read_rows(args.out)
        keep = set(wanted)
        rows = [r for r in rows if r.get("index") in keep]
    out = summarize_verify(rows, methods)
    out.update({"model": name, "dataset": args.dataset or dataset, "split": args.split, "eps": args.eps,
                "images_wanted": len(wanted), "device": str(dev), "threads": torch.get_num_threads()})
    print(json.dumps(out, indent=1))
    return out


def summarize_verify(rows: list[dict], methods: list[str]) -> dict:
    """Clean and verified error (a verified image is correct and certified) over the rows."""
    n = len(rows)
    out: dict = {"images": n}
    if not n:
        return out
    out["clean_error"] = 1 - sum(r["prediction"] == r["label"] for r in rows) / n
    for m in methods:
        have = [r for r in rows if f"verified_{m}" in r]
        if have:
            out[m] = {"images": len(have), "verified_error": 1 - sum(r[f"verified_{m}"] for r in have) / len(have),
                      "seconds_per_image": sum(r[f"seconds_{m}"] for r in have) / len(have)}
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
    v.add_argument("--limit", type=int, default=None)
    v.add_argument("--skip", type=int, default=0)
    v.add_argument("--out", default=None, help="rows file (.jsonl), written per chunk; rerun to resume")
    v.add_argument("--time-limit", type=float, default=None, help="stop (cleanly, resumable) after this many seconds")
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
