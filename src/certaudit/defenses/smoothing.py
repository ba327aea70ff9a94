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
touches individual samples, and no host synchronisation happens inside the sampling loop. That
engine (batch sizing, precision, the counting loops) is :mod:`certaudit.defenses.smoothing_engine`;
this module holds the statistics of the protocol on top of it.

Reproducibility: the noise of image ``i`` is drawn in blocks of :func:`noise_block` samples (a
function of the image shape only), each made of :data:`NOISE_LANES` lanes drawn from generators
seeded by :func:`block_seed` ``(seed, index_i, stream, block, lane)``. Counts therefore depend on the seed, the image's index and the device, never on the batch size or on
which other images share the call (up to floating-point differences of the model between batch
sizes, which can flip an exact tie of the logits).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import norm as std_normal
from torch import nn

from certaudit import validate
from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm, check_images, check_labels, radius_key
from certaudit.defenses.sequential import CERTIFIED, SEQ_BLOCK, SequentialTest, threshold
from certaudit.defenses.smoothing_engine import (  # noqa: F401 (re-exported: part of this module's API)
    CPU_BATCH_BUDGET, CUDA_MEMORY_FRACTION, MAX_BATCH, PRECISIONS, SamplingEngine, parse_precision,
)
from certaudit.defenses.smoothing_noise import (  # noqa: F401 (re-exported: part of this module's API)
    NOISE_BLOCK_BYTES, NOISE_BLOCK_MAX, NOISE_BLOCK_MIN, NOISE_LANES, NOISE_SCHEME, STREAM_ESTIMATION, STREAM_PREDICT,
    STREAM_SELECTION, STREAM_SEQUENTIAL, binomial_test_half, block_seed, clopper_pearson_lower, lane_bounds,
    noise_block, noise_pool,
)
from certaudit.errors import InputError

MAX_EXPLICIT_BATCH = 1 << 20  # a user-given batch above this cannot be a real forward pass
MAX_SAMPLES = 10**9  # n0 + n per image: 10^9 is ~17 minutes per image at 10^6 samples/s

MARGIN_P_FLOOR = 1e-6  # the soft probability is squeezed into [floor, 1 - floor] before Φ⁻¹


class SmoothedClassifier(SamplingEngine, Defense):
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
        self.sigma = validate.positive(sigma, "sigma")
        self.noise_sigma = self.sigma  # the protocol's name for it (SPGD samples with it)
        self.batch_size = None if batch_size is None else validate.count(batch_size, "batch_size")
        self.precision = parse_precision(precision)
        self.channels_last = bool(channels_last)
        self.n0 = validate.count(n0, "n0")
        self.n = validate.count(n, "n")
        if self.n0 + self.n > MAX_SAMPLES:
            raise InputError(f"n0 + n = {self.n0 + self.n:,} samples per image is beyond what any run finishes "
                             f"(at 10^6 samples/s: {(self.n0 + self.n) / 1e6 / 86400:.3g} days per image); "
                             f"the limit is {MAX_SAMPLES:,}")
        if self.batch_size is not None and self.batch_size > MAX_EXPLICIT_BATCH:
            raise InputError(f"batch_size {self.batch_size:,} cannot be allocated (the limit is {MAX_EXPLICIT_BATCH:,} "
                             "samples per forward pass)")
        self.alpha = validate.probability(alpha, "alpha")
        self.seed = None if seed is None else validate.seed(seed)
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
        n0 = self.n0 if n0 is None else validate.count(n0, "n0")
        n = self.n if n is None else validate.count(n, "n")
        alpha = self.alpha if alpha is None else validate.probability(alpha, "alpha")
        x = self._check_x(x)
        base = self._base_seed(seed, generator)
        idx = self._indices(indices, x.shape[0])
        both = self._sample(x, [n0, n], [STREAM_SELECTION, STREAM_ESTIMATION], base, idx)  # (2, B, K)
        counts0, counts = both[0], both[1]
        c_hat = counts0.argmax(dim=1)  # (B,) first maximal class on ties, as numpy's argmax
        n_a = counts.gather(1, c_hat[:, None]).squeeze(1)  # (B,)
        p_lower = clopper_pearson_lower(n_a.numpy(), n, alpha)  # (B,) float64
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * std_normal.ppf(np.where(certified, p_lower, 0.5)), 0.0)
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
        n0 = self.n0 if n0 is None else validate.count(n0, "n0")
        n = self.n if n is None else validate.count(n, "n")
        alpha = self.alpha if alpha is None else validate.probability(alpha, "alpha")
        eps_f = validate.number(eps, "eps", low=0.0)  # 0 is allowed here
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
        n = self.n if n is None else validate.count(n, "n")
        alpha = self.alpha if alpha is None else validate.probability(alpha, "alpha")
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
        num = validate.count(num, "num")
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
        n_samples = validate.count(n_samples, "n_samples")
        eps_f = validate.number(eps, "eps", low=0.0)  # 0 is allowed here
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

    # ------------------------------------------------------------------------------ checks, seeds

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x.detach())
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return x

    def _base_seed(self, seed: int | None, generator: torch.Generator | None) -> int:
        drawn = validate.seed_or_draw(seed, generator)
        if drawn is not None:
            return drawn
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


__all__ = [
    "SmoothedClassifier", "block_seed", "clopper_pearson_lower", "binomial_test_half", "parse_precision",
    "noise_block", "lane_bounds", "NOISE_LANES", "NOISE_SCHEME", "STREAM_SELECTION", "STREAM_ESTIMATION", "STREAM_PREDICT",
    "STREAM_SEQUENTIAL", "PRECISIONS", "CPU_BATCH_BUDGET", "CUDA_MEMORY_FRACTION", "MAX_BATCH", "NOISE_BLOCK_BYTES",
    "NOISE_BLOCK_MAX", "NOISE_BLOCK_MIN", "noise_pool",
]
