"""Our IBP and CROWN margin bounds next to auto_LiRPA 0.7.1's, on the published Fashion-MNIST model.

auto_LiRPA is a baseline and an oracle only (its source is in ``../shared/peers``; install steps in
``benchmarks/README.md``). It runs in a subprocess (importing it configures the root logger), found
on ``$CERTAUDIT_ALIRPA`` or ``~/.cache/alirpa/site``; the test skips where it does not import, where
``../shared`` (the model) is absent, or where the Fashion-MNIST test set is not on this machine.

What is checked on 8 test images, margin specification y − j, ε = 0.1:
* soundness: every one of our lower bounds is at most the smallest margin a PGD attack finds;
* our IBP is auto_LiRPA's up to our floating-point widening (ours ≤ theirs + 1e-4, and at most a few
  hundredths below);
* our CROWN is never far below theirs (the rounding slack, about 0.02 here), often above it (CROWN's
  intermediate bounds intersected with IBP's, and the best of CROWN and IBP), and verifies every image
  theirs verifies;
* on image 237, whose CROWN-IBP margin (0.00099) lies inside float32's rounding slack, our real-network
  CROWN-IBP (``spec_bounds_real``, the claim auto_LiRPA makes) verifies it as theirs does and agrees with
  theirs to 1e-4 (their float32 rounding), while the float32-sound bound does not verify it.
The comparison is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certaudit.defenses.interval import compile_network, convert_kw, margin_bounds, specification

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "kw" / "fashion_mnist.pth"
ALIRPA = Path(os.environ.get("CERTAUDIT_ALIRPA", Path.home() / ".cache" / "alirpa" / "site"))
N, EPS = 8, 0.1

SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
try:
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
except Exception as exc:
    print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
import torch
from torch import nn
from certaudit.data import load_dataset
from certaudit.defenses.interval import convert_kw, specification
model, _ = convert_kw(sys.argv[1])
x, y = load_dataset("fashion-mnist", "test", download=False)
idx = [int(i) for i in sys.argv[2].split(",")]
x, y, eps = x[idx], y[idx], float(sys.argv[3])
body = nn.Sequential(*model[1:])  # the published model has no normalization (mean 0, std 1)
lirpa = BoundedModule(body, torch.zeros(1, *x.shape[1:]), device="cpu", verbose=0)
box = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
c, _ = specification(y, 10, x.dtype)
out = {}
with torch.no_grad():
    for method in sys.argv[4].split(","):
        low, _ = lirpa.compute_bounds(x=(BoundedTensor(x, box),), C=c, method=method, bound_upper=False)
        out[method] = low.tolist()
print(json.dumps(out))
"""


def _theirs(indices=tuple(range(N)), methods=("IBP", "CROWN")) -> dict:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} is absent (../shared)")
    if not ALIRPA.is_dir():
        pytest.skip(f"auto_LiRPA is not installed at {ALIRPA} (see benchmarks/README.md)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ALIRPA)]))
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(MODEL), ",".join(map(str, indices)), str(EPS),
                          ",".join(methods)], capture_output=True,
                         text=True, env=env, timeout=300)
    if res.returncode != 0:
        if "DataNotFoundError" in res.stderr:
            pytest.skip("the Fashion-MNIST test set is not on this machine")
        raise AssertionError(res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"auto_LiRPA does not import: {out['skip']}")
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _pgd_min(model, x, y, eps, steps=40, restarts=2):
    """(B, K−1): the smallest margin f_y − f_j found per class by signed-gradient descent (plus the start)."""
    _, others = specification(y, 10, x.dtype)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    gen = torch.Generator().manual_seed(0)
    best = torch.full(others.shape, math.inf)
    for start in range(restarts + 1):
        xa = x.clone() if start == 0 else lo + torch.rand(x.shape, generator=gen) * (hi - lo)
        for step in range(steps + 1):
            xa.requires_grad_(True)
            f = model(xa)
            m = f.gather(1, y[:, None]) - f.gather(1, others)
            best = torch.minimum(best, m.detach())
            if step == steps:
                break
            (g,) = torch.autograd.grad(m.sum(), xa)  # each class's margin only depends on its own column
            xa = torch.max(torch.min(xa.detach() - eps / 8 * g.sign(), hi), lo)
    return best.double()


def test_ours_next_to_auto_lirpa_and_pgd():
    theirs = _theirs()
    from certaudit.data import load_dataset

    model, _ = convert_kw(MODEL)
    x, y = load_dataset("fashion-mnist", "test", download=False)
    x, y = x[:N], y[:N]
    net = compile_network(model, x.shape[1:])
    _, others = specification(y, 10, x.dtype)
    with torch.no_grad():
        ours = {m: margin_bounds(net, x, EPS, y, m.lower()).gather(1, others) for m in ("IBP", "CROWN")}
    found = _pgd_min(model, x, y, EPS)
    for m, low in ours.items():
        assert bool((low <= found).all()), f"{m}: a bound above a margin PGD found"
        diff = low - theirs[m]
        print(f"\n{m}: ours − auto_LiRPA over {diff.numel()} margins: mean {float(diff.mean()):+.4f}, "
              f"min {float(diff.min()):+.4f}, max {float(diff.max()):+.4f}; verified ours "
              f"{int((low.min(1).values > 0).sum())} / theirs {int((theirs[m].min(1).values > 0).sum())} of {N}")
    assert bool((ours["IBP"] <= theirs["IBP"] + 1e-4).all()) and float((ours["IBP"] - theirs["IBP"]).min()) > -0.1
    assert float((ours["CROWN"] - theirs["CROWN"]).min()) > -0.1
    assert bool(((ours["CROWN"].min(1).values > 0) | (theirs["CROWN"].min(1).values <= 0)).all())


def test_real_network_crown_ibp_verifies_the_image_inside_the_float32_slack():
    theirs = _theirs((237, 0, 1), ("CROWN-IBP",))["CROWN-IBP"]
    from certaudit.data import load_dataset
    from certaudit.defenses.interval.bounds import compile_network64, spec_bounds, spec_bounds_real

    model, _ = convert_kw(MODEL)
    x, y = load_dataset("fashion-mnist", "test", download=False)
    x, y = x[[237, 0, 1]], y[[237, 0, 1]]
    net, net64 = compile_network(model, x.shape[1:]), compile_network64(model, x.shape[1:])
    c, _ = specification(y, 10, x.dtype)
    with torch.no_grad():
        f32 = spec_bounds(net, x, EPS, c, "crown-ibp")
        real, redo = spec_bounds_real(net, net64, x, EPS, c, "crown-ibp")
    assert float(theirs[0].min()) > 0 and float(f32[0].min()) <= 0 < float(real[0].min())
    assert bool(redo[0])
    assert float((real[0] - theirs[0]).abs().max()) < 1e-4  # redone in float64: their bound, rigorously
    assert bool((real[1:] <= theirs[1:] + 1e-4).all())  # not redone: the float32-sound bound
    assert bool((real <= _pgd_min(model, x, y, EPS)).all())
