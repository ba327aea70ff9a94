"""The audit's summary: every headline figure from the stage rows, and its JSON schema.

:func:`build_summary` is a pure function of the rows (plus the configuration, versions, device and
timings it records), so a summary can always be recomputed from an audit folder's rows;
:data:`SUMMARY_SCHEMA` validates ``summary.json``.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # the pipeline imports this module; its types are only annotations here
    from certaudit.audits.pipeline import AuditSettings, AuditSource

STAGES = ("clean", "certify", "degrade", "spoof")
SUMMARY_VERSION = 2  # 2: spoof success within a stated budget (spoof_budget), the unbounded figure apart


def _versions() -> dict[str, Any]:
    import certaudit

    out = {"certaudit": certaudit.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "platform": platform.platform()}
    for mod in ("scipy", "matplotlib"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional in odd installs
            out[mod] = None
    return out


def _device_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": dev.type, "name": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(dev)
    return info


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def build_summary(source: AuditSource, settings: AuditSettings, guard: Any, norm: str,
                  rows: dict[str, list[dict[str, Any]]], timings: dict[str, Any], dev: torch.device,
                  wall: float, *, input_dim: int, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All headline figures from the stage rows (see the README for the meaning of each)."""
    from certaudit.audits import certified as cert_mod
    from certaudit.audits import spoofing as spoof_mod

    eps = float(settings.eps)
    head: dict[str, Any] = {"defense": source.defense.lower(), "norm": norm, "eps": eps,
                            "images": len(source.indices)}
    out: dict[str, Any] = {
        "kind": "certaudit-audit", "summary_version": SUMMARY_VERSION,
        "config": {"model": source.model, "model_sha256": source.model_sha256, "arch": source.arch,
                   "defense": source.defense.lower(), "dataset": source.dataset, "split": source.split,
                   "indices": _ranges(source.indices), "images": len(source.indices), "norm": norm,
                   "input_dim": int(input_dim), "defense_settings": guard.settings(),
                   "defense_diagnostics": guard.diagnostics(),
                   "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
                   **({"extra": source.extra} if source.extra else {})},
        "seed": settings.seed, "device": _device_info(dev), "versions": _versions(),
        "stages": list(settings.stages), "headline": head,
    }
    if class_names is not None:
        out["config"]["classes"] = list(class_names)
    if "clean" in rows:
        r = rows["clean"]
        head["clean_accuracy"] = _rate(sum(bool(v["correct"]) for v in r), len(r))
        out["clean"] = {"images": len(r), "accuracy": head["clean_accuracy"]}
    if "certify" in rows:
        r = rows["certify"]
        radii = sorted(set(cert_mod.default_radii(norm)) | {0.0, eps / 2, eps, 2 * eps})
        c = cert_mod.summarize(r, radii, eps=eps)
        out["certification"] = c
        head.update({"certified_clean_accuracy": c.get("clean_accuracy"), "abstain_rate": c.get("abstain_rate"),
                     "vra_eps": c.get("vra_eps"), "vra_2eps": c.get("vra_2eps"),
                     "rejection_rate_eps": c.get("rejection_rate_eps")})
        if r:
            from certaudit.audits.degradation import default_curve_radii, fpr_curve

            grid = sorted(set(default_curve_radii(r, 40)) | {eps, 2 * eps})
            out["fpr_curve"] = fpr_curve(r, grid)
    if "degrade" in rows:
        from certaudit.audits.degradation import summarize_degradation
        from certaudit.audits.degrade_job import proof_text

        d = (summarize_degradation(rows["degrade"], eps, proof=proof_text(guard, guard.default_proofs))
             if rows["degrade"] else {"test": 0})
        out["degradation"] = d
        for key in ("testR", "testA_lower", "testA_upper", "testA_2eps_check", "fpr_lower", "fpr_upper",
                    "fpr_2eps_check", "utility_reduction_lower", "utility_reduction_upper",
                    "utility_reduction_2eps_check", "lower_over_upper", "upper_bound"):
            head[key] = d.get(key)
        inv = d.get("invariant") or {}
        head["lower_subset_upper"] = inv.get("lower_subset_upper")
        head["broken_certificates"] = len(d.get("label_changed") or [])
    if "spoof" in rows:
        sp = spoof_mod.summarize(rows["spoof"], eps)
        out["spoofing"] = sp
        unbounded = sp.get("unbounded") or {}
        head.update({"spoof_images": sp.get("images"), "spoof_attacked": sp.get("attacked"),
                     "spoof_budget": sp.get("budget_label"), "spoof_success_rate": sp.get("success_rate"),
                     "spoof_natural_certified": sp.get("natural_certified"),
                     "natural_radius_mean": sp.get("natural_radius_mean"),
                     "natural_radius_mean_attacked": sp.get("natural_radius_mean_attacked"),
                     "natural_radius_mean_successes": sp.get("natural_radius_mean_successes"),
                     "shadow_radius_mean": sp.get("shadow_radius_mean"),
                     "spoof_successes_natural_wrong": sp.get("successes_natural_wrong"),
                     "spoof_success_rate_natural_correct": sp.get("success_rate_natural_correct"),
                     "spoof_attacked_natural_correct": sp.get("attacked_natural_correct"),
                     "spoof_success_rate_unbounded": unbounded.get("success_rate"),
                     "shadow_radius_mean_unbounded": unbounded.get("shadow_radius_mean"),
                     "spoofed_beats_natural": sp.get("spoofed_beats_natural"),
                     "robust_error": sp.get("robust_error"), "attack_error": sp.get("attack_error")})
    out["timings"] = {"stages": timings, "wall_seconds_this_run": round(wall, 3)}
    out["coverage"] = coverage(norm, eps, input_dim)
    return _clean_json(out)


def coverage(norm: str, eps: float, input_dim: int) -> dict[str, Any]:
    """What an ε-certificate covers in the other norm (ℓ∞ ball of ε has ℓ2 radius ε·√d)."""
    root = math.sqrt(input_dim)
    if norm == "l2":
        return {"norm": "l2", "eps": eps, "input_dim": input_dim, "linf_radius_covered": eps / root,
                "linf_radius_covered_255": eps / root * 255, "l2_radius_of_linf_ball_eps": eps * root}
    return {"norm": "linf", "eps": eps, "input_dim": input_dim, "l2_radius_covered": eps,
            "l2_radius_of_linf_ball_eps": eps * root}


def _ranges(indices: Sequence[int]) -> list[list[int]]:
    """Indices as [start, stop, step] runs (compact and exact)."""
    out: list[list[int]] = []
    idx = [int(i) for i in indices]
    i = 0
    while i < len(idx):
        j = i + 1
        step = idx[j] - idx[i] if j < len(idx) else 1
        while j < len(idx) and idx[j] - idx[j - 1] == step and step > 0:
            j += 1
        if j - i == 1:
            step = 1
        out.append([idx[i], idx[j - 1] + step, step])
        i = j
    return out


def expand_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [i for a, b, s in ranges for i in range(a, b, s)]


def _clean_json(obj: Any) -> Any:
    """NaN/inf → None (JSON has neither), tuples → lists, numpy scalars → Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------- JSON schema

_NUM = {"type": ["number", "null"]}
_RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_COUNT = {"type": "integer", "minimum": 0}

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "certaudit audit summary",
    "type": "object",
    "required": ["kind", "summary_version", "config", "seed", "device", "versions", "stages", "headline",
                 "timings", "coverage"],
    "properties": {
        "kind": {"enum": ["certaudit-audit"]},
        "summary_version": {"enum": [SUMMARY_VERSION]},
        "seed": {"type": "integer"},
        "stages": {"type": "array", "items": {"enum": list(STAGES)}},
        "config": {
            "type": "object",
            "required": ["model", "defense", "dataset", "split", "indices", "images", "norm", "input_dim",
                         "defense_settings", "settings"],
            "properties": {
                "model": {"type": "string"}, "model_sha256": {"type": ["string", "null"]},
                "defense": {"enum": ["smoothing", "lipschitz", "interval"]},
                "dataset": {"type": "string"}, "split": {"enum": ["train", "test"]},
                "indices": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                "images": {"type": "integer", "minimum": 1}, "norm": {"enum": ["l2", "linf"]},
                "input_dim": {"type": "integer", "minimum": 1},
                "defense_settings": {"type": "object"},
                "settings": {"type": "object", "required": ["eps", "seed", "attack"],
                             "properties": {"eps": {"type": "number", "exclusiveMinimum": 0}}},
            },
        },
        "device": {"type": "object", "required": ["type", "cpu_count", "torch_threads"],
                   "properties": {"type": {"type": "string"}}},
        "versions": {"type": "object", "required": ["certaudit", "python", "torch", "numpy"],
                     "properties": {k: {"type": "string"} for k in ("certaudit", "python", "torch", "numpy")}},
        "headline": {
            "type": "object",
            "required": ["defense", "norm", "eps", "images"],
            "properties": {
                "defense": {"type": "string"}, "norm": {"enum": ["l2", "linf"]},
                "eps": {"type": "number", "exclusiveMinimum": 0}, "images": {"type": "integer", "minimum": 1},
                **{k: _RATE for k in ("clean_accuracy", "certified_clean_accuracy", "abstain_rate", "vra_eps",
                                      "vra_2eps", "rejection_rate_eps", "fpr_lower", "fpr_upper",
                                      "utility_reduction_lower", "utility_reduction_upper", "lower_over_upper",
                                      "fpr_2eps_check", "utility_reduction_2eps_check",
                                      "spoof_success_rate", "spoof_success_rate_unbounded",
                                      "spoof_success_rate_natural_correct",
                                      "spoofed_beats_natural", "robust_error", "attack_error")},
                **{k: _COUNT for k in ("testR", "testA_lower", "testA_2eps_check", "broken_certificates",
                                       "spoof_images", "spoof_attacked")},
                "testA_upper": {"type": ["integer", "null"], "minimum": 0}, "upper_bound": {"type": "string"},
                **{k: {"type": ["integer", "null"], "minimum": 0}
                   for k in ("spoof_natural_certified", "spoof_successes_natural_wrong",
                             "spoof_attacked_natural_correct")},
                "natural_radius_mean": _NUM, "shadow_radius_mean": _NUM, "shadow_radius_mean_unbounded": _NUM,
                "natural_radius_mean_attacked": _NUM, "natural_radius_mean_successes": _NUM,
                "spoof_budget": {"type": ["string", "null"]},
                "lower_subset_upper": {"type": ["boolean", "null"]},
            },
        },
        "clean": {"type": "object", "required": ["images", "accuracy"]},
        "certification": {"type": "object", "required": ["images", "certified_accuracy"],
                          "properties": {"certified_accuracy": {"type": "array", "items": {
                              "type": "object", "required": ["radius", "accuracy"],
                              "properties": {"radius": {"type": "number", "minimum": 0}, "accuracy": _RATE,
                                             "source": {"type": "string"}}}}}},
        "fpr_curve": {"type": "array", "items": {"type": "object",
                                                  "required": ["radius", "testR", "fpr_2r_check"],
                                                  "properties": {"radius": {"type": "number"}, "testR": _COUNT,
                                                                 "fpr_2r_check": _RATE}}},
        "degradation": {"type": "object", "required": ["test"]},
        "spoofing": {"type": "object", "required": ["images"]},
        "timings": {"type": "object", "required": ["stages", "wall_seconds_this_run"],
                    "properties": {"wall_seconds_this_run": {"type": "number", "minimum": 0},
                                   "stages": {"type": "object", "additionalProperties": {
                                       "type": "object", "required": ["wall_seconds_this_run", "new_images",
                                                                      "row_seconds"]}}}},
        "coverage": {"type": "object", "required": ["norm", "eps", "input_dim"]},
    },
}

__all__ = ["STAGES", "SUMMARY_VERSION", "SUMMARY_SCHEMA", "build_summary", "coverage", "expand_ranges"]
