"""Lipschitz bounds: tightness against the exact norm, power iteration's under-estimate, certify speed.

For every Conv2d / Linear layer of a model (a certaudit checkpoint, or a freshly initialised 2C2F on
1×28×28), measured in one run:

* the exact spectral norm (SVD of the dense operator, for layers whose input has at most
  ``--dense-limit`` dimensions), the certified bound and their ratio (≥ 1, and ≤ 1.01 is the goal);
* power iteration after 10 and 50 steps from a random start, as a fraction of the exact norm
  (below 1: why it can drive training but never a certificate);
* the time to compute the certified bound;

and the certify throughput (images/s of ``LipschitzDefense.certify``, bounds cached) against the
raw forward pass of the same model on the same batch (the hardware limit)::

    PYTHONPATH=src python benchmarks/bench_lipschitz.py --model runs/gloro/fmnist_2c2f_eps0.3.safetensors
    PYTHONPATH=src python benchmarks/bench_lipschitz.py --arch 6c2f --shape 3,32,32 --dense-limit 0
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="certaudit checkpoint (default: a random model of --arch)")
    ap.add_argument("--arch", default="2c2f")
    ap.add_argument("--shape", default="1,28,28")
    ap.add_argument("--dense-limit", type=int, default=4096, help="largest input dimension for the dense SVD")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from certaudit.defenses.lipschitz import LipschitzDefense
    from certaudit.defenses.lipschitz.bounds import ConvOperator, conv_bound, linear_bound, power_iteration
    from certaudit.defenses.lipschitz.network import walk
    from certaudit.models import build_model, load_checkpoint

    if args.model:
        net, meta = load_checkpoint(args.model)
        shape, classes = tuple(meta.input_shape), meta.num_classes
    else:
        shape, classes = tuple(int(s) for s in args.shape.split(",")), 10
        torch.manual_seed(0)
        net = build_model(args.arch, shape, classes)
    net.eval()
    rows = []
    for layer in walk(net, shape, classes)[:-1]:
        if layer.kind not in ("conv", "linear"):
            continue
        w = layer.module.weight.detach()
        t0 = time.perf_counter()
        if layer.kind == "conv":
            bound, info = conv_bound(w, layer.geom)
            op = ConvOperator(w.double(), layer.geom)
            apply, adjoint, n_in = op.apply, op.adjoint, int(torch.tensor(layer.in_shape).prod())
        else:
            bound, info = linear_bound(w)
            w64 = w.double()
            apply, adjoint, n_in = (lambda v: v @ w64.T), (lambda u: u @ w64), w.shape[1]
        seconds = time.perf_counter() - t0
        row = {"layer": layer.name, "kind": layer.kind, "in_shape": list(layer.in_shape), "bound": bound,
               "method": info.get("method"), "bound_seconds": round(seconds, 3)}
        exact = None
        if n_in <= args.dense_limit:
            dense = op.dense() if layer.kind == "conv" else w.double()
            exact = float(torch.linalg.matrix_norm(dense, ord=2))
            row.update(exact=exact, bound_over_exact=bound / exact)
        elif "max_gap" in info:
            row["max_gap"] = info["max_gap"]
        ref = exact if exact is not None else bound
        gen = torch.Generator().manual_seed(1)
        v0 = torch.randn(1, *layer.in_shape, generator=gen, dtype=torch.float64)
        for iters in (10, 50):
            est, _ = power_iteration(apply, adjoint, v0, iters)
            row[f"power{iters}_over_{'exact' if exact is not None else 'bound'}"] = est / ref
        rows.append(row)

    defense = LipschitzDefense(net, classes, input_shape=shape, batch_size=args.batch)
    defense.lipschitz_constants()  # cached from here on
    x = torch.rand(args.batch, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        net(x)
        defense.certify(x)
        t_fwd = _median(lambda: net(x))
        t_cert = _median(lambda: defense.certify(x))
    out = {"layers": rows, "penultimate_lipschitz": defense.lipschitz_constants().penultimate,
           "forward_images_per_s": args.batch / t_fwd, "certify_images_per_s": args.batch / t_cert,
           "certify_over_forward_time": t_cert / t_fwd}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in rows:
        extra = {k: (round(v, 9 if "over" in k else 6) if isinstance(v, float) else v) for k, v in r.items() if k not in ("layer", "kind", "in_shape")}
        print(f"{r['layer']:>4} {r['kind']:<6} {str(tuple(r['in_shape'])):<14} {extra}")
    print(f"L = {out['penultimate_lipschitz']:.6g}; certify {out['certify_images_per_s']:.4g} img/s, forward "
          f"{out['forward_images_per_s']:.4g} img/s, certify/forward time {out['certify_over_forward_time']:.2f}")


def _median(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
