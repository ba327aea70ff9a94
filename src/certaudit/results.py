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
    """Resumable writer of JSONL rows (one experiment per file, one writer at a time).

    The file is checked read-only before anything is written: a file that is not a certaudit
    results file (no header line, not JSON, not UTF-8: a model, a text file) is refused untouched;
    a header whose configuration no longer matches its own hash (edited by hand) is refused; rows
    with a key that occurs twice are refused. Only then may a torn last row of *our* file (a crash
    mid-write) be cut. An exclusive lock (``fcntl.flock`` on ``<path>.lock``, holding the writer's
    pid) is held for the writer's lifetime: a second writer on the same file is refused, naming the
    holder. The lock dies with its process (a crashed run leaves no stale lock).
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], key: str = "index"):
        self.path = Path(path)
        self.key = key
        self.config = config
        self.hash = config_hash(config)
        self._done: set[Any] = set()
        self.rows: list[dict[str, Any]] = []
        self._fh: Any = None
        self._lock: Any = None
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"output path {self.path} is a directory; give a .jsonl file")
        if self.path.exists() and not self.path.is_file():
            raise InputError(f"output path {self.path} is not a regular file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock_file(self.path)
        try:
            if self.path.exists() and self.path.stat().st_size > 0:
                self._resume()
            else:
                with open(self.path, "w", encoding="utf-8") as fh:
                    fh.write(_dumps({"kind": "header", "config": config, "config_hash": self.hash}) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            self._fh = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self._release(remove=not self.rows and not self._done)  # refused before writing: leave no lock file
            raise

    def _resume(self) -> None:
        with open(self.path, "rb") as fh:
            data = fh.read()
        # 1. read-only: is this our results file, of this configuration, with one row per key?
        first_end = data.find(b"\n")
        if first_end < 0:
            raise InputError(f"{self.path} is not a certaudit results file (no header line); it was left untouched: "
                             "choose another output")
        header = _parse_header(data[:first_end], self.path)
        if header.get("config_hash") != self.hash:
            raise InputError(
                f"{self.path} holds results of a different configuration (hash {header.get('config_hash')} "
                f"vs {self.hash}); use another output path or delete it"
            )
        end = data.rfind(b"\n") + 1
        try:
            lines = data[first_end + 1:end].decode("utf-8", errors="strict").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: rows are not UTF-8 text; delete the file to start over") from None
        rows = []
        for i, line in enumerate(lines, start=2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{self.path}:{i}: corrupt row; delete the file to start over") from None
            if not isinstance(row, dict):
                raise InputError(f"{self.path}:{i}: a row must be a JSON object; delete the file to start over")
            rows.append(row)
        dup = _duplicates(rows, self.key)
        if dup:
            raise InputError(f"{self.path}: {self.key} {dup[0]!r} occurs in more than one row ({len(dup)} duplicates; "
                             "two runs wrote it at once, or it was edited): delete the duplicate rows or the file")
        # 2. only now, and only a torn final row of our own file, is cut
        if end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        for row in rows:
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
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        self._release()

    def _release(self, remove: bool = False) -> None:
        if self._lock is not None:
            unlock_file(self._lock, remove=remove)
            self._lock = None

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _parse_header(line: bytes, path: Path) -> dict[str, Any]:
    """The header of a results file, or InputError (the file is never modified here)."""
    try:
        header = json.loads(line.decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path} is not a certaudit results file; it was left untouched: choose another output") from None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise InputError(f"{path} is not a certaudit results file; it was left untouched: choose another output")
    config = header.get("config")
    if not isinstance(config, dict) or config_hash(config) != header.get("config_hash"):
        raise InputError(f"{path}: its header's configuration does not match its hash (edited by hand?); "
                         "refusing to resume it: delete the file or choose another output")
    return header


def _duplicates(rows: list[dict[str, Any]], key: str) -> list[Any]:
    seen: set[Any] = set()
    dup = []
    for r in rows:
        k = _hashable(r.get(key))
        if k in seen:
            dup.append(k)
        seen.add(k)
    return dup


def lock_file(path: str | os.PathLike) -> Any:
    """Take the exclusive lock of ``path`` (``<path>.lock``, which then holds this pid); refuse with
    the holder's pid when another process has it. Returns the open lock file (see :func:`unlock_file`)."""
    lock = Path(str(path) + ".lock")
    created = not lock.exists()
    if not created and not lock.is_file():
        raise InputError(f"{lock} exists and is not a lock file; move it away to write {path}")
    fh = open(lock, "a+", encoding="utf-8")
    fh.certaudit_lock_path = lock if created else None  # type: ignore[attr-defined]  # ours to remove on refusal
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise InputError(f"{path} is being written by another certaudit process (pid {holder}); wait for it to "
                         "finish or stop it, then rerun to resume") from None
    fh.seek(0)
    old = fh.read()
    if old.strip() and not old.strip().isdigit():  # someone else's file of that name: never overwrite it
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
        raise InputError(f"{lock} exists and is not a certaudit lock file (it holds no pid); move it away to write "
                         f"{path}")
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def unlock_file(fh: Any, remove: bool = False) -> None:
    """Release the lock; with ``remove``, also delete the lock file if this process created it
    (a refused run leaves nothing behind next to the user's file)."""
    created = getattr(fh, "certaudit_lock_path", None)
    if remove and created is not None:
        try:
            created.unlink()
        except OSError:  # pragma: no cover
            pass
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except (ImportError, OSError, ValueError):  # pragma: no cover
        pass
    fh.close()


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def read_rows(path: str | os.PathLike, key: str | None = "index") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a results file: (header, complete rows). A torn last line is ignored; a line that is
    not a JSON object, non-UTF-8 bytes or (with ``key``) a key that occurs twice are refused."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"results file not found: {p}")
    header: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(_complete_lines(p), start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if header is None:
                raise InputError(f"{p} is not a certaudit results file") from None
            raise InputError(f"{p}:{lineno}: corrupt row (not JSON)") from None
        if header is None:
            if not isinstance(obj, dict) or obj.get("kind") != "header":
                raise InputError(f"{p} is not a certaudit results file")
            header = obj
        elif not isinstance(obj, dict):
            raise InputError(f"{p}:{lineno}: a row must be a JSON object")
        else:
            rows.append(obj)
    if header is None:
        raise InputError(f"{p} is empty")
    if key is not None:
        dup = _duplicates(rows, key)
        if dup:
            raise InputError(f"{p}: {key} {dup[0]!r} occurs in more than one row ({len(dup)} duplicates)")
    return header, rows


def _complete_lines(p: Path) -> Iterator[str]:
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p} is not a certaudit results file (not UTF-8 text)") from None
    yield from text.splitlines()


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
