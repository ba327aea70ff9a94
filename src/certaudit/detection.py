"""Detector claims against robust classification (Tramèr, ICML 2022), and the two reductions.

Tramèr's reductions tie a detector (a classifier with a rejection option ⊥ = :data:`ABSTAIN`) to a
classifier at half the radius:

* Theorem 4: a detector with robust accuracy with detection ``a`` at radius ε yields an explicit
  (but computationally inefficient) classifier with robust accuracy ``≥ a`` at ε/2. So a detector
  claim is only as believable as the classification claim it implies; :func:`check_claim` compares
  it with a reference table of the best known robust classification accuracy at ε/2.
* Theorem 5: a classifier robust at ε/2 yields a detector robust at ε. With a *certified*
  classifier this is simply "answer if certified at ε/2, else reject" (§2.3): :class:`ClassifierToDetector`.

Both constructions run here over any :class:`~certaudit.defenses.base.Defense`
(:class:`ClassifierToDetector`, :class:`DetectorToClassifier`), and
:func:`check_classifier_to_detector` attacks the Theorem-5 detector at ε to confirm empirically
that it never answers a wrong label where the classifier was certified at ε/2.

Claims and reference tables are CSV or JSON files; see ``docs/detection.md`` for the columns and
for what each verdict (flagged / not flagged / no reference) means.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from certaudit.attacks.pgd import make_generator, pgd, random_in_ball
from certaudit.defenses.base import ABSTAIN, Defense, Norm, check_eps, check_images, check_labels
from certaudit.errors import InputError

__all__ = [
    "ClaimKind",
    "DetectorClaim",
    "ReferenceRow",
    "ReferenceTable",
    "Verdict",
    "robust_risk_with_detection_bound",
    "robust_accuracy_with_detection_bound",
    "robust_risk_with_detection",
    "check_claim",
    "check_claims",
    "summarize",
    "load_claims",
    "load_reference",
    "example_claims_path",
    "EXAMPLES",
    "Detector",
    "FunctionDetector",
    "ClassifierToDetector",
    "DetectorToClassifier",
    "Theorem4Output",
    "ReductionCheck",
    "check_classifier_to_detector",
]

_TABLES_PACKAGE = "certaudit.tables"
REFERENCE_FILE = "detector_reference.csv"
EXAMPLES = {"table1": "detector_claims_table1.csv", "table2": "detector_claims_table2.csv"}
"""Shipped example claim files: Tramèr's Table 1 (16 claims) and Table 2 (certified detector)."""

_EPS_RTOL = 1e-6  # radii that agree to this relative tolerance are the same radius


# =============================================================================== small parsers

class ClaimKind(str, Enum):
    """How a number was obtained: by attacks (an estimate) or by a proof (a guarantee)."""

    EMPIRICAL = "empirical"
    CERTIFIED = "certified"

    @classmethod
    def parse(cls, value: "str | ClaimKind | None") -> "ClaimKind":
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls.EMPIRICAL
        try:
            return cls(str(value.value if isinstance(value, ClaimKind) else value).strip().lower())
        except ValueError:
            raise InputError(f"unknown kind {value!r}; choose one of: empirical, certified") from None


_NORM_SPELLINGS = {
    "l2": "l2", "ℓ2": "l2", "l_2": "l2", "2": "l2",
    "linf": "linf", "ℓ∞": "linf", "l∞": "linf", "l_inf": "linf", "linfty": "linf", "inf": "linf",
    "ℓinf": "linf", "l_infty": "linf", "linfinity": "linf",
}


def _parse_norm(value: Any) -> Norm:
    if isinstance(value, Norm):
        return value
    key = str(value).strip().lower().replace(" ", "")
    return Norm.parse(_NORM_SPELLINGS.get(key, key))


def _number(value: Any, name: str) -> float:
    """A finite number; strings may be fractions like ``8/255``."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        s = str(value).strip()
        try:
            v = float(Fraction(s)) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"{name} must be a number like 0.5 or 8/255, got {value!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return v


def _probability(value: Any, name: str) -> float:
    """A fraction in [0, 1]; a string ending in ``%`` is a percentage (``75%`` -> 0.75)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        v = _number(value.strip()[:-1], name) / 100.0
    else:
        v = _number(value, name)
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{name} must be a fraction in [0, 1] (write 75% for a percentage), got {value!r}")
    return v


def _radius(value: Any, name: str = "eps") -> tuple[float, str]:
    """A radius > 0 and the text to show for it (fractions like ``8/255`` keep their form)."""
    v = _number(value, name)
    if not v > 0:
        raise InputError(f"{name} must be > 0, got {value!r}")
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
    else:
        text = f"{v:g}"
    return v, text


def _half_text(eps_text: str, eps: float) -> str:
    """ε/2 written like ε was: ``8/255`` -> ``4/255``, ``2.9`` -> ``1.45``."""
    m = re.fullmatch(r"(\d+)/(\d+)", eps_text)
    if m:  # keep the denominator the user wrote: 20/255 -> 10/255, 13/255 -> 13/510
        num, den = int(m.group(1)), int(m.group(2))
        return f"{num // 2}/{den}" if num % 2 == 0 else f"{num}/{2 * den}"
    return f"{eps / 2:g}"


def dataset_key(name: str) -> str:
    """Matching key of a data set name: lower case, only letters and digits (CIFAR-10 == cifar10)."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _same_radius(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_EPS_RTOL, abs_tol=1e-12)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ======================================================================================= Eq. (4)

def robust_risk_with_detection_bound(fpr: float, fnr: float, clean_error: float) -> float:
    """Equation (4): R_adv-det ≤ FPR + FNR + R(f_det), capped at 1 (a union bound over the three errors)."""
    fpr = _probability(fpr, "fpr")
    fnr = _probability(fnr, "fnr")
    clean_error = _probability(clean_error, "clean_error")
    return min(1.0, fpr + fnr + clean_error)


def robust_accuracy_with_detection_bound(fpr: float, fnr: float, clean_error: float) -> float:
    """Lower bound on the robust accuracy with detection, ``1 − (FPR + FNR + R(f_det))``, at least 0."""
    return max(0.0, 1.0 - robust_risk_with_detection_bound(fpr, fnr, clean_error))


def robust_risk_with_detection(clean_pred: torch.Tensor, adv_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Definition 3 measured on a sample: the fraction with ``f(x) ≠ y`` or ``f(x̂) ∉ {y, ⊥}``.

    ``adv_pred`` is the detector's answer on the attack's point x̂ for each x (the worst found).
    """
    wrong = (clean_pred != y) | ((adv_pred != y) & (adv_pred != ABSTAIN))
    return wrong.float().mean()


# ========================================================================= claims and references

@dataclass
class DetectorClaim:
    """A detector's robustness claim at radius ``eps``.

    Either ``robust_accuracy`` (robust accuracy with detection, 1 − R_adv-det of Definition 3) is
    given, or all of ``fpr``, ``fnr`` and ``clean_error``, from which Equation (4) bounds it.
    """

    dataset: str
    norm: Norm
    eps: float
    robust_accuracy: float | None = None
    fpr: float | None = None
    fnr: float | None = None
    clean_error: float | None = None
    defense: str = ""
    citation: str = ""
    kind: ClaimKind = ClaimKind.EMPIRICAL
    note: str = ""
    eps_text: str = ""

    def __post_init__(self) -> None:
        if _blank(self.dataset):
            raise InputError("a claim needs a dataset")
        self.dataset = str(self.dataset).strip()
        self.norm = _parse_norm(self.norm)
        eps, text = _radius(self.eps if not self.eps_text else self.eps_text)
        self.eps, self.eps_text = eps, text
        self.kind = ClaimKind.parse(self.kind)
        rates = {"fpr": self.fpr, "fnr": self.fnr, "clean_error": self.clean_error}
        given = [k for k, v in rates.items() if not _blank(v)]
        if self.robust_accuracy is not None and not _blank(self.robust_accuracy):
            if given:
                raise InputError("give either robust_accuracy or fpr/fnr/clean_error, not both")
            self.robust_accuracy = _probability(self.robust_accuracy, "robust_accuracy")
            self.fpr = self.fnr = self.clean_error = None
        else:
            self.robust_accuracy = None
            if len(given) != 3:
                missing = sorted(set(rates) - set(given))
                if not given:
                    raise InputError("a claim needs robust_accuracy, or all of fpr, fnr and clean_error")
                raise InputError(f"Equation (4) needs all of fpr, fnr and clean_error; missing {', '.join(missing)}")
            self.fpr = _probability(self.fpr, "fpr")
            self.fnr = _probability(self.fnr, "fnr")
            self.clean_error = _probability(self.clean_error, "clean_error")
        self.defense = _text(self.defense)
        self.citation = _text(self.citation)
        self.note = _text(self.note)

    @property
    def accuracy_source(self) -> str:
        """``reported`` (robust accuracy with detection given) or ``eq4`` (bounded from the rates)."""
        return "reported" if self.robust_accuracy is not None else "eq4"

    @property
    def robust_accuracy_with_detection(self) -> float:
        """The claimed robust accuracy with detection at ``eps`` (given, or Eq. (4)'s lower bound)."""
        if self.robust_accuracy is not None:
            return self.robust_accuracy
        return robust_accuracy_with_detection_bound(self.fpr, self.fnr, self.clean_error)

    @property
    def implied_eps(self) -> float:
        """Theorem 4: the classification radius ε/2 the claim speaks for."""
        return self.eps / 2.0

    @property
    def implied_eps_text(self) -> str:
        return _half_text(self.eps_text, self.eps)

    @property
    def label(self) -> str:
        return self.defense or f"{self.dataset} {self.norm.value} eps={self.eps_text}"


@dataclass
class ReferenceRow:
    """Best known robust classification accuracy on (dataset, norm) at radius ``eps``, with its source."""

    dataset: str
    norm: Norm
    eps: float
    robust_accuracy: float
    citation: str
    kind: ClaimKind = ClaimKind.EMPIRICAL
    method: str = ""
    note: str = ""
    eps_text: str = ""

    def __post_init__(self) -> None:
        if _blank(self.dataset):
            raise InputError("a reference row needs a dataset")
        self.dataset = str(self.dataset).strip()
        self.norm = _parse_norm(self.norm)
        self.eps, self.eps_text = _radius(self.eps if not self.eps_text else self.eps_text)
        self.robust_accuracy = _probability(self.robust_accuracy, "robust_accuracy")
        if _blank(self.citation):
            raise InputError("every reference row needs a citation")
        self.citation = _text(self.citation)
        self.kind = ClaimKind.parse(self.kind)
        self.method = _text(self.method)
        self.note = _text(self.note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "norm": self.norm.value, "eps": self.eps, "eps_text": self.eps_text,
            "robust_accuracy": self.robust_accuracy, "kind": self.kind.value, "method": self.method,
            "citation": self.citation,
        }


@dataclass
class ReferenceTable:
    """The reference rows and where they came from (``source``: a path or ``built-in``)."""

    rows: list[ReferenceRow]
    source: str = "built-in"

    def candidates(self, dataset: str, norm: Norm | str) -> list[ReferenceRow]:
        key, n = dataset_key(dataset), _parse_norm(norm)
        return [r for r in self.rows if dataset_key(r.dataset) == key and r.norm is n]


# ========================================================================================= verdicts

FLAGGED, NOT_FLAGGED, NO_REFERENCE = "flagged", "not flagged", "no reference"


@dataclass
class Verdict:
    """The outcome of checking one claim.

    ``flagged`` is True when the claim implies more robust classification accuracy at ε/2 than
    the reference, False when it does not, None when no reference applies. ``margin`` is implied
    minus reference accuracy (a fraction; positive when flagged). ``basis`` says which reference
    radius was used: ``exact`` (a row at ε/2) or ``smaller-radius`` (a row at a radius below ε/2,
    which bounds the best known accuracy at ε/2 from above since robustness shrinks with the radius).
    """

    claim: DetectorClaim
    reference: ReferenceRow | None
    flagged: bool | None
    margin: float | None
    basis: str | None
    explanation: str

    @property
    def implied_accuracy(self) -> float:
        return self.claim.robust_accuracy_with_detection

    @property
    def status(self) -> str:
        return {True: FLAGGED, False: NOT_FLAGGED, None: NO_REFERENCE}[self.flagged]

    def to_dict(self) -> dict[str, Any]:
        c = self.claim
        return {
            "defense": c.defense,
            "dataset": c.dataset,
            "norm": c.norm.value,
            "eps": c.eps,
            "eps_text": c.eps_text,
            "kind": c.kind.value,
            "robust_accuracy_with_detection": c.robust_accuracy_with_detection,
            "accuracy_source": c.accuracy_source,
            "fpr": c.fpr,
            "fnr": c.fnr,
            "clean_error": c.clean_error,
            "implied_eps": c.implied_eps,
            "implied_eps_text": c.implied_eps_text,
            "implied_robust_accuracy": self.implied_accuracy,
            "reference": None if self.reference is None else self.reference.to_dict(),
            "basis": self.basis,
            "flagged": self.flagged,
            "margin": self.margin,
            "verdict": self.status,
            "explanation": self.explanation,
            "citation": c.citation,
        }


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _best_by_radius(rows: Iterable[ReferenceRow]) -> dict[float, ReferenceRow]:
    """For every distinct radius, the row with the highest accuracy (the best known there)."""
    best: dict[float, ReferenceRow] = {}
    for r in rows:
        key = next((k for k in best if _same_radius(k, r.eps)), r.eps)
        if key not in best or r.robust_accuracy > best[key].robust_accuracy:
            best[key] = r
    return best


def check_claim(claim: DetectorClaim, table: ReferenceTable | None = None, *, exact_only: bool = False) -> Verdict:
    """Compare the classification claim implied by Theorem 4 with the reference table.

    The claim at ε implies a classifier with robust accuracy ≥ ``a`` at ε/2. Rows for the same
    data set and norm are considered; a certified claim is compared with certified rows when the
    table has any (like against like, Table 2 of the paper), else with all rows. A row at exactly
    ε/2 decides (best accuracy among such rows); failing that, and unless ``exact_only``, rows at
    smaller radii can still *flag* a claim (a classifier at ε/2 is also one at any smaller radius),
    but they cannot clear it: without an exact row the answer is then "no reference".
    """
    table = load_reference() if table is None else table
    implied = claim.robust_accuracy_with_detection
    r = claim.implied_eps
    where = f"{claim.dataset} {claim.norm.value} at eps/2={claim.implied_eps_text}"
    rows = table.candidates(claim.dataset, claim.norm)
    if claim.kind is ClaimKind.CERTIFIED and any(x.kind is ClaimKind.CERTIFIED for x in rows):
        rows = [x for x in rows if x.kind is ClaimKind.CERTIFIED]
    vacuous = " (Equation 4's bound is vacuous: FPR+FNR+error >= 1)" if (
        claim.accuracy_source == "eq4" and implied == 0.0) else ""

    exact = [x for x in rows if _same_radius(x.eps, r)]
    if exact:
        ref = max(exact, key=lambda x: x.robust_accuracy)
        margin = implied - ref.robust_accuracy
        flagged = margin > 1e-12
        if flagged:
            text = (f"implies a classifier with >= {_pct(implied)} robust accuracy on {where}, "
                    f"{100 * margin:.1f} points above the best known {_pct(ref.robust_accuracy)}")
        else:
            text = (f"implied {_pct(implied)} on {where} does not exceed the best known "
                    f"{_pct(ref.robust_accuracy)} (margin {100 * margin:+.1f} points){vacuous}")
        if claim.kind is ClaimKind.CERTIFIED and ref.kind is ClaimKind.CERTIFIED:
            text += "; certified detector vs certified classifier"
        return Verdict(claim, ref, flagged, margin, "exact", text)

    smaller = [x for x in _best_by_radius(rows).values() if x.eps < r]
    if smaller and not exact_only:
        ref = min(smaller, key=lambda x: x.robust_accuracy)
        margin = implied - ref.robust_accuracy
        if margin > 1e-12:
            text = (f"no reference at eps/2={claim.implied_eps_text}, but a classifier robust there is also robust "
                    f"at {ref.eps_text}, where the best known is {_pct(ref.robust_accuracy)}: the implied "
                    f"{_pct(implied)} is {100 * margin:.1f} points above it")
            return Verdict(claim, ref, True, margin, "smaller-radius", text)
        text = (f"no reference at {where}; the nearest smaller-radius reference ({ref.eps_text}: "
                f"{_pct(ref.robust_accuracy)}) is not exceeded, which says nothing about eps/2")
        return Verdict(claim, None, None, None, None, text)
    if rows:
        radii = ", ".join(sorted({x.eps_text for x in rows}, key=lambda s: _number(s, "eps")))
        text = f"no reference at {where} (the table has {claim.dataset} {claim.norm.value} rows only at {radii})"
    else:
        text = f"no reference for {claim.dataset} {claim.norm.value} in the table ({table.source})"
    return Verdict(claim, None, None, None, None, text)


def check_claims(claims: Sequence[DetectorClaim], table: ReferenceTable | None = None, *,
                 exact_only: bool = False) -> list[Verdict]:
    """:func:`check_claim` for every claim, with one reference table."""
    table = load_reference() if table is None else table
    return [check_claim(c, table, exact_only=exact_only) for c in claims]


def summarize(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Counts of verdicts, over claims and over defenses (a defense is flagged if any claim is)."""
    by_defense: dict[str, list[bool | None]] = {}
    for v in verdicts:
        by_defense.setdefault(v.claim.label, []).append(v.flagged)
    return {
        "claims": len(verdicts),
        "flagged": sum(v.flagged is True for v in verdicts),
        "not_flagged": sum(v.flagged is False for v in verdicts),
        "no_reference": sum(v.flagged is None for v in verdicts),
        "defenses": len(by_defense),
        "defenses_flagged": sum(any(f is True for f in fs) for fs in by_defense.values()),
    }


# ==================================================================================== files

_CLAIM_COLUMNS = ("defense", "citation", "dataset", "norm", "eps", "robust_accuracy", "fpr", "fnr",
                  "clean_error", "kind", "note")
_REFERENCE_COLUMNS = ("dataset", "norm", "eps", "robust_accuracy", "kind", "method", "citation", "note")
_ALIASES = {
    "epsilon": "eps", "radius": "eps",
    "robust_accuracy_with_detection": "robust_accuracy", "accuracy": "robust_accuracy",
    "clean_err": "clean_error", "error": "clean_error", "notes": "note", "reference": "citation",
}


def _column(name: Any) -> str:
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    return _ALIASES.get(key, key)


def _read_records(text: str, source: str, what: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs from CSV (``#`` comment lines allowed) or JSON text."""
    stripped = text.lstrip("\ufeff").strip()
    if not stripped:
        raise InputError(f"{source}: the {what} file is empty")
    if stripped[0] in "[{":
        return _json_records(stripped, source, what)
    return _csv_records(text.lstrip("\ufeff"), source)


def _json_records(text: str, source: str, what: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        for key in ("claims", "references", "rows"):
            if key in data:
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        raise InputError(f"{source}: expected a JSON list of {what} objects")
    out = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise InputError(f"{source}: item {i}: expected a JSON object, got {type(item).__name__}")
        out.append((f"item {i}", {_column(k): v for k, v in item.items()}))
    return out


def _csv_records(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    # Blank out comment lines but keep them, so reported line numbers are the file's.
    lines = ["" if line.lstrip().startswith("#") else line for line in text.splitlines()]
    reader = csv.reader(io.StringIO("\n".join(lines) + "\n"))
    header: list[str] | None = None
    out = []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if header is None:
                header = [_column(c) for c in row]
                dupes = {c for c in header if header.count(c) > 1 and c}
                if dupes:
                    names = ", ".join(sorted(dupes))
                    raise InputError(f"{source}: line {reader.line_num}: duplicate column(s) {names}")
                continue
            where = f"line {reader.line_num}"
            if len(row) > len(header):
                raise InputError(f"{source}: {where}: {len(row)} cells but the header has {len(header)} columns")
            out.append((where, {h: (row[i] if i < len(row) else "") for i, h in enumerate(header) if h}))
    except csv.Error as exc:
        raise InputError(f"{source}: line {reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise InputError(f"{source}: no header row found")
    return out


def _check_columns(record: dict[str, Any], allowed: tuple[str, ...], source: str, where: str) -> None:
    unknown = sorted(k for k in record if k not in allowed)
    if unknown:
        raise InputError(f"{source}: {where}: unknown column(s) {', '.join(unknown)}; known: {', '.join(allowed)}")


def _clean(value: Any) -> Any:
    return None if _blank(value) else value


def claim_from_record(record: dict[str, Any], source: str = "claims", where: str = "") -> DetectorClaim:
    """Build a claim from one CSV row or JSON object (keys are column names), with located errors."""
    prefix = f"{source}: {where}: " if where else f"{source}: "
    _check_columns(record, _CLAIM_COLUMNS, source, where or "record")
    for req in ("dataset", "norm", "eps"):
        if _blank(record.get(req)):
            raise InputError(f"{prefix}missing {req}")
    try:
        return DetectorClaim(
            dataset=record["dataset"], norm=record["norm"], eps=record["eps"], eps_text=_text(record["eps"]),
            robust_accuracy=_clean(record.get("robust_accuracy")), fpr=_clean(record.get("fpr")),
            fnr=_clean(record.get("fnr")), clean_error=_clean(record.get("clean_error")),
            defense=_text(record.get("defense")), citation=_text(record.get("citation")),
            kind=_clean(record.get("kind")), note=_text(record.get("note")),
        )
    except InputError as exc:
        raise InputError(f"{prefix}{exc}") from None


def reference_from_record(record: dict[str, Any], source: str = "reference", where: str = "") -> ReferenceRow:
    prefix = f"{source}: {where}: " if where else f"{source}: "
    _check_columns(record, _REFERENCE_COLUMNS, source, where or "record")
    for req in ("dataset", "norm", "eps", "robust_accuracy", "citation"):
        if _blank(record.get(req)):
            raise InputError(f"{prefix}missing {req}")
    try:
        return ReferenceRow(
            dataset=record["dataset"], norm=record["norm"], eps=record["eps"], eps_text=_text(record["eps"]),
            robust_accuracy=record["robust_accuracy"], citation=record["citation"],
            kind=_clean(record.get("kind")), method=_text(record.get("method")), note=_text(record.get("note")),
        )
    except InputError as exc:
        raise InputError(f"{prefix}{exc}") from None


def _read_text(path: str | Path, what: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise InputError(f"{what} file {p} is not a regular file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} file {p} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} file {p} ({exc.strerror})") from None


def parse_claims(text: str, source: str = "claims") -> list[DetectorClaim]:
    """Claims from CSV or JSON text (see :func:`load_claims`)."""
    claims = [claim_from_record(rec, source, where) for where, rec in _read_records(text, source, "claim")]
    if not claims:
        raise InputError(f"{source}: no claims found")
    return claims


def load_claims(path: str | Path) -> list[DetectorClaim]:
    """Claims from a CSV file (header row, ``#`` comments) or a JSON list of objects.

    Columns: dataset, norm, eps (required); robust_accuracy, or fpr + fnr + clean_error; optional
    defense, citation, kind (empirical/certified), note. Bad rows raise :class:`InputError` naming
    the line (CSV) or item (JSON).
    """
    return parse_claims(_read_text(path, "claims"), str(path))


def parse_reference(text: str, source: str = "reference") -> ReferenceTable:
    rows = [reference_from_record(rec, source, where) for where, rec in _read_records(text, source, "reference")]
    if not rows:
        raise InputError(f"{source}: no reference rows found")
    return ReferenceTable(rows, source)


def load_reference(path: str | Path | None = None) -> ReferenceTable:
    """The reference table: the shipped one (``certaudit/tables/detector_reference.csv``) or ``path``."""
    if path is None:
        text = resources.files(_TABLES_PACKAGE).joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
        return parse_reference(text, "built-in reference")
    return parse_reference(_read_text(path, "reference"), str(path))


def example_claims_path(name: str = "table1") -> Path:
    """Path of a shipped example claim file (``table1`` or ``table2``)."""
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    with resources.as_file(resources.files(_TABLES_PACKAGE).joinpath(EXAMPLES[name])) as p:
        return Path(p)


def load_example_claims(name: str = "table1") -> list[DetectorClaim]:
    """The claims of a shipped example (``table1``: Tramèr's Table 1; ``table2``: his Table 2)."""
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    text = resources.files(_TABLES_PACKAGE).joinpath(EXAMPLES[name]).read_text(encoding="utf-8")
    return parse_claims(text, f"example {name}")


# ================================================================================= the reductions

class Detector(ABC):
    """A classifier with a rejection option: :meth:`predict` returns a label or :data:`ABSTAIN`.

    Detectors that can, also expose :meth:`acceptance_score`, a differentiable (B,) score that is
    positive where the input is accepted; the Theorem-4 search climbs it. Without one the search
    falls back to random sampling.
    """

    num_classes: int
    norm: Norm

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64: a label in [0, num_classes) or ABSTAIN for every input."""

    def acceptance_score(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable (B,) score, > 0 iff the input is accepted (not available by default)."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable acceptance score")

    @property
    def has_score(self) -> bool:
        return type(self).acceptance_score is not Detector.acceptance_score

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)


class FunctionDetector(Detector):
    """Any detector given as functions: ``predict_fn(x) -> labels/ABSTAIN``, optional ``score_fn``."""

    def __init__(self, predict_fn: Callable[[torch.Tensor], torch.Tensor], num_classes: int, norm: Norm | str,
                 score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not callable(predict_fn):
            raise InputError("predict_fn must be callable")
        if int(num_classes) < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        self._predict = predict_fn
        self._score = score_fn
        self.num_classes = int(num_classes)
        self.norm = _parse_norm(norm)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._predict(x).long()

    @property
    def has_score(self) -> bool:
        return self._score is not None

    def acceptance_score(self, x: torch.Tensor) -> torch.Tensor:
        if self._score is None:
            return super().acceptance_score(x)
        return self._score(x)


class ClassifierToDetector(Detector):
    """Theorem 5 instantiated with a certified classifier (Tramèr §2.3).

    On input x̂ answer the defense's label if it is certified at radius ε/2 around x̂, else reject
    (ABSTAIN). If the classifier is certified at ε/2 on a clean x with its true label, no x̂ within
    ε of x can be answered with another label: the two ε/2-balls would overlap, and the classifier
    cannot be constant on both with different labels. So the detector's robust accuracy with
    detection at ε is at least the classifier's verified robust accuracy (VRA) at ε/2.
    """

    def __init__(self, defense: Defense, eps: float):
        if not isinstance(defense, Defense):
            raise InputError(f"defense must be a certaudit Defense, got {type(defense).__name__}")
        self.defense = defense
        self.eps = check_eps(eps)
        self.radius = self.eps / 2.0
        self.norm = defense.norm
        self.num_classes = defense.num_classes

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense.accept(x, self.radius).long()

    def label_margins(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) certification margins at ε/2 for every label (a loop over labels, not images)."""
        cols = [self.defense.margin(x, self.radius, torch.full((x.shape[0],), j, dtype=torch.long, device=x.device))
                for j in range(self.num_classes)]
        return torch.stack(cols, dim=1)

    def acceptance_score(self, x: torch.Tensor) -> torch.Tensor:
        """max over labels of the defense's margin at ε/2: > 0 iff some label is certified (accepted)."""
        return self.label_margins(x).amax(dim=1)


SOURCE_DETECTOR, SOURCE_SEARCH, SOURCE_RANDOM = 0, 1, 2
"""Where a Theorem-4 label came from: the detector on x̂, a non-rejected point found near x̂, a random draw."""


@dataclass
class Theorem4Output:
    """Labels of the Theorem-4 classifier and how each was obtained (see the ``SOURCE_*`` codes)."""

    label: torch.Tensor  # (B,) int64, never ABSTAIN
    source: torch.Tensor  # (B,) int64 in {SOURCE_DETECTOR, SOURCE_SEARCH, SOURCE_RANDOM}
    evals: torch.Tensor  # (B,) detector evaluations spent by the search (0 where not rejected)
    point: torch.Tensor  # (B, C, H, W) the accepted input whose label was used (x̂ where none)


class DetectorToClassifier:
    """Theorem 4: a (computationally inefficient) classifier built from a detector robust at ε.

    On input x̂: if the detector accepts x̂, answer its label. Otherwise search the ε/2-ball
    around x̂ (∩ [0,1]^d) for an input the detector accepts and answer that input's label; if the
    search finds none, answer a label drawn with a seeded generator. The exact construction needs
    a global search; here the search is an attack within ``budget`` detector evaluations per
    rejected input:

    * with a differentiable :meth:`Detector.acceptance_score`: PGD maximizing it (minimizing
      rejection), first from x̂ then from random points of the ball, checking acceptance every
      ``check_every`` steps (each gradient step and each check costs one evaluation);
    * without one: random search, ``candidates_per_round`` uniform draws per rejected input per round.

    All rejected inputs of a batch are searched together. A :class:`Defense` passed instead of a
    detector is first wrapped by :class:`ClassifierToDetector` at the same ε.
    """

    def __init__(self, detector: Detector | Defense, eps: float, budget: int = 100, *, steps: int = 10,
                 check_every: int = 1, step_size: float | None = None, schedule: str = "constant",
                 candidates_per_round: int = 8, search: str = "auto", seed: int = 0):
        if isinstance(detector, Defense):
            detector = ClassifierToDetector(detector, eps)
        if not isinstance(detector, Detector):
            raise InputError(f"detector must be a certaudit Detector or Defense, got {type(detector).__name__}")
        if search not in ("auto", "pgd", "random"):
            raise InputError(f"unknown search {search!r}; choose one of: auto, pgd, random")
        if search == "pgd" and not detector.has_score:
            raise InputError(f"search='pgd' needs a detector with an acceptance score; "
                             f"{type(detector).__name__} has none")
        for name, v in (("budget", budget), ("steps", steps), ("check_every", check_every),
                        ("candidates_per_round", candidates_per_round)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        self.detector = detector
        self.eps = check_eps(eps)
        self.radius = self.eps / 2.0
        self.norm = detector.norm
        self.num_classes = detector.num_classes
        self.budget = budget
        self.steps = steps
        self.check_every = check_every
        self.step_size = step_size
        self.schedule = schedule
        self.candidates_per_round = candidates_per_round
        self.search = "pgd" if search == "auto" and detector.has_score else ("random" if search == "auto" else search)
        self.seed = int(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x).label

    predict = __call__

    def classify(self, x: torch.Tensor) -> Theorem4Output:
        """Labels for a batch (B, C, H, W) in [0, 1], with their provenance."""
        x = check_images(x)
        generator = make_generator(self.seed)  # CPU draws: the same labels on every device
        labels = self.detector.predict(x).long()
        source = torch.full_like(labels, SOURCE_DETECTOR)
        evals = torch.zeros_like(labels)
        point = x.detach().clone()
        rejected = (labels == ABSTAIN).nonzero().flatten()  # (R,)
        if rejected.numel() == 0:
            return Theorem4Output(labels, source, evals, point)
        xr = x[rejected].detach()
        if self.search == "pgd":
            found, found_label, xf, used = self._pgd_search(xr, generator)
        else:
            found, found_label, xf, used = self._random_search(xr, generator)
        random_labels = torch.randint(self.num_classes, (xr.shape[0],), generator=generator).to(labels.device)
        labels[rejected] = torch.where(found, found_label, random_labels)
        source[rejected] = torch.where(found, torch.full_like(found_label, SOURCE_SEARCH),
                                       torch.full_like(found_label, SOURCE_RANDOM))
        evals[rejected] = used
        point[rejected] = torch.where(found.view(-1, *([1] * (x.dim() - 1))), xf, xr)
        return Theorem4Output(labels, source, evals, point)

    def _pgd_search(self, xr: torch.Tensor, generator: torch.Generator):
        found_label = torch.full((xr.shape[0],), ABSTAIN, dtype=torch.long, device=xr.device)

        def score(xs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return self.detector.acceptance_score(xs)

        def accepted(xs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            pred = self.detector.predict(xs).long()
            ok = pred != ABSTAIN
            found_label[index[ok]] = pred[ok]
            return ok

        steps = min(self.steps, self.budget)
        per_restart = steps + 1 + (steps + self.check_every - 1) // self.check_every
        restarts = max(1, math.ceil(self.budget / per_restart) + 1)  # the budget stops the last one
        res = pgd(score, xr, self.radius, self.norm, steps=steps, step_size=self.step_size, restarts=restarts,
                  random_start=False, schedule=self.schedule, generator=generator, done_fn=accepted,
                  check_every=self.check_every, budget=self.budget)
        return res.success, found_label, res.x, res.evals

    def _random_search(self, xr: torch.Tensor, generator: torch.Generator):
        n = xr.shape[0]
        found = torch.zeros(n, dtype=torch.bool, device=xr.device)
        found_label = torch.full((n,), ABSTAIN, dtype=torch.long, device=xr.device)
        xf = xr.clone()
        used = torch.zeros(n, dtype=torch.long, device=xr.device)
        active = torch.arange(n, device=xr.device)
        spent = 0
        while active.numel() > 0 and spent < self.budget:
            k = min(self.candidates_per_round, self.budget - spent)
            xa = xr[active].repeat_interleave(k, dim=0)  # (A*k, C, H, W)
            cand = random_in_ball(xa, self.radius, self.norm, generator)
            pred = self.detector.predict(cand).long().view(-1, k)  # (A, k)
            ok = pred != ABSTAIN
            hit_rows = ok.any(dim=1)
            first = ok.long().argmax(dim=1)  # first accepted candidate of each row
            hit = active[hit_rows]
            sel = first[hit_rows]
            cand = cand.view(active.shape[0], k, *xr.shape[1:])
            xf[hit] = cand[hit_rows, sel]
            found_label[hit] = pred[hit_rows, sel]
            used[hit] = spent + sel + 1
            found[hit] = True
            spent += k
            active = active[~hit_rows]
        used[~found] = spent
        return found, found_label, xf, used


# ====================================================================== the empirical check

@dataclass
class ReductionCheck:
    """Theorem 5, measured: the detector built from a certified classifier, attacked at ε.

    Per input: ``certified`` (the classifier is certified at ε/2 with the true label), ``clean_ok``
    (the detector answers the true label on x), ``attack_wrong`` (the attack found x̂ within ε
    with a wrong, non-ABSTAIN answer), ``evals`` (attack evaluations used).
    """

    eps: float
    norm: Norm
    certified: torch.Tensor  # (N,) bool
    clean_ok: torch.Tensor  # (N,) bool
    attack_wrong: torch.Tensor  # (N,) bool
    evals: torch.Tensor  # (N,) int64

    @property
    def n(self) -> int:
        return int(self.certified.shape[0])

    @property
    def vra_half(self) -> float:
        """The classifier's verified robust accuracy at ε/2."""
        return float(self.certified.float().mean())

    @property
    def robust_accuracy_with_detection(self) -> float:
        """Measured 1 − R_adv-det at ε (Definition 3 under this attack; an upper estimate)."""
        return float((self.clean_ok & ~self.attack_wrong).float().mean())

    @property
    def violations(self) -> int:
        """Certified inputs where the detector was driven to a wrong label (Theorem 5 says: 0)."""
        return int((self.certified & self.attack_wrong).sum())

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n, "eps": self.eps, "half_eps": self.eps / 2, "norm": self.norm.value,
            "vra_half_eps": self.vra_half,
            "detector_clean_accuracy": float(self.clean_ok.float().mean()),
            "robust_accuracy_with_detection": self.robust_accuracy_with_detection,
            "wrong_answers_forced": int(self.attack_wrong.sum()),
            "violations_on_certified": self.violations,
        }


def check_classifier_to_detector(defense: Defense, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                                 steps: int = 50, restarts: int = 2, step_size: float | None = None,
                                 schedule: str = "constant", seed: int = 0, batch_size: int = 256) -> ReductionCheck:
    """Attack the Theorem-5 detector at ε and compare with the classifier's VRA at ε/2.

    For each (x, y): PGD over the ε-ball around x maximizes the best certification margin at ε/2
    of any wrong label (so that the detector *accepts* a wrong label), stopping as soon as the
    detector answers a label outside {y, ⊥}. Batched over inputs; ``batch_size`` bounds memory.
    """
    x = check_images(x)
    y = check_labels(y, x.shape[0], defense.num_classes, "y").to(x.device)
    eps = check_eps(eps)
    detector = ClassifierToDetector(defense, eps)
    generator = make_generator(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    certified, clean_ok, wrong, evals = [], [], [], []
    for lo in range(0, x.shape[0], batch_size):  # a loop over batches, not images
        xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
        # the defense's own check at exactly ε/2 (no bisection radius compared with it)
        cert = defense.certify_checks(xb, [detector.radius], full_radius=False)
        certified.append(cert.certified_at(detector.radius).to(yb.device) & (cert.label.to(yb.device) == yb))
        clean_ok.append(detector.predict(xb) == yb)

        def wrong_label_margin(xs: torch.Tensor, index: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
            m = detector.label_margins(xs)  # (b, C)
            own = torch.nn.functional.one_hot(yb[index], detector.num_classes).bool()
            return m.masked_fill(own, -math.inf).amax(dim=1)

        def answered_wrong(xs: torch.Tensor, index: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
            pred = detector.predict(xs)
            return (pred != yb[index]) & (pred != ABSTAIN)

        res = pgd(wrong_label_margin, xb, eps, defense.norm, steps=steps, step_size=step_size, restarts=restarts,
                  random_start=False, schedule=schedule, generator=generator, done_fn=answered_wrong,
                  check_every=1)
        wrong.append(res.success)
        evals.append(res.evals)
    return ReductionCheck(eps, defense.norm, torch.cat(certified), torch.cat(clean_ok), torch.cat(wrong),
                          torch.cat(evals))
