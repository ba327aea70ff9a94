"""The certify verb as a library call: certify a data set split with a defense; rows + summary.

Rows (one JSON object per image, written as produced, resumed after a crash) come from
:func:`certaudit.audits.certified.certification_rows`: ``index``, ``label``, ``prediction``
(ABSTAIN = -1), ``radius``, ``correct``, ``seconds``, ``certified_at`` (the defense's own check at
each requested radius) and the defense's extras. The summary is computed from all rows of the
selected range, old and new (:func:`certaudit.audits.certified.summarize`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from certaudit.audits.certified import certification_rows, default_radii, plot_certified_accuracy, summarize
from certaudit.audits.session import Session, check_output, check_plot, check_range
from certaudit.defenses.base import radius_key
from certaudit.defenses.registry import defense_class
from certaudit.defenses.sequential import SEQ_BLOCK, SEQ_GROWTH
from certaudit.errors import InputError


def _check_request(cls: Any, name: str, eps: float | None, sequential: bool, radii: Sequence[float] | None,
                   full_radius: bool, plot: Any, method: Any) -> tuple[list[float], bool]:
    """Refuse combinations the defense cannot answer; the radii to check and whether rows carry a radius."""
    if sequential and (eps is None or not cls.sequential_test):
        raise InputError("--sequential needs a defense with a sequential test (smoothing) and --eps (the radius "
                         "to decide)")
    if sequential and (radii is not None or full_radius or plot is not None):
        raise InputError("--sequential decides certification at --eps only: it gives no radius for --radii, "
                         "--full-radius or --plot")
    if full_radius and not cls.radius_is_search:
        raise InputError(f"--full-radius applies to defenses whose radius is a search (interval); {name} "
                         "always gives the radius")
    if method is not None and not cls.methods:
        raise InputError(f"--method applies to --defense interval only (its bound methods); {name} has none")
    # the defense's own checks at exactly these radii (ε, 2ε and the table's radii): figures at a radius come
    # from them; a radius that costs a search (interval bisection) is computed only when asked for
    checks = sorted({r for r in ([eps, 2 * eps] if eps is not None else []) + list(radii or []) if r > 0})
    if sequential:
        checks = [eps]  # the sequential test decides one radius
    want_radius = not sequential and (not cls.radius_is_search or full_radius or (eps is None and radii is None))
    if plot is not None and not want_radius:
        raise InputError("--plot draws certified accuracy against the radius: add --full-radius (bisection) "
                         "for the interval defense")
    return checks, want_radius


def _table_radii(norm: str, rows: list[dict[str, Any]], radii: Sequence[float] | None, eps: float | None,
                 want_radius: bool, sequential: bool) -> list[float]:
    if radii is not None:
        grid = list(radii)
    elif want_radius:
        top = max((float(r["radius"]) for r in rows if r.get("radius") is not None), default=0.0)
        grid = []
        for r in default_radii(norm):  # the default grid up to the first radius no row reaches
            grid.append(r)
            if r > top:
                break
    else:
        grid = [0.0]
    if eps is not None:  # the table always shows the requested radii
        grid = sorted(set(grid) | {eps} | (set() if sequential else {2 * eps}))
    return grid


def certify_job(model: Any, *, weights: Any = None, defense: str = "smoothing", options: dict[str, Any] | None = None,
                eps: float | None = None, sequential: bool = False, radii: Sequence[float] | None = None,
                full_radius: bool = False, chunk: int | None = None, device: str = "auto",
                dataset: str | None = None, split: str = "test", limit: int | None = None, skip: int = 0,
                data_root: Any = None, out: Any = None, plot: Any = None, quiet: bool = False) -> dict[str, Any] | None:
    """Certify images ``skip .. skip+limit`` of a split; write rows to ``out`` (resumable); return the
    summary (``None`` on the ranks other than 0 of a multi-process launch).

    ``options`` are the defense's own (:meth:`~certaudit.defenses.base.Defense.from_options`: sigma,
    n0, n, alpha, method, batch_size, precision, seed, ...); ``eps`` adds VRA at ε and 2ε and the clean
    rejection rate; ``sequential`` decides certification at ``eps`` only with the anytime-valid test."""
    check_range(limit, skip)
    for flag, value in (("--chunk", chunk), ("--batch-size", (options or {}).get("batch_size"))):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    cls = defense_class(defense)  # its declared capabilities decide which options apply
    name = defense.lower()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    checks, want_radius = _check_request(cls, name, eps, sequential, radii, full_radius, plot, options.get("method"))
    options.update({"eps": eps, "sequential": sequential or None})
    options = {k: v for k, v in options.items() if v is not None}
    check_output(out, "--out")
    check_plot(plot)
    s = Session.open(model, weights=weights, dataset=dataset, device=device, quiet=quiet)
    guard = cls.from_options(s.net, s.meta, options)
    x, y, wanted = s.data(split, data_root, skip=skip, limit=limit)
    settings = guard.settings()
    if sequential:
        settings = {**settings, "sequential_eps": eps, "sequential": f"beta-mixture-block{SEQ_BLOCK}-growth{SEQ_GROWTH}",
                    "rows": "radius-null-decision"}  # rows before carried radius = ε
    config = {"verb": "certify", "model_sha256": s.model_sha, "arch": s.meta.arch, "defense": name,
              "settings": settings, "dataset": s.info.name, "split": split, "device": s.device.type}
    if checks or not want_radius:  # rows carry checks at these radii (older files without them stay resumable)
        config["checks"] = [radius_key(r) for r in checks]
        config["full_radius"] = want_radius
    run = s.run(lambda idx: certification_rows(guard, x, y, idx, checks, full_radius=want_radius, device=s.device),
                wanted, out=out, config=config, block=chunk or guard.images_per_chunk(tuple(s.info.shape),
                                                                                   full_radius=want_radius),
                label=f"certify ({name})", done_noun="certified")
    if not s.env.is_main:
        return None
    rows = run.rows
    norm = guard.norm.value
    summary = {"model": str(model), "defense": name, "norm": norm, "dataset": s.info.name, "split": split,
               "range": [skip, wanted[-1] + 1 if wanted else skip], "settings": {**settings, **guard.diagnostics()},
               **s.run_fields(run, out),
               **summarize(rows, _table_radii(norm, rows, radii, eps, want_radius, sequential), eps)}
    if sequential:
        evals = [r["samples"] for r in rows if "samples" in r]
        summary["evaluations_per_image_mean"] = sum(evals) / max(1, len(evals))
    if run.new_images and run.wall_seconds > 0 and "n0" in settings and "n" in settings and not sequential:
        summary["samples_per_second_this_run"] = run.new_images * (settings["n0"] + settings["n"]) / run.wall_seconds
    if plot is not None:
        plot_certified_accuracy({f"{name} ({s.info.name})": rows}, plot, norm=norm, eps=eps,
                                title=f"{Path(str(model)).name}: {len(rows)} {split} images")
        summary["plot"] = str(plot)
    return summary


__all__ = ["certify_job"]
