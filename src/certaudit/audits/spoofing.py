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

A perceptual budget (``max_linf``, ``min_ssim``: :mod:`certaudit.attacks.budget`) binds the attack
while it optimizes, and a spoof succeeds only if the judged image is within it; a *sweep* runs the
same attack under several budgets in one batch (``sweep`` in each row). Each budget is an independent
attack, selected and judged on its own candidates only: the unbounded entry is the paper's attack (no
ℓ∞ bound, no SSIM term), a budget's figure does not depend on which other budgets were swept, and
success is not forced to grow with the budget (the curve may dip where one attack is luckier).

Images are attacked only when they have a target: an image whose natural CERTIFY abstains (with
``skip_abstained``) or for which no candidate class differs from its label (``candidates`` = only its
own class) keeps ``attacked = False`` and enters no spoof figure.

Rows hold, per image: the budget, the natural and spoofed labels and radii, the chosen target, the
perturbation actually applied (``x_adv − x``: ℓ2, ℓ∞ = the largest per-pixel change, TV, colour and
dissimilarity penalties, SSIM(x, x_adv)), whether it is within the budget, the spoofing loss and the
seconds spent. The SSIM is the attack's own value for the chosen image (``ShadowResult.ssim``), the one
the selection compared with the bound: the judge does not recompute it in another batch, whose last bits
may differ (:mod:`certaudit.attacks.budget`), so an iterate kept at the bound is judged within it.
:func:`summarize` (:mod:`certaudit.audits.spoofing_summary`) gives the paper's Table 1
(mean/std radius natural vs shadow, success rate over the images the classifier does not abstain on)
and, at a radius ``eps``, Table 2's "robust error" (natural images not certified correct at eps)
against "attack error" (shadow images not certified with a wrong label at eps). :func:`save_grid`
draws Fig. 2's natural | δ | x + δ grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from certaudit.attacks.budget import LINF_TOL, Budget, run_budgets, ssim_at_least
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
from certaudit.audits.spoofing_summary import summarize, summarize_sweep
from certaudit.defenses.base import ABSTAIN, Certificates, radius_key
from certaudit.errors import InputError

# 2: rows hold the budget, SSIM and within_budget; 3: budgeted steps capped at τ/4, a feasible start under an SSIM
# bound, each budget selected on its own candidates, images without a target not attacked. Rows of an older format
# were computed otherwise: their files are refused, not mixed.
ROW_FORMAT = 3
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
                on_step: Callable[[int], None] | None = None, eps: float | None = None,
                sweep: Sequence[Budget] | None = None) -> SpoofOutcome:
    """Natural CERTIFY, batched untargeted Shadow Attack, selection, fresh judging CERTIFY.

    ``x`` (B, C, H, W) in [0, 1], ``y`` (B,) true labels, ``indices`` their data-set indices (for
    seeds; default 0..B−1). ``certify_options`` go to the natural and the judging CERTIFY (e.g.
    ``n0``, ``n``, ``alpha``), ``select_options`` to the selection CERTIFY of every candidate (default:
    the same). ``skip_abstained``: do not attack images whose natural CERTIFY abstains (the paper
    reports over the images the smoothed classifier does not abstain on). ``eps``: also record the
    defense's own check at exactly ``eps`` of the natural image and of the judged spoof
    (``natural_certified_eps``, ``spoofed_certified_eps``: Table 2 is computed from these, never
    from a bisection radius compared with ε).

    Budgets: the row's spoof is the one under ``config.budget`` (``max_linf``, ``min_ssim``; success
    needs a wrong certified label *and* the judged image within the budget). ``sweep`` (budgets): the
    same attack under each of them too, every (image, target, budget) in one batched attack, one
    selection and one judging CERTIFY; row field ``sweep`` holds one entry per budget. Each budget is
    judged on the candidates of its own attack only (no candidate is borrowed from another budget).
    Images without a wrong-class target among ``candidates`` are not attacked.
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
    budgets = run_budgets(config.budget, sweep)
    t0 = time.perf_counter()

    check_radii = [] if eps is None else [float(eps)]
    nat = certify_images(defense, x, seed=seed, indices=idx, radii=check_radii, **cert_opts)
    rows = _natural_rows(nat, y, idx, eps, config.budget)
    delta_best = torch.zeros_like(x)
    x_best = x.detach().clone()

    image0, _ = wrong_class_pairs(y, int(defense.num_classes), candidates)  # checks candidates, too
    has_target = set(image0.tolist())  # images with at least one wrong-class target
    todo = [b for b in range(b_count) if b in has_target
            and not (skip_abstained and rows[b]["natural_prediction"] == ABSTAIN)]
    if todo:
        sub = torch.tensor(todo, dtype=torch.long)
        xs, ys = x[sub.to(x.device)], y[sub]
        att = _attack(defense, loss, xs, ys, config, budgets, [idx[b] for b in todo], seed, candidates,
                      images_per_group, on_step, sel_opts)
        x_adv = att.res.x_adv[torch.tensor(att.best, dtype=torch.long, device=x.device)]  # (G, C, H, W), G = budgets × A
        # The judge: a fresh CERTIFY of the chosen images (new noise for randomized defenses).
        final = certify_images(defense, x_adv, seed=mix_seed(seed, ROLE_FINAL),
                               indices=[idx[b] for b in todo] * len(budgets), radii=check_radii, **cert_opts)
        applied = x_adv - xs.repeat(len(budgets), 1, 1, 1)  # (G, C, H, W) the perturbation as certified
        sweep_pos = None if sweep is None else [budgets.index(b) for b in sweep]
        _fill_attacked_rows(rows, todo, att, final, x_adv, xs, budgets, eps, sweep_pos)
        delta_best[sub.to(x.device)] = applied[:len(todo)]  # the row's budget comes first
        x_best[sub.to(x.device)] = x_adv[:len(todo)]
    seconds = (time.perf_counter() - t0) / max(1, b_count)
    for r in rows:
        r["seconds"] = round(seconds, 6)
    return SpoofOutcome(rows=rows, natural=x.detach(), delta=delta_best, x_adv=x_best)


class _Pairs(NamedTuple):
    """The (image, wrong class, budget) candidates of one Shadow Attack, as lists indexed by the pair."""

    image: list[int]  # position of the pair's image among the attacked ones
    target: list[int]
    y: list[int]  # true label of each attacked image (indexed by image, not by pair)
    loss: list[float]
    objective: list[float]


class _Attack(NamedTuple):
    res: Any  # ShadowResult over every pair
    pairs: _Pairs
    sel: Certificates  # the selection CERTIFY of every pair
    best: list[int]  # the chosen pair per group (budget-major: group g = budget · A + image)
    n_cand: np.ndarray  # (G,) candidates considered per group
    n_good: np.ndarray  # (G,) of them: wrong label certified by the selection and within the group's budget


def _attack(defense: Any, loss: SpoofLoss, xs: torch.Tensor, ys: torch.Tensor, config: ShadowConfig,
            budgets: list[Budget], indices: list[int], seed: int, candidates: Sequence[int] | None,
            images_per_group: int | None, on_step: Callable[[int], None] | None,
            sel_opts: dict[str, Any]) -> _Attack:
    """One batched Shadow Attack over every (image, wrong class, budget), then the selection CERTIFY.

    Every image of ``xs`` must have a wrong-class target (:func:`spoof_batch` attacks only those)."""
    n_img, n_bud = int(xs.shape[0]), len(budgets)
    image0, target0 = wrong_class_pairs(ys, int(defense.num_classes), candidates)  # (P0,), (P0,)
    image, target = image0.repeat(n_bud), target0.repeat(n_bud)  # budget-major, (P,)
    bud = torch.arange(n_bud).repeat_interleave(image0.shape[0])  # (P,)
    tau, sim = _budget_tensors(budgets)
    dev = xs.device
    res = shadow_attack(loss, xs, target.to(dev), config, image=image.to(dev), indices=indices, seed=seed,
                        images_per_group=images_per_group, max_linf=tau[bud].float().to(dev),
                        min_ssim=sim[bud].float().to(dev), on_step=on_step)
    pairs = _Pairs(image.tolist(), target.tolist(), ys.tolist(), res.loss.cpu().tolist(), res.objective.cpu().tolist())
    # selection: one CERTIFY of every candidate (the noise of an (image, target) is shared by its budgets)
    pair_ids = [indices[i] * int(defense.num_classes) + t for i, t in zip(pairs.image, pairs.target)]
    sel = certify_images(defense, res.x_adv, seed=mix_seed(seed, ROLE_SELECT), indices=pair_ids, **sel_opts)
    # each budget is its own attack: group (budget b, image a) holds the pairs of a attacked under b only
    g = (bud * n_img + image).numpy()  # (P,)
    linf = (res.x_adv - xs[image.to(dev)]).flatten(1).abs().amax(dim=1).double().cpu()  # (P,)
    within = ((linf <= tau[bud] + LINF_TOL) & ssim_at_least(res.ssim.cpu(), sim[bud])).numpy()  # the judge's rule
    label, radius = sel.label.cpu().numpy(), sel.radius.detach().cpu().double().numpy()
    good = (label != ys.numpy()[image.numpy()]) & (label != ABSTAIN) & (radius > 0) & within
    best = _select(g, good, within, radius, np.asarray(pairs.objective, dtype=np.float64), n_bud * n_img)
    return _Attack(res, pairs, sel, best, np.bincount(g, minlength=n_bud * n_img),
                   np.bincount(g, weights=good, minlength=n_bud * n_img))


def _budget_tensors(budgets: list[Budget]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per budget: τ (inf: none) and the SSIM bound (−inf: none), float64."""
    tau = torch.tensor([math.inf if b.max_linf is None else b.max_linf for b in budgets], dtype=torch.float64)
    sim = torch.tensor([-math.inf if b.min_ssim is None else b.min_ssim for b in budgets], dtype=torch.float64)
    return tau, sim


def _fill_attacked_rows(rows: list[dict[str, Any]], todo: list[int], att: _Attack, final: Certificates,
                        x_adv: torch.Tensor, xs: torch.Tensor, budgets: list[Budget], eps: float | None,
                        sweep_pos: list[int] | None) -> None:
    """Write the judged spoof of the row's budget (``budgets[0]``) into the rows of ``todo`` and, in
    ``sweep``, that of ``budgets[k]`` for each ``k`` of ``sweep_pos``."""
    n_img = len(todo)
    # SSIM: the attack's own value for each chosen candidate (the one the selection compared), not a
    # recomputation in another batch, which may differ in the last bits (certaudit.attacks.budget)
    stats = _perturbation_stats(xs.repeat(len(budgets), 1, 1, 1), x_adv, att.res.ssim[att.best])
    f_label, f_radius = final.label.cpu().tolist(), final.radius.detach().cpu().double().tolist()
    s_label, s_radius = att.sel.label.cpu().tolist(), att.sel.radius.detach().cpu().double().tolist()

    def entry(g: int, b: int) -> dict[str, Any]:
        a, p = g % n_img, att.best[g]
        label = int(rows[todo[a]]["label"])
        within = budgets[b].within(stats["linf"][g], stats["ssim"][g])
        # a spoof is a wrong label *with a certificate* (deterministic defenses return the prediction with
        # radius 0 where nothing is certified), on an image within the budget
        success = f_label[g] not in (label, ABSTAIN) and f_radius[g] > 0 and within
        e = {**budgets[b].as_dict(), "target": int(att.pairs.target[p]), "spoofed_prediction": int(f_label[g]),
             "spoofed_radius": float(f_radius[g]), "success": bool(success), "within_budget": bool(within),
             **{k: stats[k][g] for k in ("l2", "linf", "ssim", "tv")}, "selection_radius": float(s_radius[p])}
        if eps is not None:
            e["spoofed_certified_eps"] = _check_at(final, eps, b=g)
        return e

    for a, b in enumerate(todo):
        p = att.best[a]
        row = rows[b]
        row.update(entry(a, 0))
        row.update({"attacked": True, "selection_prediction": int(s_label[p]), "candidates": int(att.n_cand[a]),
                    "selection_successes": int(att.n_good[a]), "spoof_loss": _finite(att.pairs.loss[p]),
                    "objective": _finite(att.pairs.objective[p]), "color": stats["color"][a],
                    "dissim": stats["dissim"][a]})
        for key, val in final.extras.items():
            row["spoofed_" + key] = _jsonable(val[a])
        if sweep_pos is not None:
            row["sweep"] = [entry(k * n_img + a, k) for k in sweep_pos]


def _perturbation_stats(natural: torch.Tensor, x_adv: torch.Tensor,
                        ssim_values: torch.Tensor) -> dict[str, list[float]]:
    """Per image: ℓ2, ℓ∞ (the largest per-pixel change), TV, colour and dissimilarity penalties of the
    applied perturbation ``x_adv − x``, and SSIM(x, x_adv) = ``ssim_values`` (the attack's, see
    :class:`~certaudit.attacks.shadow.ShadowResult`)."""
    applied = x_adv - natural
    return {"l2": applied.flatten(1).norm(dim=1).cpu().tolist(),
            "linf": applied.flatten(1).abs().amax(dim=1).cpu().tolist(),
            "tv": tv_penalty(applied).cpu().tolist(), "color": color_penalty(applied, "mean_abs").cpu().tolist(),
            "dissim": dissim_penalty(applied).cpu().tolist(), "ssim": ssim_values.detach().float().cpu().tolist()}


def _natural_rows(nat: Certificates, y: torch.Tensor, idx: list[int], eps: float | None,
                  budget: Budget) -> list[dict[str, Any]]:
    """One row per image from the natural CERTIFY (the spoofing fields unset)."""
    nat_label, nat_radius = nat.label.cpu().tolist(), nat.radius.detach().cpu().double().tolist()
    rows = [_natural_row(idx[b], int(y[b]), nat_label[b], nat_radius[b], nat, b) for b in range(len(idx))]
    for b, row in enumerate(rows):
        row.update(budget.as_dict())
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


def _select(group: np.ndarray, good: np.ndarray, within: np.ndarray, radius: np.ndarray, objective: np.ndarray,
            n_groups: int) -> list[int]:
    """Per group, the candidate whose selection certificate is a wrong label with the largest radius
    (and within the group's budget); where none is, the one with the largest surrogate objective among
    those within the budget (else among all). Ties: the first candidate. Returns positions in the
    candidate arrays. Every group must have a candidate: a group without one is a bug upstream (an image
    with no target must not be attacked), and raises rather than borrow another group's candidate."""
    present = np.bincount(group, minlength=n_groups)[:n_groups] > 0
    if group.size == 0 or not present.all() or int(group.max()) >= n_groups:
        missing = np.flatnonzero(~present).tolist()
        raise RuntimeError(f"spoof selection: groups {missing[:5]} have no candidate (an image without a target "
                           "was attacked)")
    pos = np.arange(group.shape[0])
    rad_key = np.where(good, radius, -np.inf)
    obj_key = np.where(np.isfinite(objective), objective, -np.inf)
    order = np.lexsort((-pos, obj_key, rad_key, within, good, group))  # the last of each group is its best
    last = np.r_[group[order][1:] != group[order][:-1], True]
    best = np.empty(n_groups, dtype=np.int64)
    best[group[order][last]] = order[last]
    return best.tolist()


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _jsonable(v: torch.Tensor) -> Any:
    v = v.detach().cpu()
    return v.tolist() if v.dim() else v.item()


# ------------------------------------------------------------------------------------------- grid

def save_grid(path: str | Path, natural: torch.Tensor, delta: torch.Tensor, x_adv: torch.Tensor,
              captions: Sequence[tuple[str, str]] | None = None, class_names: Sequence[str] | None = None,
              title: str | None = None) -> Path:
    """A PNG grid like Fig. 2: one row per image, columns natural | δ | x + δ.

    δ is shown as ``0.5 + δ / (2·max|δ|)`` per image (grey = no change); ``captions[i]`` =
    (text under the natural image, text under x + δ); ``title`` above the grid (e.g. the budget).
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
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.1 * n)) if title else None)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


__all__ = ["ROW_FORMAT", "SpoofOutcome", "spoof_batch", "certify_images", "is_randomized", "summarize", "summarize_sweep",
           "save_grid"]
