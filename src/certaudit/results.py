"""Append-only JSONL result rows that survive crashes and resume without losing or duplicating rows.

File layout: the first line is a header ``{"kind": "header", "config": {...}, "config_hash": "..."}``;
every further line is one result row (a JSON object with a unique key, by default ``"index"``).
Each row is flushed and fsync'ed as it is written. On reopen, a torn last line (a crash mid-write)
is cut off, the header's configuration hash must match the new run's (else the run refuses to mix
results of different experiments), and :meth:`RowWriter.done` tells which keys to skip.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from certaudit.errors import InputError


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=False, default=_json_default, allow_nan=False, separators=(",", ":"))


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RowWriter:
    """Resumable writer of JSONL rows (one experiment per file)."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], key: str = "index"):
        self.path = Path(path)
        self.key = key
        self.config = config
        self.hash = config_hash(config)
        self._done: set[Any] = set()
        self.rows: list[dict[str, Any]] = []
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"output path {self.path} is a directory; give a .jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume()
        else:
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(_dumps({"kind": "header", "config": config, "config_hash": self.hash}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self._fh = open(self.path, "a", encoding="utf-8")

    def _resume(self) -> None:
        with open(self.path, "rb") as fh:
            data = fh.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn final line from a crash: drop it
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
        lines = data.decode("utf-8", errors="strict").splitlines()
        if not lines:
            raise InputError(f"{self.path}: no header line; delete the file or choose another output")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise InputError(f"{self.path} is not a certaudit results file; choose another output") from None
        if not isinstance(header, dict) or header.get("kind") != "header":
            raise InputError(f"{self.path} is not a certaudit results file; choose another output")
        if header.get("config_hash") != self.hash:
            raise InputError(
                f"{self.path} holds results of a different configuration (hash {header.get('config_hash')} "
                f"vs {self.hash}); use another output path or delete it"
            )
        for i, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{self.path}:{i}: corrupt row; delete the file to start over") from None
            self.rows.append(row)
            self._done.add(_hashable(row.get(self.key)))

    def done(self) -> set[Any]:
        """Keys of rows already written (skip them on resume)."""
        return set(self._done)

    def write(self, row: dict[str, Any]) -> None:
        self.write_many([row])

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows, then flush and fsync once; a row whose key is already written is an error."""
        rows = list(rows)
        if not rows:
            return
        text, keys = [], []
        for row in rows:
            k = _hashable(row.get(self.key))
            if k in self._done or k in keys:
                raise RuntimeError(f"row with {self.key}={k!r} already written to {self.path}")
            keys.append(k)
            text.append(_dumps(row) + "\n")  # serialise everything before writing anything
        self._done.update(keys)
        self._fh.write("".join(text))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows.extend(rows)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def read_rows(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a results file: (header, complete rows). A torn last line is ignored."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"results file not found: {p}")
    header: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    for line in _complete_lines(p):
        obj = json.loads(line)
        if header is None:
            if not isinstance(obj, dict) or obj.get("kind") != "header":
                raise InputError(f"{p} is not a certaudit results file")
            header = obj
        else:
            rows.append(obj)
    if header is None:
        raise InputError(f"{p} is empty")
    return header, rows


def _complete_lines(p: Path) -> Iterator[str]:
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    yield from data[:end].decode("utf-8").splitlines()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write a JSON document atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    return p
