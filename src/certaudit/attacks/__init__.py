"""Attacks written once against the defense protocol (:mod:`certaudit.defenses.base`).

* :mod:`certaudit.attacks.pgd` -- batched projected gradient ascent for ℓ2 and ℓ∞ on any
  differentiable per-example loss, with exact projections onto the ε-ball ∩ [0, 1]^d, random
  starts, restarts, step-size schedules, early stopping and a per-example evaluation budget. The
  detector reduction (Tramèr, Theorem 4) and the degradation attacks are built on it.
"""
