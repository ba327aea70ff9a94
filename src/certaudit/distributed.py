"""Multi-process runs with ``torch.distributed``: split inputs across ranks, one row shard per rank.

Recipes (any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``: torchrun, ``accelerate
launch``, SLURM with those variables)::

    # one node, 2 processes (CPU: gloo; CUDA: nccl, one GPU per process via LOCAL_RANK)
    torchrun --nproc_per_node 2 -m certaudit certify --model m.safetensors --n 100000 --out rows.jsonl
    # two nodes, 8 GPUs each
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m certaudit certify --model m.safetensors --out rows.jsonl

Design. Every input's randomness derives from (seed, index) (see ``certaudit.defenses.smoothing``),
so which rank treats an input does not change its row. Rank ``r`` of ``W`` takes the inputs at
positions ``r, r + W, r + 2W, ...`` of the requested list (:func:`shard_indices`; fixed *before*
dropping finished inputs, so ranks never need to agree on what is finished). Each rank appends its
rows to ``OUT.rank{r}`` (a :class:`~certaudit.results.RowWriter`, fsync per chunk); at the end rank 0
merges every shard into ``OUT`` (sorted by index, one row per index, written atomically) and
removes the shards. A rerun, with any number of ranks, first merges shards left by an interrupted
run, then skips every index already in ``OUT``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from certaudit.errors import InputError
from certaudit.results import RowWriter, _dumps, config_hash, read_rows

_SHARD = re.compile(r"\.rank(\d+)$")
_OWNED: list[bool] = []  # non-empty while this module owns the process group


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run (rank 0 of 1 when not launched by a distributed launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ(environ: dict[str, str] | None = None) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and ``accelerate launch``)."""
    environ = os.environ if environ is None else environ

    def get(name: str, default: int) -> int:
        raw = environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise InputError(f"environment variable {name} must be an integer, got {raw!r}") from None

    world = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local = get("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not (0 <= rank < world) or local < 0:
        raise InputError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init(backend: str | None = None, environ: dict[str, str] | None = None) -> DistEnv:
    """The process's :class:`DistEnv`; joins the process group when ``WORLD_SIZE > 1`` (gloo on CPU,
    nccl when CUDA is present, unless ``backend`` says otherwise)."""
    import torch
    import torch.distributed as dist

    env = env_from_environ(environ)
    if env.distributed and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        import datetime
        import os

        seconds = float(os.environ.get("CERTAUDIT_DIST_TIMEOUT", "120"))
        try:
            with _c10d_log_held() as held:  # torch's C++ retry log (stack frames) is kept off the terminal
                dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                        timeout=datetime.timedelta(seconds=seconds))
            held.release()  # joined: whatever torch logged goes to stderr after all
        except (ValueError, RuntimeError) as exc:  # leftover WORLD_SIZE, no or stale MASTER_ADDR/PORT
            raise InputError(f"cannot join the torch.distributed group (WORLD_SIZE={env.world_size}, RANK={env.rank}): "
                             f"{' '.join(str(exc).split())[:300]}; launch with torchrun, or unset WORLD_SIZE/RANK "
                             f"for one process (rendezvous timeout {seconds:g} s: CERTAUDIT_DIST_TIMEOUT)") from None
        _OWNED.append(True)
    return env


class _Held:
    def __init__(self, path: str):
        self.path = path

    def release(self) -> None:
        import os
        import sys

        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
            if data:
                sys.stderr.flush()
                os.write(2, data)
        finally:
            os.unlink(self.path)


class _c10d_log_held:
    """Redirect the process's fd 2 to a temporary file while entered (C++ logs bypass sys.stderr)."""

    def __enter__(self) -> _Held:
        import os
        import sys
        import tempfile

        sys.stderr.flush()
        fd, path = tempfile.mkstemp(prefix="certaudit-c10d-")
        self._saved = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        self._held = _Held(path)
        return self._held

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        import os
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if exc_type is not None:  # the caller raises its own one-line message: drop the log
            try:
                os.unlink(self._held.path)
            except OSError:
                pass


def shutdown(env: DistEnv) -> None:
    """Leave the process group if :func:`init` created it (a caller's own group is left alone)."""
    if env.distributed and _OWNED:
        import torch.distributed as dist

        if dist.is_initialized():
            # every rank reaches this point before any rank tears gloo down: destroying the group while a
            # peer is still finishing its last collective aborts that peer ("terminate called without an
            # active exception", exit -6), seen under load
            dist.barrier()
            dist.destroy_process_group()
        _OWNED.clear()


def device_for(env: DistEnv, device: Any) -> Any:
    """One GPU per process: a bare ``cuda`` device becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
    import torch

    dev = torch.device(device)
    if env.distributed and dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count()))
    return dev


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_sum(env: DistEnv, value: int) -> int:
    """Sum of an integer over all ranks."""
    if not env.distributed:
        return int(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def gather_rows(env: DistEnv, rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """All ranks' rows on rank 0 (``None`` elsewhere); for runs that write no file."""
    if not env.distributed:
        return list(rows)
    import torch.distributed as dist

    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(list(rows), out, dst=0)
    if not env.is_main:
        return None
    return [r for part in out for r in part]  # type: ignore[union-attr]


def shard_indices(indices: Sequence[Any] | int, rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s share of ``indices`` (or of ``range(indices)``): positions rank, rank + W, ...

    The shares are disjoint, cover everything, and differ in size by at most one.
    """
    if world_size < 1 or not (0 <= rank < world_size):
        raise InputError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    items = list(range(indices)) if isinstance(indices, int) else list(indices)
    return items[rank::world_size]


def shard_blocks(indices: Sequence[Any], block: int, rank: int, world_size: int,
                 done: set[Any] | frozenset[Any] = frozenset()) -> list[list[Any]]:
    """Rank ``rank``'s blocks of ``indices``: cut the requested list into consecutive blocks of
    ``block`` inputs (fixed by the request, not by what is finished), deal block ``b`` to rank
    ``b mod W``, then drop inputs in ``done`` (and blocks left empty).

    For verbs whose randomness is keyed by a *batch* (an attack seeded by its first index), the
    batches are then the same whatever the number of ranks and however often a run was resumed
    (rows are written one whole block at a time).
    """
    if block < 1:
        raise InputError(f"block must be >= 1, got {block}")
    if world_size < 1 or not (0 <= rank < world_size):
        raise InputError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    items = list(indices)
    out = []
    for b, a in enumerate(range(0, len(items), block)):
        if b % world_size != rank:
            continue
        part = [i for i in items[a:a + block] if _hashable(i) not in done]
        if part:
            out.append(part)
    return out


def shard_path(out: str | os.PathLike, rank: int) -> Path:
    """``rows.jsonl`` → ``rows.jsonl.rank{rank}``."""
    p = Path(out)
    return p.with_name(f"{p.name}.rank{int(rank)}")


def shard_files(out: str | os.PathLike) -> list[Path]:
    """Existing shard files of ``out``, by rank."""
    p = Path(out)
    if not p.parent.is_dir():
        return []
    found = [(int(m.group(1)), f) for f in p.parent.iterdir()
             if f.name.startswith(p.name + ".rank") and (m := _SHARD.search(f.name)) and f.name == f"{p.name}.rank{m.group(1)}"]
    return [f for _, f in sorted(found)]


def merge_shards(out: str | os.PathLike, config: dict[str, Any], key: str = "index",
                 remove: bool = True) -> list[dict[str, Any]]:
    """Merge ``out`` (if present) and its shard files into ``out``: one row per key, sorted by key.

    Every file must hold rows of ``config`` (same configuration hash), else :class:`InputError`.
    Rows already in ``out`` win over shard rows with the same key (a shard left by a crash after a
    merge). The merged file is written to a temporary name, fsync'ed, and renamed over ``out``;
    then the shards are removed (``remove``). Returns the merged rows.
    """
    out = Path(out)
    want = config_hash(config)
    merged: dict[Any, dict[str, Any]] = {}
    sources = ([out] if out.exists() and out.stat().st_size > 0 else []) + shard_files(out)
    for src in sources:
        header, rows = read_rows(src, key)
        if header.get("config_hash") != want:
            raise InputError(f"{src} holds results of a different configuration (hash {header.get('config_hash')} "
                             f"vs {want}); use another output path or delete it")
        for row in rows:
            merged.setdefault(_hashable(row.get(key)), row)
    rows_sorted = [merged[k] for k in sorted(merged, key=_sort_key)]
    tmp = out.with_name(out.name + ".merge.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(_dumps({"kind": "header", "config": config, "config_hash": want}) + "\n")
        fh.write("".join(_dumps(r) + "\n" for r in rows_sorted))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    if remove:
        for src in sources:
            if src != out:
                src.unlink(missing_ok=True)
    return rows_sorted


class ShardedRowWriter:
    """Per-rank rows for a run over ``env.world_size`` processes, merged into ``out`` by rank 0.

    Use as a context manager; :meth:`done` is the set of keys already in ``out`` (merged earlier)
    or in this rank's shard; :meth:`write_many` appends to the shard; :meth:`finish` (after the
    loop, on every rank) waits for all ranks, merges on rank 0 and returns the merged rows there
    (``None`` on other ranks). With one process it is a plain :class:`RowWriter` on ``out`` (after
    merging shards an earlier multi-process run may have left).
    """

    def __init__(self, out: str | os.PathLike, config: dict[str, Any], env: DistEnv, key: str = "index"):
        self.out = Path(out)
        self.config = config
        self.env = env
        self.key = key
        if self.out.exists() and self.out.is_dir():
            raise InputError(f"output path {self.out} is a directory; give a .jsonl file")
        err = None
        if env.is_main and shard_files(self.out):  # leftovers of an interrupted multi-process run
            try:
                merge_shards(self.out, config, key)
            except InputError as exc:  # raise on every rank, not only on rank 0
                err = str(exc)
        err = _broadcast(env, err)
        if err:
            raise InputError(err)
        if env.distributed:
            base: list[dict[str, Any]] = []
            if self.out.exists() and self.out.stat().st_size > 0:
                header, base = read_rows(self.out)
                if header.get("config_hash") != config_hash(config):
                    raise InputError(f"{self.out} holds results of a different configuration; use another output "
                                     "path or delete it")
            self._base = base
            self._writer = RowWriter(shard_path(self.out, env.rank), config, key=key)
        else:
            self._base = []
            self._writer = RowWriter(self.out, config, key=key)

    def done(self) -> set[Any]:
        return {_hashable(r.get(self.key)) for r in self._base} | self._writer.done()

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Rows known to this rank: merged earlier plus its own."""
        return self._base + self._writer.rows

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        have = {_hashable(r.get(self.key)) for r in self._base}
        clash = [r.get(self.key) for r in rows if _hashable(r.get(self.key)) in have]
        if clash:
            raise RuntimeError(f"rows with {self.key} {clash[:5]} are already in {self.out}")
        self._writer.write_many(rows)

    def finish(self) -> list[dict[str, Any]] | None:
        """Barrier, then rank 0 merges the shards into ``out``; returns the merged rows on rank 0."""
        self._writer.close()
        if not self.env.distributed:
            return list(self._writer.rows)
        barrier(self.env)
        rows = merge_shards(self.out, self.config, self.key) if self.env.is_main else None
        barrier(self.env)
        return rows

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "ShardedRowWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _broadcast(env: DistEnv, value: Any) -> Any:
    if not env.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _sort_key(k: Any) -> tuple:
    return (0, k, "") if isinstance(k, (int, float)) else (1, 0, json.dumps(k, default=str))


__all__ = [
    "DistEnv", "env_from_environ", "init", "shutdown", "device_for", "barrier", "all_sum", "gather_rows", "shard_indices", "shard_blocks",
    "shard_path", "shard_files", "merge_shards", "ShardedRowWriter",
]
