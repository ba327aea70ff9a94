"""Spoofed certificates (Shadow Attack, Ghiasi et al. 2020): natural against spoofed certified radii.

For each image ``x`` with label ``y``, :func:`spoof_batch`

1. certifies ``x`` with the real defense (natural label and radius ``r_nat``);
2. runs the untargeted Shadow Attack (Eq. 4): every wrong class as a target, all images × targets
   in one batched optimization (:func:`certaudit.attacks.shadow.shadow_attack`);
3. *selects* per image the candidate ``x + δ_t`` with the largest certified radius among those
   that a selection CERTIFY labels with a wrong class (as the authors' code did, with fewer samples);
4. runs a *fresh* CERTIFY on the chosen ``x + δ`` (new noise for randomized defenses, the full
   sample counts): the attack succeeds only if this certificate's label is neither ``y`` nor
   ABSTAIN; its radius is ``r_adv``. The surrogate loss never decides success.

Rows hold, per image: the natural and spoofed labels and radii, the chosen target, the perturbation
actually applied (``x_adv − x``: ℓ2, ℓ∞, TV, colour and dissimilarity penalties), the spoofing loss
and the seconds spent. :func:`summarize` gives the paper's Table 1 (mean/std radius natural vs
shadow, success rate over the images the classifier does not abstain on) and, at a radius ``eps``,
Table 2's "robust error" (natural images not certified correct at eps) against "attack error"
(shadow images not certified with a wrong label at eps). :func:`save_grid` draws Fig. 2's
natural | δ | x + δ grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from certaudit.attacks.degradation import is_randomized
from certaudit.attacks.shadow import (
    ShadowConfig,
    SpoofLoss,
    color_penalty,
    dissim_penalty,
    mix_seed,
    shadow_attack,
    tv_penalty,
    wrong_class_pairs,
)
from certaudit.defenses.base import ABSTAIN, Certificates, radius_key
from certaudit.errors import InputError

ROLE_SELECT = 101  # seed role of the selection CERTIFY
ROLE_FINAL = 102  # seed role of the fresh, judging CERTIFY


@dataclass
class SpoofOutcome:
    """Rows (one per image) and, per image, the chosen perturbation and spoofed image."""

    rows: list[dict[str, Any]]
    natural: torch.Tensor  # (B, C, H, W)
    delta: torch.Tensor  # (B, C, H, W) x_adv − x (zeros where the image was not attacked)
    x_adv: torch.Tensor  # (B, C, H, W)


def certify_images(defense: Any, x: torch.Tensor, *, seed: int | None = None,
                   indices: Sequence[int] | None = None, radii: Sequence[float] = (), **options: Any) -> Certificates:
    """``defense.certify_checks(x, radii)``: label, radius and the defense's own check at exactly each
    of ``radii``. ``seed``/``indices`` and ``options`` (``n0``, ``n``, ``alpha``) reach a randomized
    defense only (deterministic ones have no noise); ``None`` options are left out."""
    opts = {k: v for k, v in options.items() if v is not None} if defense.randomized else {}
    return defense.certify_checks(x, list(radii), full_radius=True, seed=seed,
                                  indices=None if indices is None else list(indices), **opts)


def _check_at(cert: Certificates, eps: float | None, b: int) -> bool | None:
    """The defense's own verdict at exactly ``eps`` for item ``b`` (label not ABSTAIN), or None."""
    if eps is None:
        return None
    hit = cert.checks.get(radius_key(eps))
    return None if hit is None else bool(hit[b]) and int(cert.label[b]) != ABSTAIN


def spoof_batch(defense: Any, loss: SpoofLoss, x: torch.Tensor, y: torch.Tensor, config: ShadowConfig, *,
                indices: Sequence[int] | None = None, seed: int = 0, candidates: Sequence[int] | None = None,
                certify_options: dict[str, Any] | None = None, select_options: dict[str, Any] | None = None,
                skip_abstained: bool = True, images_per_group: int | None = None,
                on_step: Callable[[int], None] | None = None, eps: float | None = None) -> SpoofOutcome:
    """Natural CERTIFY, batched untargeted Shadow Attack, selection, fresh judging CERTIFY.

    ``x`` (B, C, H, W) in [0, 1], ``y`` (B,) true labels, ``indices`` their data-set indices (for
    seeds; default 0..B−1). ``certify_options`` go to the natural and the judging CERTIFY (e.g.
    ``n0``, ``n``, ``alpha``), ``select_options`` to the selection CERTIFY of every candidate (default:
    the same). ``skip_abstained``: do not attack images whose natural CERTIFY abstains (the paper
    reports over the images the smoothed classifier does not abstain on). ``eps``: also record the
    defense's own check at exactly ``eps`` of the natural image and of the judged spoof
    (``natural_certified_eps``, ``spoofed_certified_eps``: Table 2 is computed from these, never
    from a bisection radius compared with ε).
    """
    b_count = int(x.shape[0])
    y = torch.as_tensor(y).long().flatten()
    if y.shape[0] != b_count:
        raise InputError(f"y must have one label per image ({b_count}), got {tuple(y.shape)}")
    idx = list(range(b_count)) if indices is None else [int(i) for i in indices]
    if len(idx) != b_count:
        raise InputError(f"indices must have one entry per image ({b_count}), got {len(idx)}")
    cert_opts = dict(certify_options or {})
    sel_opts = dict(cert_opts if select_options is None else select_options)
    num_classes = int(defense.num_classes)
    t0 = time.perf_counter()

    check_radii = [] if eps is None else [float(eps)]
    nat = certify_images(defense, x, seed=seed, indices=idx, radii=check_radii, **cert_opts)
    rows = _natural_rows(nat, y, idx, eps)
    delta_best = torch.zeros_like(x)
    x_best = x.detach().clone()

    todo = [b for b in range(b_count) if not (skip_abstained and rows[b]["natural_prediction"] == ABSTAIN)]
    if todo:
        sub = torch.tensor(todo, dtype=torch.long)
        xs, ys = x[sub.to(x.device)], y[sub]
        image, target = wrong_class_pairs(ys, num_classes, candidates)  # (P,), (P,) all wrong classes
        res = shadow_attack(loss, xs, target.to(x.device), config, image=image.to(x.device),
                            indices=[idx[b] for b in todo], seed=seed, images_per_group=images_per_group,
                            on_step=on_step)
        pairs = _Pairs(image.tolist(), target.tolist(), ys.tolist(), res.loss.cpu().tolist(),
                       res.objective.cpu().tolist())
        sel, best = _select_candidates(defense, res.x_adv, pairs, [idx[b] for b in todo], num_classes, seed, sel_opts)
        x_adv = res.x_adv[torch.tensor(best, dtype=torch.long, device=x.device)]  # (A, C, H, W)
        # The judge: a fresh CERTIFY of the chosen images (new noise for randomized defenses).
        final = certify_images(defense, x_adv, seed=mix_seed(seed, ROLE_FINAL), indices=[idx[b] for b in todo],
                               radii=check_radii, **cert_opts)
        applied = x_adv - xs  # (A, C, H, W) the perturbation as certified, after clipping
        _fill_attacked_rows(rows, todo, pairs, best, sel, final, applied, eps)
        delta_best[sub.to(x.device)] = applied
        x_best[sub.to(x.device)] = x_adv
    seconds = (time.perf_counter() - t0) / max(1, b_count)
    for r in rows:
        r["seconds"] = round(seconds, 6)
    return SpoofOutcome(rows=rows, natural=x.detach(), delta=delta_best, x_adv=x_best)


class _Pairs(NamedTuple):
    """The (image, wrong class) pairs of one Shadow Attack, as lists indexed by the pair."""

    image: list[int]  # position of the pair's image among the attacked ones
    target: list[int]
    y: list[int]  # true label of each attacked image (indexed by image, not by pair)
    loss: list[float]
    objective: list[float]


def _select_candidates(defense: Any, x_adv: torch.Tensor, pairs: _Pairs, indices: list[int], num_classes: int,
                       seed: int, options: dict[str, Any]) -> tuple[Certificates, list[int]]:
    """Selection: a CERTIFY of every candidate (fresh noise per pair); per image the largest
    wrong-label radius wins. Returns the selection certificates and the chosen pair per image."""
    pair_ids = [indices[i] * num_classes + t for i, t in zip(pairs.image, pairs.target)]
    sel = certify_images(defense, x_adv, seed=mix_seed(seed, ROLE_SELECT), indices=pair_ids, **options)
    best = _select(pairs.image, pairs.target, pairs.y, sel.label.cpu().tolist(),
                   sel.radius.detach().cpu().double().tolist(), pairs.objective, len(indices))
    return sel, best


def _fill_attacked_rows(rows: list[dict[str, Any]], todo: list[int], pairs: _Pairs, best: list[int],
                        sel: Certificates, final: Certificates, applied: torch.Tensor, eps: float | None) -> None:
    """Write the judged spoof, the selection and the applied perturbation into the rows of ``todo``."""
    f_label, f_radius = final.label.cpu().tolist(), final.radius.detach().cpu().double().tolist()
    l2 = applied.flatten(1).norm(dim=1).cpu().tolist()
    linf = applied.flatten(1).abs().amax(dim=1).cpu().tolist()
    tv = tv_penalty(applied).cpu().tolist()
    color = color_penalty(applied, "mean_abs").cpu().tolist()
    dissim = dissim_penalty(applied).cpu().tolist()
    s_label, s_radius = sel.label.cpu().tolist(), sel.radius.detach().cpu().double().tolist()
    n_success = _count_per_image(pairs.image, pairs.target, pairs.y, s_label, s_radius, len(todo))
    n_cand = np.bincount(np.asarray(pairs.image, dtype=np.int64), minlength=len(todo)).tolist()
    for a, b in enumerate(todo):
        p = best[a]
        label = int(rows[b]["label"])
        # a spoof is a wrong label *with a certificate*: deterministic defenses (interval) return the
        # prediction with radius 0 where nothing is certified, which is not a spoofed certificate
        success = f_label[a] not in (label, ABSTAIN) and f_radius[a] > 0
        rows[b].update({
            "attacked": True, "target": int(pairs.target[p]), "spoofed_prediction": int(f_label[a]),
            "spoofed_radius": float(f_radius[a]), "success": bool(success),
            "selection_prediction": int(s_label[p]), "selection_radius": float(s_radius[p]),
            "candidates": int(n_cand[a]), "selection_successes": int(n_success[a]),
            "spoof_loss": _finite(pairs.loss[p]), "objective": _finite(pairs.objective[p]),
            "l2": float(l2[a]), "linf": float(linf[a]), "tv": float(tv[a]), "color": float(color[a]),
            "dissim": float(dissim[a]),
        })
        if eps is not None:
            rows[b]["spoofed_certified_eps"] = _check_at(final, eps, b=a)
        for key, val in final.extras.items():
            rows[b]["spoofed_" + key] = _jsonable(val[a])


def _natural_rows(nat: Certificates, y: torch.Tensor, idx: list[int], eps: float | None) -> list[dict[str, Any]]:
    """One row per image from the natural CERTIFY (the spoofing fields unset)."""
    nat_label, nat_radius = nat.label.cpu().tolist(), nat.radius.detach().cpu().double().tolist()
    rows = [_natural_row(idx[b], int(y[b]), nat_label[b], nat_radius[b], nat, b) for b in range(len(idx))]
    for b, row in enumerate(rows):
        if eps is not None:
            row["natural_certified_eps"] = _check_at(nat, eps, b)
        if nat.radius_tol > 0:
            row["radius_tol"] = nat.radius_tol
    return rows


def _natural_row(index: int, label: int, pred: int, radius: float, cert: Certificates, b: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": index, "label": label, "natural_prediction": int(pred), "natural_radius": float(radius),
        "natural_correct": int(pred) == label, "attacked": False, "target": None, "spoofed_prediction": None,
        "spoofed_radius": None, "success": False,
    }
    for key, val in cert.extras.items():
        row["natural_" + key] = _jsonable(val[b])
    return row


def _select(image: list[int], target: list[int], y: list[int], label: list[int], radius: list[float],
            objective: list[float], n_images: int) -> list[int]:
    """Per image, the pair whose selection certificate is a wrong label with the largest radius;
    where none is, the pair with the largest surrogate objective."""
    best: list[tuple[tuple[float, float, float], int]] = [((-1.0, -math.inf, -math.inf), -1)] * n_images
    for p, i in enumerate(image):
        wrong = label[p] not in (y[i], ABSTAIN) and radius[p] > 0
        key = (1.0 if wrong else 0.0, radius[p] if wrong else -math.inf, objective[p] if math.isfinite(objective[p]) else -math.inf)
        if best[i][1] < 0 or key > best[i][0]:
            best[i] = (key, p)
    return [p for _, p in best]


def _count_per_image(image: list[int], target: list[int], y: list[int], label: list[int], radius: list[float],
                     n_images: int) -> list[int]:
    out = [0] * n_images
    for p, i in enumerate(image):
        out[i] += int(label[p] not in (y[i], ABSTAIN) and radius[p] > 0)
    return out


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _jsonable(v: torch.Tensor) -> Any:
    v = v.detach().cpu()
    return v.tolist() if v.dim() else v.item()


# ---------------------------------------------------------------------------------------- summary

def summarize(rows: Sequence[dict[str, Any]], eps: float | None = None) -> dict[str, Any]:
    """Table 1 (and, at ``eps``, Table 2) of the Shadow Attack paper from spoofing rows.

    * ``natural_radius_mean/std``: over images whose natural CERTIFY does not abstain (and, for
      deterministic defenses that always return a label, certifies a radius > 0);
    * ``success_rate``: fraction of the attacked images whose fresh CERTIFY of ``x + δ`` gives a
      wrong label (not ABSTAIN) with a radius > 0;
    * ``shadow_radius_mean/std``: the spoofed radius over the successful images
      (``shadow_radius_mean_all`` counts failures as radius 0, over all attacked images);
    * ``spoofed_beats_natural``: fraction of attacked images with success and ``r_adv ≥ r_nat``;
    * at ``eps``: ``robust_error`` = fraction of all images not certified *correctly* at eps (wrong
      label, ABSTAIN or radius < eps); ``attack_error`` = fraction of all images whose shadow image
      is not certified with a *wrong* label at eps (correct label, ABSTAIN, radius < eps or not
      attacked). Lower attack error = stronger attack (Table 2).

    Standard deviations are population standard deviations (ddof = 0).
    """
    try:
        n = len(rows)
        nat_pred = np.array([int(r["natural_prediction"]) for r in rows], dtype=np.int64)
        nat_rad = np.array([float(r["natural_radius"]) for r in rows], dtype=np.float64)
        label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        attacked = np.array([bool(r.get("attacked")) for r in rows], dtype=bool)
        success = np.array([bool(r.get("success")) for r in rows], dtype=bool)
        adv_rad = np.array([float(r["spoofed_radius"]) if r.get("spoofed_radius") is not None else 0.0 for r in rows])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"spoofing rows need label, natural_prediction, natural_radius ({exc})") from None
    out: dict[str, Any] = {"images": n}
    if n == 0:
        return out
    certified = (nat_pred != ABSTAIN) & (nat_rad > 0)  # radius 0: a label without a certificate
    out["natural_abstain_rate"] = float(np.mean(~certified))
    out["natural_accuracy"] = float(np.mean(nat_pred == label))
    out["attacked"] = int(attacked.sum())
    out["natural_radius_mean"] = _mean(nat_rad[certified])
    out["natural_radius_std"] = _std(nat_rad[certified])
    out["successes"] = int((success & attacked).sum())
    out["success_rate"] = float(np.mean(success[attacked])) if attacked.any() else None
    ok = success & attacked
    out["shadow_radius_mean"] = _mean(adv_rad[ok])
    out["shadow_radius_std"] = _std(adv_rad[ok])
    out["shadow_radius_mean_all"] = _mean(np.where(ok, adv_rad, 0.0)[attacked])
    out["spoofed_beats_natural"] = float(np.mean((ok & (adv_rad >= nat_rad))[attacked])) if attacked.any() else None
    for key in ("l2", "linf", "tv"):
        vals = [float(r[key]) for r in rows if r.get("attacked") and r.get(key) is not None]
        out[f"{key}_mean"] = float(np.mean(vals)) if vals else None
    if eps is not None:
        eps = float(eps)
        adv_pred = np.array([int(r["spoofed_prediction"]) if r.get("spoofed_prediction") is not None else ABSTAIN
                             for r in rows])
        out["eps"] = eps
        nat_at = _at_eps(rows, "natural_certified_eps", nat_rad, eps)
        adv_at = _at_eps([r for r in rows if r.get("attacked")], "spoofed_certified_eps", adv_rad[attacked], eps)
        if nat_at is None or adv_at is None:
            out["robust_error"] = out["attack_error"] = None
            out["table2_note"] = (f"rows hold no check at eps={eps:g} and their radii are bisection points: "
                                  "rerun with this --eps to get the robust and attack errors")
        else:
            nat_ok = (nat_pred == label) & (nat_pred != ABSTAIN) & nat_at
            adv_cert = np.zeros(n, dtype=bool)
            adv_cert[attacked] = adv_at
            adv_ok = attacked & (adv_pred != label) & (adv_pred != ABSTAIN) & adv_cert
            out["robust_error"] = float(1.0 - nat_ok.mean())
            out["attack_error"] = float(1.0 - adv_ok.mean())
    seconds = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if len(seconds) == n:
        total = float(sum(seconds))
        out["seconds"] = total
        out["images_per_second"] = n / total if total > 0 else None
    return out


def _at_eps(rows: Sequence[dict[str, Any]], key: str, radius: np.ndarray, eps: float) -> np.ndarray | None:
    """Per row, certified at exactly ``eps`` by the defense's own check (``key``); rows without it fall
    back to ``radius >= eps`` only where the radius is closed-form (no ``radius_tol``); else None."""
    if all(r.get(key) is not None for r in rows):
        return np.array([bool(r[key]) for r in rows], dtype=bool)
    if any(r.get("radius_tol") for r in rows):
        return None
    return radius >= eps


def _mean(v: np.ndarray) -> float | None:
    return float(np.mean(v)) if v.size else None


def _std(v: np.ndarray) -> float | None:
    return float(np.std(v)) if v.size else None


# ------------------------------------------------------------------------------------------- grid

def save_grid(path: str | Path, natural: torch.Tensor, delta: torch.Tensor, x_adv: torch.Tensor,
              captions: Sequence[tuple[str, str]] | None = None, class_names: Sequence[str] | None = None) -> Path:
    """A PNG grid like Fig. 2: one row per image, columns natural | δ | x + δ.

    δ is shown as ``0.5 + δ / (2·max|δ|)`` per image (grey = no change); ``captions[i]`` =
    (text under the natural image, text under x + δ).
    """
    # Imported here on purpose: the Agg backend is chosen only when a grid is drawn, before pyplot
    # loads, so importing this module leaves the backend of an interactive session alone.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.exists() and path.is_dir():
        raise InputError(f"grid path {path} is a directory; give a .png file")
    n = int(natural.shape[0])
    if n == 0:
        raise InputError("no images to draw")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.1 * n), squeeze=False)
    scale = delta.detach().flatten(1).abs().amax(dim=1).clamp_min(1e-12)  # (n,)
    shown = (0.5 + delta.detach() / (2 * scale.view(-1, 1, 1, 1))).clamp(0, 1)
    for i in range(n):
        panels = [natural[i], shown[i], x_adv[i]]
        texts = ["natural", f"δ (×{0.5 / float(scale[i]):.3g})", "x + δ"]
        if captions is not None:
            texts[0] = f"natural\n{captions[i][0]}"
            texts[2] = f"x + δ\n{captions[i][1]}"
        for j, img in enumerate(panels):
            ax = axes[i][j]
            arr = img.detach().cpu().float().numpy()
            if arr.shape[0] == 1:
                ax.imshow(arr[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.transpose(arr[:3], (1, 2, 0)).clip(0, 1))
            ax.set_title(texts[j], fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


__all__ = ["SpoofOutcome", "spoof_batch", "certify_images", "is_randomized", "summarize", "save_grid"]
