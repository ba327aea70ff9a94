"""Interval / CROWN bounds: speed and memory against auto_LiRPA and convex_adversarial; verified error.

Two modes:

``speed`` (default) -- time, peak extra memory and verified images for IBP, CROWN-IBP and CROWN at
batch 256 (ε = 0.1, margin specification y − j on the first test images; random images when the
data set is missing), ours against

* auto_LiRPA 0.7.1 (``alirpa:ibp``, ``alirpa:crown-ibp``, ``alirpa:crown``: the reference
  implementation of these bounds; skipped with a message where it does not import; install: see
  ``benchmarks/README.md``; ``--alirpa-path`` is added to its ``PYTHONPATH``);
* ``real:ibp``, ``real:crown-ibp``, ``real:crown``: ours for the real-arithmetic network (auto_LiRPA's
  claim; ``spec_bounds_real``: the float32-sound bound, the images it may leave undecided by its own
  rounding redone in float64), where ``ours:`` bounds the float32 forward pass as well;
* convex_adversarial 0.4.4 (``oracle:kw``: Wong & Kolter's dual bound, the same linear relaxation as
  our ``crown`` with ``pure=True, lower_slope="parallel"``, shown as ``ours:crown-kw``).

Every measurement runs in a fresh subprocess, so its peak resident memory (CPU; on CUDA
``max_memory_allocated``) is its own; ``--rounds`` runs every case that many times, in turn (shared
CPUs drift), and keeps the fastest repeat of each::

    PYTHONPATH=src python benchmarks/bench_interval.py speed --threads 1 --rounds 3
    PYTHONPATH=src python benchmarks/bench_interval.py speed --model ../shared/models/kw/cifar_small_8px.pth

``verify`` -- clean and verified error of a model over a data set split (the must-show numbers); a
method ``real:<m>`` bounds the real-arithmetic network (``spec_bounds_real``: the claim of auto_LiRPA and
of the papers' verified errors) instead of the deployed float32 one, ``alirpa:<m>`` is auto_LiRPA's::

    PYTHONPATH=src python benchmarks/bench_interval.py verify \\
        --model ../shared/models/kw/fashion_mnist.pth --eps 0.1 --methods ibp,crown-ibp,crown --oracle \\
        --out runs/interval/kw_fmnist_verify.jsonl --time-limit 1500    # rerun to resume

``alpha`` -- α-CROWN: verified images and seconds of our ``alpha-crown`` against auto_LiRPA's
``CROWN-Optimized`` at equal iterations, both in one process (see :func:`alpha`)::

    PYTHONPATH=src python benchmarks/bench_interval.py alpha --limit 200 --iters 20 --threads 1 --crown

``--model`` is a Wong & Kolter ``.pth`` (converted with ``convert_kw``) or a certaudit checkpoint.
A "bound" is one image's K − 1 = 9 margin lower bounds; verified = all nine > 0.
"""

from __future__ import annotations

import argparse
import importlib
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
DATA_ROOTS = {"cifar10": SHARED / "data" / "cifar10-jpeg"}
ALIRPA_PATH = Path.home() / ".cache" / "alirpa" / "site"
METHODS = ("ibp", "crown-ibp", "crown")
CASES = tuple(f"ours:{m}" for m in METHODS) + tuple(f"real:{m}" for m in METHODS) + tuple(f"alirpa:{m}" for m in METHODS) \
    + ("ours:crown-kw", "oracle:kw")
ALIRPA_METHOD = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}


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
    from certaudit.data import dataset_info, load_dataset
    from certaudit.errors import DataNotFoundError

    root = DATA_ROOTS.get(dataset)
    try:
        x, y = load_dataset(dataset, split, root=root if root is not None and root.is_dir() else None, download=False)
        return x[:n], y[:n], True
    except DataNotFoundError:
        info = dataset_info(dataset)
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, *info.shape, generator=g), torch.randint(0, info.num_classes, (n,), generator=g), False


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _alirpa_bound(model, x, eps: float, method: str):
    """auto_LiRPA's lower bounds of ``C f`` over the clipped box, as a function ``(x, C) -> (B, S)``."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    from torch import nn

    class Norm4(nn.Module):  # our Normalize with (1, C, 1, 1) statistics, the shape auto_LiRPA's CROWN expects
        def __init__(self, norm):
            super().__init__()
            self.register_buffer("mean", norm.mean.reshape(1, -1, 1, 1).clone())
            self.register_buffer("std", norm.std.reshape(1, -1, 1, 1).clone())

        def forward(self, z):
            return (z - self.mean) / self.std

    body = nn.Sequential(Norm4(model[0]), *model[1:])
    lirpa = BoundedModule(body, torch.zeros(1, *x.shape[1:], device=x.device), device=x.device.type, verbose=0)

    def bound(xb, c):
        box = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(xb - eps).clamp(0, 1), x_U=(xb + eps).clamp(0, 1))
        low, _ = lirpa.compute_bounds(x=(BoundedTensor(xb, box),), C=c, method=ALIRPA_METHOD[method], bound_upper=False)
        return low

    return bound


def _bound_fn(case: str, net, model, x, eps: float):
    """``f(x, y) -> lower bounds`` of the case's margins (B, K−1 or K)."""
    from certaudit.defenses.interval import margin_bounds, spec_bounds, specification

    who, what = case.split(":")
    k = net.num_classes
    if who == "alirpa":
        bound = _alirpa_bound(model, x, eps, what)
        return lambda xb, yb: bound(xb, specification(yb, k, xb.dtype)[0])
    if who == "oracle":
        from convex_adversarial import DualNetwork

        return lambda xb, yb: DualNetwork(model[1:], xb, eps, bounded_input=True)(specification(yb, k, xb.dtype)[0])
    if who == "real":  # the real-arithmetic network (auto_LiRPA's claim), rigorously: spec_bounds_real
        from certaudit.defenses.interval.bounds import compile_network64, spec_bounds_real

        net64 = compile_network64(model, x.shape[1:])
        c1 = specification(torch.zeros(1, dtype=torch.long, device=x.device), k, torch.float64)[0]
        spec_bounds(net64, x[:1].double(), eps, c1, what)  # warm-up of the float64 kernels too
        return lambda xb, yb: spec_bounds_real(net, net64, xb, eps, specification(yb, k, xb.dtype)[0], what)[0]
    if what == "crown-kw":
        return lambda xb, yb: spec_bounds(net, xb, eps, specification(yb, k, xb.dtype)[0], "crown", pure=True,
                                          lower_slope="parallel")
    return lambda xb, yb: margin_bounds(net, xb, eps, yb, what)


def run_one(case: str, batch: int, device: str, eps: float | None, reps: int, model_path: str | None = None) -> dict:
    """One measurement in this process (called in a subprocess by :func:`speed`)."""
    from certaudit.defenses.interval import compile_network

    warnings.filterwarnings("ignore")
    dev = torch.device(device)
    model, dataset, name = _load_model(model_path, dev)
    x, y, real = _images(dataset, batch)
    x, y = x.to(dev), y.to(dev)
    eps = _default_eps(name) if eps is None else eps
    net = compile_network(model, x.shape[1:])
    with torch.no_grad():
        fn = _bound_fn(case, net, model, x, eps)
        fn(x[:4], y[:4])  # warm-up (allocators, kernels)
        base = _rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base_gpu = torch.cuda.memory_allocated(dev)
        times, cpu = [], []
        for _ in range(reps):
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            low = fn(x, y)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    best = min(times)
    low = low.double()
    out = {"case": case, "batch": batch, "device": str(dev), "model": name, "real_images": real, "eps": eps,
           "seconds": best, "cpu_seconds": min(cpu), "images_per_s": batch / best, "bounds_per_s": batch * 9 / best,
           "verified_in_batch": int(((low.min(1).values if low.dim() == 2 else low) > 0).sum()),
           "peak_extra_mb": _rss_mb() - base, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated(dev) - base_gpu) / 2**20
    return out


def _default_eps(name: str) -> float:
    from certaudit.defenses.interval.kw import REPORTED

    return float(REPORTED.get(name, {}).get("eps", 0.1))


def _available(case: str, env: dict) -> str | None:
    """Why a case cannot run here (its library does not import), or None."""
    module = {"alirpa": "auto_LiRPA", "oracle": "convex_adversarial"}.get(case.split(":")[0])
    if module is None:
        return None
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env)
    if res.returncode == 0:
        return None
    hint = " (install: benchmarks/README.md)" if module == "auto_LiRPA" else ""
    return f"{module} does not import{hint}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}"


def speed(args) -> list[dict]:
    extra = [str(ROOT / "src")] + ([args.alirpa_path] if args.alirpa_path and Path(args.alirpa_path).is_dir() else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(extra + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cases = []
    for case in args.cases.split(","):
        why = _available(case, env)
        if why:
            print(f"{case}: skipped, {why}", file=sys.stderr)
        else:
            cases.append(case)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for case in cases:
            slow = "crown" in case and "ibp" not in case or "kw" in case
            reps = max(1, args.reps // 3) if slow else args.reps
            cmd = [sys.executable, __file__, "_one", case, "--batch", str(args.batch), "--device", args.device,
                   "--reps", str(reps)] + (["--eps", str(args.eps)] if args.eps is not None else []) \
                + (["--threads", str(args.threads)] if args.threads else []) \
                + (["--model", args.model] if args.model else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(f"{case} failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            old = best.get(case)
            if old is None or row["seconds"] < old["seconds"]:
                row["cpu_seconds"] = min(row["cpu_seconds"], old["cpu_seconds"]) if old else row["cpu_seconds"]
                row["peak_extra_mb"] = max(row["peak_extra_mb"], old["peak_extra_mb"]) if old else row["peak_extra_mb"]
                best[case] = row
            else:
                old["cpu_seconds"] = min(old["cpu_seconds"], row["cpu_seconds"])
                old["peak_extra_mb"] = max(old["peak_extra_mb"], row["peak_extra_mb"])
    rows = [best[c] for c in cases]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        _print_speed(rows, args)
    return rows


def _print_speed(rows: list[dict], args) -> None:
    head = rows[0]
    print(f"model {head['model']}, batch {args.batch}, eps {head['eps']:.4g}, device {head['device']}, "
          f"{head['threads']} threads, {args.rounds} round(s), "
          f"{'test images' if head['real_images'] else 'random images'}; time: fastest repeat (wall, CPU)")
    print(f"{'case':16} {'s/batch':>9} {'CPU s':>8} {'images/s':>9} {'peak MB':>8} {'verified':>8}")
    for r in rows:
        print(f"{r['case']:16} {r['seconds']:9.3f} {r['cpu_seconds']:8.3f} {r['images_per_s']:9.1f} "
              f"{r['peak_extra_mb']:8.0f} {r['verified_in_batch']:8d}")
    by = {r["case"]: r for r in rows}
    pairs = [(m, by.get(f"ours:{m}"), by.get(f"alirpa:{m}")) for m in METHODS]
    pairs += [(f"{m} (real)", by.get(f"real:{m}"), by.get(f"alirpa:{m}")) for m in METHODS]
    pairs += [("crown-kw", by.get("ours:crown-kw"), by.get("oracle:kw"))]
    pairs = [(m, o, t) for m, o, t in pairs if o and t]
    if pairs:
        print(f"\n{'method':16} {'speed (theirs/ours)':>20} {'CPU ratio':>10} {'memory (ours/theirs)':>21} {'verified':>10}")
        for m, o, t in pairs:
            mem = f"{o['peak_extra_mb'] / t['peak_extra_mb']:.2f}x" if t["peak_extra_mb"] >= 1 else "- (theirs < 1 MB)"
            print(f"{m:16} {t['seconds'] / o['seconds']:19.2f}x {t['cpu_seconds'] / o['cpu_seconds']:9.2f}x "
                  f"{mem:>21} {o['verified_in_batch']:>4d} / {t['verified_in_batch']:<4d}")


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
    for m in methods:
        who, _, what = m.rpartition(":")
        if who not in ("", "real", "alirpa") or what not in METHODS:
            raise SystemExit(f"unknown method {m!r}: use {', '.join(METHODS)}, or real:/alirpa: before one")
        if who == "alirpa":
            if args.alirpa_path and args.alirpa_path not in sys.path:
                sys.path.append(args.alirpa_path)
            try:
                importlib.import_module("auto_LiRPA")
            except Exception as exc:  # noqa: BLE001 -- any import failure: say so in one line
                raise SystemExit(f"{m}: auto_LiRPA does not import ({type(exc).__name__}); see benchmarks/README.md")
    if args.oracle:
        mean, std = model[0].mean, model[0].std
        if bool((mean != 0).any()) or bool((std != 1).any()):
            raise SystemExit("the oracle comparison needs a model without normalization")
        methods.append("oracle")
    defenses = {m: IntervalDefense(model, 10, m, batch_size=args.batch) for m in methods
                if m != "oracle" and ":" not in m}
    theirs: dict = {}
    if any(m.startswith("real:") for m in methods):  # the real-arithmetic network's claim (auto_LiRPA's)
        from certaudit.defenses.interval.bounds import compile_network, compile_network64

        nets = (compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:]))
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
                elif m.startswith("alirpa:"):  # auto_LiRPA 0.7.1 (plain float32, the real network's claim)
                    if m not in theirs:
                        theirs[m] = _alirpa_bound(model, xb, args.eps, m.split(":", 1)[1])
                    with torch.no_grad():
                        c, _ = specification(pred, 10, xb.dtype)
                        low = theirs[m](xb, c).double()
                elif m.startswith("real:"):
                    from certaudit.defenses.interval.bounds import spec_bounds_real

                    with torch.no_grad():
                        c, _ = specification(pred, 10, xb.dtype)
                        low = spec_bounds_real(*nets, xb, args.eps, c, m.split(":", 1)[1])[0]
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


# ------------------------------------------------------------------ alpha: α-CROWN vs CROWN-Optimized

def _alirpa_optimized(model, x, eps: float, iters: int, lr: float):
    """auto_LiRPA's ``CROWN-Optimized`` (α-CROWN) lower bounds as ``(x, C) -> (B, S)``, ``iters`` iterations."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    from torch import nn

    norm = model[0]
    if bool((norm.mean != 0).any()) or bool((norm.std != 1).any()):
        raise SystemExit("the alpha mode compares models without normalization (such as Wong & Kolter's)")
    opts = {"optimize_bound_args": {"iteration": iters, "lr_alpha": lr}, "verbosity": 0}
    lirpa = BoundedModule(nn.Sequential(*model[1:]), torch.zeros(1, *x.shape[1:]), bound_opts=opts, verbose=0)

    def bound(xb, c):
        box = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(xb - eps).clamp(0, 1), x_U=(xb + eps).clamp(0, 1))
        low, _ = lirpa.compute_bounds(x=(BoundedTensor(xb, box),), C=c, method="CROWN-Optimized", bound_upper=False)
        return low.detach()

    return bound


def alpha(args) -> dict:
    """Verified images and seconds of our ``alpha-crown`` against auto_LiRPA's ``CROWN-Optimized`` at
    the same iterations and learning rate, chunk by chunk in one process (the two alternate, so a
    shared CPU's drift hits both alike); ``--crown`` adds our CROWN for reference. Verified: correct and
    all nine margin bounds > 0 (of the prediction). Ours are sound bounds, auto_LiRPA's plain float32."""
    from certaudit.data import load_dataset
    from certaudit.defenses.interval import compile_network, spec_bounds, specification

    warnings.filterwarnings("ignore")
    if args.alirpa_path and args.alirpa_path not in sys.path:
        sys.path.append(args.alirpa_path)
    model, dataset, name = _load_model(args.model, torch.device("cpu"))
    x, y = load_dataset(dataset, "test")
    x, y = x[args.skip:args.skip + args.limit], y[args.skip:args.skip + args.limit]
    net = compile_network(model, x.shape[1:])
    cases = (["ours:crown"] if args.crown else []) + ["ours:alpha-crown", "alirpa:CROWN-Optimized"]
    try:
        theirs = _alirpa_optimized(model, x, args.eps, args.iters, args.lr)
    except ImportError as exc:
        print(f"auto_LiRPA does not import ({exc}): only ours", file=sys.stderr)
        cases, theirs = cases[:-1], None
    seconds = {case: 0.0 for case in cases}
    verified = {case: 0 for case in cases}
    for a in range(0, len(y), args.batch):
        xb, yb = x[a:a + args.batch], y[a:a + args.batch]
        with torch.no_grad():
            pred = model(xb).argmax(1)
        c, _ = specification(pred, net.num_classes, xb.dtype)
        for case in cases:
            t0 = time.perf_counter()
            if case == "alirpa:CROWN-Optimized":
                low = theirs(xb, c)
            else:
                with torch.no_grad():
                    low = spec_bounds(net, xb, args.eps, c, case.split(":")[1],
                                      alpha={"iters": args.iters, "lr": args.lr})
            seconds[case] += time.perf_counter() - t0
            verified[case] += int(((low.min(1).values > 0) & (pred == yb)).sum())
        print(f"{a + len(yb)}/{len(y)} images: " + ", ".join(f"{k} {verified[k]}" for k in cases), file=sys.stderr,
              flush=True)
    out = {"model": name, "images": len(y), "skip": args.skip, "eps": args.eps, "iterations": args.iters,
           "lr": args.lr, "batch": args.batch, "threads": torch.get_num_threads(),
           "cases": {k: {"verified": verified[k], "seconds": round(seconds[k], 2)} for k in cases}}
    if args.json:
        print(json.dumps(out, indent=1))
        return out
    print(f"model {name}, first {len(y)} test images from {args.skip}, eps {args.eps}, {args.iters} iterations "
          f"(lr {args.lr}), batch {args.batch}, {out['threads']} threads, one process")
    print(f"{'case':24} {'verified':>8} {'seconds':>9}")
    for k in cases:
        print(f"{k:24} {verified[k]:8d} {seconds[k]:9.1f}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode")
    s = sub.add_parser("speed", help="bounds/s and peak memory, ours vs the oracle")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--device", default="cpu")
    s.add_argument("--eps", type=float, default=None, help="radius (default: the model's, 0.1 for Fashion-MNIST)")
    s.add_argument("--reps", type=int, default=3, help="repeats per process (a third of them for CROWN)")
    s.add_argument("--rounds", type=int, default=1, help="processes per case, run in turn; the fastest counts")
    s.add_argument("--cases", default=",".join(CASES))
    s.add_argument("--model", default=None, help="Wong & Kolter .pth or certaudit checkpoint (default: KW FMNIST)")
    s.add_argument("--alirpa-path", default=str(ALIRPA_PATH), help="directory holding auto_LiRPA (added to PYTHONPATH)")
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
    v.add_argument("--alirpa-path", default=str(ALIRPA_PATH), help="directory holding auto_LiRPA (alirpa: methods)")
    al = sub.add_parser("alpha", help="α-CROWN: ours vs auto_LiRPA's CROWN-Optimized, verified count and time")
    al.add_argument("--model", default=None, help="Wong & Kolter .pth or certaudit checkpoint (default: KW FMNIST)")
    al.add_argument("--eps", type=float, default=0.1)
    al.add_argument("--limit", type=int, default=200)
    al.add_argument("--skip", type=int, default=0)
    al.add_argument("--iters", type=int, default=20, help="bound evaluations (auto_LiRPA's iteration)")
    al.add_argument("--lr", type=float, default=0.5, help="Adam learning rate of the slopes (both)")
    al.add_argument("--batch", type=int, default=50)
    al.add_argument("--crown", action="store_true", help="also our CROWN")
    al.add_argument("--alirpa-path", default=str(ALIRPA_PATH), help="directory holding auto_LiRPA")
    al.add_argument("--json", action="store_true")
    one = sub.add_parser("_one")
    one.add_argument("case")
    one.add_argument("--batch", type=int, default=256)
    one.add_argument("--device", default="cpu")
    one.add_argument("--eps", type=float, default=None)
    one.add_argument("--reps", type=int, default=3)
    one.add_argument("--model", default=None)
    for q in (s, v, one, al):
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.mode == "_one":
        print(json.dumps(run_one(args.case, args.batch, args.device, args.eps, args.reps, args.model)))
    elif args.mode == "verify":
        verify(args)
    elif args.mode == "alpha":
        alpha(args)
    else:
        if args.mode is None:
            args = p.parse_args(["speed", *(argv or sys.argv[1:])])
        speed(args)


if __name__ == "__main__":
    main()
