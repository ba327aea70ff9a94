"""Sequential accept-at-ε: soundness by simulation, the pitfalls it avoids, and the model path."""

from __future__ import annotations

import inspect

import mpmath
import numpy as np
import pytest
import torch
from scipy.special import betaincc
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from torch import nn

from certaudit.defenses.base import ABSTAIN
from certaudit.defenses.sequential import (
    ABSTAINED,
    BUDGET,
    CERTIFIED,
    CONTINUE,
    FUTILE,
    SequentialTest,
    bernoulli_draw,
    log_evidence,
    run_sequential,
    threshold,
)
from certaudit.defenses.smoothing import SmoothedClassifier
from certaudit.errors import InputError


def _first_decision(test: SequentialTest, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """The decision of each path (rows) of counts observed at the check times (columns)."""
    codes = test.decide(successes, np.broadcast_to(trials, successes.shape))  # (R, T)
    stopped = codes != CONTINUE
    first = np.argmax(stopped, axis=1)
    return np.where(stopped.any(axis=1), codes[np.arange(len(codes)), first], CONTINUE)


def _paths(rng: np.random.Generator, p: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Cumulative Bernoulli(p) success counts (R, T) at the check times."""
    steps = np.diff(np.concatenate([[0], times]))
    return np.cumsum(rng.binomial(steps[None, :], p[:, None]), axis=1)


# ------------------------------------------------------------------------------ the statistic

def _reference_log_evidence(s: int, t: int, p0: float) -> float:
    """log ∫_{p0}^1 (q/p0)^S ((1-q)/(1-p0))^F dq / (1 - p0), by 50-digit quadrature."""
    mpmath.mp.dps = 50
    p0m, f = mpmath.mpf(p0), t - s
    integrand = lambda q: mpmath.exp(s * mpmath.log(q / p0m) + f * mpmath.log((1 - q) / (1 - p0m)))  # noqa: E731
    mode = mpmath.mpf(s) / t
    points = [p0m, mode, 1] if p0m < mode < 1 else [p0m, 1]
    return float(mpmath.log(mpmath.quad(integrand, points) / (1 - p0m)))


@pytest.mark.parametrize("z, s, t", [(2.0, 97_900, 100_000), (2.0, 500, 500), (1.0, 86_000, 100_000),
                                     (0.5, 40, 128), (3.0, 99_990, 100_000)])
def test_statistic_is_float64_and_matches_a_50_digit_reference_where_float32_does_not(z, s, t):
    """Pitfall: low precision. At t = 10⁵ the terms are ~10⁴ and cancel to a few units."""
    p0 = threshold(z, 1.0)
    ours = log_evidence(s, t, p0)
    assert ours.dtype == np.float64
    ref = _reference_log_evidence(s, t, p0)
    assert float(ours) == pytest.approx(ref, abs=1e-7, rel=1e-9)
    # the same formula evaluated in float32 (threshold, counts and logs) is visibly off at large t
    p32 = torch.tensor(p0, dtype=torch.float32)
    s32, f32 = torch.tensor(float(s)), torch.tensor(float(t - s))
    tail = torch.tensor(betaincc(s + 1, t - s + 1, float(p32)), dtype=torch.float32)
    low = (torch.lgamma(s32 + 1) + torch.lgamma(f32 + 1) - torch.lgamma(s32 + f32 + 2) + torch.log(tail)
           - s32 * torch.log(p32) - f32 * torch.log1p(-p32) - torch.log1p(-p32))
    if t >= 100_000:
        assert abs(float(low) - ref) > 1e-3 > 100 * abs(float(ours) - ref)


def test_evidence_starts_at_one_and_grows_with_successes():
    p0 = threshold(0.5, 0.25)
    assert log_evidence(0, 0, p0) == pytest.approx(0.0, abs=1e-12)
    assert log_evidence(0, 0, p0, "below") == pytest.approx(0.0, abs=1e-12)
    t = 1000
    up = log_evidence(np.arange(t + 1), t, p0)
    assert np.all(np.isfinite(up)) and np.all(np.diff(up) > 0)
    down = log_evidence(np.arange(t + 1), t, p0, "below")
    assert np.all(np.isfinite(down)) and np.all(np.diff(down) < 0)
    # far on the null side the incomplete beta underflows; the endpoint expansion takes over
    for s in (0, 300, 660):
        assert float(up[s]) == pytest.approx(_reference_log_evidence(s, t, p0), abs=1e-4)
    # a Beta prior other than uniform: closed form against direct quadrature
    from scipy.integrate import quad

    a, b, s = 2.0, 0.5, 30
    num = quad(lambda q: (q / p0) ** s * ((1 - q) / (1 - p0)) ** (40 - s) * beta_dist.pdf(q, a, b), p0, 1)[0]
    den = quad(lambda q: beta_dist.pdf(q, a, b), p0, 1)[0]
    assert float(log_evidence(s, 40, p0, prior=(a, b))) == pytest.approx(np.log(num / den), rel=1e-7)


def test_decisions_follow_their_definitions():
    test = SequentialTest(threshold(0.5, 0.25), 0.001, 5000)
    times = test.check_times()
    assert times[0] == 128 and times[-1] == 5000 and np.all(np.diff(times) > 0)
    assert np.all(np.diff(times)[1:] >= np.diff(times)[:-1])  # rounds never shrink (but at the budget)
    s = np.array([512, 0, 4900, 4950, 100, 384])
    t = np.array([512, 128, 5000, 4960, 120, 384])
    code = test.decide(s, t)
    assert code[0] == CERTIFIED and log_evidence(512, 512, test.p0) >= np.log(1000)
    assert code[5] == CONTINUE and log_evidence(384, 384, test.p0) < np.log(1000)  # 384 of 384 is not yet enough
    assert code[1] == ABSTAINED
    assert code[2] == BUDGET  # 98% of 5000 is not enough evidence above p* = 0.977, nor below
    assert code[3] == CERTIFIED
    no_abstain = SequentialTest(test.p0, 0.001, 5000, beta=0.0)
    assert no_abstain.decide(4800, 4960) == FUTILE  # 40 samples left cannot make up for 160 failures
    assert code[4] == ABSTAINED
    assert np.all(SequentialTest(1.0, 0.001, 100).decide(np.array([5]), np.array([5])) == FUTILE)  # Φ(ε/σ) = 1


@pytest.mark.parametrize("kwargs, match", [
    ({"p0": 0.0}, "threshold"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"beta": 1.0}, "beta"),
    ({"max_samples": 0}, "budget"), ({"max_samples": 10.5}, "budget"), ({"block": 0}, "block"),
])
def test_bad_test_parameters_are_clear_errors(kwargs, match):
    args = {"p0": 0.9, "alpha": 0.01, "max_samples": 1000, **kwargs}
    with pytest.raises(InputError, match=match):
        SequentialTest(**args)


# ------------------------------------------------------------------------ soundness by simulation

def test_false_certification_rate_is_at_most_alpha_over_100k_runs_near_the_boundary():
    """10⁵ complete runs (n0 selection draws, then the sequential test) with p_A at or just around
    p*; wrong certificates (certified while p_ĉ ≤ p*) are at most α (one-sided binomial test)."""
    rng = np.random.default_rng(2026)
    alpha, runs, n0 = 0.01, 100_000, 50
    test = SequentialTest(threshold(0.25, 0.25), alpha, 4000)  # p* = Φ(1) ≈ 0.841
    offsets = np.array([-0.02, -0.005, 0.0, 0.0, 0.0, 0.005, 0.05])  # mostly exactly at the boundary
    p_a = test.p0 + offsets[rng.integers(0, offsets.size, runs)]
    probs = np.stack([p_a, 0.6 * (1 - p_a), 0.4 * (1 - p_a)], axis=1)  # (R, 3): class 0 is the top class
    counts0 = rng.multinomial(n0, probs)  # (R, 3) selection draws, separate from the estimation draws
    c_hat = counts0.argmax(axis=1)
    p_sel = probs[np.arange(runs), c_hat]
    res = run_sequential(test, runs, bernoulli_draw(p_sel, rng), 1 << 40)
    assert np.all(res.decision != CONTINUE)
    wrong = res.certified & (p_sel <= test.p0)
    k, trials = int(wrong.sum()), int((p_sel <= test.p0).sum())
    assert trials > 60_000
    assert binomtest(k, trials, alpha, alternative="greater").pvalue > 1e-4, (k, trials)
    # not vacuous: inputs clearly above p* are certified, those clearly below are not
    assert res.certified[p_sel >= test.p0 + 0.05].mean() > 0.9
    assert res.certified[p_sel <= test.p0 - 0.02].mean() < alpha


def test_fixed_n_clopper_pearson_after_optional_stopping_is_anti_conservative_while_ours_is_not():
    """Pitfall: checking the fixed-n bound after every round and stopping when it certifies."""
    rng = np.random.default_rng(7)
    alpha, runs = 0.01, 20_000
    test = SequentialTest(threshold(0.25, 0.25), alpha, 20_000)
    times = test.check_times()
    p = np.full(runs, test.p0)  # exactly at the boundary: every certificate is wrong
    paths = _paths(rng, p, times)  # (R, T), the same draws for both procedures
    cp_lower = np.where(paths > 0, beta_dist.ppf(alpha, paths, times[None, :] - paths + 1), 0.0)
    naive = (cp_lower > test.p0).any(axis=1)
    ours = _first_decision(test, paths, times) == CERTIFIED
    assert binomtest(int(naive.sum()), runs, alpha, alternative="greater").pvalue < 1e-10  # several times α
    assert naive.mean() > 3 * alpha
    assert binomtest(int(ours.sum()), runs, alpha, alternative="greater").pvalue > 1e-4
    # at any single fixed n the same bound is fine: the failure comes from the optional stopping
    assert binomtest(int((cp_lower[:, -1] > test.p0).sum()), runs, alpha, alternative="greater").pvalue > 1e-4


def test_reusing_the_selection_samples_in_the_final_count_is_anti_conservative():
    """Pitfall: counting the n0 samples that chose ĉ_A again. Two classes at p = 1/2 (ε = 0): the
    chosen class always looks ahead in its own selection samples. Shown on a count whose level is
    tight (Clopper–Pearson at a fixed n): the bias pushes the false-certification rate above α.
    (Reuse costs the mixture test at most a factor K by a union bound, which its slack at p* hides:
    there the separation is pinned structurally, on a model, by the next test.)"""
    rng = np.random.default_rng(11)
    alpha, runs, n0, n = 0.05, 40_000, 400, 400
    counts0 = rng.binomial(n0, 0.5, runs)
    head = np.maximum(counts0, n0 - counts0)  # selection successes of the chosen (top) class
    fresh = rng.binomial(n, 0.5, runs)  # fresh estimation draws; p_ĉ = 1/2 = p*: every certificate is wrong
    separate = beta_dist.ppf(alpha, fresh, n - fresh + 1) > 0.5
    reused = beta_dist.ppf(alpha, fresh + head, n + n0 - fresh - head + 1) > 0.5
    assert binomtest(int(separate.sum()), runs, alpha, alternative="greater").pvalue > 1e-4
    assert binomtest(int(reused.sum()), runs, alpha, alternative="greater").pvalue < 1e-10
    assert reused.mean() > 1.5 * alpha


def test_batches_stay_full_as_inputs_finish_at_different_times():
    rng = np.random.default_rng(3)
    test = SequentialTest(threshold(0.5, 0.25), 0.001, 20_000)
    p = rng.choice([1.0, 0.995, 0.98, 0.9, 0.3], size=400)
    sizes: list[int] = []
    base = bernoulli_draw(p, rng)

    def draw(items, blocks, req_sizes):
        sizes.append(int(req_sizes.sum()))
        assert len(set(zip(items.tolist(), blocks.tolist()))) == items.size  # no block drawn twice in a call
        return base(items, blocks, req_sizes)

    cap = 4096
    res = run_sequential(test, p.size, draw, cap)
    assert np.all(res.decision != CONTINUE)
    assert sum(sizes) == res.trials.sum() == res.samples_drawn
    assert max(sizes) <= cap
    full = np.array(sizes) == cap
    assert full.mean() > 0.9  # only the tail of the run, when no new input is left, is partial
    assert res.trials[p == 1.0].max() <= 1024 and np.all(res.certified[p == 1.0])
    assert np.all(res.trials <= 20_000)


# ------------------------------------------------------------------------------ the model path

class LinearThreshold(nn.Module):
    """Class 1 iff w·z > t: under z = x + δ, P(class 1) = Φ((w·x − t)/(σ‖w‖)) exactly."""

    def __init__(self, w: torch.Tensor, t: float):
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.t = float(t)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = (z.flatten(1) * self.w).sum(dim=1) - self.t  # (S,)
        return torch.stack([torch.zeros_like(s), s, torch.full_like(s, -1.0)], dim=1)  # (S, 3)


def _linear(sigma: float, probs: list[float], repeats: int):
    w = torch.linspace(0.5, 1.5, 16)
    model = LinearThreshold(w, 0.5 * float(w.sum()))
    a = 0.5 + sigma * float(w.norm()) * norm.ppf(np.array(probs)) / float(w.sum())
    x = torch.tensor(np.repeat(a, repeats), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return model, x


class Spy(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.detach().clone())
        return self.inner(z)


def test_selection_samples_are_separate_from_the_counted_samples_on_a_model():
    model, x = _linear(0.5, [0.7, 0.95, 0.999], repeats=2)
    spy = Spy(model)
    sc = SmoothedClassifier(spy, 3, 0.5, batch_size=512, n0=64, n=3000)
    cert = sc.certify_at(x, 0.25, seed=5)
    seen = torch.cat(spy.seen)  # every noisy sample the base model evaluated
    n_sel = 64 * x.shape[0]
    assert seen.shape[0] == int(cert.extras["samples"].sum())  # n0 + estimation per image, nothing else
    assert torch.all(cert.extras["counts_selection"].sum(1) == 64)
    assert torch.equal(cert.extras["counts"].sum(1) + 64, cert.extras["samples"])
    sel, est = seen[:n_sel].flatten(1), seen[n_sel:].flatten(1)
    assert not torch.isin(est[:, 0], sel[:, 0]).any()  # no selection sample is counted again
    # the selection is CERTIFY's: same stream, same class
    full = sc.certify(x, n=500, seed=5)
    assert torch.equal(full.extras["counts_selection"], cert.extras["counts_selection"])


def test_sequential_agrees_with_fixed_n_and_spends_far_fewer_samples():
    sigma, eps = 0.5, 0.25
    probs = [0.15, 0.5, 0.6, 0.95, 0.995, 0.9999]  # p* = Φ(0.5) ≈ 0.69; class 0 is on top at 0.15
    model, x = _linear(sigma, probs, repeats=4)
    sc = SmoothedClassifier(model, 3, sigma, batch_size=1024, n0=100, n=20_000, alpha=0.001)
    seq = sc.certify_at(x, eps, seed=1)
    fixed = sc.accept(x, eps, seed=1)
    assert torch.equal(seq.label, fixed)
    assert torch.equal(sc.accept(x, eps, seed=1, sequential=True), seq.label)
    # the test decides certification at ε and measures no radius: NaN radius, the decision as the check at ε
    assert torch.isnan(seq.radius).all() and torch.equal(seq.accept(eps), seq.label)
    with pytest.raises(InputError, match="no check"):
        seq.accept(eps / 2)  # any other radius is refused, never read off a radius of ε
    assert seq.extras["log_evidence"].dtype == torch.float64
    assert float(seq.extras["samples"].float().mean()) < 20_100 / 5


def test_decisions_do_not_depend_on_batch_size_or_companions():
    model, x = _linear(0.5, [0.6, 0.72, 0.9, 0.99], repeats=3)
    a = SmoothedClassifier(model, 3, 0.5, batch_size=256, n=6000).certify_at(x, 0.3, seed=9)
    order = [7, 2, 11, 0]
    b = SmoothedClassifier(model, 3, 0.5, batch_size=1000, n=6000).certify_at(x[order], 0.3, seed=9, indices=order)
    for key in ("counts", "samples", "decision", "counts_selection"):
        assert torch.equal(a.extras[key][order], b.extras[key]), key
    assert torch.equal(a.label[order], b.label)


def test_sigma_is_one_for_all_inputs_and_a_per_input_sigma_would_break_the_certificate():
    """Pitfall: σ chosen per input. f(z) = 1 iff |z| < 1 (1-D). With σ = 0.3 at x = 0 the smoothed
    class 1 is certified beyond 0.9; with σ = 3 at x' = 0.75 the smoothed class is 0: a defense
    that picked σ per input would contradict its own certificate."""
    def p1(x, s):
        return norm.cdf((1 - x) / s) - norm.cdf((-1 - x) / s)

    radius = 0.3 * norm.ppf(p1(0.0, 0.3))
    assert radius > 0.9 and p1(0.75, 3.0) < 0.5 < p1(0.75, 0.3)

    class Interval(nn.Module):
        def forward(self, z):
            inside = (z.flatten(1)[:, 0].abs() < 1).float()
            return torch.stack([1 - inside, inside], dim=1)

    sc = SmoothedClassifier(Interval(), 2, 0.3, n0=100, n=20_000, alpha=0.001)
    x = torch.tensor([0.0, 0.75]).view(2, 1, 1, 1)
    cert = sc.certify_at(x, 0.8, seed=0)
    assert cert.label[0] == 1  # certified at 0.8 > 0.75 with the one σ of the defense
    assert int(sc.accept(x[1:], 0.0, seed=0, sequential=True)[0]) in (1, ABSTAIN)  # never the class of σ = 3
    params = inspect.signature(SmoothedClassifier.certify_at).parameters
    assert "sigma" not in params  # σ belongs to the defense, not to a call or an input
    with pytest.raises(InputError, match="single number"):
        sc.certify_at(x, torch.tensor([0.1, 0.9]))


@pytest.mark.parametrize("eps, match", [(-0.1, "eps"), (float("nan"), "eps"), ("a", "eps")])
def test_bad_eps_is_a_clear_error(eps, match):
    model, x = _linear(0.5, [0.9], repeats=1)
    with pytest.raises(InputError, match=match):
        SmoothedClassifier(model, 3, 0.5).certify_at(x, eps)


def test_huge_eps_abstains_without_estimation_samples():
    model, x = _linear(0.5, [0.999], repeats=2)
    cert = SmoothedClassifier(model, 3, 0.5, n0=10, n=1000).certify_at(x, 100.0, seed=0)
    assert torch.all(cert.label == ABSTAIN) and torch.all(cert.extras["decision"] == FUTILE)
    assert torch.all(cert.extras["samples"] == 10)


def test_certify_verb_decides_at_eps_sequentially(tmp_path, capsys):
    from certaudit.cli import main
    from certaudit.models import ModelMeta, build_model, save_checkpoint
    from certaudit.results import read_rows

    torch.manual_seed(0)
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0],
                     method="gaussian", sigma=0.25)
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("2c2f", (1, 8, 8), 10), meta)
    out = tmp_path / "rows.jsonl"
    args = ["certify", "--model", str(path), "--n", "5000", "--alpha", "0.001", "--eps", "0.25", "--sequential",
            "--limit", "6", "--device", "cpu", "--seed", "4", "--out", str(out), "--json"]
    assert main(args) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    header, rows = read_rows(out)
    assert header["config"]["settings"]["sequential_eps"] == 0.25
    from certaudit.data import load_dataset
    from certaudit.models import load_checkpoint

    net, _ = load_checkpoint(path, torch.device("cpu"))
    x, _ = load_dataset("digits", "test")
    cert = SmoothedClassifier(net, 10, 0.25, n=5000, alpha=0.001).certify_at(x[:6], 0.25, seed=4)
    assert [r["prediction"] for r in rows] == cert.label.tolist()
    assert [r["samples"] for r in rows] == cert.extras["samples"].tolist()
    assert summary["evaluations_per_image_mean"] == pytest.approx(float(cert.extras["samples"].double().mean()))
    assert main(["certify", "--model", str(path), "--sequential", "--limit", "2", "--device", "cpu"]) == 2


def test_a_sequential_instance_answers_accept_sequentially_and_says_so_in_its_settings():
    model, x = _linear(0.5, [0.6, 0.95, 0.9999], repeats=2)
    seq = SmoothedClassifier.from_options(model, type("M", (), {"num_classes": 3, "input_shape": None, "sigma": 0.5})(),
                                          {"n": 4000, "sequential": True})
    plain = SmoothedClassifier(model, 3, 0.5, n=4000)
    assert seq.settings()["accept"] == "sequential" and "accept" not in plain.settings()
    assert torch.equal(seq.accept(x, 0.3, seed=2), plain.certify_at(x, 0.3, seed=2).label)
    assert torch.equal(seq.accept(x, 0.3, seed=2, sequential=False), plain.accept(x, 0.3, seed=2))
