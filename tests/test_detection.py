"""Detector claims against robust classification (Tramèr 2022) and the two reductions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from certaudit.attacks.pgd import flat_norm, make_generator, random_in_ball
from certaudit.cli import main
from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm, check_images
from certaudit.detection import (
    SOURCE_DETECTOR,
    SOURCE_RANDOM,
    SOURCE_SEARCH,
    ClaimKind,
    ClassifierToDetector,
    DetectorClaim,
    DetectorToClassifier,
    FunctionDetector,
    check_claim,
    check_claims,
    check_classifier_to_detector,
    load_claims,
    load_example_claims,
    parse_claims,
    parse_reference,
    robust_accuracy_with_detection_bound,
    robust_risk_with_detection,
    robust_risk_with_detection_bound,
    summarize_verdicts,
)
from certaudit.errors import InputError


# --------------------------------------------------------------------- a tiny exact defense

class LinearDefense(Defense):
    """Linear classifier z = Wx + b with its exact certificate.

    The label y is certified at radius r iff z_y − z_j > r·‖w_y − w_j‖_* for every j ≠ y (dual
    norm: ℓ2 for ℓ2, ℓ1 for ℓ∞), so the certified radius is min_j (z_y − z_j)/‖w_y − w_j‖_*.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, norm: str = "l2"):
        c, d = weight.shape
        model = nn.Sequential(nn.Flatten(), nn.Linear(d, c))
        with torch.no_grad():
            model[1].weight.copy_(weight)
            model[1].bias.copy_(bias)
        super().__init__(model, c)
        self.norm = Norm.parse(norm)
        diff = weight[:, None, :] - weight[None, :, :]  # (C, C, d)
        self.lip = diff.norm(p=2 if self.norm is Norm.L2 else 1, dim=2)  # (C, C)

    def certify(self, x: torch.Tensor, *, seed=None, indices=None) -> Certificates:
        x = check_images(x)
        with torch.no_grad():
            z = self.model(x)
        label = z.argmax(1)
        gap = z.gather(1, label[:, None]) - z  # (B, C)
        ratio = gap / self.lip[label].clamp_min(1e-12)
        ratio = ratio.masked_fill(nn.functional.one_hot(label, self.num_classes).bool(), math.inf)
        return Certificates(label, ratio.amin(1).clamp_min(0.0), self.norm)

    def margin(self, x: torch.Tensor, eps: float, target: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        gap = z.gather(1, target[:, None]) - z - eps * self.lip[target]  # (B, C)
        gap = gap.masked_fill(nn.functional.one_hot(target, self.num_classes).bool(), math.inf)
        return gap.amin(1)


def _linear(norm="l2", seed=0, c=3, d=16):
    g = make_generator(seed)
    return LinearDefense(torch.randn(c, d, generator=g), 0.1 * torch.randn(c, generator=g), norm)


def _data(n=40, d=16, seed=1):
    return torch.rand(n, 1, 4, d // 4, generator=make_generator(seed))


# ------------------------------------------------------------------------------- Eq. (4)

def test_equation_4_arithmetic():
    # Raghuram et al. on CIFAR-10: FNR 19%, FPR 20%, clean error 5% -> at least 56%.
    assert robust_risk_with_detection_bound(0.20, 0.19, 0.05) == pytest.approx(0.44)
    assert robust_accuracy_with_detection_bound(0.20, 0.19, 0.05) == pytest.approx(0.56)
    assert robust_risk_with_detection_bound(0.0, 0.0, 0.0) == 0.0
    # a vacuous union bound is capped: risk 1, accuracy 0
    assert robust_risk_with_detection_bound(0.5, 0.5, 0.3) == 1.0
    assert robust_accuracy_with_detection_bound(0.5, 0.5, 0.3) == 0.0
    claim = DetectorClaim("CIFAR-10", "l2", 4.0, fpr="20%", fnr=0.19, clean_error=0.05)
    assert claim.accuracy_source == "eq4"
    assert claim.robust_accuracy_with_detection == pytest.approx(0.56)
    with pytest.raises(InputError):
        robust_risk_with_detection_bound(1.2, 0.1, 0.1)


def test_definition_3_on_predictions():
    y = torch.tensor([0, 1, 2, 0])
    clean = torch.tensor([0, 1, 2, 1])  # last one misclassified clean
    adv = torch.tensor([0, ABSTAIN, 0, 1])  # third: a wrong accepted answer
    assert float(robust_risk_with_detection(clean, adv, y)) == pytest.approx(0.5)


# ------------------------------------------------------------------------ Table 1 / Table 2

def test_table1_gives_14_of_16_claims_and_12_of_14_defenses_flagged():
    claims = load_example_claims("table1")
    verdicts = check_claims(claims)
    s = summarize_verdicts(verdicts)
    assert s["claims"] == 16 and s["defenses"] == 14
    assert s["flagged"] == 14 and s["defenses_flagged"] == 12
    assert s["no_reference"] == 0
    cleared = sorted(v.claim.defense for v in verdicts if v.flagged is False)
    assert cleared == ["Jha et al. (2019)", "Roth et al. (2019)"]
    for v in verdicts:
        assert v.basis == "exact" and v.reference is not None and v.reference.citation
        assert v.margin == pytest.approx(v.implied_accuracy - v.reference.robust_accuracy)


def test_table1_miller_example_from_the_text():
    miller = next(v for v in check_claims(load_example_claims("table1")) if v.claim.defense.startswith("Miller"))
    assert miller.claim.implied_eps == pytest.approx(1.45)
    assert miller.reference.robust_accuracy == pytest.approx(0.30)
    assert miller.flagged is True and miller.margin == pytest.approx(0.45)


def test_table2_certified_detector_agrees_with_certified_classifier_within_2_points():
    verdicts = check_claims(load_example_claims("table2"))
    assert len(verdicts) == 2
    for v in verdicts:
        assert v.claim.kind is ClaimKind.CERTIFIED
        assert v.reference.kind is ClaimKind.CERTIFIED
        assert "Zhang et al. 2020a" in v.reference.citation
        assert v.flagged is False
        assert abs(v.margin) <= 0.02 + 1e-9
    assert [round(100 * v.margin) for v in verdicts] == [-2, -1]


def test_empirical_claims_use_the_best_row_certified_ones_like_for_like():
    # At CIFAR-10 linf 4/255 the table holds Rebuffi (79%, empirical) and Zhang (39%, certified).
    emp = check_claim(DetectorClaim("CIFAR-10", "linf", "8/255", robust_accuracy=0.5))
    assert emp.reference.robust_accuracy == pytest.approx(0.79) and emp.flagged is False
    cert = check_claim(DetectorClaim("CIFAR-10", "linf", "8/255", robust_accuracy=0.5, kind="certified"))
    assert cert.reference.robust_accuracy == pytest.approx(0.39) and cert.flagged is True


def test_unknown_dataset_or_norm_gives_no_reference():
    for claim in (DetectorClaim("SVHN", "l2", 1.0, robust_accuracy=0.9),
                  DetectorClaim("MNIST", "l2", 0.2, robust_accuracy=0.9),  # below every MNIST l2 row
                  DetectorClaim("ImageNet", "l2", 0.4, robust_accuracy=0.99)):
        v = check_claim(claim)
        assert v.flagged is None and v.margin is None and v.reference is None
        assert v.status == "no reference"
        assert "no reference" in v.explanation


def test_smaller_radius_rows_can_flag_but_never_clear():
    # No ImageNet l2 row at 2.0, but the 0.5 row (54%) bounds what is known at 2.0.
    high = check_claim(DetectorClaim("ImageNet", "l2", 4.0, robust_accuracy=0.9))
    assert high.flagged is True and high.basis == "smaller-radius"
    assert high.margin == pytest.approx(0.9 - 0.54)
    low = check_claim(DetectorClaim("ImageNet", "l2", 4.0, robust_accuracy=0.2))
    assert low.flagged is None
    exact_only = check_claim(DetectorClaim("ImageNet", "l2", 4.0, robust_accuracy=0.9), exact_only=True)
    assert exact_only.flagged is None


def test_user_reference_table_and_dataset_name_matching():
    table = parse_reference(
        "# my table\ndataset,norm,eps,robust_accuracy,citation\ncifar_10,l2,1.45,0.80,My paper 2030\n", "mine")
    v = check_claim(DetectorClaim("CIFAR-10", "l2", 2.9, robust_accuracy=0.75), table)
    assert v.flagged is False and v.reference.citation == "My paper 2030"
    assert v.margin == pytest.approx(-0.05)


# ------------------------------------------------------------------------------- claim files

def test_claims_csv_and_json_parse_the_same():
    csv_text = "dataset,norm,eps,robust_accuracy\nCIFAR-10,linf,8/255,66%\nMNIST,l2,4.2,0.99\n"
    json_text = json.dumps([{"dataset": "CIFAR-10", "norm": "linf", "eps": "8/255", "robust_accuracy": 0.66},
                            {"dataset": "MNIST", "norm": "L2", "eps": 4.2, "robust_accuracy": "99%"}])
    a, b = parse_claims(csv_text), parse_claims(json_text)
    for ca, cb in zip(a, b, strict=True):
        assert (ca.dataset, ca.norm, ca.robust_accuracy) == (cb.dataset, cb.norm, pytest.approx(cb.robust_accuracy))
        assert ca.eps == pytest.approx(cb.eps)
    assert a[0].eps_text == "8/255" and a[0].implied_eps_text == "4/255"


@pytest.mark.parametrize("row, message", [
    ("CIFAR-10,l3,1.0,0.5,,,", "unknown norm"),
    ("CIFAR-10,l2,1.0,1.5,,,", "[0, 1]"),
    ("CIFAR-10,l2,0,0.5,,,", "eps must be > 0"),
    ("CIFAR-10,l2,-1,0.5,,,", "eps must be > 0"),
    ("CIFAR-10,l2,nan,0.5,,,", "finite"),
    ("CIFAR-10,l2,1.0,nan,,,", "finite"),
    ("CIFAR-10,l2,1.0,,0.1,0.1,", "clean_error"),
    ("CIFAR-10,l2,1.0,,,,", "robust_accuracy"),
    ("CIFAR-10,l2,1.0,0.5,0.1,0.1,0.1", "not both"),
    (",l2,1.0,0.5,,,", "missing dataset"),
    ("CIFAR-10,l2,abc,0.5,,,", "number"),
])
def test_bad_claim_rows_raise_input_error_with_line(row, message):
    text = "# comment\ndataset,norm,eps,robust_accuracy,fpr,fnr,clean_error\nMNIST,l2,4.2,0.99,,,\n" + row + "\n"
    with pytest.raises(InputError) as exc:
        parse_claims(text, "claims.csv")
    assert message in str(exc.value)
    assert "line 4" in str(exc.value)


def test_bad_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_claims(tmp_path / "nope.csv")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"dataset": "MNIST", "norm": "l2"}]')
    with pytest.raises(InputError, match="item 1: missing eps"):
        load_claims(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_claims(bad)
    unknown = tmp_path / "u.csv"
    unknown.write_text("dataset,norm,eps,robust_acc\nMNIST,l2,1,0.5\n")
    with pytest.raises(InputError, match="unknown column"):
        load_claims(unknown)
    with pytest.raises(InputError, match="citation"):
        parse_reference("dataset,norm,eps,robust_accuracy\nMNIST,l2,1,0.5\n")


# ------------------------------------------------------------------------------------- CLI

def _table1_path():
    from certaudit.detection import example_claims_path
    return str(example_claims_path("table1"))


def test_cli_shipped_example_prints_16_verdicts_and_exits_0(capsys):
    rc = main(["check-detector", "--claims", _table1_path()])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("FLAGGED") == 14 and out.count("not flagged") >= 2
    assert "14 of 16 claims flagged (12 of 14 defenses)" in out


def test_cli_json_one_object_per_claim(capsys):
    rc = main(["check-detector", "--example", "table1", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 16
    assert sum(r["flagged"] is True for r in rows) == 14
    assert all(r["flagged"] in (True, False, None) and r["reference"]["citation"] for r in rows)


def test_cli_single_claim_from_flags_is_flagged_with_margin(capsys):
    rc = main(["check-detector", "--dataset", "CIFAR-10", "--norm", "l2", "--eps", "2.9",
               "--robust-accuracy", "75%"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "FLAGGED" in out and "1.45" in out and "+45" in out and "45.0 points above" in out
    rc = main(["check-detector", "--dataset", "cifar10", "--norm", "linf", "--eps", "8/255",
               "--fpr", "0.1", "--fnr", "0.1", "--clean-error", "0.1", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert rc == 0 and row["accuracy_source"] == "eq4"
    assert row["implied_robust_accuracy"] == pytest.approx(0.7) and row["implied_eps_text"] == "4/255"
    assert row["flagged"] is False and row["margin"] == pytest.approx(-0.09)


def test_cli_no_reference(capsys):
    rc = main(["check-detector", "--dataset", "SVHN", "--norm", "l2", "--eps", "1", "--robust-accuracy", "0.9",
               "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert rc == 0 and row["flagged"] is None and row["verdict"] == "no reference"


def test_cli_user_reference(tmp_path, capsys):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([{"dataset": "CIFAR-10", "norm": "l2", "eps": 1.45, "robust_accuracy": 0.9,
                                "citation": "hypothetical"}]))
    rc = main(["check-detector", "--dataset", "CIFAR-10", "--norm", "l2", "--eps", "2.9",
               "--robust-accuracy", "0.75", "--reference", str(ref), "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert rc == 0 and row["flagged"] is False and row["reference"]["citation"] == "hypothetical"


@pytest.mark.parametrize("args", [
    ["--dataset", "CIFAR-10", "--norm", "l3", "--eps", "1", "--robust-accuracy", "0.5"],
    ["--dataset", "CIFAR-10", "--norm", "l2", "--eps", "0", "--robust-accuracy", "0.5"],
    ["--dataset", "CIFAR-10", "--norm", "l2", "--eps", "nan", "--robust-accuracy", "0.5"],
    ["--dataset", "CIFAR-10", "--norm", "l2", "--eps", "1", "--robust-accuracy", "1.5"],
    ["--dataset", "CIFAR-10", "--norm", "l2", "--eps", "1"],
    ["--dataset", "CIFAR-10", "--norm", "l2", "--eps", "1", "--fpr", "0.1"],
    ["--norm", "l2", "--eps", "1", "--robust-accuracy", "0.5"],
    ["--claims", "/nonexistent/claims.csv"],
    ["--example", "table9"],
    ["--example", "table1", "--dataset", "MNIST"],
    [],
])
def test_cli_bad_input_exits_2_with_one_line(args, capsys):
    rc = main(["check-detector", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("certaudit: error:")


def test_cli_bad_claims_file_exits_2(tmp_path, capsys):
    f = tmp_path / "c.csv"
    f.write_text("dataset,norm,eps,robust_accuracy\nMNIST,l2,4.2,0.99\nMNIST,lp,1,0.5\n")
    rc = main(["check-detector", "--claims", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "line 3" in err and "unknown norm" in err


def test_cli_help(capsys):
    rc = main(["check-detector", "--help"])
    assert rc == 0
    assert "--robust-accuracy" in capsys.readouterr().out


# ------------------------------------------------------------------------------- reductions

@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_linear_defense_certificate_is_exact(norm):
    defense = _linear(norm)
    x = _data(20)
    cert = defense.certify(x)
    targets = cert.label
    # margin at the certified radius is ~0; a bit below it positive, a bit above negative
    r = cert.radius
    for k in range(20):
        xi, ti = x[k:k + 1], targets[k:k + 1]
        assert float(defense.margin(xi, float(r[k]) * 0.99 + 1e-9, ti).detach()) > 0
        assert float(defense.margin(xi, float(r[k]) * 1.01 + 1e-6, ti).detach()) < 0


def test_classifier_to_detector_answers_iff_certified_at_half_eps():
    defense = _linear("l2")
    x = _data(40)
    eps = 0.4
    det = ClassifierToDetector(defense, eps)
    cert = defense.certify(x)
    pred = det.predict(x)
    expected = torch.where(cert.radius >= eps / 2, cert.label, torch.full_like(cert.label, ABSTAIN))
    assert torch.equal(pred, expected)
    assert bool(((det.acceptance_score(x) > 0) == (pred != ABSTAIN)).all())
    assert 0 < int((pred == ABSTAIN).sum()) < 40  # the test needs both cases


def test_theorem4_wrapper_returns_the_detectors_label_when_not_rejected():
    x = _data(10)
    labels = torch.arange(10) % 3
    det = FunctionDetector(lambda z: labels[: z.shape[0]], num_classes=3, norm="l2")
    clf = DetectorToClassifier(det, eps=0.5, budget=10)
    out = clf.classify(x)
    assert torch.equal(out.label, labels)
    assert bool((out.source == SOURCE_DETECTOR).all()) and int(out.evals.sum()) == 0
    # and the same through a real Theorem-5 detector: accepted inputs keep their label
    defense = _linear("l2")
    det5 = ClassifierToDetector(defense, 0.4)
    accepted = det5.predict(x) != ABSTAIN
    got = DetectorToClassifier(det5, 0.4, budget=20)(x)
    assert torch.equal(got[accepted], det5.predict(x)[accepted])


@pytest.mark.parametrize("search", ["pgd", "random"])
def test_theorem4_search_finds_an_accepted_point_in_the_half_ball(search):
    defense = _linear("l2")
    x = _data(40)
    eps = 0.8
    det5 = ClassifierToDetector(defense, eps)
    if search == "random":  # the same detector seen as a black box (no score)
        det = FunctionDetector(det5.predict, det5.num_classes, "l2")
    else:
        det = det5
    clf = DetectorToClassifier(det, eps, budget=60, seed=0)
    out = clf.classify(x)
    rejected = det5.predict(x) == ABSTAIN
    found = out.source == SOURCE_SEARCH
    assert bool(rejected.any()) and bool(found.any())
    assert bool((found <= rejected).all())
    # found points lie in the eps/2 ball around the input and are accepted with the returned label
    assert bool((flat_norm(out.point[found] - x[found], "l2") <= eps / 2 + 1e-5).all())
    assert torch.equal(det5.predict(out.point[found]), out.label[found])
    assert int(out.evals.max()) <= 60
    assert bool(((out.label >= 0) & (out.label < 3)).all())


def test_theorem4_falls_back_to_a_seeded_random_label():
    x = _data(12)
    never = FunctionDetector(lambda z: torch.full((z.shape[0],), ABSTAIN), num_classes=5, norm="linf")
    a = DetectorToClassifier(never, 0.1, budget=16, seed=7).classify(x)
    b = DetectorToClassifier(never, 0.1, budget=16, seed=7).classify(x)
    assert bool((a.source == SOURCE_RANDOM).all())
    assert torch.equal(a.label, b.label)
    assert bool(((a.label >= 0) & (a.label < 5)).all())
    assert bool((a.evals == 16).all())


def test_theorem4_classifier_is_robust_at_half_eps_where_the_detector_is_robust_at_eps():
    # x certified at eps/2 => the Theorem-5 detector is robust at eps on x => the Theorem-4
    # classifier labels every x̂ within eps/2 of x correctly (x itself is an accepted point nearby).
    defense = _linear("l2", seed=3)
    x = _data(60, seed=4)
    eps = 0.6
    cert = defense.certify(x)
    keep = cert.certified_at(eps / 2)
    assert int(keep.sum()) >= 5
    xc, yc = x[keep], cert.label[keep]
    x_hat = random_in_ball(xc, eps / 2, "l2", make_generator(9))
    clf = DetectorToClassifier(defense, eps, budget=100, steps=20)
    assert torch.equal(clf(x_hat), yc)


@pytest.mark.parametrize("norm, eps", [("l2", 0.6), ("linf", 0.08)])
def test_theorem5_detector_never_answers_wrong_where_certified(norm, eps):
    defense = _linear(norm, seed=2)
    x = _data(48, seed=5)
    y = defense.certify(x).label.clone()
    y[::4] = (y[::4] + 1) % 3  # some inputs with a wrong label, too
    check = check_classifier_to_detector(defense, x, y, eps, steps=20, restarts=2, seed=0)
    assert check.violations == 0
    assert check.n == 48
    assert 0 < check.vra_half < 1
    assert check.robust_accuracy_with_detection == pytest.approx(check.vra_half)
    s = check.summary()
    assert s["violations_on_certified"] == 0 and s["half_eps"] == pytest.approx(eps / 2)


def test_reduction_wrappers_reject_bad_input():
    defense = _linear("l2")
    with pytest.raises(InputError):
        ClassifierToDetector(defense, 0.0)
    with pytest.raises(InputError):
        ClassifierToDetector("not a defense", 0.1)
    with pytest.raises(InputError):
        DetectorToClassifier(defense, 0.5, budget=0)
    with pytest.raises(InputError):
        DetectorToClassifier(FunctionDetector(lambda z: z, 3, "l2"), 0.5, search="pgd")
    with pytest.raises(InputError):
        DetectorToClassifier(defense, 0.5)(torch.full((1, 1, 4, 4), 2.0))
