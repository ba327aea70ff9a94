"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): PREDICT and CERTIFY, batched over images.

The smoothed classifier of a base classifier ``f`` is ``g(x) = argmax_c P(f(x + δ) = c)`` with
``δ ~ N(0, σ² I)``. If the top class has probability ``p_A ≥ 1/2``, ``g`` is constant on the ℓ2
ball of radius ``σ·Φ⁻¹(p_A)`` around ``x`` (Theorem 1 of the paper with ``p_B = 1 − p_A``).

* :meth:`SmoothedClassifier.certify` is CERTIFY (the paper's Algorithm, "certify"): ``n0``
  selection samples choose the class ``ĉ_A``; ``n`` *fresh* estimation samples count it; the
  one-sided Clopper–Pearson lower bound ``p_A_lower`` at level ``α`` gives the radius
  ``σ·Φ⁻¹(p_A_lower)``, or ABSTAIN when ``p_A_lower < 1/2``. With probability at least ``1 − α``
  over the noise, a returned (label, radius) is correct for the smoothed classifier.
* :meth:`SmoothedClassifier.predict` is PREDICT: the top two counts of ``n`` samples, and a
  two-sided binomial test of ``n_A`` against ``n_A + n_B`` at ``p = 1/2``; ABSTAIN when its
  p-value exceeds ``α`` (then the probability of returning a wrong class is at most ``α``).
* :meth:`SmoothedClassifier.margin` is a differentiable Monte-Carlo surrogate for attacks (the
  smoothed PGD, SPGD, of the degradation paper, Algorithm 3.2, follows its gradient).

Batching design (see ``docs/smoothing.md``): the noisy copies of *many* images are packed into
one forward batch; the predicted labels are counted on the device with one ``scatter_add_`` into a
(streams × images × classes) table; the table crosses to the host once per call. No Python loop
touches individual samples, and no host synchronisation happens inside the sampling loop.

Reproducibility: the noise of image ``i`` is drawn in blocks of :func:`noise_block` samples (a
function of the image shape only), each made of :data:`NOISE_LANES` lanes drawn from generators
seeded by :func:`block_seed` ``(seed, index_i, stream, block, lane)``. Counts therefore depend on the seed, the image's index and the device, never on the batch size or on
which other images share the call (up to floating-point differences of the model between batch
sizes, which can flip an exact tie of the logits).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from certaudit.defenses.smoothing_noise import (  # noqa: F401 (re-exported: part of this module's API)
    NOISE_BLOCK_BYTES, NOISE_BLOCK_MAX, NOISE_BLOCK_MIN, NOISE_LANES, NOISE_SCHEME, STREAM_ESTIMATION, STREAM_PREDICT,
    STREAM_SELECTION, STREAM_SEQUENTIAL, binomial_test_half, block_seed, clopper_pearson_lower, lane_bounds,
    noise_block, noise_pool,
)
from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm, check_images, check_labels, radius_key
from certaudit.errors import InputError

PRECISIONS = ("fp32", "bf16")
_PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16"}

CPU_BATCH_BUDGET = 6 * 2**20  # bytes of the largest activation across a CPU batch (L2/L3-cache-sized)
CUDA_MEMORY_FRACTION = 0.5  # of the free device memory used by one forward batch
MAX_BATCH = 16384
MAX_EXPLICIT_BATCH = 1 << 20  # a user-given batch above this cannot be a real forward pass
MAX_SAMPLES = 10**9  # n0 + n per image: 10^9 is ~17 minutes per image at 10^6 samples/s

MARGIN_P_FLOOR = 1e-6  # the soft probability is squeezed into [floor, 1 - floor] before Φ⁻¹

def _count(name: str, value: Any) -> int:
    """A sample count: an integer >= 1 (bools and non-integral floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if int(value) < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _alpha(value: Any) -> float:
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < a < 1.0):
        raise InputError(f"alpha must lie strictly between 0 and 1, got {value!r}")
    return a


def _sigma(value: Any) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise InputError(f"sigma must be a number > 0, got {value!r}") from None
    if not (s > 0) or math.isinf(s):
        raise InputError(f"sigma must be a finite number > 0, got {value!r}")
    return s


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {value!r}")
    return int(value)


def _eps(value: Any) -> float:
    try:
        e = float(value)
    except (TypeError, ValueError):
        raise InputError(f"eps must be a single number >= 0 (one ε for the whole batch), got {value!r}") from None
    if not (e >= 0) or math.isinf(e):
        raise InputError(f"eps must be a finite number >= 0, got {value!r}")
    return e


def parse_precision(value: str) -> str:
    key = _PRECISION_ALIASES.get(str(value).strip().lower())
    if key is None:
        raise InputError(f"unknown precision {value!r}; choose one of: {', '.join(PRECISIONS)}")
    return key


class SmoothedClassifier(Defense):
    """The ℓ2 randomized-smoothing defense around a base classifier (Cohen et al. 2019).

    ``model`` maps images in [0, 1] (NCHW) to ``num_classes`` logits; it is put in eval mode. The
    noise is added in input space, before the model's own normalization, so radii are ℓ2 distances
    between [0, 1] images.

    ``batch_size``: samples per forward pass (``None``: chosen from memory, see
    :meth:`resolve_batch_size`). ``precision="bf16"`` runs the base classifier under bfloat16
    autocast: faster on recent GPUs, and the certificate then holds for the base classifier *as
    evaluated in bf16* (which is the classifier actually deployed at that precision), not for its
    fp32 twin. ``channels_last`` converts the model and the noisy batches to channels-last memory
    layout (a CUDA speed-up for convolutions). ``n0``, ``n``, ``alpha`` and ``seed`` are the
    defaults of :meth:`certify` / :meth:`accept`; ``input_shape`` (C, H, W), if given, is checked.
    """

    norm = Norm.L2
    randomized = True  # certificates draw noise: certify takes seed/indices, a re-check is a re-draw
    sequential_test = True

    def __init__(self, model: nn.Module, num_classes: int, sigma: float, *, batch_size: int | None = None,
                 precision: str = "fp32", channels_last: bool = False, n0: int = 100, n: int = 100_000,
                 alpha: float = 0.001, seed: int | None = None, input_shape: Sequence[int] | None = None,
                 sequential: bool = False):
        super().__init__(model, num_classes)
        self.sequential = bool(sequential)  # accept() defaults to the sequential test (certify_at)
        self.sigma = _sigma(sigma)
        self.noise_sigma = self.sigma  # the protocol's name for it (SPGD samples with it)
        self.batch_size = None if batch_size is None else _count("batch_size", batch_size)
        self.precision = parse_precision(precision)
        self.channels_last = bool(channels_last)
        self.n0 = _count("n0", n0)
        self.n = _count("n", n)
        if self.n0 + self.n > MAX_SAMPLES:
            raise InputError(f"n0 + n = {self.n0 + self.n:,} samples per image is beyond what any run finishes "
                             f"(at 10^6 samples/s: {(self.n0 + self.n) / 1e6 / 86400:.3g} days per image); "
                             f"the limit is {MAX_SAMPLES:,}")
        if self.batch_size is not None and self.batch_size > MAX_EXPLICIT_BATCH:
            raise InputError(f"batch_size {self.batch_size:,} cannot be allocated (the limit is {MAX_EXPLICIT_BATCH:,} "
                             "samples per forward pass)")
        self.alpha = _alpha(alpha)
        self.seed = None if seed is None else _seed(seed)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.model.eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._auto_batch: dict[tuple, int] = {}

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_options(cls, model: nn.Module, meta: Any, options: dict[str, Any]) -> "SmoothedClassifier":
        """Build from CLI-level options (sigma, n0, n, alpha, batch_size, precision, seed, channels_last).

        σ defaults to the checkpoint's training σ (``meta.sigma``, set by Gaussian-noise training
        or by ``certaudit import --format cohen``).
        """
        if options.get("method") is not None:
            raise InputError("--method chooses interval bounds; randomized smoothing has none")
        sigma = options.get("sigma")
        if sigma is None:
            sigma = getattr(meta, "sigma", None)
            if sigma is None:
                raise InputError("randomized smoothing needs --sigma: the model's checkpoint records no training σ")
        kwargs: dict[str, Any] = {}
        for key in ("n0", "n", "alpha", "batch_size", "precision", "seed", "channels_last", "sequential"):
            if options.get(key) is not None:
                kwargs[key] = options[key]
        shape = getattr(meta, "input_shape", None)
        return cls(model, int(meta.num_classes), sigma, input_shape=shape, **kwargs)

    def settings(self) -> dict[str, Any]:
        """The settings that determine the counts (for result headers and configuration hashes)."""
        out = {"sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha, "seed": self.seed,
               "precision": self.precision, "channels_last": self.channels_last, "noise": NOISE_SCHEME}
        if self.sequential:  # only then: existing configuration hashes stay as they were
            out["accept"] = "sequential"
        return out

    # ---------------------------------------------------------------------------- the protocol

    def certify(self, x: torch.Tensor, n0: int | None = None, n: int | None = None, alpha: float | None = None,
                generator: torch.Generator | None = None, *, seed: int | None = None,
                indices: Sequence[int] | torch.Tensor | None = None) -> Certificates:
        """CERTIFY of Cohen et al. for every image of the batch.

        Returns :class:`Certificates` (on the CPU) with ``label`` (ABSTAIN where the lower bound is
        below 1/2), ``radius = σ·Φ⁻¹(p_A_lower)`` (0 where ABSTAIN) and extras ``counts_selection``
        (B, K) from the ``n0`` selection samples, ``counts`` (B, K) from the ``n`` estimation samples
        and ``p_lower`` (B,). Noise: see :meth:`sample_counts` (``seed``/``generator``/``indices``).
        """
        from scipy.stats import norm

        n0 = self.n0 if n0 is None else _count("n0", n0)
        n = self.n if n is None else _count("n", n)
        alpha = self.alpha if alpha is None else _alpha(alpha)
        x = self._check_x(x)
        base = self._base_seed(seed, generator)
        idx = self._indices(indices, x.shape[0])
        both = self._sample(x, [n0, n], [STREAM_SELECTION, STREAM_ESTIMATION], base, idx)  # (2, B, K)
        counts0, counts = both[0], both[1]
        c_hat = counts0.argmax(dim=1)  # (B,) first maximal class on ties, as numpy's argmax
        n_a = counts.gather(1, c_hat[:, None]).squeeze(1)  # (B,)
        p_lower = clopper_pearson_lower(n_a.numpy(), n, alpha)  # (B,) float64
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.where(certified, p_lower, 0.5)), 0.0)
        label = torch.where(torch.from_numpy(certified), c_hat, torch.full_like(c_hat, ABSTAIN))
        return Certificates(label=label, radius=torch.from_numpy(radius), norm=Norm.L2,
                            extras={"counts_selection": counts0, "counts": counts,
                                    "p_lower": torch.from_numpy(p_lower)})

    def accept(self, x: torch.Tensor, eps: float, n0: int | None = None, n: int | None = None,
               alpha: float | None = None, generator: torch.Generator | None = None, *,
               seed: int | None = None, indices: Sequence[int] | torch.Tensor | None = None,
               sequential: bool | None = None, beta: float | None = None) -> torch.Tensor:
        """Algorithm 2.1 (PredictWithDefense): CERTIFY's label where its radius is ≥ ``eps``, else ABSTAIN.

        ``sequential=True`` answers the same question with :meth:`certify_at` (an anytime-valid
        test at the same level α that stops per image as soon as it is decided; ``n`` is then the
        budget per image). ``sequential=None`` takes the instance's default (``sequential=`` of the
        constructor, option ``sequential`` of :meth:`from_options`), so audits that call
        ``accept`` use the sequential test without change.
        """
        if self.sequential if sequential is None else sequential:
            return self.certify_at(x, eps, n0, n, alpha, generator, seed=seed, indices=indices, beta=beta).label
        return self.certify(x, n0, n, alpha, generator, seed=seed, indices=indices).accept(eps)

    def certify_checks(self, x: torch.Tensor, radii: Sequence[float] = (), *, full_radius: bool = True,
                       seed: int | None = None, indices: Sequence[int] | None = None,
                       **options: Any) -> Certificates:
        """CERTIFY (one draw) with its verdict at each of ``radii`` (``radius >= r``: the run-time check).
        A defense built with ``sequential=True`` answers a single radius without ``full_radius`` with
        the sequential test (:meth:`certify_at`), as its :meth:`accept` does."""
        radii = list(radii)
        if self.sequential and not full_radius and len(radii) == 1:
            return self.certify_at(x, radii[0], seed=seed, indices=indices, **options)
        return self.certify(x, seed=seed, indices=indices, **options).with_checks(radii)

    def certify_at(self, x: torch.Tensor, eps: float, n0: int | None = None, n: int | None = None,
                   alpha: float | None = None, generator: torch.Generator | None = None, *,
                   seed: int | None = None, indices: Sequence[int] | torch.Tensor | None = None,
                   beta: float | None = None) -> Certificates:
        """Sequential accept-at-ε (:mod:`certaudit.defenses.sequential`): is ``ĉ_A`` certified at ``eps``?

        ``ĉ_A`` is chosen from ``n0`` selection samples (the same stream, hence the same class, as
        :meth:`certify`); then *fresh* estimation samples (stream :data:`STREAM_SEQUENTIAL`) are
        drawn in blocks until the mixture-martingale test of ``p_A > Φ(eps/σ)`` decides at level
        ``alpha`` (σ is the instance's, one for all images), the abstain-side test decides at level
        ``beta`` (default ``alpha``), or the budget ``n`` is spent (ABSTAIN). With probability at
        least ``1 − alpha`` a returned label is certified at ``eps`` for the smoothed classifier.

        Returns :class:`Certificates` with ``label`` (ABSTAIN where not certified at ``eps``),
        ``radius`` NaN (the test decides certification at ``eps``, it measures no radius), the
        decision in ``checks`` at ``eps`` (so ``.accept(eps)`` works and any other radius is refused), and extras
        ``counts_selection`` (B, K), ``counts`` (B, K) of the estimation samples, ``samples`` (B,)
        base-model evaluations (``n0`` + estimation), ``decision`` (B,) codes of
        :data:`certaudit.defenses.sequential.DECISIONS` and ``log_evidence`` (B,) float64.
        Forward batches are kept full: an image that is decided frees its slots for the next one.
        """
        from certaudit.defenses.sequential import CERTIFIED, SEQ_BLOCK, SequentialTest, threshold

        n0 = self.n0 if n0 is None else _count("n0", n0)
        n = self.n if n is None else _count("n", n)
        alpha = self.alpha if alpha is None else _alpha(alpha)
        eps_f = _eps(eps)
        x = self._check_x(x)
        base = self._base_seed(seed, generator)
        idx = self._indices(indices, x.shape[0])
        test = SequentialTest(threshold(eps_f, self.sigma), alpha, n, beta=beta)
        counts0 = self._sample(x, [n0], [STREAM_SELECTION], base, idx)[0]  # (B, K)
        c_hat = counts0.argmax(dim=1)  # (B,) as in certify
        counts, result = self._sample_sequential(x, c_hat, test, base, idx, SEQ_BLOCK)
        certified = torch.from_numpy(result.decision == CERTIFIED)
        label = torch.where(certified, c_hat, torch.full_like(c_hat, ABSTAIN))
        # the test decides "certified at ε or not", it measures no radius: NaN, and the decision is the check at ε
        radius = torch.full((x.shape[0],), math.nan, dtype=torch.float64)
        extras = {"counts_selection": counts0, "counts": counts,
                  "samples": torch.from_numpy(result.trials + n0),
                  "decision": torch.from_numpy(result.decision.astype(np.int64)),
                  "log_evidence": torch.from_numpy(test.evidence(result.successes, result.trials))}
        return Certificates(label=label, radius=radius, norm=Norm.L2, extras=extras,
                            checks={radius_key(eps_f): certified})

    def predict(self, x: torch.Tensor, n: int | None = None, alpha: float | None = None,
                generator: torch.Generator | None = None, *, seed: int | None = None,
                indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """PREDICT of Cohen et al.: (B,) labels, ABSTAIN where the binomial test's p-value exceeds α.

        A returned class differs from the smoothed classifier's with probability at most α.
        """
        n = self.n if n is None else _count("n", n)
        alpha = self.alpha if alpha is None else _alpha(alpha)
        x = self._check_x(x)
        base = self._base_seed(seed, generator)
        counts = self._sample(x, [n], [STREAM_PREDICT], base, self._indices(indices, x.shape[0]))[0]  # (B, K)
        top2 = torch.topk(counts, 2, dim=1)  # values (B, 2), indices (B, 2)
        n_a, n_b = top2.values[:, 0], top2.values[:, 1]
        c_a = counts.argmax(dim=1)  # the first maximal class (ties abstain below anyway)
        pvalue = binomial_test_half(n_a.numpy(), (n_a + n_b).numpy())
        keep = torch.from_numpy(pvalue <= alpha)
        return torch.where(keep, c_a, torch.full_like(c_a, ABSTAIN))

    def sample_counts(self, x: torch.Tensor, num: int, generator: torch.Generator | None = None, *,
                      seed: int | None = None, indices: Sequence[int] | torch.Tensor | None = None,
                      stream: int = STREAM_ESTIMATION) -> torch.Tensor:
        """Class counts (B, K) int64 (CPU) of the base classifier on ``num`` noisy copies per image.

        Noise of image ``b``: blocks of :func:`noise_block` samples seeded by
        ``block_seed(seed, indices[b], stream, j)``. ``seed`` defaults to one drawn from
        ``generator`` (or to the instance's seed, or to one drawn from torch's global generator);
        ``indices`` defaults to ``0..B-1``.
        """
        num = _count("num", num)
        x = self._check_x(x)
        base = self._base_seed(seed, generator)
        return self._sample(x, [num], [int(stream)], base, self._indices(indices, x.shape[0]))[0]

    def margin(self, x: torch.Tensor, eps: float, target: torch.Tensor, n_samples: int = 32,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Differentiable Monte-Carlo surrogate (B,) of "CERTIFY returns ``target`` at radius ``eps``".

        ``p̂ = mean_i softmax(f(x + δ_i))[target]`` over ``n_samples`` noisy copies (fresh noise from
        ``generator``) is a soft estimate of ``P(f(x + δ) = target)``; the margin is
        ``σ·Φ⁻¹(p̃) − eps`` with ``p̃ = floor + (1 − 2·floor)·p̂`` (a squeeze that keeps gradients and
        avoids Φ⁻¹(0 or 1)). It is positive iff the soft estimate would certify ``target`` at
        ``eps`` (ignoring the confidence correction). SPGD (Algorithm 3.2) ascends or descends it.
        Runs under the instance's precision; one forward pass of B·n_samples copies with gradients.
        """
        x = self._check_x(x)
        n_samples = _count("n_samples", n_samples)
        try:
            eps_f = float(eps)
        except (TypeError, ValueError):
            raise InputError(f"eps must be a number >= 0, got {eps!r}") from None
        if not (eps_f >= 0) or math.isinf(eps_f):
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        b = x.shape[0]
        target = check_labels(target, b, self.num_classes).to(x.device)
        gen_dev = generator.device if generator is not None else x.device
        noise = torch.randn((b, n_samples, *x.shape[1:]), generator=generator, device=gen_dev)
        noise = noise.to(x.device)  # (B, S, C, H, W)
        noisy = (x.unsqueeze(1) + self.sigma * noise).reshape(b * n_samples, *x.shape[1:])  # (B·S, C, H, W)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self._autocast(x.device):
            logits = self.model(noisy)
        self._check_logits(logits)
        probs = torch.softmax(logits.float(), dim=1).reshape(b, n_samples, self.num_classes).mean(dim=1)  # (B, K)
        p = probs.gather(1, target[:, None]).squeeze(1).double()  # (B,)
        p = MARGIN_P_FLOOR + (1.0 - 2.0 * MARGIN_P_FLOOR) * p
        return (self.sigma * torch.special.ndtri(p) - eps_f).to(x.dtype)

    # ------------------------------------------------------------------------------ batching core

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

        The samples form one sequence, image by image and, within an image, stream by stream.
        Whole noise blocks are written into a buffer, and next to them, in a parallel index buffer,
        the flat offset ``(slot·B + image)·K`` of their count row; before a block that would
        overflow ``batch`` samples the buffer is classified (so forward passes never exceed
        ``batch``, and with block-aligned batch sizes they are full except near the ends of images);
        a block larger than ``batch`` is classified in slices of ``batch``. Each forward pass ends
        in one ``scatter_add_`` of ``offset + label`` into the device table.
        """
        dev = self.device
        x = x.detach().to(dev, torch.float32)  # (B, C, H, W), the only host-to-device copy
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
        from certaudit.defenses.sequential import run_sequential

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

    # ------------------------------------------------------------------------------ checks, seeds

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x.detach())
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return x

    def _base_seed(self, seed: int | None, generator: torch.Generator | None) -> int:
        if seed is not None:
            return _seed(seed)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, 2**62, (1,)).item())

    @staticmethod
    def _indices(indices: Sequence[int] | torch.Tensor | None, b: int) -> list[int]:
        if indices is None:
            return list(range(b))
        out = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        if len(out) != b:
            raise InputError(f"indices must have one entry per image ({b}), got {len(out)}")
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in out):
            raise InputError("indices must be integers")
        return [int(i) for i in out]

    def images_per_chunk(self, sample_shape: Sequence[int], n0: int | None = None, n: int | None = None, *,
                         full_radius: bool = True) -> int:
        """Images per :meth:`certify` call so that the call's one partial batch costs little (≤ ~3%)."""
        per_image = (self.n0 if n0 is None else n0) + (self.n if n is None else n)
        return max(1, min(4096, -(-32 * self.resolve_batch_size(sample_shape) // per_image)))


def _round_batch(raw: int, block: int) -> int:
    raw = max(1, min(int(raw), MAX_BATCH))
    if raw >= block:
        return raw // block * block
    return 1 << (raw.bit_length() - 1)


__all__ = [
    "SmoothedClassifier", "block_seed", "clopper_pearson_lower", "binomial_test_half", "parse_precision",
    "noise_block", "lane_bounds", "NOISE_LANES", "NOISE_SCHEME", "STREAM_SELECTION", "STREAM_ESTIMATION", "STREAM_PREDICT",
    "STREAM_SEQUENTIAL", "PRECISIONS",
]
