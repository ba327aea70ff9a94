#!/usr/bin/env python
"""Why local proofs do (not) close the FPR bracket of a GloRo model (issue 18, must-show "measured reason").

For a Lipschitz-margin (GloRo) model, an ℓ2 radius ε and the first ``--images`` test images, prints per image
(averaged) for the pair (predicted class y, runner-up j):

* the share of ReLUs per layer that are unstable / not provably dead over B₂(x, ε) ∩ [0,1]^d (CROWN over the
  ℓ2 ball: the bounds every local proof starts from);
* ``‖∇(f_y − f_j)(x)‖₂ / K_yj``: the gradient at x itself against the global rate the run-time check uses (no
  sound local bound over the ball can be below the largest gradient in it);
* the local Lipschitz bound over the ball (interval Jacobian) / K_yj and the CROWN lower bound of the minimum
  margin over the ball next to the global-Lipschitz one ``(f_y − f_j)(x) − ε·K_yj``;
* model-wide: ``‖W_2 W_1‖ / (‖W_2‖‖W_1‖)`` for the first two affine layers and ``‖(w_y − w_j)ᵀ W_{L−1} ⋯ W_1‖ / K_yj``
  (the network with every ReLU active): how much room the product of layer norms leaves at all.

Usage::

    PYTHONPATH=src python benchmarks/bracket_diagnostics.py --model src/certaudit/zoo/fmnist_gloro_eps.safetensors \\
        --dataset fashion-mnist --eps 0.3 --images 32
"""

from __future__ import annotations

import argparse
import copy

import torch

from certaudit.data import load_dataset
from certaudit.defenses.interval.bounds import compile_network, layer_bounds, margin_bounds, specification
from certaudit.defenses.lipschitz import LipschitzDefense
from certaudit.defenses.lipschitz.local import local_lipschitz
from certaudit.defenses.lipschitz.network import walk
from certaudit.models import load_checkpoint


def dense(layer, n_in: int) -> torch.Tensor:
    """The matrix (out, in) of a walked conv / linear layer (float64, no bias)."""
    m = layer.module
    if layer.kind == "linear":
        return m.weight.detach().double()
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *layer.in_shape)
    out = torch.nn.functional.conv2d(eye, m.weight.double(), None, m.stride, m.padding, m.dilation, m.groups)
    return out.reshape(n_in, -1).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, meta = load_checkpoint(args.model)
    for p in net.parameters():
        p.requires_grad_(False)
    shape = tuple(meta.input_shape)
    x, _ = load_dataset(args.dataset, "test")
    x = x[:args.images]
    defense = LipschitzDefense(net, meta.num_classes, args.eps, input_shape=shape)
    k = defense.lipschitz_constants().pairwise.double()
    with torch.no_grad():
        f = net(x).double()
    top = f.topk(2, dim=1).indices
    y, j = top[:, 0], top[:, 1]
    k_yj = k[y, j]
    eps = args.eps
    print(f"model {args.model}, ε = {eps} (ℓ2), {x.shape[0]} test images, pair (prediction, runner-up)")

    cnet = compile_network(net, shape)
    relu_b = layer_bounds(cnet, x, eps, "crown", norm="l2")
    for n, (lo, hi) in enumerate(relu_b):
        unstable = ((lo < 0) & (hi > 0)).float().mean()
        alive = (hi > 0).float().mean()
        print(f"ReLU layer {n + 1}: unstable {100 * float(unstable):.1f} %, not provably dead {100 * float(alive):.1f} %")

    xs = x.clone().requires_grad_(True)
    out = net(xs)
    (g,) = torch.autograd.grad((out.gather(1, y[:, None]) - out.gather(1, j[:, None])).sum(), xs)
    grad = g.flatten(1).norm(dim=1).double() / k_yj
    print(f"‖∇(f_y − f_j)(x)‖ / K_yj: mean {float(grad.mean()):.3f}, max {float(grad.max()):.3f}")

    layers64 = walk(copy.deepcopy(net).double().eval(), shape, meta.num_classes)
    wabs = [lay.module.weight.detach().abs() if lay.kind in ("conv", "linear") else None for lay in layers64]
    spec, others = specification(y, meta.num_classes, torch.float32)
    col = (others == j[:, None]).float().argmax(1)
    lip = local_lipschitz(layers64, wabs, relu_b, spec.double()).gather(1, col[:, None])[:, 0]
    print(f"local Lipschitz bound over the ball / K_yj: mean {float((lip / k_yj).mean()):.3f}, "
          f"min {float((lip / k_yj).min()):.3f}")
    crown = margin_bounds(cnet, x, eps, y, "crown", norm="l2").gather(1, j[:, None])[:, 0].double()
    glob = f.gather(1, y[:, None])[:, 0] - f.gather(1, j[:, None])[:, 0] - eps * k_yj
    print(f"lower bound of min over the ball of f_y − f_j: CROWN over the ball mean {float(crown.mean()):.3f}, "
          f"global Lipschitz mean {float(glob.mean()):.3f}; CROWN better on {int((crown > glob).sum())} of {x.shape[0]}")

    aff = [lay for lay in layers64 if lay.kind in ("conv", "linear")]
    mats = []
    for lay in aff[:-1]:
        n_in = 1
        for s in lay.in_shape:
            n_in *= s
        mats.append(dense(lay, n_in))
    if len(mats) >= 2:
        n1, n2 = (torch.linalg.matrix_norm(m, 2) for m in mats[:2])
        n21 = torch.linalg.matrix_norm(mats[1] @ mats[0], 2)
        print(f"‖W2 W1‖ / (‖W2‖‖W1‖) = {float(n21 / (n1 * n2)):.3f}")
    prod = mats[0]
    for m in mats[1:]:
        prod = m @ prod
    w_last = aff[-1].module.weight.detach().double()
    pairs = torch.stack([w_last[a] - w_last[b] for a, b in zip(y.tolist(), j.tolist())])
    lin = (pairs @ prod).norm(dim=1) / k_yj
    std = None
    for lay in layers64:
        if lay.kind == "normalize":
            std = lay.module.std.double()
    if std is not None and bool((std != 1).any()):
        print("(the model normalizes its input: the all-active product below ignores the 1/std factor)")
    print(f"all-ReLUs-active network ‖(w_y − w_j)ᵀ W_L−1 ⋯ W_1‖ / K_yj: mean {float(lin.mean()):.3f}, "
          f"range {float(lin.min()):.3f}–{float(lin.max()):.3f}")


if __name__ == "__main__":
    main()
