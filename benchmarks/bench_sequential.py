"""Sequential accept-at-ε against fixed-N CERTIFY on a trained model: evaluations, time, agreement.

For the first ``--images`` test images of the model's data set this measures, in one run:

* ``fixed``: Cohen et al.'s CERTIFY with ``n0`` + ``N`` samples per image (``N = 100,000``);
  accepted at ε iff its radius ≥ ε (rows in ``OUT/fixed.jsonl``, resumable);
* ``sequential``: :meth:`SmoothedClassifier.certify_at` at each ε (level α, budget N, the same
  n0 selection samples): base-model evaluations per image, wall time, decision agreement with
  fixed-N (rows in ``OUT/seq_eps{ε}.jsonl``);
* ``scaling`` (``--scaling``): ``certaudit certify`` launched by ``torchrun --nproc_per_node P``
  for P = 1, 2 on ``--scaling-images`` images with ``--scaling-n`` samples (gloo on CPU): wall
  time, and whether the merged rows are identical.

Runs (CPU, the recorded figures)::

    certaudit train --dataset fashion-mnist --arch 2c2f --method gaussian --sigma 0.25 --epochs 4 \\
        --out runs/sequential/fmnist_2c2f_g025.safetensors
    python benchmarks/bench_sequential.py --model runs/sequential/fmnist_2c2f_g025.safetensors \\
        --images 100 --eps 0.25,0.5 --alpha 0.001 --out runs/sequential/bench --scaling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from certaudit.data import load_dataset  # noqa: E402
from certaudit.defenses.base import ABSTAIN  # noqa: E402
from certaudit.defenses.sequential import DECISIONS  # noqa: E402
from certaudit.defenses.smoothing import SmoothedClassifier  # noqa: E402
from certaudit.models import load_checkpoint  # noqa: E402
from certaudit.results import RowWriter  # noqa: E402


def run_fixed(sc: SmoothedClassifier, x: torch.Tensor, out: Path, chunk: int) -> dict[int, dict]:
    """CERTIFY on every image (resumable rows); returns rows by index."""
    config = {"bench": "fixed", "settings": sc.settings(), "images": int(x.shape[0])}
    with RowWriter(out, config) as w:
        todo = [i for i in range(x.shape[0]) if i not in w.done()]
        for a in range(0, len(todo), chunk):
            idx = todo[a:a + chunk]
            t0 = time.perf_counter()
            cert = sc.certify(x[idx], indices=idx)
            sec = (time.perf_counter() - t0) / len(idx)
            w.write_many([{"index": i, "label": int(cert.label[b]), "radius": float(cert.radius[b]),
                           "samples": sc.n0 + sc.n, "seconds": sec} for b, i in enumerate(idx)])
            print(f"fixed: {len(w.done())}/{x.shape[0]} images, {sec:.2f} s/image", flush=True)
        return {r["index"]: r for r in w.rows}


def run_sequential(sc: SmoothedClassifier, x: torch.Tensor, eps: float, out: Path, chunk: int) -> dict[int, dict]:
    config = {"bench": "sequential", "eps": eps, "settings": sc.settings(), "images": int(x.shape[0])}
    with RowWriter(out, config) as w:
        todo = [i for i in range(x.shape[0]) if i not in w.done()]
        for a in range(0, len(todo), chunk):
            idx = todo[a:a + chunk]
            t0 = time.perf_counter()
            cert = sc.certify_at(x[idx], eps, indices=idx)
            sec = (time.perf_counter() - t0) / len(idx)
            w.write_many([{"index": i, "label": int(cert.label[b]), "samples": int(cert.extras["samples"][b]),
                           "decision": DECISIONS[int(cert.extras["decision"][b])], "seconds": sec}
                          for b, i in enumerate(idx)])
        return {r["index"]: r for r in w.rows}


def scaling(model: Path, images: int, n: int, out: Path) -> list[dict]:
    """``certaudit certify`` under torchrun with 1 and 2 processes (gloo, CPU): wall time, same rows."""
    res, rows_by_p = [], {}
    for procs in (1, 2):
        dest = out / f"scaling_p{procs}.jsonl"
        for f in out.glob(f"scaling_p{procs}.jsonl*"):
            f.unlink()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "certaudit", "--", "certify", "--model", str(model), "--defense", "smoothing", "--n0", "100",
               "--n", str(n), "--alpha", "0.001", "--device", "cpu", "--limit", str(images), "--chunk", "1",
               "--out", str(dest), "--json"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed ({procs} processes): {proc.stderr[-2000:]}")
        lines = dest.read_text().splitlines()[1:]
        rows = [{k: v for k, v in json.loads(s).items() if k != "seconds"} for s in lines]
        rows_by_p[procs] = rows
        res.append({"processes": procs, "wall_seconds": round(wall, 2), "images": len(rows),
                    "samples_per_second": round(len(rows) * (100 + n) / wall, 1)})
        print(json.dumps(res[-1]), flush=True)
    res.append({"identical_rows_1_vs_2": rows_by_p[1] == rows_by_p[2]})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--eps", default="0.25,0.5")
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--sigma", type=float, default=None, help="default: the checkpoint's training σ")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/sequential/bench"))
    ap.add_argument("--skip-fixed", action="store_true", help="only what is already in OUT/fixed.jsonl")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--scaling-images", type=int, default=8)
    ap.add_argument("--scaling-n", type=int, default=20_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    net, meta = load_checkpoint(args.model, torch.device("cpu"))
    sigma = args.sigma if args.sigma is not None else meta.sigma
    sc = SmoothedClassifier(net, meta.num_classes, sigma, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed,
                            input_shape=meta.input_shape)
    x, y = load_dataset(meta.dataset, "test")
    x = x[:args.images]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": str(args.model), "sigma": sigma, "alpha": args.alpha, "n0": args.n0, "n": args.n,
                    "images": args.images, "threads": torch.get_num_threads(), "eps": {}}
    if not args.skip_fixed:
        t0 = time.perf_counter()
        fixed = run_fixed(sc, x, args.out / "fixed.jsonl", chunk=2)
        report["fixed_wall_this_run"] = time.perf_counter() - t0
    else:
        from certaudit.results import read_rows

        fixed = {r["index"]: r for r in read_rows(args.out / "fixed.jsonl")[1]}
    idx = sorted(i for i in fixed if i < args.images)
    fixed_sec = float(np.mean([fixed[i]["seconds"] for i in idx]))
    report["fixed_seconds_per_image"] = fixed_sec
    report["fixed_evaluations_per_image"] = args.n0 + args.n
    for eps in (float(e) for e in args.eps.split(",")):
        t0 = time.perf_counter()
        seq = run_sequential(sc, x, eps, args.out / f"seq_eps{eps:g}.jsonl", chunk=args.images)
        wall = time.perf_counter() - t0
        f_acc = np.array([fixed[i]["label"] if fixed[i]["radius"] >= eps else ABSTAIN for i in idx])
        s_acc = np.array([seq[i]["label"] for i in idx])
        evals = np.array([seq[i]["samples"] for i in idx], dtype=np.float64)
        truth = np.asarray(y[idx])
        item = {
            "images": len(idx),
            "agreement": float(np.mean(f_acc == s_acc)),
            "disagreements": [int(i) for i, a, b in zip(idx, f_acc, s_acc) if a != b],
            "evaluations_per_image_mean": float(evals.mean()),
            "evaluations_per_image_median": float(np.median(evals)),
            "evaluations_per_image_max": float(evals.max()),
            "evaluation_ratio_fixed_over_sequential": (args.n0 + args.n) / float(evals.mean()),
            "seconds_per_image": float(np.mean([seq[i]["seconds"] for i in idx])),
            "wall_ratio_fixed_over_sequential": fixed_sec / float(np.mean([seq[i]["seconds"] for i in idx])),
            "certified_accuracy_fixed": float(np.mean(f_acc == truth)),
            "certified_accuracy_sequential": float(np.mean(s_acc == truth)),
            "decisions": {d: int(sum(seq[i]["decision"] == d for i in idx)) for d in DECISIONS.values()},
            "wall_this_run": wall,
        }
        report["eps"][f"{eps:g}"] = item
        print(json.dumps({f"eps={eps:g}": item}), flush=True)
    if args.scaling:
        report["scaling"] = scaling(args.model, args.scaling_images, args.scaling_n, args.out)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
