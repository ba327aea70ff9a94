"""Detector claims, the reference table of robust classification, and the verdicts (Tramèr's Theorem 4
turned into a check: a detector claim at ε implies a classifier at ε/2). See the package docstring."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

import torch

from certaudit import validate
from certaudit.defenses.base import ABSTAIN, Norm
from certaudit.errors import InputError

TABLES_PACKAGE = "certaudit.tables"
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


def parse_norm_name(value: Any) -> Norm:
    if isinstance(value, Norm):
        return value
    key = str(value).strip().lower().replace(" ", "")
    return Norm.parse(_NORM_SPELLINGS.get(key, key))


def _probability(value: Any, name: str) -> float:
    """A fraction in [0, 1]; a string ending in ``%`` is a percentage (``75%`` -> 0.75)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        v = validate.number(value.strip()[:-1], name) / 100.0
    else:
        v = validate.number(value, name)
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{name} must be a fraction in [0, 1] (write 75% for a percentage), got {value!r}")
    return v


def _radius(value: Any, name: str = "eps") -> tuple[float, str]:
    """A radius > 0 and the text to show for it (fractions like ``8/255`` keep their form)."""
    v = validate.positive(value, name)
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


def as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def is_blank(value: Any) -> bool:
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
        if is_blank(self.dataset):
            raise InputError("a claim needs a dataset")
        self.dataset = str(self.dataset).strip()
        self.norm = parse_norm_name(self.norm)
        eps, text = _radius(self.eps if not self.eps_text else self.eps_text)
        self.eps, self.eps_text = eps, text
        self.kind = ClaimKind.parse(self.kind)
        rates = {"fpr": self.fpr, "fnr": self.fnr, "clean_error": self.clean_error}
        given = [k for k, v in rates.items() if not is_blank(v)]
        if self.robust_accuracy is not None and not is_blank(self.robust_accuracy):
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
        self.defense = as_text(self.defense)
        self.citation = as_text(self.citation)
        self.note = as_text(self.note)

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
        if is_blank(self.dataset):
            raise InputError("a reference row needs a dataset")
        self.dataset = str(self.dataset).strip()
        self.norm = parse_norm_name(self.norm)
        self.eps, self.eps_text = _radius(self.eps if not self.eps_text else self.eps_text)
        self.robust_accuracy = _probability(self.robust_accuracy, "robust_accuracy")
        if is_blank(self.citation):
            raise InputError("every reference row needs a citation")
        self.citation = as_text(self.citation)
        self.kind = ClaimKind.parse(self.kind)
        self.method = as_text(self.method)
        self.note = as_text(self.note)

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
        key, n = dataset_key(dataset), parse_norm_name(norm)
        return [r for r in self.rows if dataset_key(r.dataset) == key and r.norm is n]


# ========================================================================================= verdicts

FLAGGED, NOT_FLAGGED, NO_REFERENCE = "flagged", "not flagged", "no reference"


@dataclass
class ClaimVerdict:
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


def reference_cells(verdicts: Sequence[ClaimVerdict], pct: Callable[[float], str], *, dash: str = "–",
                    at: str = " at ") -> tuple[list[str], list[str]]:
    """For tables of verdicts: per verdict the "best known" cell (the reference's accuracy, formatted by
    ``pct``, with the number [k] of its citation, and ``at`` its radius where it is a smaller-radius
    reference; ``dash`` without one), and the citations in the order the cells number them."""
    refs: list[str] = []
    cells = []
    for v in verdicts:
        if v.reference is None:
            cells.append(dash)
            continue
        if v.reference.citation not in refs:
            refs.append(v.reference.citation)
        cell = f"{pct(v.reference.robust_accuracy)} [{refs.index(v.reference.citation) + 1}]"
        if v.basis == "smaller-radius":
            cell += f"{at}{v.reference.eps_text}"
        cells.append(cell)
    return cells, refs


def claim_cell(claim: DetectorClaim, pct: Callable[[float], str], certified_mark: str, ge: str = "≥") -> str:
    """The claimed robust accuracy with detection, ``ge`` where it is Equation 4's lower bound, marked
    when the detector is certified."""
    text = (ge if claim.accuracy_source == "eq4" else "") + pct(claim.robust_accuracy_with_detection)
    return text + certified_mark if claim.kind.value == "certified" else text


def check_claim(claim: DetectorClaim, table: ReferenceTable | None = None, *, exact_only: bool = False) -> ClaimVerdict:
    """Compare the classification claim implied by Theorem 4 with the reference table.

    The claim at ε implies a classifier with robust accuracy ≥ ``a`` at ε/2. Rows for the same
    data set and norm are considered; a certified claim is compared with certified rows when the
    table has any (like against like, Table 2 of the paper), else with all rows. A row at exactly
    ε/2 decides (best accuracy among such rows); failing that, and unless ``exact_only``, rows at
    smaller radii can still *flag* a claim (a classifier at ε/2 is also one at any smaller radius),
    but they cannot clear it: without an exact row the answer is then "no reference".
    """
    table = _shipped_reference() if table is None else table
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
        return ClaimVerdict(claim, ref, flagged, margin, "exact", text)

    smaller = [x for x in _best_by_radius(rows).values() if x.eps < r]
    if smaller and not exact_only:
        ref = min(smaller, key=lambda x: x.robust_accuracy)
        margin = implied - ref.robust_accuracy
        if margin > 1e-12:
            text = (f"no reference at eps/2={claim.implied_eps_text}, but a classifier robust there is also robust "
                    f"at {ref.eps_text}, where the best known is {_pct(ref.robust_accuracy)}: the implied "
                    f"{_pct(implied)} is {100 * margin:.1f} points above it")
            return ClaimVerdict(claim, ref, True, margin, "smaller-radius", text)
        text = (f"no reference at {where}; the nearest smaller-radius reference ({ref.eps_text}: "
                f"{_pct(ref.robust_accuracy)}) is not exceeded, which says nothing about eps/2")
        return ClaimVerdict(claim, None, None, None, None, text)
    if rows:
        radii = ", ".join(sorted({x.eps_text for x in rows}, key=lambda s: validate.number(s, "eps")))
        text = f"no reference at {where} (the table has {claim.dataset} {claim.norm.value} rows only at {radii})"
    else:
        text = f"no reference for {claim.dataset} {claim.norm.value} in the table ({table.source})"
    return ClaimVerdict(claim, None, None, None, None, text)


def check_claims(claims: Sequence[DetectorClaim], table: ReferenceTable | None = None, *,
                 exact_only: bool = False) -> list[ClaimVerdict]:
    """:func:`check_claim` for every claim, with one reference table."""
    table = _shipped_reference() if table is None else table
    return [check_claim(c, table, exact_only=exact_only) for c in claims]


def summarize_verdicts(verdicts: Sequence[ClaimVerdict]) -> dict[str, int]:
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



def _shipped_reference() -> ReferenceTable:
    """The shipped reference table (read by :mod:`.claims_io`, which builds on this module)."""
    from certaudit.detection.claims_io import load_reference  # the reader imports this module: no cycle at load

    return load_reference()
