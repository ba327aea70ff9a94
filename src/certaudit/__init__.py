"""certaudit: what is a robustness certificate really worth?

Public API (everything else is private by default)::

    import certaudit
    summary = certaudit.audit(model, x, y, defense="smoothing", eps=0.5, sigma=0.25, out="audit-dir")
    from certaudit import load_dataset, load_checkpoint, SmoothedClassifier, ABSTAIN
"""

from __future__ import annotations

import importlib
from typing import Any

from certaudit.data import dataset_info, load_dataset
from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm
from certaudit.defenses.registry import build_defense
from certaudit.errors import CheckpointError, DataNotFoundError, InputError
from certaudit.models import ModelMeta, build_model, load_checkpoint, save_checkpoint
from certaudit.results import RowWriter, read_rows
from certaudit.train import TrainConfig, train

__version__ = "0.1.0"

# Heavier modules, imported on first use.
_LAZY = {
    "audit": "certaudit.api",
    "SmoothedClassifier": "certaudit.defenses.smoothing",
    "LipschitzDefense": "certaudit.defenses.lipschitz",
    "IntervalDefense": "certaudit.defenses.interval",
    "ClassifierToDetector": "certaudit.detection",
    "DetectorToClassifier": "certaudit.detection",
    "degrade_batch": "certaudit.audits.degradation",
    "summarize_degradation": "certaudit.audits.degradation",
    "fpr_curve": "certaudit.audits.degradation",
    "shadow_attack": "certaudit.attacks.shadow",
    "ShadowConfig": "certaudit.attacks.shadow",
    "spoof_batch": "certaudit.audits.spoofing",
    "run_audit": "certaudit.audits.pipeline",
    "shard_indices": "certaudit.distributed",
    "ShardedRowWriter": "certaudit.distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'certaudit' has no attribute {name!r}")


__all__ = [
    "ABSTAIN", "Certificates", "Defense", "Norm", "build_defense", "dataset_info", "load_dataset",
    "ModelMeta", "build_model", "load_checkpoint", "save_checkpoint", "RowWriter", "read_rows",
    "TrainConfig", "train", "InputError", "DataNotFoundError", "CheckpointError", *_LAZY,
]
