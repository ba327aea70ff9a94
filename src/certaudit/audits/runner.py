"""The one run loop every verb and every audit stage shares.

:func:`run_rows` takes the images to process (``wanted``, data-set indices), cuts them into fixed
blocks dealt round-robin to the processes of a torchrun/accelerate launch
(:func:`certaudit.distributed.shard_blocks`), skips what an earlier run already wrote, calls
``work(block)`` for each block of this process and writes the rows it returns as they come
(:class:`certaudit.distributed.ShardedRowWriter`: resumable, configuration-checked, per-rank shards
merged by rank 0), then gathers and returns the rows of ``wanted`` in index order (on rank 0;
other ranks get ``[]``). Without ``out`` the rows live in memory (nothing persists).

Because the blocks are fixed by the request, a block's batch is the same whatever the number of
processes and however often the run was resumed: verbs whose randomness is keyed by a batch (an
attack seeded by its first index) give identical rows in every case.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from certaudit.distributed import DistEnv, ShardedRowWriter, all_sum, gather_rows, shard_blocks

Work = Callable[[list[int]], list[dict[str, Any]]]
"""``work(block) -> rows``: one row (a dict with ``index``) per image of the block."""


class MemoryRows:
    """Stand-in for a row writer when no output file is given (nothing persists, nothing resumes)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def done(self) -> set[Any]:
        return set()

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def __enter__(self) -> "MemoryRows":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


@dataclass
class RunResult:
    """What :func:`run_rows` returns."""

    rows: list[dict[str, Any]]  # the rows of ``wanted``, by index (rank 0; [] on other ranks)
    new_images: int  # images processed in this run, all ranks together
    resumed: int  # images of ``wanted`` already written before this run
    wall_seconds: float  # this rank's time in the loop


def run_rows(work: Work, wanted: Sequence[int], *, out: str | os.PathLike | None, config: dict[str, Any],
             env: DistEnv, block: int, progress: Callable[[int, int], None] | None = None,
             announce: Callable[[int], None] | None = None,
             estimate: Callable[[float, int], None] | None = None) -> RunResult:
    """Run ``work`` over this process's blocks of ``wanted``; write, resume, gather (see the module).

    ``progress(done, total)`` is called with this process's images before the first block and after
    every block (``total`` counts only what this run still has to do); ``announce(n)`` once, before
    any work, when ``n`` > 0 images of ``wanted`` were already written (a resumed run);
    ``estimate(seconds, images)`` once, after the first block, with the projected time of the
    ``images`` this process still has to do (measured on that block).
    """
    wanted = [int(i) for i in wanted]
    writer: Any = ShardedRowWriter(out, config, env) if out is not None else MemoryRows()
    with writer:
        done = writer.done()
        resumed = sum(1 for i in wanted if i in done)
        if resumed and announce is not None:
            announce(resumed)
        blocks = shard_blocks(wanted, block, env.rank, env.world_size, done)
        total = sum(len(b) for b in blocks)
        if progress is not None:
            progress(0, total)
        t0 = time.perf_counter()
        finished = 0
        for k, idx in enumerate(blocks):
            writer.write_many(work(idx))
            finished += len(idx)
            if progress is not None:
                progress(finished, total)
            if k == 0 and estimate is not None and finished < total:
                per_image = (time.perf_counter() - t0) / max(1, finished)
                estimate(per_image * (total - finished), total - finished)
        merged = writer.finish() if out is not None else gather_rows(env, writer.rows)
        wall = time.perf_counter() - t0
    new = all_sum(env, total)
    if merged is None:
        return RunResult(rows=[], new_images=new, resumed=resumed, wall_seconds=wall)
    keep = set(wanted)
    rows = sorted((r for r in merged if r.get("index") in keep), key=lambda r: r["index"])
    return RunResult(rows=rows, new_images=new, resumed=resumed, wall_seconds=wall)


__all__ = ["MemoryRows", "RunResult", "Work", "run_rows"]
