"""The batched sampling engine behind :class:`~certaudit.defenses.smoothing.SmoothedClassifier`.

:class:`SamplingEngine` is a mixin that turns noisy copies of many images into class counts: the
copies are packed into forward batches of a size chosen from memory (or given by the user), the
base classifier runs under the chosen precision and memory layout, and the predicted labels are
counted on the device with one ``scatter_add_`` per forward pass (see ``docs/smoothing.md``). On
CPU each forward batch's noise is drawn just before it, by worker threads that each run their own
forward passes (``docs/scale.md``). The noise itself follows the scheme of
:mod:`certaudit.defenses.smoothing_noise`; the statistics built on the counts (Cohen, Rosenfeld &
Kolter 2019) live in :mod:`certaudit.defenses.smoothing`.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import wait
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from certaudit.defenses.sequential import run_sequential
from certaudit.defenses.smoothing_noise import (
    STREAM_SEQUENTIAL, LaneQueue, LaneReader, block_seed, lane_bounds, lane_plan, noise_block, noise_pool,
    noise_workers, piecewise_draws_exact,
)
from certaudit.errors import InputError

PRECISIONS = ("fp32", "bf16")
_PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16"}

CPU_BATCH_BUDGET = 12 * 2**20  # bytes of the largest activation across a CPU batch (the forward sweep of
# benchmarks/bench_smoothing.py peaks there on the 2-core development machine: 256 for the 2C2F, 64 for ResNet-20)
CUDA_MEMORY_FRACTION = 0.5  # of the free device memory used by one forward batch
MAX_BATCH = 16384


def parse_precision(value: str) -> str:
    """The canonical precision name (``fp32`` or ``bf16``) of a user-given spelling."""
    key = _PRECISION_ALIASES.get(str(value).strip().lower())
    if key is None:
        raise InputError(f"unknown precision {value!r}; choose one of: {', '.join(PRECISIONS)}")
    return key


class SamplingEngine:
    """Mixin: class counts of a base classifier on noisy copies of a batch of images.

    The host class provides ``model``, ``num_classes``, ``device``, ``sigma`` (the noise level),
    ``precision`` (a name from :data:`PRECISIONS`), ``channels_last``, ``batch_size`` (``None``:
    estimated) and ``_auto_batch`` (a dict caching the estimated batch sizes).
    """

    model: nn.Module
    num_classes: int
    sigma: float
    precision: str
    channels_last: bool
    batch_size: int | None
    _auto_batch: dict[tuple, int]

    def resolve_batch_size(self, sample_shape: Sequence[int]) -> int:
        """Samples per forward pass: the user's choice, else estimated from memory.

        CUDA: a probe forward of 256 samples measures the peak memory per sample; the batch takes
        :data:`CUDA_MEMORY_FRACTION` of the free memory. CPU: the batch whose largest layer output
        fills :data:`CPU_BATCH_BUDGET` (cache-sized batches run fastest on CPU). The result is capped
        at :data:`MAX_BATCH` and rounded down to a multiple of the noise block when it is larger (so
        whole blocks fill batches exactly), else to a power of two (a divisor of the block).
        """
        if self.batch_size is not None:
            return self.batch_size
        dev = self.device
        key = (dev.type, dev.index, tuple(sample_shape), self.precision, self.channels_last)
        if key not in self._auto_batch:
            if dev.type == "cuda":
                per_sample = self._probe_cuda_bytes(tuple(sample_shape))
                free, _ = torch.cuda.mem_get_info(dev)
                free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
                raw = int(CUDA_MEMORY_FRACTION * free / max(per_sample, 1))
            else:
                raw = int(CPU_BATCH_BUDGET / max(self._probe_largest_activation(tuple(sample_shape)), 1))
            self._auto_batch[key] = _round_batch(raw, noise_block(sample_shape))
        return self._auto_batch[key]

    def _sample(self, x: torch.Tensor, nums: list[int], streams: list[int], base_seed: int,
                indices: list[int]) -> torch.Tensor:
        """Counts (P, B, K) int64 on the CPU for P streams of ``nums[p]`` samples per image.

        On CPU (where drawing a lane in pieces is exact, :func:`piecewise_draws_exact`) the noise is
        drawn batch by batch (:meth:`_sample_pieces`), else block by block (:meth:`_sample_blocks`):
        the same noise, hence the same counts.
        """
        x = x.detach().to(self.device, torch.float32)  # (B, C, H, W), the only host-to-device copy
        if self.device.type == "cpu" and piecewise_draws_exact(x.shape[1:]):
            return self._sample_pieces(x, nums, streams, base_seed, indices)
        return self._sample_blocks(x, nums, streams, base_seed, indices)

    def _sample_pieces(self, x: torch.Tensor, nums: list[int], streams: list[int], base_seed: int,
                       indices: list[int]) -> torch.Tensor:
        """CPU counts (P, B, K): ``W`` = :func:`noise_workers` threads, each drawing the noise of its
        own forward batches just before classifying them.

        The lanes of the call (:func:`lane_plan`) form a queue; each worker fills a batch-sized
        buffer of its own from the lanes it takes off the queue (:class:`LaneReader`: ``normal_``
        from each lane's own generator, piece by piece, then ``+ x`` in place), so the noise stays in
        its core's cache; it classifies the buffer with ``T / W`` intra-op threads (``T`` =
        ``torch.get_num_threads()``) and counts into its own table; the tables are summed. No thread
        waits for another (no intra-op barrier across cores, no noise/forward hand-over), the noise
        is drawn on every core, and a slower core simply takes fewer lanes (the longest lanes go
        first, so all finish at nearly the same time). Which samples share a forward pass depends on
        ``W``, timing and the batch size; the samples themselves, hence the counts, do not. With one
        thread the main thread does it all.
        """
        b_count, shape, k = x.shape[0], tuple(x.shape[1:]), self.num_classes
        threads = torch.get_num_threads()
        width = noise_workers() if threads > 1 else 1
        lanes = lane_plan(nums, streams, base_seed, indices, noise_block(shape), k)
        if width > 1:  # longest first, so the workers run out of lanes at nearly the same time
            lanes.sort(key=lambda lane: -lane[3])
        queue, total = LaneQueue(lanes), sum(lane[3] for lane in lanes)
        size = len(nums) * b_count * k
        batch = min(self.resolve_batch_size(shape), max(1, total))  # (resolved in this thread: it may probe)
        x = x.contiguous()  # (B, C, H, W) on the CPU
        if width == 1:
            return self._count_lanes(queue, x, size, batch, None).view(len(nums), b_count, k)
        futures = [noise_pool().submit(self._count_lanes, queue, x, size, batch, max(1, threads // width))
                   for _ in range(width)]
        try:
            tables = [f.result() for f in futures]
        finally:
            queue.close()  # after an error or an interrupt the other workers stop at their next batch
            wait(futures)
            torch.set_num_threads(threads)  # a worker's set_num_threads also set the default of new threads
        return torch.stack(tables).sum(dim=0).view(len(nums), b_count, k)

    def _count_lanes(self, queue: LaneQueue, x: torch.Tensor, size: int, batch: int,
                     threads: int | None) -> torch.Tensor:
        """Flat counts (size,) of the lanes this thread takes off ``queue``, ``batch`` samples at a time
        (in a worker when ``threads`` is given: the intra-op threads of this worker thread). Each
        piece of a lane belongs to one count row: its labels are counted with one ``bincount``."""
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # this thread's OpenMP team size
        shape, sigma, k, reader = x.shape[1:], self.sigma, self.num_classes, LaneReader(queue)
        table = np.zeros(size, dtype=np.int64)
        with torch.inference_mode():
            buf = torch.empty((batch, *shape))  # (S, C, H, W) noisy images of one forward pass
            while True:
                pieces, pos = reader.take(batch), 0
                if not pieces:
                    return torch.from_numpy(table)
                for _row, b, gen, c in pieces:
                    buf[pos:pos + c].normal_(0.0, sigma, generator=gen).add_(x[b])
                    pos += c
                labels = self._labels(buf[:pos]).numpy()  # (pos,) in [0, K)
                pos = 0
                for row, _b, _gen, c in pieces:
                    table[row:row + k] += np.bincount(labels[pos:pos + c], minlength=k)
                    pos += c

    def _sample_blocks(self, x: torch.Tensor, nums: list[int], streams: list[int], base_seed: int,
                       indices: list[int]) -> torch.Tensor:
        """Counts (P, B, K) with the noise drawn a whole block at a time (CUDA, and CPU shapes where
        piecewise draws are not exact).

        The samples form one sequence, image by image and, within an image, stream by stream.
        Whole noise blocks are written into a buffer, and next to them, in a parallel index buffer,
        the flat offset ``(slot·B + image)·K`` of their count row; before a block that would
        overflow ``batch`` samples the buffer is classified (so forward passes never exceed
        ``batch``, and with block-aligned batch sizes they are full except near the ends of images);
        a block larger than ``batch`` is classified in slices of ``batch``. Each forward pass ends
        in one ``scatter_add_`` of ``offset + label`` into the device table.
        """
        dev = self.device
        b_count, shape, k = x.shape[0], tuple(x.shape[1:]), self.num_classes
        batch = self.resolve_batch_size(shape)
        block = noise_block(shape)
        cap = max(batch, min(block, max(nums)))
        gen = torch.Generator(device=dev)
        pool = noise_pool() if dev.type == "cpu" and torch.get_num_threads() > 1 else None
        sigma = self.sigma

        def draw(part: torch.Tensor, seed: int) -> None:  # one lane, in a worker thread on CPU
            with torch.inference_mode():
                part.normal_(0.0, sigma, generator=torch.Generator().manual_seed(seed))

        with torch.inference_mode():
            buf = torch.empty((cap, *shape), device=dev)  # (cap, C, H, W) noisy images waiting
            offsets = torch.empty(cap, dtype=torch.long, device=dev)  # (cap,) flat count-row offsets
            table = torch.zeros(len(nums) * b_count * k, dtype=torch.long, device=dev)  # flat (P, B, K)
            ones = torch.ones(batch, dtype=torch.long, device=dev)
            fill = 0  # samples waiting in buf

            def flush() -> None:  # classify buf[:fill] in forward passes of at most `batch`
                for lo in range(0, fill, batch):
                    hi = min(fill, lo + batch)
                    labels = self._labels(buf[lo:hi])  # (S,)
                    table.scatter_add_(0, offsets[lo:hi] + labels, ones[: hi - lo])

            for b in range(b_count):  # loop over noise blocks, never over samples
                xb = x[b]  # (C, H, W)
                for slot, (num, stream) in enumerate(zip(nums, streams)):
                    row = (slot * b_count + b) * k
                    for j in range(-(-num // block)):
                        m = min(block, num - j * block)
                        if fill and fill + m > batch:
                            flush()
                            fill = 0
                        lanes = [(buf[fill + a:fill + e], block_seed(base_seed, indices[b], stream, j, lane))
                                 for lane, (a, e) in enumerate(lane_bounds(m))]
                        if pool is not None:  # CPU: torch's normal_ is single-threaded; fill lanes in parallel
                            list(pool.map(lambda t: draw(*t), lanes))
                        else:
                            for part, seed in lanes:
                                part.normal_(0.0, sigma, generator=gen.manual_seed(seed))
                        buf[fill:fill + m].add_(xb)
                        offsets[fill:fill + m] = row
                        fill += m
                        if fill >= batch:
                            flush()
                            fill = 0
            if fill:
                flush()
            out = table.view(len(nums), b_count, k).cpu()  # the one device-to-host transfer
        return out

    def _sample_sequential(self, x: torch.Tensor, c_hat: torch.Tensor, test: Any, base_seed: int,
                           indices: list[int], block: int) -> tuple[torch.Tensor, Any]:
        """Run :func:`~certaudit.defenses.sequential.run_sequential` on the base classifier.

        Block ``j`` of image ``b`` is ``normal_(0, σ)`` of shape (m, C, H, W) from a generator seeded
        by ``block_seed(seed, indices[b], STREAM_SEQUENTIAL, j)`` (``m`` = ``block``, less in the
        last block of the budget), written in place into one reused buffer, plus ``x[b]``. Counts
        (B, K) accumulate on the device; one small transfer (successes per block) per forward batch
        feeds the stopping decisions. Returns (counts (B, K) int64 on the CPU, SequentialResult).
        """
        dev = self.device
        x = x.detach().to(dev, torch.float32)  # (B, C, H, W)
        b_count, shape, k = x.shape[0], tuple(x.shape[1:]), self.num_classes
        batch = self.resolve_batch_size(shape)  # samples per forward pass
        cap = max(block, batch // block * block)  # samples per draw call: whole blocks
        gen = torch.Generator(device=dev)
        pool = noise_pool() if dev.type == "cpu" and torch.get_num_threads() > 1 else None
        sigma = self.sigma
        c_dev = c_hat.to(dev)

        def fill(part: torch.Tensor, seed: int, xb: torch.Tensor, g: torch.Generator | None = None) -> None:
            with torch.inference_mode():  # noise in place, then the image: no second buffer
                part.normal_(0.0, sigma, generator=(g or torch.Generator()).manual_seed(seed)).add_(xb)

        with torch.inference_mode():
            buf = torch.empty((cap, *shape), device=dev)  # (cap, C, H, W), reused by every draw
            table = torch.zeros(b_count * k, dtype=torch.long, device=dev)  # flat (B, K)

            def draw(items: np.ndarray, blocks: np.ndarray, sizes: np.ndarray) -> np.ndarray:
                ends = np.cumsum(sizes)
                starts = ends - sizes
                parts = [(buf[a:e], block_seed(base_seed, indices[i], STREAM_SEQUENTIAL, j), x[i])
                         for a, e, i, j in zip(starts.tolist(), ends.tolist(), items.tolist(), blocks.tolist())]
                if pool is not None:  # CPU: normal_ is single-threaded; fill blocks in parallel
                    list(pool.map(lambda p: fill(*p), parts))
                else:
                    for part, sd, xb in parts:
                        fill(part, sd, xb, gen)
                total = int(ends[-1])
                owner = torch.from_numpy(np.repeat(items, sizes)).to(dev)  # (S,) image of each sample
                req = torch.from_numpy(np.repeat(np.arange(items.size), sizes)).to(dev)  # (S,) request of each sample
                noisy = buf[:total]  # (S, C, H, W)
                labels = torch.cat([self._labels(noisy[lo:lo + batch]) for lo in range(0, total, batch)])  # (S,)
                table.scatter_add_(0, owner * k + labels, torch.ones_like(labels))
                hits = torch.zeros(items.size, dtype=torch.long, device=dev)
                hits.scatter_add_(0, req, (labels == c_dev[owner]).long())
                return hits.cpu().numpy()  # the one transfer per forward batch

            result = run_sequential(test, b_count, draw, cap)
            counts = table.view(b_count, k).cpu()
        return counts, result

    def _labels(self, batch: torch.Tensor) -> torch.Tensor:
        """Base-classifier labels (S,) of a batch of noisy images, under the chosen precision/layout."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast(batch.device):
            logits = self.model(batch)
        self._check_logits(logits)
        return logits.argmax(dim=1)

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise InputError(f"the model returns logits of shape {tuple(logits.shape)}, expected (batch, {self.num_classes})")

    def _autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _probe_cuda_bytes(self, shape: tuple[int, ...]) -> float:
        """Peak CUDA memory per sample of a forward pass (input, noise buffer and activations)."""
        dev = self.device
        probe = 256
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            self._labels(torch.zeros((probe, *shape), device=dev))
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        return peak / probe + 4.0 * math.prod(shape) * 2  # + the noise buffer and its copy

    def _probe_largest_activation(self, shape: tuple[int, ...]) -> float:
        """Bytes of the largest layer output for one sample (forward hooks on the leaf modules)."""
        largest = [4.0 * math.prod(shape)]

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                largest[0] = max(largest[0], float(out[0].numel() * out.element_size()))

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if not list(m.children())]
        try:
            with torch.inference_mode():
                self._labels(torch.zeros((1, *shape), device=self.device))
        finally:
            for h in handles:
                h.remove()
        return 3.0 * largest[0]  # input, output and one more live tensor per layer


def _round_batch(raw: int, block: int) -> int:
    """Cap ``raw`` at :data:`MAX_BATCH`, then round it down to whole noise blocks, or to a power of two."""
    raw = max(1, min(int(raw), MAX_BATCH))
    if raw >= block:
        return raw // block * block
    return 1 << (raw.bit_length() - 1)
