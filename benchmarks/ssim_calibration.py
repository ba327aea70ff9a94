"""What SSIM (certaudit.attacks.budget.ssim) says about perturbations of known size: the yardstick of
the spoof budget's ``--min-ssim`` (docs/shadow.md).

For the first ``--images`` test images of each data set, and each ℓ∞ size τ, the mean SSIM(x, x + δ)
of two perturbations that both have ‖δ‖∞ = τ:

* ``random signs``: δ = τ·(±1) per pixel (and channel), the texture of an ℓ∞ PGD-style attack at τ;
* ``brighten``: δ = +τ everywhere (a uniform shadow), clipped to [0, 1].

    python benchmarks/ssim_calibration.py --data-root-cifar ../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse

import torch

from certaudit.attacks.budget import ssim, ssim_window
from certaudit.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--taus", default="4,8,16,32,64", help="ℓ∞ sizes in 8-bit steps (/255)")
    ap.add_argument("--datasets", default="cifar10,fashion-mnist,digits")
    ap.add_argument("--data-root-cifar", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    taus = [int(t) for t in args.taus.split(",")]
    print(f"{'data set':14s} {'window':>8s} {'τ (/255)':>9s} {'random signs':>13s} {'brighten':>9s}")
    for name in args.datasets.split(","):
        root = args.data_root_cifar if name == "cifar10" else None
        x, _ = load_dataset(name, "test", root)
        x = x[:args.images]
        win = ssim_window(x.shape[2], x.shape[3])
        gen = torch.Generator().manual_seed(args.seed)
        signs = torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1
        for t in taus:
            tau = t / 255
            rs = float(ssim(x, (x + tau * signs).clamp(0, 1)).mean())
            br = float(ssim(x, (x + tau).clamp(0, 1)).mean())
            print(f"{name:14s} {win[0]:>4d}/{win[1]:<3g} {t:>9d} {rs:>13.3f} {br:>9.3f}")


if __name__ == "__main__":
    main()
