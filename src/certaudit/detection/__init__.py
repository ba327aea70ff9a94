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

from certaudit.detection.claims import (
    EXAMPLES,
    ClaimKind,
    DetectorClaim,
    ReferenceRow,
    ReferenceTable,
    ClaimVerdict,
    check_claim,
    check_claims,
    dataset_key,
    robust_accuracy_with_detection_bound,
    robust_risk_with_detection,
    robust_risk_with_detection_bound,
    summarize_verdicts,
)
from certaudit.detection.claims_io import (
    claim_from_record,
    example_claims_path,
    load_claims,
    load_example_claims,
    load_reference,
    parse_claims,
    parse_reference,
    reference_from_record,
)
from certaudit.detection.reductions import (
    SOURCE_DETECTOR,
    SOURCE_RANDOM,
    SOURCE_SEARCH,
    ClassifierToDetector,
    Detector,
    DetectorToClassifier,
    FunctionDetector,
    ReductionCheck,
    Theorem4Output,
    check_classifier_to_detector,
)

__all__ = [
    "ClaimKind",
    "DetectorClaim",
    "ReferenceRow",
    "ReferenceTable",
    "ClaimVerdict",
    "robust_risk_with_detection_bound",
    "robust_accuracy_with_detection_bound",
    "robust_risk_with_detection",
    "check_claim",
    "check_claims",
    "summarize_verdicts",
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
    "SOURCE_DETECTOR",
    "SOURCE_RANDOM",
    "SOURCE_SEARCH",
    "parse_claims",
    "parse_reference",
    "load_example_claims",
    "dataset_key",
    "claim_from_record",
    "reference_from_record",
]
