"""Degradation attacks and the degradation audit: the claims of §3 and Appendix A."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from certaudit.attacks.degradation import (
    AttackConfig, attacks_for, distances, project_to_eps, run_attack, shrink_into_ball, verify_candidates,
)
from certaudit.audits.degradation import (
    degrade_batch, fpr_curve, read_certification_log, summarize_degradation, upper_from_log,
)
from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm
from certaudit.defenses.lipschitz import LipschitzDefense
from certaudit.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 4, 4)
D = 16


def _linear_defense() -> tuple[LipschitzDefense, torch.Tensor]:
    """A 2-class linear model f(x) = (w·x − 2, −w·x + 2) with a unit-norm w: the margin
    f_0 − f_1 = 2(w·x − 2) is 2-Lipschitz (K = ‖2w‖ = 2), so the certified radius at x is exactly
    w·x − 2 in class 0 (minus float slack), and Algorithm 2.1 rejects x' at ε iff w·x' − 2 < ε."""
    w = torch.zeros(D)
    w[:8] = 1.0
    w = w / w.norm()
    lin = nn.Linear(D, 2)
    with torch.no_grad():
        lin.weight[:] = torch.stack([w, -w])
        lin.bias[:] = torch.tensor([-2.0, 2.0])
    model = nn.Sequential(nn.Flatten(), lin)
    return LipschitzDefense(model, 2, input_shape=SHAPE), w


def _points(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Images x = 0.5 + t·w (in [0,1]) with w·x = 2 + s: certified radius s (class 0) for s > 0."""
    base = torch.full((D,), 0.5)
    t = (2.0 + s - base @ w) / (w @ w)
    return (base[None] + t[:, None] * w[None]).reshape(-1, *SHAPE)


def test_linear_model_radius_is_known():
    defense, w = _linear_defense()
    s = torch.tensor([0.05, 0.15, 0.25, 0.4])
    x = _points(w, s)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    cert = defense.certify(x)
    assert (cert.label == 0).all()
    torch.testing.assert_close(cert.radius.float(), s, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attack", ["pgd", "pgd-2eps", "margin"])
def test_attack_finds_degradation_exactly_where_the_2eps_check_fails(attack):
    """Linear model: an x' in B(x, ε) is rejected iff x is not certified at 2ε (radius < 2ε), and
    moving ε along −w reaches it. Every attack must find all of them and none of the others."""
    defense, w = _linear_defense()
    eps = 0.1
    s = torch.tensor([0.11, 0.13, 0.15, 0.18, 0.195, 0.21, 0.25, 0.4])  # radius; 2ε = 0.2
    x = _points(w, s)
    y = torch.zeros(len(s), dtype=torch.long)
    rows = degrade_batch(defense, x, y, eps, attack=attack, steps=20, seed=1)
    assert all(r["certified"] for r in rows)
    found = [r["degraded_by"] == attack for r in rows]
    upper = [not r["certified_2eps"] for r in rows]
    assert upper == [bool(v < 2 * eps) for v in s]
    assert found == upper
    for r in rows:
        if r["degraded_by"]:
            assert r["distance"] <= eps * (1 + 1e-5)
    summary = summarize_degradation(rows, eps)
    assert summary["testA_lower"] == summary["testA_upper"] == 5
    assert summary["lower_over_upper"] == 1.0
    assert summary["invariant"]["lower_subset_upper"] and not summary["invariant"]["bug"]


def test_all_records_first_attack_and_exhaustive_records_each():
    defense, w = _linear_defense()
    x = _points(w, torch.tensor([0.12, 0.3]))
    y = torch.zeros(2, dtype=torch.long)
    rows = degrade_batch(defense, x, y, 0.1, attack="all", steps=10)
    assert rows[0]["degraded_by"] == "pgd" and rows[0]["attacks"] == {"pgd": True}
    assert rows[1]["degraded_by"] is None and set(rows[1]["attacks"]) == {"pgd", "pgd-2eps", "margin"}
    rows = degrade_batch(defense, x, y, 0.1, attack="all", exhaustive=True, steps=10)
    assert rows[0]["attacks"] == {"pgd": True, "pgd-2eps": True, "margin": True}
    per = summarize_degradation(rows, 0.1)["per_attack"]
    assert per["margin"]["succeeded"] == 1 and per["pgd"]["first"] == 1


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_candidates_stay_in_ball_and_box(norm):
    torch.manual_seed(0)
    x = torch.rand(6, 1, 5, 5)
    x[0] = 0.0
    x[1] = 1.0
    far = x + 3 * torch.randn_like(x)
    for eps in (0.05, 0.5, 2.0):
        z = project_to_eps(x, far, eps, norm)
        assert float(z.min()) >= 0 and float(z.max()) <= 1
        assert bool((distances(x, z, norm) <= eps).all())
        z2 = shrink_into_ball(x, z, eps, norm)
        assert bool((distances(x, z2, norm) <= eps).all())


@pytest.mark.parametrize("attack", ["pgd", "margin"])
def test_attack_stays_in_ball_on_a_conv_net(attack, digits):
    """A real (untrained) GloRo-style conv net on 8×8 digits: candidates in B(x, ε) ∩ [0,1]^d."""
    from certaudit.models import build_model

    torch.manual_seed(0)
    net = build_model("2c2f", (1, 8, 8), 10)
    defense = LipschitzDefense(net, 10, input_shape=(1, 8, 8))
    x = digits[2][:12]
    label = defense.model(x).argmax(1)
    for eps in (0.3, 1.0):
        cand = run_attack(attack, defense, x, label, eps, AttackConfig(steps=8))
        assert float(cand.min()) >= 0 and float(cand.max()) <= 1
        assert bool((distances(x, cand, Norm.L2) <= eps).all())


class _Scripted(Defense):
    """A defense whose verdicts are scripted, to test what counts as success."""

    norm = Norm.L2

    def __init__(self, accept_labels: torch.Tensor):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(D, 2)), 2)
        self.answers = accept_labels

    def certify(self, x, *, seed=None, indices=None):
        return Certificates(self.answers[: x.shape[0]].clone(), torch.ones(x.shape[0]), Norm.L2)

    def accept(self, x, eps):
        return self.answers[: x.shape[0]].clone()

    def margin(self, x, eps, target):
        return self.model(x)[:, 0]


def test_accepted_or_out_of_ball_candidates_never_count():
    x = torch.full((4, *SHAPE), 0.5)
    label = torch.zeros(4, dtype=torch.long)
    # 0: rejected, inside → counts; 1: still accepted → no; 2: rejected but outside the ball → no;
    # 3: accepted with another label (a broken certificate) → no, and flagged
    defense = _Scripted(torch.tensor([ABSTAIN, 0, ABSTAIN, 1]))
    cand = x.clone()
    cand[0, 0, 0, 0] += 0.1
    cand[1, 0, 0, 0] += 0.1
    cand[2, 0, 0, 0] += 0.3
    cand[3, 0, 0, 0] += 0.1
    v = verify_candidates(defense, x, cand, label, 0.2)
    assert v.success.tolist() == [True, False, False, False]
    assert v.label_changed.tolist() == [False, False, False, True]
    bad = cand.clone()
    bad[0, 0, 0, 0] = 1.05  # outside [0,1]
    assert not bool(verify_candidates(defense, x, bad, label, 0.2).success[0])


def test_lower_never_exceeds_upper_and_violations_are_bugs():
    rows = [
        {"index": 0, "label": 1, "prediction": 1, "radius": 0.7, "correct": True, "certified": True,
         "certified_2eps": True, "degraded_by": None, "attacks": {"pgd": False}},
        {"index": 1, "label": 1, "prediction": 1, "radius": 0.4, "correct": True, "certified": True,
         "certified_2eps": False, "degraded_by": "pgd", "attacks": {"pgd": True}},
        {"index": 2, "label": 1, "prediction": 1, "radius": 0.35, "correct": True, "certified": True,
         "certified_2eps": False, "degraded_by": None, "attacks": {"pgd": False}},
        {"index": 3, "label": 0, "prediction": 1, "radius": 0.5, "correct": False, "certified": True,
         "certified_2eps": False, "degraded_by": None, "attacks": {"pgd": False}},
        {"index": 4, "label": 0, "prediction": -1, "radius": 0.0, "correct": False, "certified": False,
         "certified_2eps": False, "degraded_by": None, "attacks": {}},
    ]
    s = summarize_degradation(rows, 0.3, monotone=True)  # GloRo: the 2ε check is the proven upper bound
    assert (s["test"], s["testR"], s["testA_lower"], s["testA_upper"]) == (5, 3, 1, 2)
    assert s["testA_2eps_check"] == 2 and s["fpr_2eps_check"] == pytest.approx(2 / 3)
    assert s["fpr_lower"] == pytest.approx(1 / 3) and s["fpr_upper"] == pytest.approx(2 / 3)
    assert s["utility_reduction_lower"] == pytest.approx(1 / 5) and s["utility_reduction_upper"] == pytest.approx(2 / 5)
    assert s["vra_eps"] == pytest.approx(3 / 5) and s["vra_2eps"] == pytest.approx(1 / 5)
    assert s["fpr_lower"] <= s["fpr_upper"] and s["lower_over_upper"] == pytest.approx(0.5)
    assert s["invariant"]["lower_subset_upper"]
    rows[0]["degraded_by"] = "pgd"  # degraded although certified at 2ε: impossible for GloRo
    s = summarize_degradation(rows, 0.3, monotone=True)
    assert not s["invariant"]["lower_subset_upper"] and s["invariant"]["bug"] and s["invariant"]["violations"] == [0]
    s = summarize_degradation(rows, 0.3, monotone=False)  # smoothing: no proof, so no proven upper bound
    assert not s["invariant"]["bug"] and s["invariant"]["lower_subset_upper"] is None
    assert s["testA_upper"] is None and s["fpr_upper"] is None and s["fpr_2eps_check"] == pytest.approx(2 / 3)
    assert s["invariant"]["outside_2eps_check"] == [0]
    rows[0]["proven_nondegradable"] = True  # a proof (e.g. IBP at 2ε for CROWN) that an attack then broke
    s = summarize_degradation(rows, 0.3, monotone=False)
    assert s["invariant"]["bug"] and s["invariant"]["violations"] == [0]


def test_fpr_curve_matches_definition():
    radii_rows = [0.1, 0.3, 0.5, 0.9, 1.2]
    rows = [{"label": 0, "prediction": 0, "radius": r} for r in radii_rows]
    rows.append({"label": 0, "prediction": 1, "radius": 2.0})  # wrong: never in testR
    rows.append({"label": 0, "prediction": -1, "radius": 0.0})
    curve = fpr_curve(rows, [0.25, 0.5, 1.0])
    # r = 0.25: testR = {0.3, 0.5, 0.9, 1.2}; upper = radius < 0.5 → {0.3}
    assert curve[0]["testR"] == 4 and curve[0]["testA_2r_check"] == 1 and curve[0]["fpr_2r_check"] == 0.25
    assert "fpr_upper" not in curve[0]  # the 2r check is the paper's curve, never called a bound
    # r = 0.5: testR = {0.5, 0.9, 1.2}; all < 1.0 except 1.2
    assert curve[1]["fpr_2r_check"] == pytest.approx(2 / 3)
    assert curve[2]["testR"] == 1 and curve[2]["fpr_2r_check"] == 1.0
    assert curve[0]["vra"] == pytest.approx(4 / 7) and curve[0]["vra_2r"] == pytest.approx(3 / 7)
    with pytest.raises(InputError):
        fpr_curve(rows, [0.0])


def test_cohen_log_parsing(tmp_path):
    log = tmp_path / "sigma_0.25"
    log.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                   "0\t3\t3\t0.612\t1\t0:00:02.345678\n"
                   "20\t8\t8\t0.301\t1\t0:00:02.100000\n"
                   "40\t1\t-1\t0.0\t0\t0:00:01.500000\n"
                   "60\t2\t5\t0.9\t0\t0:01:00.000000\n")
    fmt, rows = read_certification_log(log)
    assert fmt == "cohen" and [r["index"] for r in rows] == [0, 20, 40, 60]
    assert rows[2]["prediction"] == ABSTAIN and rows[0]["seconds"] == pytest.approx(2.345678)
    assert rows[3]["seconds"] == pytest.approx(60.0) and rows[3]["correct"] is False
    up = upper_from_log(rows, 0.25)
    # testR: radius >= 0.25 and correct → idx 0, 20; 2ε = 0.5: idx 20 fails
    assert (up["testR"], up["testA_2eps_check"], up["fpr_2eps_check"]) == (2, 1, 0.5)
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\n1\t2\t3\n")
    with pytest.raises(InputError):
        read_certification_log(bad)
    broken = tmp_path / "broken"
    broken.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\tx\t0.6\t1\t0:00:01\n")
    with pytest.raises(InputError):
        read_certification_log(broken)


def test_spgd_only_for_smoothing_and_names_checked():
    defense, _ = _linear_defense()
    with pytest.raises(InputError):
        attacks_for(defense, "spgd")
    with pytest.raises(InputError):
        attacks_for(defense, "cw")
    assert attacks_for(defense, "all") == ["pgd", "pgd-2eps", "margin"]
    assert attacks_for(defense, "margin,pgd") == ["margin", "pgd"]
    with pytest.raises(InputError):
        AttackConfig.from_options({"stepz": 3})


def test_smoothing_attacks_recheck_with_fresh_noise(digits):
    """SPGD and the margin attack on a tiny smoothed digits model: candidates feasible, counted only
    when a fresh CERTIFY (other seed) rejects, and the audit's bookkeeping holds."""
    from certaudit.defenses.smoothing import SmoothedClassifier
    from certaudit.models import build_model
    from certaudit.train import TrainConfig, train

    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    net = build_model("2c2f", (1, 8, 8), 10)
    train(net, x_tr, y_tr, TrainConfig(method="gaussian", sigma=0.25, epochs=3, batch_size=128, lr=3e-3))
    defense = SmoothedClassifier(net, 10, 0.25, n0=32, n=400, alpha=0.01, batch_size=512)
    x, y = x_te[:10], y_te[:10]
    eps = 0.25
    rows = degrade_batch(defense, x, y, eps, attack="spgd,margin", exhaustive=True, seed=3, steps=6, samples=8,
                         indices=list(range(100, 110)))
    assert [r["index"] for r in rows] == list(range(100, 110))
    for r in rows:
        assert set(r["attacks"]) == ({"spgd", "margin"} if r["certified"] else set())
        if r["degraded_by"]:
            assert r["certified"] and r["distance"] <= eps * (1 + 1e-5)
    # counted successes are real: a fresh CERTIFY at the candidate rejects
    label = torch.tensor([r["prediction"] for r in rows])
    cand = run_attack("spgd", defense, x, label.clamp_min(0), eps, AttackConfig(steps=4, samples=8), seed=0)
    assert bool((distances(x, cand, Norm.L2) <= eps).all()) and float(cand.min()) >= 0 and float(cand.max()) <= 1
    v = verify_candidates(defense, x, cand, label, eps, seed=99, indices=list(range(10)))
    again = defense.accept(cand, eps, seed=99, indices=list(range(10)))
    assert v.success.tolist() == (again == ABSTAIN).tolist()
    s = summarize_degradation(rows, eps)
    assert s["testA_lower"] <= s["testR"] and s["invariant"]["monotone_certifier"] is False
    assert not math.isnan(s["vra_eps"])


def test_interval_defense_linf(digits):
    """ℓ∞ (norm taken from the defense): IBP-certified inputs attacked with every attack; candidates
    in the ℓ∞ ball and the box; IBP is monotone, so a degraded input is never certified at 2ε."""
    from certaudit.defenses.interval import IntervalDefense
    from certaudit.models import build_model
    from certaudit.train import TrainConfig, train

    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    net = build_model("2c2f", (1, 8, 8), 10)
    train(net, x_tr[:600], y_tr[:600], TrainConfig(method="standard", epochs=3, batch_size=128, lr=3e-3))
    defense = IntervalDefense(net, 10, "ibp", input_shape=(1, 8, 8), tol=1e-5)
    eps = 0.0006  # an undefended net: certified radii of ~1e-3
    rows = degrade_batch(defense, x_te[:24], y_te[:24], eps, attack="all", exhaustive=True, steps=10)
    assert any(r["certified"] for r in rows)
    for r in rows:
        if r["degraded_by"]:
            assert r["distance"] <= eps * (1 + 1e-5) and not r["certified_2eps"]
    s = summarize_degradation(rows, eps)
    assert s["invariant"]["monotone_certifier"] is True and s["invariant"]["lower_subset_upper"]
    label = torch.tensor([max(r["prediction"], 0) for r in rows])
    cand = run_attack("margin", defense, x_te[:24], label, eps, AttackConfig(steps=5))
    assert bool((distances(x_te[:24], cand, Norm.LINF) <= eps).all())
    assert float(cand.min()) >= 0 and float(cand.max()) <= 1


def test_prune_skips_only_what_appendix_a_rules_out():
    defense, w = _linear_defense()
    s = torch.tensor([0.12, 0.18, 0.25, 0.4])
    x = _points(w, s)
    y = torch.zeros(4, dtype=torch.long)
    full = degrade_batch(defense, x, y, 0.1, attack="margin", steps=10)
    pruned = degrade_batch(defense, x, y, 0.1, attack="margin", steps=10, prune=True)
    assert [r["degraded_by"] for r in full] == [r["degraded_by"] for r in pruned]
    assert [r["pruned"] for r in pruned] == [False, False, True, True]
    assert pruned[3]["attacks"] == {} and full[3]["attacks"] == {"margin": False}


def test_identity_control_never_degrades_a_deterministic_defense():
    defense, w = _linear_defense()
    x = _points(w, torch.tensor([0.11, 0.15, 0.3]))
    rows = degrade_batch(defense, x, torch.zeros(3, dtype=torch.long), 0.1, attack="identity")
    assert all(r["certified"] and r["degraded_by"] is None and r["attacks"] == {"identity": False} for r in rows)
    assert "identity" not in attacks_for(defense, "all")


def test_smoothing_sequential_upper_bound(digits):
    """Issue 18 item 4: the 2ε check of testR through the sequential test (``upper``): rows carry its
    verdict and sample count, inputs it calls safe have a smoothed top-class probability above
    Φ(2ε/σ) (checked on a large fresh sample), and the summary counts the rest as the upper set."""
    from scipy.stats import norm as gauss

    from certaudit.defenses.smoothing import SmoothedClassifier
    from certaudit.models import load_checkpoint
    from certaudit.zoo import model_path

    net, _ = load_checkpoint(model_path("digits_gaussian"))
    _, _, x_te, y_te = digits
    x, y = x_te[:8], y_te[:8]
    eps, sigma = 0.1, 0.25
    defense = SmoothedClassifier(net, 10, sigma, n0=64, n=1000, alpha=0.001, batch_size=1024)
    upper = SmoothedClassifier(net, 10, sigma, n0=64, n=20000, alpha=0.001, batch_size=1024, sequential=True)
    rows = degrade_batch(defense, x, y, eps, attack="spgd", seed=0, steps=3, samples=8, upper=upper)
    s = summarize_degradation(rows, eps)
    sq = s["sequential_2eps"]
    test_r = [r for r in rows if r["certified"] and r["correct"]]
    assert sq["judged"] == len(test_r) > 0 and sq["testA_upper"] + sq["certified_2eps"] == len(test_r)
    for r in rows:
        if r in test_r:
            assert isinstance(r["certified_2eps_sequential"], bool) and 64 < r["samples_2eps_sequential"] <= 20064
        else:
            assert r["certified_2eps_sequential"] is None
    safe = [i for i, r in enumerate(rows) if r.get("certified_2eps_sequential")]
    assert safe
    counts = defense.sample_counts(x[safe], 8000, seed=123)
    p_hat = counts.max(dim=1).values.double() / 8000
    assert bool((p_hat > gauss.cdf(2 * eps / sigma) - 0.02).all())
