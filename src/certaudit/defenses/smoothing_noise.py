"""The noise scheme and the statistics of randomized smoothing (used by :mod:`.smoothing`).

Noise: image ``i``'s samples are drawn in blocks of :func:`noise_block` samples, each made of
:data:`NOISE_LANES` lanes seeded by :func:`block_seed` ``(seed, index, stream, block, lane)`` (so
counts never depend on the batch or on the other images of a call); :func:`noise_pool` holds the
CPU threads that fill lanes in parallel. Statistics: the one-sided Clopper–Pearson lower bound of
CERTIFY and the two-sided binomial test of PREDICT.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch

NOISE_BLOCK_BYTES = 32 * 2**20
"""Target size of one noise block (the unit of seeding, see :func:`noise_block`)."""
NOISE_BLOCK_MIN, NOISE_BLOCK_MAX = 64, 4096
NOISE_LANES = 4
"""Each block is drawn as this many independently seeded lanes (filled in parallel on CPU)."""
NOISE_SCHEME = "blake2b-blocks-lanes4-v1"

STREAM_SELECTION = 0  # CERTIFY's n0 samples that choose the class
STREAM_ESTIMATION = 1  # CERTIFY's n fresh samples that bound its probability
STREAM_PREDICT = 2  # PREDICT's n samples
STREAM_SEQUENTIAL = 3  # sequential accept-at-ε: estimation samples, in blocks of sequential.SEQ_BLOCK


SEED_MASK = (1 << 63) - 1


def noise_block(sample_shape: Sequence[int]) -> int:
    """Samples per noise block for images of ``sample_shape``: the power of two closest below
    :data:`NOISE_BLOCK_BYTES` of float32 noise, within [64, 4096] (4096 for 1x28x28, 2048 for 3x32x32,
    64 for 3x224x224). It depends on the shape only, never on the batch size."""
    per_sample = 4 * max(1, math.prod(int(s) for s in sample_shape))
    raw = max(1, NOISE_BLOCK_BYTES // per_sample)
    return int(min(NOISE_BLOCK_MAX, max(NOISE_BLOCK_MIN, 1 << (raw.bit_length() - 1))))


def lane_bounds(m: int) -> list[tuple[int, int]]:
    """The lanes of a block of ``m`` samples: ``NOISE_LANES`` consecutive ranges of ceil(m / lanes)."""
    q = -(-int(m) // NOISE_LANES)
    return [(a, min(int(m), a + q)) for a in range(0, int(m), q)]


def block_seed(seed: int, index: int, stream: int, block: int, lane: int = 0) -> int:
    """63-bit seed of one lane of one noise block: a hash of (seed, image, stream, block, lane).

    With ``L = noise_block((C, H, W))``, block ``j`` of image ``index`` in ``stream`` holds samples
    ``j·L ... j·L + m − 1`` (``m = min(L, num − j·L)``); lane ``l`` of it, samples ``a ... b − 1`` of
    the block for ``(a, b) = lane_bounds(m)[l]``, is ``torch.empty((b − a, C, H, W)).normal_(0, σ,
    generator=g)`` with ``g`` seeded by this value; the noisy images are ``noise + x``.
    """
    text = f"certaudit-smoothing-v1:{int(seed)}:{int(index)}:{int(stream)}:{int(block)}:{int(lane)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & SEED_MASK


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> np.ndarray:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion, vectorised (float64).

    ``P(bound > p) ≤ α`` for every true ``p``: the α-quantile of Beta(k, n − k + 1), and 0 at k = 0.
    """
    from scipy.stats import beta

    k = np.asarray(successes, dtype=np.float64)
    n = np.broadcast_to(np.asarray(trials, dtype=np.float64), k.shape)
    out = np.zeros(k.shape, dtype=np.float64)
    pos = k > 0
    if np.any(pos):
        out[pos] = beta.ppf(alpha, k[pos], n[pos] - k[pos] + 1.0)
    return out


def binomial_test_half(top: Any, trials: Any) -> np.ndarray:
    """Two-sided binomial-test p-value of ``top`` successes in ``trials`` at p = 1/2, vectorised.

    Equals ``scipy.stats.binomtest(top, trials, 0.5).pvalue`` when ``top ≥ trials / 2`` (the top
    count of two): by symmetry it is ``min(1, 2·P(X ≥ top))``.
    """
    from scipy.stats import binom

    k = np.asarray(top, dtype=np.float64)
    m = np.asarray(trials, dtype=np.float64)
    return np.minimum(1.0, 2.0 * binom.sf(k - 1.0, m, 0.5))



Lane = tuple[int, int, int, int]
"""One lane of a call's noise: (flat offset of its count row, position of its image in the call, seed, samples)."""


def lane_plan(nums: Sequence[int], streams: Sequence[int], base_seed: int, indices: Sequence[int], block: int,
              num_classes: int) -> list[Lane]:
    """Every lane of a call, in the order of the scheme: image by image, stream by stream, block by block.

    The count row of image ``b`` (of ``B = len(indices)``) in slot ``p`` of ``nums``/``streams`` is
    the flat offset ``(p·B + b)·num_classes`` of a (P, B, K) table.
    """
    out: list[Lane] = []
    b_count = len(indices)
    for b, index in enumerate(indices):
        for slot, (num, stream) in enumerate(zip(nums, streams)):
            row = (slot * b_count + b) * num_classes
            for j in range(-(-int(num) // block)):
                m = min(block, int(num) - j * block)
                out.extend((row, b, block_seed(base_seed, index, stream, j, lane), e - a)
                           for lane, (a, e) in enumerate(lane_bounds(m)))
    return out


class LaneQueue:
    """The lanes of a call, handed out one at a time to the threads that draw them (thread-safe)."""

    def __init__(self, lanes: Sequence[Lane]) -> None:
        self._lanes = list(lanes)
        self._next = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Hand out nothing more (the readers stop at their next batch)."""
        with self._lock:
            self._next = len(self._lanes)

    def pop(self) -> Lane | None:
        with self._lock:
            if self._next == len(self._lanes):
                return None
            self._next += 1
            return self._lanes[self._next - 1]


class LaneReader:
    """One thread's view of a :class:`LaneQueue`: it draws each lane it opens from that lane's own
    generator, piece by piece, continuing where the previous piece stopped (so a lane drawn in pieces
    is the lane drawn at once, see :func:`piecewise_draws_exact`), and opens the next lane of the
    queue when one runs out. Which thread reads which lane never changes the samples."""

    def __init__(self, queue: LaneQueue) -> None:
        self.queue = queue
        self._open: tuple[int, int, torch.Generator] | None = None  # (row, image, generator) of the open lane
        self._left = 0  # samples left in the open lane

    def take(self, m: int) -> list[tuple[int, int, torch.Generator, int]]:
        """Up to ``m`` next samples as pieces (row, image, generator, samples); fewer only when the
        queue is empty."""
        out = []
        while m > 0:
            if self._left == 0:
                lane = self.queue.pop()
                if lane is None:
                    break
                row, b, seed, self._left = lane
                self._open = (row, b, torch.Generator().manual_seed(seed))
            c = min(m, self._left)
            out.append((*self._open, c))
            self._left -= c
            m -= c
        return out


_PIECEWISE: dict[int, bool] = {}


def piecewise_draws_exact(sample_shape: Sequence[int]) -> bool:
    """Whether a lane of samples of ``sample_shape`` drawn in pieces of whole samples with one CPU
    generator equals the lane drawn by one ``normal_`` call (checked once per sample size).

    PyTorch's CPU ``normal_`` transforms uniforms 16 at a time and redraws the last 16 values of a
    tensor whose size is not a multiple of 16, so pieces are exact when a sample holds a multiple of
    16 values; the check also guards against a PyTorch version that draws differently.
    """
    d = max(1, math.prod(int(s) for s in sample_shape))
    if d not in _PIECEWISE:
        ok = d % 16 == 0
        if ok:
            whole = torch.empty((64, d)).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(12345))
            g, parts = torch.Generator().manual_seed(12345), torch.empty((64, d))
            for a, e in ((0, 1), (1, 8), (8, 57), (57, 64)):
                parts[a:e].normal_(0.0, 1.0, generator=g)
            ok = torch.equal(whole, parts)
        _PIECEWISE[d] = ok
    return _PIECEWISE[d]


_POOLS: dict[int, ThreadPoolExecutor] = {}
if hasattr(os, "register_at_fork"):  # a forked child has no pool threads: start afresh there
    os.register_at_fork(after_in_child=_POOLS.clear)


def noise_workers() -> int:
    """Threads that draw noise on CPU: one per torch thread, at most :data:`NOISE_LANES` and the cores."""
    return max(1, min(NOISE_LANES, torch.get_num_threads(), os.cpu_count() or 1))


def noise_pool() -> ThreadPoolExecutor:
    """Threads that draw noise lanes on CPU (torch releases the GIL inside ``normal_``)."""
    workers = noise_workers()
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="certaudit-noise")
    return _POOLS[workers]



__all__ = ["NOISE_BLOCK_BYTES", "NOISE_BLOCK_MIN", "NOISE_BLOCK_MAX", "NOISE_LANES", "NOISE_SCHEME", "STREAM_SELECTION",
           "STREAM_ESTIMATION", "STREAM_PREDICT", "STREAM_SEQUENTIAL", "SEED_MASK", "noise_block", "lane_bounds",
           "block_seed", "clopper_pearson_lower", "binomial_test_half", "noise_pool", "noise_workers", "Lane", "lane_plan",
           "LaneQueue", "LaneReader", "piecewise_draws_exact"]
