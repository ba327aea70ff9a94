"""Certification logs: our JSONL rows or Cohen et al.'s tab-separated logs, read and checked, and the
§3.3.2 2ε check computed from them alone (``certaudit degrade --from-log``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from certaudit.audits.certified import certified_mask
from certaudit.defenses.base import ABSTAIN, check_eps
from certaudit.defenses.registry import DEFENSES, defense_class
from certaudit.errors import InputError
from certaudit.results import read_rows


def cert_arrays(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """correct (certified label = label) and radius (NaN where a row carries none)."""
    try:
        correct = np.array([int(r["prediction"]) == int(r["label"]) and int(r["prediction"]) != ABSTAIN
                            for r in rows], dtype=bool)
        radius = np.array([math.nan if r.get("radius") is None else float(r["radius"]) for r in rows],
                          dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"rows need label, prediction and radius ({exc})") from None
    nan_given = np.array([r.get("radius") is not None for r in rows], dtype=bool) & np.isnan(radius)
    bad = np.isinf(radius) | (radius < 0) | nan_given
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        shown = "NaN" if np.isnan(radius[i]) else repr(float(radius[i]))
        raise InputError(f"row {rows[i].get('index', i)} has radius {shown}: radii must be finite numbers >= 0 "
                         "(a missing radius is written null)")
    return correct, radius


COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


def read_certification_log(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Certification rows from a file: our JSONL rows (certify or degrade) or Cohen et al.'s
    tab-separated log (header ``idx label predict radius correct time``; ``predict`` = -1 abstains).

    Returns ``(format, rows)`` with rows holding ``index``, ``label``, ``prediction``, ``radius``,
    ``correct`` (and ``seconds`` when the log has times).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"log file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith("{"):
        header, rows = read_rows(p)
        need = ("label", "prediction", "radius")
        good = [r for r in rows if all(k in r for k in need)]
        config = (header or {}).get("config")
        config = config if isinstance(config, dict) else {}
        if _radius_is_search(config.get("defense")):
            # interval rows written before radius_tol existed hold bisection radii: say so, so that no
            # figure at ε is read off them (the tolerance is the run's own setting, 1e-3 by default)
            settings = config.get("settings") if isinstance(config.get("settings"), dict) else {}
            tol = settings.get("tol")
            tol = float(tol) if isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0 else 1e-3
            for r in good:
                if r.get("radius") is not None and "radius_tol" not in r:
                    r["radius_tol"] = tol
        if rows and not good:
            raise InputError(f"{p}: rows have no label/prediction/radius (not certification rows)")
        if any(r.get("radius") is None and "decision" in r for r in good):
            raise InputError(f"{p}: rows of certify --sequential hold an accept-at-ε decision and no radius; "
                             "the 2ε check needs certified radii (certify without --sequential)")
        # read_rows has refused duplicate indices already (one row per image)
        return "certaudit", good
    cols = first.strip().split("\t") if "\t" in first else first.split()
    if [c.strip().lower() for c in cols[:5]] != list(COHEN_COLUMNS[:5]):
        raise InputError(f"{p}: not a certaudit JSONL file nor a Cohen et al. log "
                         f"(expected header 'idx\\tlabel\\tpredict\\tradius\\tcorrect\\ttime', got {first[:80]!r})")
    rows = []
    for lineno, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 5:
            raise InputError(f"{p}:{lineno}: expected at least 5 columns, got {len(parts)}")
        try:
            row: dict[str, Any] = {"index": int(parts[0]), "label": int(parts[1]), "prediction": int(parts[2]),
                                   "radius": float(parts[3]), "correct": bool(int(parts[4]))}
        except ValueError:
            raise InputError(f"{p}:{lineno}: cannot parse {line.strip()!r}") from None
        if not math.isfinite(row["radius"]):
            raise InputError(f"{p}:{lineno}: radius is not finite")
        if row["prediction"] == ABSTAIN:
            row["radius"] = 0.0
        if len(parts) > 5:
            sec = _parse_time(parts[5])
            if sec is not None:
                row["seconds"] = sec
        rows.append(row)
    return "cohen", rows


def _radius_is_search(name: Any) -> bool:
    """Whether the defense named in a log's header finds its radius by a search (registry capability)."""

    return isinstance(name, str) and name.lower() in DEFENSES and defense_class(name).radius_is_search


def _parse_time(text: str) -> float | None:
    """Cohen et al. write ``str(datetime.timedelta)``: ``H:MM:SS.ffffff`` (or plain seconds)."""
    s = text.strip()
    try:
        if ":" in s:
            parts = [float(v) for v in s.split(":")]
            total = 0.0
            for v in parts:
                total = total * 60 + v
            return total
        return float(s)
    except ValueError:
        return None


def upper_from_log(rows: Sequence[dict[str, Any]], eps: float) -> dict[str, Any]:
    """The §3.3.2 2ε check at ε from certification rows alone (no model run).

    ``fpr_2eps_check`` = |correct, certified at ε, not at 2ε| / |correct, certified at ε|, with
    "certified at r" from the rows' checks at exactly r where they hold them, else closed-form
    radii. Rows whose radii are bisection points and that hold no check at ε and 2ε are refused
    (the figure at ε must come from the check at ε). A log does not say whether its certifier is
    monotone, so this is the 2ε check, not a proven bound (see ``degrade --model`` for the proof).
    """

    eps = check_eps(eps)
    correct, _ = cert_arrays(rows)
    n = len(correct)
    m1, why1 = certified_mask(rows, eps)
    m2, why2 = certified_mask(rows, 2 * eps)
    if m1 is None or m2 is None:
        raise InputError(f"no 2ε check at eps={eps:g} from these rows: {why1 if m1 is None else why2}; "
                         "certify with --eps at this ε")
    test_r = correct & m1
    up = test_r & ~m2
    k = int(test_r.sum())
    return {"eps": eps, "test": n, "testR": k, "testA_2eps_check": int(up.sum()),
            "fpr_2eps_check": int(up.sum()) / k if k else None,
            "utility_reduction_2eps_check": int(up.sum()) / n if n else None,
            "vra_eps": k / n if n else None,
            "vra_2eps": int((correct & m2).sum()) / n if n else None,
            "source": why1 if why1 == why2 else f"{why1} / {why2}"}


__all__ = ["COHEN_COLUMNS", "cert_arrays", "read_certification_log", "upper_from_log"]
