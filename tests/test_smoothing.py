"""Randomized smoothing: soundness of CERTIFY, agreement with a one-image reference, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, binomtest, norm
from torch import nn

from certaudit.defenses.base import ABSTAIN
from certaudit.defenses.smoothing import (
    STREAM_ESTIMATION,
    STREAM_SELECTION,
    SmoothedClassifier,
    binomial_test_half,
    block_seed,
    clopper_pearson_lower,
    lane_bounds,
    noise_block,
)
from certaudit.defenses.smoothing_noise import LaneQueue, LaneReader, lane_plan, piecewise_draws_exact
from certaudit.errors import InputError
from certaudit.models import ModelMeta, build_model


class LinearThreshold(nn.Module):
    """Base classifier with a known smoothed probability: class 1 iff w·z > t (class 2 never).

    Under z = x + δ, δ ~ N(0, σ²I): P(class 1) = Φ((w·x − t) / (σ‖w‖)) exactly.
    """

    def __init__(self, w: torch.Tensor, t: float, scale: float = 1.0):
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.t = float(t)
        self.scale = float(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.scale * ((z.flatten(1) * self.w).sum(dim=1) - self.t)  # (S,)
        zero = torch.zeros_like(s)
        return torch.stack([zero, s, zero - 1.0], dim=1)  # (S, 3)

    def p_class1(self, x: torch.Tensor, sigma: float) -> np.ndarray:
        w = self.w.double()
        s = (x.flatten(1).double() @ w - self.t) / (sigma * float(w.norm()))
        return norm.cdf(s.numpy())


class PixelBins(nn.Module):
    """Elementwise base classifier: the class is the bin of pixel (0, 0, 0) (exact in any batch)."""

    def __init__(self, centers: list[float]):
        super().__init__()
        self.register_buffer("centers", torch.tensor(centers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -(z[:, 0, 0, 0, None] - self.centers).abs()  # (S, K)


def _linear_setup(sigma: float, probs: list[float], repeats: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = 0.5 + torch.rand(16, generator=gen)  # positive weights on a 1x4x4 image
    s_w, n_w = float(w.sum()), float(w.norm())
    model = LinearThreshold(w, 0.5 * s_w)
    a = 0.5 + sigma * n_w * norm.ppf(np.array(probs)) / s_w  # constant images hitting each p exactly
    assert np.all((a >= 0) & (a <= 1))
    x = torch.tensor(np.repeat(a, repeats), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return model, x


# ------------------------------------------------------------------------------------ soundness

def test_certify_is_sound_over_thousands_of_trials():
    """P(p_A_lower > p_A) <= α and P(radius > true smoothed radius) <= α (one-sided binomial tests)."""
    sigma, alpha, n0, n = 0.5, 0.05, 16, 400
    probs = [0.55, 0.7, 0.85, 0.95, 0.99]
    model, x = _linear_setup(sigma, probs, repeats=2000)
    trials = x.shape[0]  # 10,000 independent CERTIFY runs (distinct indices, distinct noise)
    sc = SmoothedClassifier(model, 3, sigma, batch_size=8192)
    cert = sc.certify(x, n0=n0, n=n, alpha=alpha, seed=1234)

    p1 = model.p_class1(x, sigma)  # exact P(class 1) of every trial
    p_true = np.stack([1 - p1, p1, np.zeros_like(p1)], axis=1)  # (T, 3)
    counts0 = cert.extras["counts_selection"].numpy()
    selected = counts0.argmax(axis=1)
    assert np.all(cert.extras["counts"].numpy().sum(axis=1) == n)
    assert np.all(counts0.sum(axis=1) == n0)

    p_lower = cert.extras["p_lower"].numpy()
    bound_fail = p_lower > p_true[np.arange(trials), selected]
    label = cert.label.numpy()
    radius = cert.radius.numpy()
    true_radius = sigma * norm.ppf(p1)  # class 1 is the smoothed class for every trial (p1 > 1/2)
    radius_fail = (label != ABSTAIN) & ((label != 1) | (radius > true_radius))

    for fails in (bound_fail, radius_fail):
        k = int(fails.sum())
        # if the true failure rate were <= α, seeing k or more failures has probability p; we
        # reject soundness only at p < 1e-4 so a correct implementation never flakes.
        assert binomtest(k, trials, alpha, alternative="greater").pvalue > 1e-4, (k, trials)
    # the bound is not vacuous: it fails at a rate of the order of α (CP is a little conservative)
    assert bound_fail.mean() > alpha / 4
    # and the check has power: an unsound bound on the same counts (Wald's normal approximation)
    # is caught by the same test
    n_a = cert.extras["counts"].numpy()[np.arange(trials), selected]
    p_hat = n_a / n
    wald = p_hat - norm.ppf(1 - alpha) * np.sqrt(p_hat * (1 - p_hat) / n)
    k_wald = int((wald > p_true[np.arange(trials), selected]).sum())
    assert binomtest(k_wald, trials, alpha, alternative="greater").pvalue < 1e-4
    # and it certifies most confident trials
    assert np.mean(label[p1 > 0.9] == 1) > 0.9


def test_certify_never_certifies_a_coin_more_often_than_alpha():
    sigma, alpha = 0.5, 0.01
    model, x = _linear_setup(sigma, [0.5], repeats=1000)
    sc = SmoothedClassifier(model, 3, sigma)
    cert = sc.certify(x, n0=20, n=200, alpha=alpha, seed=7)
    k = int((cert.label != ABSTAIN).sum())
    assert binomtest(k, len(cert), alpha, alternative="greater").pvalue > 1e-4
    assert torch.all(cert.radius[cert.label == ABSTAIN] == 0)


def test_predict_abstains_on_a_coin_and_answers_a_sure_thing():
    sigma = 0.5
    model, x = _linear_setup(sigma, [0.5, 0.999], repeats=300)
    sc = SmoothedClassifier(model, 3, sigma, seed=3)
    pred = sc.predict(x, n=200, alpha=0.01).numpy()
    coin, sure = pred[:300], pred[300:]
    # wrong answers (class 0 or 1 for the coin is "a" class; PREDICT must abstain, except w.p. <= α)
    assert binomtest(int((coin != ABSTAIN).sum()), 300, 0.01, alternative="greater").pvalue > 1e-4
    assert np.all(sure == 1)


# -------------------------------------------------------------------------- agreement with reference

def _reference_counts(model, x, sigma, num, seed, stream, index, k):
    """One image at a time, one noise block at a time, counted with numpy (the documented recipe)."""
    counts = np.zeros(k, dtype=np.int64)
    block = noise_block(x.shape)
    for j in range(math.ceil(num / block)):
        m = min(block, num - j * block)
        lanes = []
        for lane, (a, e) in enumerate(lane_bounds(m)):
            g = torch.Generator().manual_seed(block_seed(seed, index, stream, j, lane))
            lanes.append(torch.empty((e - a, *x.shape)).normal_(0.0, sigma, generator=g))
        noise = torch.cat(lanes)
        with torch.no_grad():
            pred = model(noise + x).argmax(dim=1).numpy()
        counts += np.bincount(pred, minlength=k)
    return counts


def _cp_lower_by_root(k: int, n: int, alpha: float) -> float:
    """Clopper–Pearson lower bound from its definition: the p with P(X >= k | p) = α."""
    if k == 0:
        return 0.0
    return brentq(lambda p: binom.sf(k - 1, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-14)


def _reference_certify(model, x, sigma, n0, n, alpha, seed, indices, k):
    out = []
    for img, idx in zip(x, indices):
        c0 = _reference_counts(model, img, sigma, n0, seed, STREAM_SELECTION, idx, k)
        c = _reference_counts(model, img, sigma, n, seed, STREAM_ESTIMATION, idx, k)
        c_hat = int(np.argmax(c0))
        p_lo = _cp_lower_by_root(int(c[c_hat]), n, alpha)
        if p_lo < 0.5:
            out.append((ABSTAIN, 0.0, c0, c, p_lo))
        else:
            out.append((c_hat, sigma * norm.ppf(p_lo), c0, c, p_lo))
    return out


@pytest.mark.parametrize("batch_size", [7, 300, 4096, 5000])
def test_batched_certify_equals_one_image_reference(batch_size):
    sigma, n0, n, alpha, seed = 0.3, 50, 9000, 0.01, 11  # 3 noise blocks per image
    model = PixelBins([0.1, 0.35, 0.6, 0.85])
    x = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    indices = [40, 3, 17, 0, 999]
    sc = SmoothedClassifier(model, 4, sigma, batch_size=batch_size)
    cert = sc.certify(x, n0=n0, n=n, alpha=alpha, seed=seed, indices=indices)
    ref = _reference_certify(model, x, sigma, n0, n, alpha, seed, indices, 4)
    for b, (lab, rad, c0, c, p_lo) in enumerate(ref):
        assert np.array_equal(cert.extras["counts_selection"][b].numpy(), c0)
        assert np.array_equal(cert.extras["counts"][b].numpy(), c)
        assert int(cert.label[b]) == lab
        assert float(cert.extras["p_lower"][b]) == pytest.approx(p_lo, abs=1e-9)
        assert float(cert.radius[b]) == pytest.approx(rad, abs=1e-8)


def test_batched_counts_equal_reference_on_a_conv_net():
    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sc = SmoothedClassifier(model, 10, 0.25, batch_size=512)
    got = sc.sample_counts(x, 3000, seed=5, indices=[0, 1, 2])
    for b in range(3):
        ref = _reference_counts(model, x[b], 0.25, 3000, 5, STREAM_ESTIMATION, b, 10)
        # batch-size-dependent float rounding may flip an exact logit tie: allow a couple of samples
        assert np.abs(got[b].numpy() - ref).sum() <= 2


@pytest.mark.parametrize("side", [2, 4])  # 1x2x2: noise drawn a block at a time; 1x4x4: batch by batch
def test_rows_do_not_depend_on_batch_composition_or_size(side):
    model = PixelBins([0.2, 0.5, 0.8])
    x = torch.rand(6, 1, side, side, generator=torch.Generator().manual_seed(2))
    assert piecewise_draws_exact(x.shape[1:]) == (side == 4)
    idx = [10, 11, 12, 13, 14, 15]
    full = SmoothedClassifier(model, 3, 0.4, batch_size=1024).certify(x, n0=30, n=3000, seed=9, indices=idx)
    small = SmoothedClassifier(model, 3, 0.4, batch_size=13)
    parts = [small.certify(x[a:b], n0=30, n=3000, seed=9, indices=idx[a:b]) for a, b in ((0, 1), (1, 4), (4, 6))]
    for key in ("counts_selection", "counts"):
        assert torch.equal(full.extras[key], torch.cat([p.extras[key] for p in parts]))
    assert torch.equal(full.label, torch.cat([p.label for p in parts]))
    threads = torch.get_num_threads()
    try:  # one thread draws the noise lanes in turn; several draw them in parallel: same noise
        torch.set_num_threads(1)
        serial = SmoothedClassifier(model, 3, 0.4).sample_counts(x, 9000, seed=9, indices=idx)
        torch.set_num_threads(2)
        parallel = SmoothedClassifier(model, 3, 0.4).sample_counts(x, 9000, seed=9, indices=idx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_size", [5, 128, 4096, 9000])
def test_noise_drawn_batch_by_batch_equals_noise_drawn_by_blocks(threads, batch_size):
    """The CPU sampler draws each lane in pieces as forward batches need them; the counts are those
    of whole blocks drawn at once (the documented recipe), for any batch size and thread count."""
    model = PixelBins([0.1, 0.35, 0.6, 0.85])
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))  # 16 values: pieces are exact
    assert noise_block(x.shape[1:]) == 4096
    idx, nums, streams = [7, 0, 123], [50, 9000], [STREAM_SELECTION, STREAM_ESTIMATION]  # 3 blocks, a short last one
    sc = SmoothedClassifier(model, 4, 0.3, batch_size=batch_size)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        pieces = sc._sample_pieces(x, nums, streams, 21, idx)
    finally:
        torch.set_num_threads(old)
    blocks = sc._sample_blocks(x, nums, streams, 21, idx)
    assert torch.equal(pieces, blocks)
    for b in range(3):
        assert np.array_equal(pieces[1, b].numpy(), _reference_counts(model, x[b], 0.3, 9000, 21, STREAM_ESTIMATION, idx[b], 4))


def test_piecewise_draws_and_the_lane_queue():
    assert piecewise_draws_exact((1, 28, 28)) and piecewise_draws_exact((3, 32, 32)) and piecewise_draws_exact((1, 4, 4))
    assert not piecewise_draws_exact((1, 3, 3)) and not piecewise_draws_exact((1, 2, 2))
    lanes = lane_plan([100, 10_000], [STREAM_SELECTION, STREAM_ESTIMATION], 3, [5, 6], 4096, 10)
    assert sum(lane[3] for lane in lanes) == 2 * 10_100 and lanes[0][:2] == (0, 0) and lanes[-1][:2] == (30, 1)
    assert lanes[0][2] == block_seed(3, 5, STREAM_SELECTION, 0, 0) and lanes[-1][2] == block_seed(3, 6, STREAM_ESTIMATION, 2, 3)
    queue = LaneQueue(lanes)
    readers = [LaneReader(queue), LaneReader(queue)]
    first = readers[0].take(lanes[0][3] + 1)  # crosses into the next lane of the queue
    assert [p[3] for p in first] == [lanes[0][3], 1] and first[0][:2] == lanes[0][:2] and first[1][:2] == lanes[1][:2]
    assert readers[1].take(5)[0][:2] == lanes[2][:2]  # the other reader opens the next free lane
    taken = sum(p[3] for r in readers for p in r.take(10**6))
    assert taken == sum(lane[3] for lane in lanes) - sum(p[3] for p in first) - 5 and readers[0].take(3) == []


def test_seeds_and_generators_are_reproducible():
    model = PixelBins([0.2, 0.5, 0.8])
    x = torch.full((2, 1, 2, 2), 0.5)
    sc = SmoothedClassifier(model, 3, 0.5)
    a = sc.sample_counts(x, 500, seed=1)
    assert torch.equal(a, sc.sample_counts(x, 500, seed=1))
    assert not torch.equal(a, sc.sample_counts(x, 500, seed=2))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(sc.sample_counts(x, 500, g1), sc.sample_counts(x, 500, g2))
    # selection and estimation use independent noise (fresh samples)
    cert = sc.certify(x, n0=500, n=500, seed=1)
    assert not torch.equal(cert.extras["counts_selection"], cert.extras["counts"])
    # identical images with different indices get different noise
    assert not torch.equal(a[0], a[1])


# ------------------------------------------------------------------------------ statistics helpers

def test_clopper_pearson_matches_its_definition():
    for n in (1, 7, 100, 10_000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for alpha in (0.001, 0.05):
                got = float(clopper_pearson_lower([k], n, alpha)[0])
                assert got == pytest.approx(_cp_lower_by_root(k, n, alpha), abs=1e-9)


def test_binomial_test_matches_scipy_binomtest():
    for m in (1, 2, 5, 40, 333):
        for top in range((m + 1) // 2, m + 1):
            got = float(binomial_test_half([top], [m])[0])
            assert got == pytest.approx(binomtest(top, m, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_abstains_when_n_cannot_reach_one_half():
    # with n = 4 and α = 0.05 the best bound is 0.05 ** (1/4) = 0.473 < 1/2: always ABSTAIN
    model = PixelBins([0.0, 1.0])
    x = torch.zeros(3, 1, 2, 2)
    sc = SmoothedClassifier(model, 2, 0.01)
    cert = sc.certify(x, n0=3, n=4, alpha=0.05, seed=0)
    assert torch.all(cert.label == ABSTAIN) and torch.all(cert.radius == 0)
    assert torch.all(cert.extras["counts"][:, 0] == 4)
    cert5 = sc.certify(x, n0=3, n=5, alpha=0.05, seed=0)  # 0.05 ** (1/5) = 0.549: certified
    assert torch.all(cert5.label == 0)
    assert torch.allclose(cert5.radius, torch.full((3,), 0.01 * norm.ppf(0.05 ** 0.2), dtype=torch.float64))
    assert torch.equal(sc.accept(x, 1e-4, n0=3, n=5, alpha=0.05, seed=0), torch.zeros(3, dtype=torch.long))
    assert torch.all(sc.accept(x, 1.0, n0=3, n=5, alpha=0.05, seed=0) == ABSTAIN)


# ------------------------------------------------------------------------------------------ margin

def test_margin_is_a_differentiable_estimate_of_the_certified_margin():
    sigma = 0.5
    model, x = _linear_setup(sigma, [0.9, 0.6], repeats=1)
    model.scale = 200.0  # nearly hard decisions: the soft probability is close to the true one
    sc = SmoothedClassifier(model, 3, sigma)
    xr = x.clone().requires_grad_(True)
    target = torch.tensor([1, 1])
    m = sc.margin(xr, 0.1, target, n_samples=20000, generator=torch.Generator().manual_seed(0))
    expected = sigma * norm.ppf(model.p_class1(x, sigma)) - 0.1
    assert np.allclose(m.detach().numpy(), expected, atol=0.03)
    m.sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    # sign: certified at a small eps, not at a radius beyond the smoothed one
    big = sc.margin(x, 2.0, target, n_samples=2000, generator=torch.Generator().manual_seed(0))
    assert torch.all(big < 0)
    assert torch.all(sc.margin(x, 0.0, torch.tensor([0, 0]), n_samples=2000) < 0)


# ---------------------------------------------------------------------------------- configuration

def test_bf16_and_channels_last_run_and_count_every_sample():
    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10)
    x = torch.rand(2, 1, 8, 8)
    sc = SmoothedClassifier(model, 10, 0.25, precision="bf16", channels_last=True, batch_size=256)
    cert = sc.certify(x, n0=10, n=700, seed=0)
    assert torch.all(cert.extras["counts"].sum(1) == 700)
    fp32 = SmoothedClassifier(build_model("2c2f", (1, 8, 8), 10), 10, 0.25)
    assert fp32.precision == "fp32" and sc.precision == "bf16"


def test_from_options_defaults_sigma_to_training_sigma():
    model = build_model("2c2f", (1, 8, 8), 10)
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0],
                     method="gaussian", sigma=0.25)
    sc = SmoothedClassifier.from_options(model, meta, {"n0": 10, "n": 50, "alpha": 0.01, "seed": 3, "eps": 0.5})
    assert sc.sigma == 0.25 and sc.n0 == 10 and sc.n == 50 and sc.alpha == 0.01 and sc.seed == 3
    assert SmoothedClassifier.from_options(model, meta, {"sigma": 0.5}).sigma == 0.5
    meta.sigma = None
    with pytest.raises(InputError, match="sigma"):
        SmoothedClassifier.from_options(model, meta, {})
    with pytest.raises(InputError, match="shape"):
        SmoothedClassifier.from_options(model, ModelMeta("2c2f", "digits", [1, 8, 8], 10, [0.0], [1.0], sigma=0.2),
                                        {}).certify(torch.rand(1, 1, 9, 9), n0=1, n=1)


def test_batch_size_from_memory_on_cpu():
    sc = SmoothedClassifier(build_model("2c2f", (1, 28, 28), 10), 10, 0.25)
    bs = sc.resolve_batch_size((1, 28, 28))
    block = noise_block((1, 28, 28))
    assert block == 4096 and noise_block((3, 32, 32)) == 2048 and noise_block((3, 224, 224)) == 64
    assert 1 <= bs <= 16384 and (bs % block == 0 or bs & (bs - 1) == 0)
    assert SmoothedClassifier(sc.model, 10, 0.25, batch_size=99).resolve_batch_size((1, 28, 28)) == 99
    assert sc.images_per_chunk((1, 28, 28), 100, 10_000) >= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"sigma": float("nan")}, "sigma"),
    ({"sigma": float("inf")}, "sigma"), ({"n0": 0}, "n0"), ({"n": 0}, "n"), ({"n": 2.5}, "n"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"batch_size": 0}, "batch_size"), ({"precision": "fp16"}, "precision"), ({"seed": 1.5}, "seed"),
])
def test_bad_parameters_are_clear_errors(kwargs, match):
    args = {"sigma": 0.25, **kwargs}
    with pytest.raises(InputError, match=match):
        SmoothedClassifier(PixelBins([0.0, 1.0]), 2, **args)


@pytest.mark.parametrize("call, match", [
    (lambda sc, x: sc.certify(x, n0=0, n=10), "n0"),
    (lambda sc, x: sc.certify(x, n0=1, n=0), "n"),
    (lambda sc, x: sc.certify(x, n0=1, n=10, alpha=1.5), "alpha"),
    (lambda sc, x: sc.certify(x, n0=1, n=10, alpha=-0.1), "alpha"),
    (lambda sc, x: sc.predict(x, n=10, alpha=0), "alpha"),
    (lambda sc, x: sc.certify(torch.full_like(x, float("nan")), n0=1, n=10), "NaN"),
    (lambda sc, x: sc.certify(x + 2.0, n0=1, n=10), r"\[0, 1\]"),
    (lambda sc, x: sc.certify(x[0], n0=1, n=10), "shape"),
    (lambda sc, x: sc.certify(x, n0=1, n=10, indices=[1]), "indices"),
    (lambda sc, x: sc.accept(x, -1.0, n0=1, n=10), "eps"),
    (lambda sc, x: sc.margin(x, 0.1, torch.tensor([5, 0])), "target"),
    (lambda sc, x: sc.margin(x, float("nan"), torch.tensor([0, 0])), "eps"),
])
def test_bad_calls_are_clear_errors(call, match):
    sc = SmoothedClassifier(PixelBins([0.0, 1.0]), 2, 0.25)
    with pytest.raises(InputError, match=match):
        call(sc, torch.rand(2, 1, 2, 2))


@pytest.mark.parametrize("side", [2, 4])  # noise by blocks; batch by batch in worker threads
def test_model_with_wrong_number_of_classes_is_a_clear_error(side):
    sc = SmoothedClassifier(PixelBins([0.0, 0.5, 1.0]), 5, 0.25, batch_size=16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(InputError, match="logits"):
            sc.certify(torch.rand(3, 1, side, side), n0=20, n=300)
        assert torch.get_num_threads() == 2  # restored after a worker failed
        good = SmoothedClassifier(PixelBins([0.0, 0.5, 1.0]), 3, 0.25, batch_size=16)
        assert torch.all(good.sample_counts(torch.rand(3, 1, side, side), 300, seed=0).sum(1) == 300)
    finally:
        torch.set_num_threads(threads)
