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

With ``--soundness N`` (a checkpoint needed), N evenly spaced test images of the model's data set
are certified and attacked by ℓ2 PGD (``--steps``, ``--restarts``) on the best-rival margin inside
their certified radius (label flips must be 0) and inside 2x and 4x it (how tight the bound is).
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
    ap.add_argument("--soundness", type=int, default=0, help="attack N certified test images (needs --model)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--data-root")
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
    if args.soundness and args.model:
        out["soundness"] = _soundness(net, defense, meta, args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in rows:
        extra = {k: (round(v, 9 if "over" in k else 6) if isinstance(v, float) else v) for k, v in r.items() if k not in ("layer", "kind", "in_shape")}
        print(f"{r['layer']:>4} {r['kind']:<6} {str(tuple(r['in_shape'])):<14} {extra}")
    print(f"L = {out['penultimate_lipschitz']:.6g}; certify {out['certify_images_per_s']:.4g} img/s, forward "
          f"{out['forward_images_per_s']:.4g} img/s, certify/forward time {out['certify_over_forward_time']:.2f}")
    if "soundness" in out:
        print("soundness:", out["soundness"])


def _soundness(net, defense, meta, args) -> dict:
    """PGD inside the certified radius (must never flip) and inside 2x and 4x it."""
    import math

    from certaudit.attacks.pgd import pgd
    from certaudit.data import load_dataset

    x, y = load_dataset(meta.dataset, "test", args.data_root)
    idx = torch.linspace(0, len(y) - 1, args.soundness).long()  # evenly spaced: the files may be sorted
    x = x[idx]
    cert = defense.certify(x)
    keep = cert.label >= 0
    xs, lab, rad = x[keep], cert.label[keep], cert.radius[keep].float()

    def loss(xx, i):
        f = net(xx)
        return f.scatter(1, lab[i].view(-1, 1), -math.inf).amax(1) - f.gather(1, lab[i].view(-1, 1)).squeeze(1)

    res = {"images": len(idx), "certified": int(keep.sum()), "steps": args.steps, "restarts": args.restarts}
    t0 = time.perf_counter()
    for mult in (1.0, 2.0, 4.0):
        r = pgd(loss, xs, rad * mult, "l2", steps=args.steps, restarts=args.restarts, seed=0)
        with torch.no_grad():
            flips = int((net(r.x).argmax(1) != lab).sum())
        res[f"flips_at_{mult:g}x_radius"] = flips
    res["attack_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _median(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
