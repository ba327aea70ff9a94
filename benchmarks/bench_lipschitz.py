"""Lipschitz bounds: tightness against the exact norm, power iteration's under-estimate, certify speed.

For every Conv2d / Linear layer of a model (a certaudit checkpoint, or a freshly initialised 2C2F on
1×28×28), measured in one run:

* the exact spectral norm (SVD of the dense operator, for layers whose input has at most
  ``--dense-limit`` dimensions), the certified bound and their ratio (≥ 1, and ≤ 1.01 is the goal);
* power iteration after 10 and 50 steps from a random start, as a fraction of the exact norm
  (below 1: why it can drive training but never a certificate);
* the time to compute the certified bound;

and the certify throughput (images/s) of ``LipschitzDefense.certify`` (bounds cached) in its two
arithmetics — ``fast`` (float32 with a proven rounding bound, float64 only where the bound cannot
settle a decision; the default) and ``float64`` (the reference, every image in float64) — against
the plain float32 forward pass of the same model on the same images and batch (the hardware limit).
The three are timed in turn on each batch, ``--repeats`` rounds, and the fastest time of each
method on each batch is kept (shared CPUs drift), in wall-clock time and in the process's CPU
time (what the work costs when other jobs preempt it; with one thread the two agree on an idle
machine); printed with the ratios and the fraction of images that needed the measured layer
residuals (tier 2) or the float64 reference::

    PYTHONPATH=src python benchmarks/bench_lipschitz.py --model runs/gloro/fmnist_2c2f_eps0.3.safetensors
    PYTHONPATH=src python benchmarks/bench_lipschitz.py --arch 6c2f --shape 3,32,32 --dense-limit 0

With a checkpoint the images are its data set's test images (``--images``, default 4096), else
uniform noise. ``--same-decisions`` certifies the whole test split with both arithmetics (checks
at ε and 2ε, ε from ``--eps`` or the checkpoint) and compares labels, checks, the verdict at every
decision radius, the summary tables and the radii. ``--no-layers`` skips the layer table.

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
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer bound table")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--images", type=int, default=4096, help="images timed per measurement")
    ap.add_argument("--repeats", type=int, default=15, help="rounds of (forward, fast, float64) per batch, fastest kept")
    ap.add_argument("--eps", type=float, help="defense radius (default: the checkpoint's GloRo ε, else 0.3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--same-decisions", action="store_true", help="compare both arithmetics on the full test split")
    ap.add_argument("--soundness", type=int, default=0, help="attack N certified test images (needs --model)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--data-root")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from certaudit.defenses.lipschitz import LipschitzDefense
    from certaudit.models import build_model, load_checkpoint

    meta = None
    if args.model:
        net, meta = load_checkpoint(args.model)
        shape, classes = tuple(meta.input_shape), meta.num_classes
    else:
        shape, classes = tuple(int(s) for s in args.shape.split(",")), 10
        torch.manual_seed(0)
        net = build_model(args.arch, shape, classes)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    eps = args.eps or (getattr(meta, "eps", None) if getattr(meta, "method", None) == "gloro" else None) or 0.3
    rows = [] if args.no_layers else _layer_rows(net, shape, classes, args.dense_limit)
    fast = LipschitzDefense(net, classes, eps, input_shape=shape, batch_size=args.batch)
    ref = LipschitzDefense(net, classes, eps, input_shape=shape, batch_size=args.batch, arithmetic="float64")
    x = _images(meta, shape, args)
    out = {"layers": rows, "penultimate_lipschitz": fast.lipschitz_constants().penultimate, "eps": eps,
           "threads": args.threads, "batch": args.batch, "images": len(x), **_throughput(net, fast, ref, x, args)}
    if args.same_decisions and meta is not None:
        out["same_decisions"] = _same_decisions(fast, ref, meta, eps, args)
    if args.soundness and args.model:
        out["soundness"] = _soundness(net, fast, meta, args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in rows:
        extra = {k: (round(v, 9 if "over" in k else 6) if isinstance(v, float) else v) for k, v in r.items() if k not in ("layer", "kind", "in_shape")}
        print(f"{r['layer']:>4} {r['kind']:<6} {str(tuple(r['in_shape'])):<14} {extra}")
    print(f"L = {out['penultimate_lipschitz']:.6g}; {len(x)} images, batch {args.batch}, {args.threads} thread(s), "
          f"fastest of {args.repeats} per batch")
    print(f"  forward (float32)        {out['forward_images_per_s']:>10.1f} img/s")
    print(f"  certify fast (float32)   {out['certify_images_per_s']:>10.1f} img/s   {out['certify_over_forward']:.3f} of forward")
    print(f"  certify float64 (before) {out['float64_images_per_s']:>10.1f} img/s   {out['float64_over_forward']:.3f} of forward")
    print(f"  fast / float64           {out['fast_over_float64']:.2f}x")
    print(f"  CPU time (process, fastest): fast {out['cpu_certify_over_forward']:.3f} of forward, "
          f"float64 {out['cpu_float64_over_forward']:.3f} of forward")
    print(f"  residuals measured (tier 2) {out['fraction_residuals']:.4f}; re-evaluated in float64 "
          f"{out['fraction_float64']:.4f} (decision radii {out['decision_radii']})")
    for key in ("same_decisions", "soundness"):
        if key in out:
            print(f"{key}:", json.dumps(out[key], indent=1))


def _layer_rows(net, shape, classes, dense_limit) -> list[dict]:
    """Per Conv2d / Linear layer: certified bound, exact norm (dense SVD), power-iteration estimates."""
    from certaudit.defenses.lipschitz.bounds import ConvOperator, conv_bound, linear_bound, power_iteration
    from certaudit.defenses.lipschitz.network import walk

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
            apply, adjoint, n_in = (lambda v, w64=w64: v @ w64.T), (lambda u, w64=w64: u @ w64), w.shape[1]
        seconds = time.perf_counter() - t0
        row = {"layer": layer.name, "kind": layer.kind, "in_shape": list(layer.in_shape), "bound": bound,
               "method": info.get("method"), "bound_seconds": round(seconds, 3)}
        exact = None
        if n_in <= dense_limit:
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
    return rows


def _images(meta, shape, args) -> torch.Tensor:
    if meta is not None:
        from certaudit.data import load_dataset

        x, _ = load_dataset(meta.dataset, "test", args.data_root)
        return x[:args.images]
    return torch.rand(args.images, *shape, generator=torch.Generator().manual_seed(2))


def _throughput(net, fast, ref, x, args) -> dict:
    """Forward, fast certify and float64 certify, batch by batch and in turn (forward, fast, float64 on
    the same batch, ``--repeats`` rounds); per method the fastest time of each batch, summed: short
    measurements alternated are what survives other jobs on a shared CPU."""
    batches = [x[a:a + args.batch] for a in range(0, len(x), args.batch)]
    methods = (("forward", net), ("fast", fast.certify), ("float64", ref.certify))
    with torch.no_grad():
        for _, fn in methods:  # bounds, the float32 plan and oneDNN's kernels, built once
            fn(batches[0])
        fast.counts.update(images=0, residuals=0, float64=0)
        best = {(clock, name): [float("inf")] * len(batches) for clock in ("wall", "cpu") for name, _ in methods}
        for _ in range(args.repeats):
            for i, xb in enumerate(batches):
                for name, fn in methods:
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn(xb)
                    w1, c1 = time.perf_counter(), time.process_time()
                    best["wall", name][i] = min(best["wall", name][i], w1 - w0)
                    best["cpu", name][i] = min(best["cpu", name][i], c1 - c0)
    t = {key: sum(v) for key, v in best.items()}
    n, c = len(x), fast.counts
    return {"forward_images_per_s": n / t["wall", "forward"], "certify_images_per_s": n / t["wall", "fast"],
            "float64_images_per_s": n / t["wall", "float64"],
            "certify_over_forward": t["wall", "forward"] / t["wall", "fast"],
            "float64_over_forward": t["wall", "forward"] / t["wall", "float64"],
            "fast_over_float64": t["wall", "float64"] / t["wall", "fast"],
            "cpu_certify_over_forward": t["cpu", "forward"] / t["cpu", "fast"],
            "cpu_float64_over_forward": t["cpu", "forward"] / t["cpu", "float64"],
            "fraction_residuals": c["residuals"] / c["images"], "fraction_float64": c["float64"] / c["images"],
            "decision_radii": list(fast._decision_radii(()))}


def _same_decisions(fast, ref, meta, eps, args) -> dict:
    """Both arithmetics on the whole test split: labels, checks, verdicts at the decision radii,
    the summary (tables at the default radii, VRA, rejection), the FPR curve, and the radii."""
    from certaudit.audits.certified import default_radii, summarize
    from certaudit.audits.degradation_summary import default_curve_radii, fpr_curve
    from certaudit.data import load_dataset

    x, y = load_dataset(meta.dataset, "test", args.data_root)
    radii = [eps, 2 * eps]
    fast.counts.update(images=0, residuals=0, float64=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        cf = fast.certify_checks(x, radii)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        cr = ref.certify_checks(x, radii)
        t_ref = time.perf_counter() - t0
    verdicts = {repr(t): int(((cf.radius >= t) != (cr.radius >= t)).sum()) for t in fast._decision_radii(radii)}
    rows = {}
    for name, c in (("fast", cf), ("float64", cr)):
        rows[name] = [{"label": int(y[i]), "prediction": int(c.label[i]), "radius": float(c.radius[i]),
                       "certified_at": {k: bool(v[i]) for k, v in c.checks.items()}} for i in range(len(y))]
    table = sorted(set(default_radii("l2")) | {0.0, eps / 2, eps, 2 * eps})
    sums = {k: summarize(r, table, eps=eps) for k, r in rows.items()}
    drop = ("median_radius_correct", "mean_radius_certified")  # radius statistics: R_lo where not re-evaluated
    same_summary = [{k: v for k, v in s.items() if k not in drop} for s in sums.values()]
    curve = sorted(set(default_curve_radii(rows["float64"], 40)) | {eps, 2 * eps})
    cert = cr.label >= 0
    gap = ((cr.radius - cf.radius) / cr.radius.clamp_min(1e-300))[cert]
    return {"images": len(y), "eps": eps, "label_mismatches": int((cf.label != cr.label).sum()),
            "check_mismatches": {k: int((cf.checks[k] != cr.checks[k]).sum()) for k in cr.checks},
            "verdict_mismatches_at_decision_radii": verdicts,
            "summary_identical_except_radius_stats": same_summary[0] == same_summary[1],
            "fpr_curve_identical_on_reference_grid": fpr_curve(rows["fast"], curve) == fpr_curve(rows["float64"], curve),
            "radius_never_above_reference": bool((cf.radius <= cr.radius).all()),
            "identical_radii": int((cf.radius == cr.radius).sum()),
            "radius_relative_gap_median": float(gap.median()), "radius_relative_gap_max": float(gap.max()),
            "mean_radius_certified": [sums["fast"]["mean_radius_certified"], sums["float64"]["mean_radius_certified"]],
            "median_radius_correct": [sums["fast"]["median_radius_correct"], sums["float64"]["median_radius_correct"]],
            "vra_eps": sums["fast"]["vra_eps"], "vra_2eps": sums["fast"]["vra_2eps"],
            "clean_accuracy": sums["fast"]["clean_accuracy"], "abstain_rate": sums["fast"]["abstain_rate"],
            "fraction_residuals": fast.counts["residuals"] / len(y), "fraction_float64": fast.counts["float64"] / len(y),
            "seconds_fast": round(t_fast, 2), "seconds_float64": round(t_ref, 2)}


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


if __name__ == "__main__":
    main()
