"""The report's explanations: what every figure means, and the papers they come from (plain text,
rendered by :mod:`certaudit.report` into the HTML page and the Markdown file)."""

from __future__ import annotations

PAPERS = (
    "Cohen, Rosenfeld & Kolter, Certified Adversarial Robustness via Randomized Smoothing, ICML 2019 (arXiv:1902.02918)",
    "Leino, Wang & Fredrikson, Globally-Robust Neural Networks (GloRo Nets), ICML 2021 (arXiv:2102.08452)",
    "Degradation Attacks on Certifiably Robust Neural Networks, TMLR 2022 (Algorithms 2.1, 3.1, 3.2, B.1; §3.3, §4.1)",
    "Ghiasi, Shafahi & Goldstein, Breaking Certified Defenses: Semantic Adversarial Examples with Spoofed "
    "Robustness Certificates, ICLR 2020 (arXiv:2003.08937)",
    "Tramèr, Detecting Adversarial Examples Is (Nearly) As Hard As Classifying Them, ICML 2022 (arXiv:2107.11630)",
)

FIGURE_MEANINGS: tuple[tuple[str, str], ...] = (
    ("clean acc. (model)", "accuracy of the undefended model's argmax on the audited images."),
    ("clean acc. (defense)", "fraction of images whose certified label (at any radius ≥ 0) is correct; an abstention "
                             "(⊥) counts as an error (randomized smoothing abstains when CERTIFY's lower bound is < ½)."),
    ("VRA@ε, VRA@2ε", "verified robust accuracy: fraction of images certified with the correct label at radius ε "
                      "(resp. 2ε). |testR| = VRA@ε × images."),
    ("rejected@ε", "fraction of clean images the run-time defense (Algorithm 2.1: predict if certified at ε, else ⊥) "
                   "rejects."),
    ("FPR lower", "|testA_lower| / |testR|: fraction of correctly certified images for which an ε-bounded attack found "
                  "x' that the defense rejects (a false positive: nothing was wrong with x). A lower bound: attacks are "
                  "incomplete."),
    ("FPR upper (proven)", "|testA_upper| / |testR|: fraction of correctly certified images the defense did not "
                           "prove non-degradable. GloRo: the 2ε check with a margin for float64 rounding (Appendix A), "
                           "then, on what the attacks and it leave open, CROWN over the ℓ2 ball and a local Lipschitz "
                           "bound (and, asked for on small networks, branch and bound); IBP and CROWN: IBP on the 2ε box "
                           "with a margin for rounding (IBP is inclusion-monotone and CROWN's bound is never below "
                           "IBP's). Randomized smoothing and CROWN-IBP have no proof: –. Proven and undecided counts "
                           "are in the degradation table."),
    ("FPR 2ε check", "fraction of correctly certified images that the run-time method itself does not certify at 2ε "
                     "(§3.3.2). For monotone certifiers an upper bound at least the proven one (equal when the 2ε "
                     "proof is the only proof that ran); for CROWN-style bounds and smoothing "
                     "it is a heuristic, not a bound (an attack may degrade an image that passes it)."),
    ("utility red.", "|testA| / |test| = VRA@ε × FPR: the accuracy an adversary can take away from the defended "
                     "model by forcing rejections, lower and upper bound."),
    ("lower ⊆ upper", "every degraded image must lie in the proven testA_upper; a violation is a bug of the defense, "
                      "its proof or the attack (reported as such in summary.json)."),
    ("spoof budget", "the perceptual budget the Shadow Attack is held to while it optimizes: ℓ∞ ≤ τ (no pixel "
                     "changes by more than τ; δ is projected after every step, and each step is capped at τ/4 in ℓ∞) and SSIM(x, x+δ) ≥ s (structural "
                     "similarity, pytorch-msssim, 11×11 window, 5×5 on images under 11 pixels; a penalty, and a check "
                     "of the judged image). 'unbounded': no budget, the paper's attack."),
    ("spoof success (within budget)", "Shadow Attack: fraction of attacked images (not abstained) whose perturbed "
                                      "image x+δ is within the budget and gets a fresh certificate for a wrong label "
                                      "(the surrogate loss never decides success). Given first over the attacked "
                                      "images whose natural label was correct ('naturally correct images', with "
                                      "their number n): the real spoofs. Then over all attacked images ('incl. "
                                      "natural label already wrong'), as the paper counts: an image the defense "
                                      "already labelled wrong before any attack counts too, and the tables say how "
                                      "many of the successes those are."),
    ("spoof success (unbounded: any picture)", "the same without any budget. Not a perceptual spoof: an unbounded "
                                               "δ may turn the image into a different picture (saturated pixels, "
                                               "‖δ‖∞ up to 1), which a certificate for its label does not "
                                               "misrepresent."),
    ("r̄ natural (spoof images, certified), r̄ natural (same images as r̄ spoofed), r̄ spoofed",
     "mean certified radius of the spoof stage's natural images that are certified (natural, certified r > 0: not "
     "abstained and a radius above 0); of the natural images of the successful spoofs (the images behind r̄ spoofed, "
     "which differ from budget to budget); and of the successful spoofed images (within budget, resp. unbounded): "
     "a large spoofed radius is a confident certificate for a wrong label."),
    ("SSIM, ‖δ‖∞", "per judged spoof: SSIM(x, x+δ) (1 = identical) and the largest change of any pixel (×255 in the "
                   "tables: 8-bit steps)."),
    ("spoof success against budget", "the attack run again, in the same batch, under each ℓ∞ budget of the sweep "
                                     "(with the SSIM bound) and unbounded: success and mean spoofed radius per budget, "
                                     "next to the mean natural radius of the same successful images. The curve's "
                                     "main line is the success over the naturally correct images, the lighter line "
                                     "the success over all attacked images (incl. natural label already wrong). "
                                     "Finite τ lie on the ℓ∞ axis; a budget without an ℓ∞ bound has a tick of its "
                                     "own, 'SSIM ≥ s only' (an SSIM bound alone) or '∞' (no bound at all), shown "
                                     "apart and not joined to the curve. Each budget is an independent attack (its "
                                     "own candidates only), so the curve need not rise."),
    ("robust error / attack error", "Table 2 of the Shadow Attack paper at ε: fraction of images not certified correct "
                                    "at ε (natural), and fraction whose spoofed image is not certified with a wrong "
                                    "label at ε within the budget (lower = stronger attack)."),
    ("FPR curve", "the 2r check recomputed for every radius r from the certification rows: correct images certified "
                  "at r but not at 2r over correct images certified at r (Figs. 2–3 of the degradation paper). Not "
                  "called a bound: the proven upper bound is given at ε only; for interval bounds the radii off ε "
                  "and 2ε are bisection points."),
)

__all__ = ["FIGURE_MEANINGS", "PAPERS"]
