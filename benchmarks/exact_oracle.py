"""The exact degradability oracle (issue 18 item 3) next to the attack (lower) and the proof (upper).

For each model and each test image certified correct at ε, one row: the attack's verdict (lower:
degraded or not), the exact verdict of the MILP oracle (certaudit.verify.oracle), and the proof's
(upper: proven non-degradable or not); then the counts, the three FPRs and how many inputs each
bound gets right (agrees with the exact verdict).

Models (8×8 digits, ε as stated):
* ``gloro-eps`` / ``gloro-2eps``: the zoo's GloRo 2C2F models (conv 16 → conv 32 → dense 100;
  484 hidden ReLUs), Lipschitz defense at ε = 0.25 (ℓ2);
* ``mlp-ibp`` / ``mlp-crown``: a tiny MLP 64 → 16 → 16 → 10 (32 ReLUs, trained here: 200 full-batch
  Adam steps, seed 0), interval defense at ε = 0.006 (ℓ∞) with IBP (the oracle is exact) or
  CROWN (two-sided: undecided where neither sufficient condition holds).

Columns: ``slack`` is the smallest (value − threshold) the oracle saw at a point of the ball (a
witness when negative), ``bound`` a proven lower bound of the exact minimum's (value − threshold)
(``-inf`` where a witness ended the search, ``inf`` where the proof settled every rival); the threshold
is ε·K_{y,j} plus rounding (Lipschitz), twice the IBP rounding slack of the 2ε box (IBP, and the IBP
side of CROWN). ``decided by``: ``local search`` (a witness from the oracle's own PGD on the float64
network), ``milp-*`` (the MILP), ``screen`` (the defense's proof covered every rival).

    python benchmarks/exact_oracle.py --models gloro-eps,gloro-2eps --limit 120 --time-limit 120
    python benchmarks/exact_oracle.py --models mlp-ibp,mlp-crown --limit 360
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from certaudit import zoo
from certaudit.audits.degradation import degrade_batch
from certaudit.data import load_dataset
from certaudit.defenses.interval.defense import IntervalDefense
from certaudit.defenses.lipschitz import LipschitzDefense
from certaudit.models import load_checkpoint
from certaudit.verify.oracle import exact_degradable

MODELS = ("gloro-eps", "gloro-2eps", "mlp-ibp", "mlp-crown")


def tiny_mlp() -> nn.Module:
    x, y = load_dataset("digits", "train")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def build(name: str):
    """(defense, eps, images, labels)."""
    if name.startswith("gloro"):
        net, _ = load_checkpoint(zoo.model_path("digits_gloro_eps" if name == "gloro-eps" else "digits_gloro_2eps"))
        x, y = zoo.load_data()
        return LipschitzDefense(net.eval(), 10, 0.25, input_shape=(1, 8, 8)), 0.25, x, y
    x, y = load_dataset("digits", "test")
    return IntervalDefense(tiny_mlp(), 10, name.split("-")[1]), 0.006, x, y


def verdict_name(v) -> str:
    return {True: "degradable", False: "safe", None: "undecided"}[v.decided]


def run(name: str, limit: int, time_limit: float, steps: int) -> dict:
    defense, eps, x, y = build(name)
    x, y = x[:limit], y[:limit]
    t0 = time.perf_counter()
    rows = degrade_batch(defense, x, y, eps, attack="all", seed=0, steps=steps, restarts=2, full_radius=False)
    t_attack = time.perf_counter() - t0
    keep = [i for i, r in enumerate(rows) if r["certified"] and r["correct"]]
    t0 = time.perf_counter()
    verdicts = exact_degradable(defense, x[keep], eps, time_limit=time_limit)
    t_oracle = time.perf_counter() - t0
    print(f"\n== {name}: eps={eps} ({defense.norm.value}), {limit} images, {len(keep)} certified correct "
          f"(attack {t_attack:.0f} s, oracle {t_oracle:.0f} s)")
    print(f"{'index':>5} {'label':>5}  {'lower (attack)':<15} {'exact (MILP)':<12} {'upper (proof)':<14} "
          f"{'slack':>9} {'bound':>9}  {'decided by':<14} {'s':>6}")
    table = []
    for i, v in zip(keep, verdicts):
        r = rows[i]
        lower = "degraded" if r["degraded_by"] else "-"
        upper = "proven safe" if r["proven_nondegradable"] else ("-" if r["proven_nondegradable"] is not None else "no proof")
        print(f"{r['index']:>5} {r['label']:>5}  {lower:<15} {verdict_name(v):<12} {upper:<14} "
              f"{v.slack:>9.4f} {v.bound:>9.4f}  {v.method:<14} {v.seconds:>6.1f}")
        table.append({"index": r["index"], "lower": bool(r["degraded_by"]), "exact": v.decided,
                      "proven": r["proven_nondegradable"], "slack": v.slack, "bound": v.bound, "method": v.method,
                      "seconds": v.seconds})
    return summarize(name, eps, table)


def summarize(name: str, eps: float, table: list[dict]) -> dict:
    n = len(table)
    lower = sum(t["lower"] for t in table)
    exact = sum(t["exact"] is True for t in table)
    undecided = sum(t["exact"] is None for t in table)
    has_proof = all(t["proven"] is not None for t in table)
    upper = sum(not t["proven"] for t in table) if has_proof else None
    decided = [t for t in table if t["exact"] is not None]
    lower_right = sum(t["lower"] == t["exact"] for t in decided)
    upper_right = sum((not t["proven"]) == t["exact"] for t in decided) if has_proof else None
    out = {"model": name, "eps": eps, "certified_correct": n, "lower": lower, "exact": exact, "undecided": undecided,
           "upper": upper, "lower_right": lower_right, "upper_right": upper_right, "decided": len(decided),
           "seconds_max": max((t["seconds"] for t in table), default=0.0)}
    fpr = (lambda k: f"{k / n:.3f}" if n and k is not None else "-")
    print(f"-- counts of {n}: lower (attack) {lower}, exact {exact} (+{undecided} undecided), "
          f"proven upper {upper if has_proof else 'none'}; FPR lower {fpr(lower)}, exact {fpr(exact)}"
          f"{f'..{fpr(exact + undecided)}' if undecided else ''}, upper {fpr(upper)}")
    print(f"-- right (= exact) on the {len(decided)} decided: attack {lower_right}, proof "
          f"{upper_right if has_proof else '-'}; slowest input {out['seconds_max']:.1f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--limit", type=int, default=120, help="test images per model")
    ap.add_argument("--time-limit", type=float, default=60.0, help="oracle seconds per input")
    ap.add_argument("--steps", type=int, default=50, help="attack steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = [run(m.strip(), args.limit, args.time_limit, args.steps) for m in args.models.split(",") if m.strip()]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
