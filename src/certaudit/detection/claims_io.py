"""Reading detector claims and reference tables from CSV or JSON (shipped examples included)."""

from __future__ import annotations

import csv
import io
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any


from certaudit.errors import InputError

from certaudit.detection.claims import (
    EXAMPLES, REFERENCE_FILE, TABLES_PACKAGE, DetectorClaim, ReferenceRow, ReferenceTable, as_text, is_blank,
)

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
    return None if is_blank(value) else value


def claim_from_record(record: dict[str, Any], source: str = "claims", where: str = "") -> DetectorClaim:
    """Build a claim from one CSV row or JSON object (keys are column names), with located errors."""
    prefix = f"{source}: {where}: " if where else f"{source}: "
    _check_columns(record, _CLAIM_COLUMNS, source, where or "record")
    for req in ("dataset", "norm", "eps"):
        if is_blank(record.get(req)):
            raise InputError(f"{prefix}missing {req}")
    try:
        return DetectorClaim(
            dataset=record["dataset"], norm=record["norm"], eps=record["eps"], eps_text=as_text(record["eps"]),
            robust_accuracy=_clean(record.get("robust_accuracy")), fpr=_clean(record.get("fpr")),
            fnr=_clean(record.get("fnr")), clean_error=_clean(record.get("clean_error")),
            defense=as_text(record.get("defense")), citation=as_text(record.get("citation")),
            kind=_clean(record.get("kind")), note=as_text(record.get("note")),
        )
    except InputError as exc:
        raise InputError(f"{prefix}{exc}") from None


def reference_from_record(record: dict[str, Any], source: str = "reference", where: str = "") -> ReferenceRow:
    prefix = f"{source}: {where}: " if where else f"{source}: "
    _check_columns(record, _REFERENCE_COLUMNS, source, where or "record")
    for req in ("dataset", "norm", "eps", "robust_accuracy", "citation"):
        if is_blank(record.get(req)):
            raise InputError(f"{prefix}missing {req}")
    try:
        return ReferenceRow(
            dataset=record["dataset"], norm=record["norm"], eps=record["eps"], eps_text=as_text(record["eps"]),
            robust_accuracy=record["robust_accuracy"], citation=record["citation"],
            kind=_clean(record.get("kind")), method=as_text(record.get("method")), note=as_text(record.get("note")),
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
        text = resources.files(TABLES_PACKAGE).joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
        return parse_reference(text, "built-in reference")
    return parse_reference(_read_text(path, "reference"), str(path))


def example_claims_path(name: str = "table1") -> Path:
    """Path of a shipped example claim file (``table1`` or ``table2``)."""
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    with resources.as_file(resources.files(TABLES_PACKAGE).joinpath(EXAMPLES[name])) as p:
        return Path(p)


def load_example_claims(name: str = "table1") -> list[DetectorClaim]:
    """The claims of a shipped example (``table1``: Tramèr's Table 1; ``table2``: his Table 2)."""
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    text = resources.files(TABLES_PACKAGE).joinpath(EXAMPLES[name]).read_text(encoding="utf-8")
    return parse_claims(text, f"example {name}")


# ================================================================================= the reductions

