"""The five defects of the correctness review (figures at ε, cdist, re-drawn noise, sequential radii,
"upper bound" where none is proven), each pinned by a test that failed on the code before the fix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest, norm
from torch import nn

from certaudit import zoo
from certaudit.attacks import degradation as attacks_mod
from certaudit.audits.degradation import degrade_batch, summarize_degradation
from certaudit.cli import main
from certaudit.defenses.base import ABSTAIN, Certificates, Norm
from certaudit.defenses.interval import IntervalDefense
from certaudit.defenses.lipschitz import LipschitzDefense
from certaudit.defenses.smoothing import SmoothedClassifier, clopper_pearson_lower
from certaudit.errors import InputError
from certaudit.models import load_checkpoint
from certaudit.results import read_rows


@pytest.fixture(scope="module")
def digits_2eps():
    path = zoo.model_path("digits_gloro_2eps")
    net, meta = load_checkpoint(path)
    x, y = zoo.load_data()
    return path, net, meta, x, y


# ------------------------------------------------------------- 1. figures at ε come from checks at ε

def test_interval_vra_at_eps_is_the_defense_check_at_eps(digits_2eps, capsys):
    """2/255 is not on the bisection grid (multiples of 1/1024): the VRA must be accept(x, 2/255)'s."""
    path, net, meta, x, y = digits_2eps
    eps = 2 / 255
    d = IntervalDefense(net, 10, "ibp", input_shape=meta.input_shape)
    truth = float(((d.accept(x, eps) == y) & (y != ABSTAIN)).double().mean())
    truth_2 = float(((d.accept(x, 2 * eps) == y)).double().mean())
    # the bisection radius compared with ε is the defect: it disagrees with the check on this model
    radius_vra = float(((d.certify(x).label == y) & (d.certify(x).radius >= eps)).double().mean())
    assert radius_vra != pytest.approx(truth)
    for extra in ([], ["--full-radius"]):
        assert main(["certify", "--model", str(path), "--defense", "interval", "--method", "ibp", "--eps", "2/255",
                     "--dataset", "digits", "--device", "cpu", "--json", *extra]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["vra_eps"] == pytest.approx(truth) and s["vra_2eps"] == pytest.approx(truth_2)
        assert s["rejection_rate_eps"] == pytest.approx(float((d.accept(x, eps) == ABSTAIN).double().mean()))
        table = {round(p["radius"], 12): p for p in s["certified_accuracy"]}
        assert table[round(eps, 12)]["source"] == "check" and table[round(2 * eps, 12)]["source"] == "check"
        assert table[round(eps, 12)]["accuracy"] == pytest.approx(truth)


def test_interval_certify_with_eps_costs_two_bound_evaluations_and_writes_rows(digits_2eps, tmp_path):
    path, net, meta, x, y = digits_2eps
    out = tmp_path / "rows.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "interval", "--method", "crown", "--eps", "0.01",
                 "--dataset", "digits", "--device", "cpu", "--limit", "20", "--chunk", "8", "--out", str(out)]) == 0
    header, rows = read_rows(out)
    assert len(rows) == 20 and header["config"]["checks"] == [repr(0.01), repr(0.02)]
    assert all(r["radius"] is None and r["evaluations"] == 2 for r in rows)  # two checks, no bisection
    d = IntervalDefense(net, 10, "crown", input_shape=meta.input_shape)
    acc = d.accept(x[:20], 0.01)
    assert [r["certified_at"][repr(0.01)] for r in rows] == (acc != ABSTAIN).tolist()
    # --full-radius adds the bisection (and says so in the rows); the checks stay exact
    out2 = tmp_path / "full.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "interval", "--method", "ibp", "--eps", "0.01",
                 "--full-radius", "--dataset", "digits", "--device", "cpu", "--limit", "8", "--out", str(out2)]) == 0
    _, rows2 = read_rows(out2)
    assert all(r["radius"] is not None and r["radius_tol"] == pytest.approx(1e-3) and r["evaluations"] == 2 + 11
               for r in rows2)


def test_bisection_certificates_refuse_to_answer_at_a_radius_they_did_not_check(digits_2eps):
    _, net, meta, x, _ = digits_2eps
    d = IntervalDefense(net, 10, "ibp", input_shape=meta.input_shape)
    cert = d.certify(x[:8])
    assert cert.radius_tol > 0
    with pytest.raises(InputError, match="bisection"):
        cert.accept(2 / 255)
    checked = d.certify_checks(x[:8], [2 / 255])
    assert torch.equal(checked.accept(2 / 255), d.accept(x[:8], 2 / 255))


def test_audit_certify_and_degrade_stages_agree_on_an_interval_model(digits_2eps, tmp_path):
    from certaudit.audits.pipeline import AuditSettings, AuditSource, run_audit

    path, net, meta, x, y = digits_2eps
    d = IntervalDefense(net, 10, "ibp", input_shape=meta.input_shape)
    # images where the bisection radius and the check at 2/255 disagree, and a few others
    cert, acc = d.certify(x), d.accept(x, 2 / 255)
    differ = ((cert.radius >= 2 / 255) != (acc != ABSTAIN)).nonzero().flatten().tolist()
    assert differ
    idx = sorted(set(differ[:12]) | set(range(12)))
    src = AuditSource(model="digits_gloro_2eps", model_sha256=None, defense="interval", dataset="digits",
                      split="test", indices=idx, arch=meta.arch)
    s = run_audit(tmp_path / "a", net, meta, src, x, y,
                  AuditSettings(eps=2 / 255, method="ibp", chunk=12, attack="margin", attack_steps=4,
                                stages=("certify", "degrade")))
    truth = float((acc[idx] == y[idx]).double().mean())
    assert s["headline"]["vra_eps"] == pytest.approx(truth)
    assert s["degradation"]["vra_eps"] == pytest.approx(truth)  # both stages: the same check at exactly ε


# ----------------------------------------------------------------- 2. GloRo norms without cdist

def test_lipschitz_pairwise_constants_are_sound_for_nearly_equal_rows_and_many_classes():
    """30 classes (cdist's matmul path) and two logit rows one float32 ulp apart."""
    k, d = 30, 16
    lin = nn.Linear(d, k)
    with torch.no_grad():
        # with these weights cdist's ‖a‖² + ‖b‖² − 2a·b cancels to exactly 0 for rows 0 and 1
        lin.weight.copy_(torch.rand(k, d, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.1)
        j = 3
        delta = float(torch.nextafter(lin.weight[0, j], torch.tensor(-1.0)) - lin.weight[0, j])  # -1 ulp
        lin.weight[1] = lin.weight[0]
        lin.weight[1, j] += delta
        lin.bias.fill_(-10.0)  # the other classes never win
        lin.bias[0] = 0.0
        lin.bias[1] = 0.5 * abs(delta)  # f0 − f1 = |delta|·(x_j − 0.5): class 0 wins iff x_j > 0.5
    model = nn.Sequential(nn.Flatten(), lin)
    defense = LipschitzDefense(model, k, input_shape=(1, 4, 4))
    kmat = defense.lipschitz_constants().pairwise
    assert float(kmat[0, 1]) >= abs(delta) * (1 - 1e-12) > 0  # the exact ‖w0 − w1‖ is |delta|
    x = torch.full((1, 1, 4, 4), 0.5)
    x.view(-1)[j] = 0.8
    cert = defense.certify(x)
    assert int(cert.label[0]) == 0
    x_far = x.clone()
    x_far.view(-1)[j] = 0.2  # ℓ2 distance 0.6 from x: class 1 there
    assert defense.certify(x_far).label.item() == 1  # the defense itself says: another label at distance 0.6
    assert float(cert.radius[0]) < 0.6  # the certificate does not cover a point with another label
    assert float(cert.radius[0]) == pytest.approx(0.3, rel=1e-3)


# ------------------------------------------------- 3. one judging CERTIFY per input for smoothing

class _Threshold(nn.Module):
    """Class 0 iff x_0 > c: under N(0, σ²) noise P(class 0) = Φ((x_0 − c)/σ) exactly."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.lin = nn.Linear(4, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.weight[0, 0] = 1.0
            self.lin.bias.copy_(torch.tensor([-c, 0.0]))

    def forward(self, x):
        return self.lin(x.flatten(1))


def _single_draw_rate(p: float, n: int, alpha: float, sigma: float, eps: float) -> float:
    """P(one CERTIFY with n samples does not certify class 0 at ε), when P(class 0) = p (selection
    picks class 0 with probability ~1 here)."""
    k = np.arange(n + 1)
    lower = clopper_pearson_lower(k, n, alpha)
    ok = (lower >= 0.5) & (sigma * norm.ppf(np.clip(lower, 0.5, 1 - 1e-16)) >= eps)
    return float(binom.pmf(k, n, p)[~ok].sum())


@pytest.mark.parametrize("attack", ["all", "identity"])
def test_smoothing_lower_bound_counts_one_fresh_draw_per_input(attack, monkeypatch):
    """No perturbation matters (every attack returns x): the degraded rate must be the chance rate of
    ONE fresh CERTIFY, not of "any of four" re-draws."""
    for name in attacks_mod.ATTACKS:
        monkeypatch.setitem(attacks_mod.ATTACK_FUNCTIONS, name, attacks_mod.attack_identity)
    sigma, n, n0, alpha, images = 0.25, 200, 32, 0.001, 400
    c = 0.5 - sigma * norm.ppf(0.9)  # P(class 0) = 0.9 at x_0 = 0.5
    # ε such that a draw fails to certify with probability about 0.2
    k0 = int(binom.ppf(0.2, n, 0.9))
    eps = float(sigma * norm.ppf(clopper_pearson_lower(np.array([k0]), n, alpha)[0]))
    q = _single_draw_rate(0.9, n, alpha, sigma, eps)
    assert 0.1 < q < 0.35
    model = _Threshold(c)
    defense = SmoothedClassifier(model, 2, sigma, n0=n0, n=n, alpha=alpha, batch_size=4096, seed=7)
    x = torch.full((images, 1, 2, 2), 0.5)
    y = torch.zeros(images, dtype=torch.long)
    rows = degrade_batch(defense, x, y, eps, attack=attack, seed=7, steps=1, samples=2)
    s = summarize_degradation(rows, eps)
    k_r, k_a = s["testR"], s["testA_lower"]
    assert k_r > 200
    # the clean check itself is one draw: testR / images ≈ 1 − q
    assert binomtest(images - s["certified"], images, q).pvalue > 1e-3
    assert binomtest(k_a, k_r, q).pvalue > 1e-3, (k_a, k_r, q)
    if attack == "all":  # four attacks re-drawn independently would give 1 − (1 − q)^4
        assert binomtest(k_a, k_r, 1 - (1 - q) ** 4).pvalue < 1e-6
        assert all(r["judged"] is not None for r in rows if r["certified"])


# ----------------------------------------------------------- 4. sequential rows carry no radius

def test_sequential_rows_carry_a_decision_and_no_radius(tmp_path, capsys):
    path = zoo.model_path("digits_gaussian")
    out = tmp_path / "seq.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "smoothing", "--sequential", "--eps", "0.25",
                 "--n", "2000", "--limit", "12", "--device", "cpu", "--out", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    _, rows = read_rows(out)
    assert all(r["radius"] is None and r["decision"] in ("certified", "abstain", "budget", "futile") for r in rows)
    assert all(r["certified_at"][repr(0.25)] == (r["decision"] == "certified") for r in rows)
    assert s["vra_eps"] == pytest.approx(np.mean([r["correct"] and r["decision"] == "certified" for r in rows]))
    assert s["vra_2eps"] is None and "eps_note" in s  # not 0: the test says nothing at 2ε
    assert [p["radius"] for p in s["certified_accuracy"]] == [0.0, 0.25]
    assert s["median_radius_correct"] is None
    # the 2ε check needs radii: --from-log refuses these rows with one line, exit 2
    assert main(["degrade", "--from-log", str(out), "--eps", "0.25"]) == 2
    assert "sequential" in capsys.readouterr().err


def test_from_log_refuses_duplicate_rows(tmp_path, capsys):
    path = zoo.model_path("digits_gloro_eps")
    out = tmp_path / "c.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "lipschitz", "--limit", "6", "--device", "cpu",
                 "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines + [lines[-1]]) + "\n")
    capsys.readouterr()
    assert main(["degrade", "--from-log", str(out), "--eps", "0.1"]) == 2
    assert "more than one row" in capsys.readouterr().err


# ------------------------------------------- 5. a proven upper bound next to the run-time 2ε check

def test_crown_degradation_reports_the_proven_bound_and_the_2eps_check(digits_2eps):
    _, net, meta, x, y = digits_2eps
    eps = 0.5 / 255
    d = IntervalDefense(net, 10, "crown", input_shape=meta.input_shape)
    rows = degrade_batch(d, x[:40], y[:40], eps, attack="margin", steps=8)
    s = summarize_degradation(rows, eps, proof=d.proof_name)
    assert s["invariant"]["monotone_certifier"] is False
    assert s["upper_bound"].startswith("proven: IBP on the clipped box")
    assert all(r["radius"] is not None and r["radius_tol"] > 0 for r in rows)
    proven = [r["proven_nondegradable"] for r in rows if r["certified"]]
    assert any(proven) and not all(proven)
    # IBP ≤ CROWN: whatever IBP proves at 2ε, CROWN accepts at 2ε; the proven set is the smaller one
    assert all(r["certified_2eps"] for r in rows if r["proven_nondegradable"])
    assert s["testA_upper"] >= s["testA_2eps_check"] and s["fpr_upper"] >= s["fpr_2eps_check"]
    assert s["invariant"]["lower_subset_upper"] and not s["invariant"]["bug"]
    # CROWN-IBP has no proof: no proven upper bound, the 2ε check is reported as what it is
    d = IntervalDefense(net, 10, "crown-ibp", input_shape=meta.input_shape)
    no_radius = degrade_batch(d, x[:16], y[:16], eps, attack="margin", steps=4, full_radius=False)
    assert all(r["radius"] is None for r in no_radius)  # the checks at ε and 2ε need no bisection
    s = summarize_degradation(no_radius, eps, proof=d.proof_name)
    assert s["fpr_upper"] is None and s["testA_upper"] is None and s["upper_bound"].startswith("none proven")
    assert s["fpr_2eps_check"] is not None and s["invariant"]["lower_subset_upper"] is None


def test_proof_of_nondegradability_is_sound_under_attack(digits_2eps):
    """Every input proven non-degradable is accepted with its label at every x' we can find in the
    ε-ball: random points, corners and the certificate-aware attack (CROWN run-time check)."""
    _, net, meta, x, y = digits_2eps
    eps = 0.5 / 255
    crown_ibp = IntervalDefense(net, 10, "crown-ibp", input_shape=meta.input_shape)
    assert crown_ibp.prove_nondegradable(x[:4], eps, crown_ibp.accept(x[:4], eps)) is None  # no proof: not ≥ IBP
    for method in ("crown", "ibp"):
        d = IntervalDefense(net, 10, method, input_shape=meta.input_shape)
        xs = x[:60]
        label = d.accept(xs, eps)
        ok = label != ABSTAIN
        proof = d.prove_nondegradable(xs[ok], eps, label[ok])
        assert proof.any()
        xp, lp = xs[ok][proof], label[ok][proof]
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            u = torch.rand(xp.shape, generator=gen)
            u = torch.where(torch.rand(xp.shape, generator=gen) < 0.5, (u > 0.5).float(), u)
            z = ((xp - eps) + u * 2 * eps).clamp(0, 1)
            assert torch.equal(d.accept(z, eps), lp)
        cand = attacks_mod.run_attack("margin", d, xp, lp, eps, attacks_mod.AttackConfig(steps=20, restarts=2))
        verdict = attacks_mod.verify_candidates(d, xp, cand, lp, eps)
        assert not verdict.success.any() and not verdict.label_changed.any()


def test_proof_is_none_for_smoothing_and_the_2eps_check_for_lipschitz(digits_2eps):
    _, net, meta, x, _ = digits_2eps
    lip = LipschitzDefense(net, 10, input_shape=meta.input_shape)
    lab = lip.accept(x[:16], 0.1)
    # the 2ε check up to float64 rounding margins (~1e-9 of the logits): the same set on this model
    assert torch.equal(lip.prove_nondegradable(x[:16], 0.1, lab), (lip.accept(x[:16], 0.2) == lab) & (lab != ABSTAIN))
    rs = SmoothedClassifier(net, 10, 0.25, n=100)
    assert rs.prove_nondegradable(x[:4], 0.1, torch.zeros(4, dtype=torch.long)) is None


def test_certificates_with_checks_are_exact_for_closed_form_radii():
    cert = Certificates(label=torch.tensor([0, 1, ABSTAIN]), radius=torch.tensor([0.3, 0.1, 0.0], dtype=torch.float64),
                        norm=Norm.L2)
    cert.with_checks([0.1, 0.3])
    assert cert.checks[repr(0.1)].tolist() == [True, True, False]
    assert cert.checks[repr(0.3)].tolist() == [True, False, False]
    assert cert.accept(0.3).tolist() == [0, ABSTAIN, ABSTAIN]
    empty = Certificates(label=torch.tensor([0]), radius=torch.tensor([math.nan]), norm=Norm.LINF)
    with pytest.raises(InputError, match="not computed"):
        empty.accept(0.1)


# ------------------------------------------------------------------ logs: what they can and cannot say

def test_from_log_reads_check_only_interval_rows_at_their_eps(digits_2eps, tmp_path, capsys):
    path, net, meta, x, y = digits_2eps
    out = tmp_path / "iv.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "interval", "--method", "ibp", "--eps", "2/255",
                 "--limit", "30", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["degrade", "--from-log", str(out), "--eps", "2/255", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    d = IntervalDefense(net, 10, "ibp", input_shape=meta.input_shape)
    a1, a2 = d.accept(x[:30], 2 / 255), d.accept(x[:30], 4 / 255)
    test_r = (a1 == y[:30])
    assert s["testR"] == int(test_r.sum()) and s["testA_2eps_check"] == int((test_r & (a2 == ABSTAIN)).sum())
    assert s["source"] == "check" and s["fpr_curve"] == [] and "curve_note" in s
    # at another ε the rows hold no check and no radius: refused with one line
    assert main(["degrade", "--from-log", str(out), "--eps", "0.01"]) == 2
    assert "no 2ε check" in capsys.readouterr().err


def test_old_interval_rows_are_read_as_bisection_radii(digits_2eps, tmp_path, capsys):
    """Rows written before radius_tol existed: their radii are bisection points, never read at ε."""
    path, *_ = digits_2eps
    out = tmp_path / "full.jsonl"
    assert main(["certify", "--model", str(path), "--defense", "interval", "--method", "ibp", "--limit", "10",
                 "--device", "cpu", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    old = [json.loads(line) for line in lines]
    for r in old[1:]:
        r.pop("radius_tol", None)
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("\n".join(json.dumps(r) for r in old) + "\n")
    capsys.readouterr()
    assert main(["degrade", "--from-log", str(legacy), "--eps", "2/255"]) == 2
    assert "bisection" in capsys.readouterr().err


def test_hostile_rows_and_radii_are_refused_with_one_line(tmp_path, capsys):
    log = tmp_path / "bad.jsonl"
    good = {"index": 0, "label": 1, "prediction": 1, "radius": 0.5}
    for bad in ({"radius_tol": "x"}, {"certified_at": {"0.1": "yes"}}, {"radius": 1e400}):
        log.write_text(json.dumps({"kind": "header", "config": {}, "config_sha256": "0"}) + "\n"
                       + json.dumps({**good, **bad}) + "\n")
        assert main(["degrade", "--from-log", str(log), "--eps", "0.1"]) == 2, bad
        err = capsys.readouterr().err
        assert "row 0" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    model = zoo.model_path("digits_gloro_eps")
    for radii in ("0.01,,0.02", "0.1,0.1", ","):
        assert main(["certify", "--model", str(model), "--defense", "lipschitz", "--radii", radii,
                     "--limit", "2", "--device", "cpu"]) == 2, radii
        assert "--radii" in capsys.readouterr().err


def test_sequential_rows_report_no_clean_accuracy(capsys):
    path = zoo.model_path("digits_gaussian")
    assert main(["certify", "--model", str(path), "--defense", "smoothing", "--sequential", "--eps", "0.25",
                 "--n", "2000", "--limit", "8", "--device", "cpu", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["clean_accuracy"] is None and s["abstain_rate"] is None and "clean_note" in s
    zero = [p for p in s["certified_accuracy"] if p["radius"] == 0.0][0]
    assert zero["accuracy"] is None and "sequential" in zero["source"]


def test_interval_chunks_are_small_when_the_bisection_runs(digits_2eps):
    _, net, meta, _, _ = digits_2eps
    d = IntervalDefense(net, 10, "crown", input_shape=meta.input_shape)
    assert d.images_per_chunk((1, 8, 8), full_radius=True) * 4 <= d.images_per_chunk((1, 8, 8), full_radius=False)
