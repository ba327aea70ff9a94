"""The exact MILP oracle (certaudit.verify, issue 18 item 3) on a tiny MLP (64→16→16→10 on digits):

(a) exact lies between bound and attack: CROWN/IBP ≤ MILP minimum ≤ best PGD value;
(b) no certificate of the interval or Lipschitz defense has an exact counterexample;
(c) degradability: every input proven non-degradable is exactly non-degradable, every input the
    attacks degraded is exactly degradable (lower ⊆ exact ⊆ proven upper).

Skipped where HiGHS is absent (the optional extra ``certaudit[exact]``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("highspy")

from certaudit.attacks.pgd import pgd  # noqa: E402
from certaudit.audits.degradation import degrade_batch, summarize_degradation  # noqa: E402
from certaudit.defenses.base import ABSTAIN  # noqa: E402
from certaudit.defenses.interval.bounds import margin_bounds  # noqa: E402
from certaudit.defenses.interval.defense import IntervalDefense  # noqa: E402
from certaudit.defenses.lipschitz import LipschitzDefense  # noqa: E402
from certaudit.errors import InputError  # noqa: E402
from certaudit.verify import balls, encoding  # noqa: E402
from certaudit.verify.ibp_milp import IBPProblem, ibp_margins, interval_ops  # noqa: E402
from certaudit.verify.milp import MarginProblem, as_flat, exact_network, min_margin  # noqa: E402
from certaudit.verify.oracle import exact_certified, interval_degradable, lipschitz_degradable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EPS_INF = 0.01  # CROWN certifies nearly all test inputs of the tiny net, its IBP 2ε proof a few
EPS_L2 = 0.1
N = 12
TOL = 1e-4  # float32 model vs float64 MILP


@pytest.fixture(scope="module")
def tiny(digits):
    """A 64→16→16→10 MLP, 200 full-batch Adam steps (seeded), and the first N test images."""
    x_tr, y_tr, x_te, y_te = digits
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(net(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(old)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, exact_network(net, (1, 8, 8)), x_te[:N], y_te[:N]


def _pgd_margin(net, x, eps, norm, y, j):
    """The smallest f_y − f_j PGD finds in the ball (float32 model), per image."""
    def loss(xs, idx):
        out = net(xs)
        return out[torch.arange(len(idx)), y[idx]] - out[torch.arange(len(idx)), j[idx]]

    res = pgd(loss, x, eps, norm, steps=40, restarts=2, seed=0, maximize=False)
    with torch.no_grad():
        return loss(res.x, torch.arange(x.shape[0]))


def _runner_up(net, x):
    with torch.no_grad():
        top = net(x).topk(2, dim=1).indices
    return top[:, 0], top[:, 1]


def test_folded_network_matches_the_model(tiny):
    net, enet, x, _ = tiny
    with torch.no_grad():
        want = net(x).double().numpy()
    assert np.abs(enet.forward(x.reshape(N, -1).double().numpy()) - want).max() < 1e-4


def test_linf_exact_lies_between_crown_and_pgd(tiny):
    net, enet, x, _ = tiny
    y, j = _runner_up(net, x)
    attack = _pgd_margin(net, x, EPS_INF, "linf", y, j)
    crown = margin_bounds(enet.network, x, EPS_INF, y, "crown").gather(1, j[:, None])[:, 0]
    ibp = margin_bounds(enet.network, x, EPS_INF, y, "ibp").gather(1, j[:, None])[:, 0]
    for i in range(N):
        res = min_margin(enet, x[i], EPS_INF, "linf", int(y[i]), int(j[i]), time_limit=20)
        assert res.status == "optimal" and res.gap <= 1e-5
        assert float(crown[i]) <= res.bound + TOL and float(ibp[i]) <= float(crown[i]) + TOL
        assert res.value <= float(attack[i]) + TOL, (i, res.value, float(attack[i]))
        w = res.witness
        assert np.abs(w - as_flat(x[i])).max() <= EPS_INF + 1e-12 and w.min() >= 0 and w.max() <= 1


def test_l2_exact_lies_between_lipschitz_and_crown_bounds_and_pgd(tiny):
    net, enet, x, _ = tiny
    y, j = _runner_up(net, x[:3])
    attack = _pgd_margin(net, x[:3], EPS_L2, "l2", y, j)
    defense = LipschitzDefense(net, 10, EPS_L2, input_shape=(1, 8, 8))
    k = defense.lipschitz_constants().pairwise
    crown = margin_bounds(enet.network, x[:3], EPS_L2, y, "crown", norm="l2").gather(1, j[:, None])[:, 0]
    for i in range(3):
        res = min_margin(enet, x[i], EPS_L2, "l2", int(y[i]), int(j[i]), time_limit=20, cuts=0)
        f = enet.forward(as_flat(x[i]))[0]
        lip = f[int(y[i])] - f[int(j[i])] - EPS_L2 * float(k[y[i], j[i]])
        assert lip <= res.bound + TOL and res.bound <= res.value + 1e-9
        assert float(crown[i]) <= res.value + TOL  # CROWN over the ℓ2 ball lies below the exact minimum
        assert res.value <= float(attack[i]) + TOL
        assert res.status in ("optimal", "bracket") and res.gap <= 1e-4 * (1 + abs(res.value))
        assert np.linalg.norm(res.witness - as_flat(x[i])) <= EPS_L2 * (1 + 1e-9)


def test_l2_outer_polytope_is_within_its_factor():
    """Maximize random directions over the polytope: between ε‖c‖ (the ball inside) and (1+δ)ε‖c‖."""
    d, eps, nu = 10, 0.3, balls.rotations_for(1e-4, 10)
    enc = encoding.Encoder()
    cols, _ = enc.inputs(np.full(d, -1.0), np.full(d, 2.0))
    balls.add_l2_ball(enc, cols, np.full(d, 0.5), eps, nu)
    h = enc.highs()
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = rng.normal(size=d)
        cost = np.zeros(enc.n)
        cost[:d] = -c
        h.changeColsCost(enc.n, np.arange(enc.n, dtype=np.int32), cost)
        status, bound, sol, _ = encoding.run_highs(h, 10.0, False)
        top = -bound - c @ np.full(d, 0.5)
        assert status == "optimal"
        assert eps * np.linalg.norm(c) * (1 - 1e-7) <= top <= balls.outer_factor(nu, d) * eps * np.linalg.norm(c) + 1e-7


def test_ibp_encoding_is_the_defense_s_own_bound(tiny):
    """The MILP's IBP function equals the project's IBP (plain float) at points of the ball, and its
    minimum lies below its value at every sampled point."""
    net, enet, x, _ = tiny
    y, _ = _runner_up(net, x[:2])
    steps = interval_ops(enet)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        pts = (x[i] + (torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1) * EPS_INF).clamp(0, 1)
        ours = np.stack([ibp_margins(enet, steps, as_flat(p), EPS_INF, int(y[i])) for p in pts])
        theirs = margin_bounds(enet.network, pts, EPS_INF, y[i].expand(6), "ibp", sound=False).double().numpy()
        fin = np.isfinite(theirs)
        assert np.abs(ours[fin] - theirs[fin]).max() < 1e-4
        prob = IBPProblem(enet, x[i], EPS_INF)
        for jj in range(10):
            if jj != int(y[i]):
                res = prob.solve(int(y[i]), jj, time_limit=20)
                assert res.status == "optimal" and res.value <= ours[:, jj].min() + 1e-9


def test_ibp_encoding_follows_the_operators_one_by_one():
    """Normalize, a strided convolution, and two linear layers after the last ReLU: the folded network
    is the model, and the IBP function steps through the operators as the defense does (IBP of a
    product of matrices would be looser)."""
    from certaudit.models import Normalize

    torch.manual_seed(3)
    net = nn.Sequential(Normalize([0.3], [0.4]), nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(48, 12), nn.Linear(12, 10)).eval().requires_grad_(False)
    enet = exact_network(net, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert np.abs(enet.forward(x.reshape(3, -1).double().numpy()) - net(x).double().numpy()).max() < 1e-4
    y = net(x).argmax(1)
    theirs = margin_bounds(enet.network, x, 0.05, y, "ibp", sound=False).double().numpy()
    ours = np.stack([ibp_margins(enet, interval_ops(enet), as_flat(x[i]), 0.05, int(y[i])) for i in range(3)])
    fin = np.isfinite(theirs)
    assert np.abs(ours[fin] - theirs[fin]).max() < 1e-4


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_no_interval_certificate_has_an_exact_counterexample(tiny, method):
    net, enet, x, _ = tiny
    labels = IntervalDefense(net, 10, method).accept(x[:6], EPS_INF)
    assert int((labels != ABSTAIN).sum()) >= 3
    verdicts = exact_certified(enet, x[:6], EPS_INF, "linf", labels, time_limit=20, screen=False, search=False)
    assert all(v.decided is not True for v in verdicts), [v.decided for v in verdicts]
    # not vacuous: at a radius nothing certifies, the oracle finds real counterexamples
    y, _ = _runner_up(net, x[:2])
    broken = exact_certified(enet, x[:2], 0.2, "linf", y, time_limit=20, search=False)
    for i, v in enumerate(broken):
        assert v.decided is True
        f = enet.forward(as_flat(v.witness))[0]
        assert f[v.rival] >= f[int(y[i])] - 1e-9 and float((v.witness - x[i]).abs().max()) <= 0.2 + 1e-7


def test_no_lipschitz_certificate_has_an_exact_counterexample(tiny):
    net, enet, x, _ = tiny
    labels = LipschitzDefense(net, 10, EPS_L2, input_shape=(1, 8, 8)).accept(x, EPS_L2)
    idx = (labels != ABSTAIN).nonzero().flatten()[:3]
    verdicts = exact_certified(enet, x[idx], EPS_L2, "l2", labels[idx], time_limit=20, screen=False, search=False)
    assert len(idx) == 3 and all(v.decided is not True for v in verdicts)


def _bracket(rows, verdicts):
    """lower ⊆ exact ⊆ proven upper, per input certified at ε; returns how many the oracle decided."""
    decided = 0
    for row, v in zip(rows, verdicts):
        if not row["certified"]:
            continue
        assert v.label == row["prediction"]
        if row["degraded_by"] is not None:
            assert v.decided is not False, row
        if row["proven_nondegradable"]:
            assert v.decided is not True, row
        if v.decided is True:
            assert v.witness is not None
        decided += v.decided is not None
    return decided


def test_lipschitz_degradability_lower_exact_upper(tiny):
    net, _, x, y = tiny
    defense = LipschitzDefense(net, 10, EPS_L2, input_shape=(1, 8, 8))
    rows = degrade_batch(defense, x[:8], y[:8], EPS_L2, attack="pgd", seed=0, steps=20, full_radius=False)
    verdicts = lipschitz_degradable(defense, x[:8], EPS_L2, time_limit=20, search=False)
    assert _bracket(rows, verdicts) >= 3
    assert any(v.decided is True for v in verdicts) and any(v.decided is False for v in verdicts)
    for i, v in enumerate(verdicts):
        if v.decided is True:  # the witness is a real rejection at ε, inside the ball
            assert int(defense.accept(v.witness[None], EPS_L2)[0]) == ABSTAIN
            assert float((v.witness.double() - x[i].double()).norm()) <= EPS_L2
    # the local search and the screen change the time, not the answers
    fast = lipschitz_degradable(defense, x[:5], EPS_L2, time_limit=20)
    assert all(a.decided is None or b.decided is None or a.decided == b.decided for a, b in zip(fast, verdicts))
    assert all(v.bound <= v.slack + 1e-9 for v in fast + verdicts)  # a proven bound never above a point found
    # proven ⇒ exactly non-degradable, without the Lipschitz screen (which is the proof itself)
    half = EPS_L2 / 2
    proven = defense.prove_nondegradable(x[:4], half, defense.accept(x[:4], half))
    i = int(proven.nonzero()[0])
    (v,) = lipschitz_degradable(defense, x[i:i + 1], half, screen=False, search=False, time_limit=20)
    assert v.decided is False and v.bound > 0 and v.solves == 9


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_interval_degradability_lower_exact_upper(tiny, method):
    """At a radius where the attack, the 2ε proof and the oracle all have something to say. IBP: the
    oracle decides every certified input, and more on both sides than either bound. CROWN: only its
    two sufficient conditions, but never against the attack or the proof; witnesses are real."""
    net, _, x, y = tiny
    eps = 0.006
    defense = IntervalDefense(net, 10, method)
    rows = degrade_batch(defense, x, y, eps, attack="pgd", seed=0, steps=20, full_radius=False)
    verdicts = interval_degradable(defense, x, eps, screen=False, search=False, time_limit=20)
    certified = sum(r["certified"] for r in rows)
    decided = _bracket(rows, verdicts)
    for i, v in enumerate(verdicts):
        if v.decided is True:
            assert int(defense.accept(v.witness[None], eps)[0]) == ABSTAIN
            assert float((v.witness - x[i]).abs().max()) <= eps
    if method == "ibp":
        assert decided == certified >= 4
        assert any(v.decided is True for v in verdicts) and any(v.decided is False for v in verdicts)
    else:
        assert decided >= certified // 2


def test_oracle_refuses_what_it_cannot_decide(tiny, monkeypatch):
    net, enet, x, _ = tiny
    with pytest.raises(InputError):
        exact_network(nn.Sequential(nn.Flatten(), nn.Linear(64, 5000), nn.ReLU(), nn.Linear(5000, 10)), (1, 8, 8))
    with pytest.raises(InputError):
        lipschitz_degradable(IntervalDefense(net, 10, "ibp"), x[:1], EPS_L2)
    monkeypatch.setattr(encoding, "highspy", None)
    assert not encoding.available()
    with pytest.raises(InputError, match="certaudit\\[exact\\]"):
        MarginProblem(enet, x[0], EPS_INF, "linf")


def test_branch_and_bound_proof_closes_the_bracket(tiny):
    """The milp proof (branch and bound with a time budget) in the degradation audit: every certified,
    correct input ends degraded or proven (the tiny net is decided within the budget); what it proves,
    a stronger attack does not degrade; what it finds is re-checked like an attack's candidate."""
    net, _, x, y = tiny
    defense = LipschitzDefense(net, 10, EPS_L2, input_shape=(1, 8, 8))
    assert defense.proof_methods == ("2eps", "local", "milp") and "milp" not in defense.default_proofs
    rows = degrade_batch(defense, x, y, EPS_L2, attack="pgd", seed=0, steps=10, full_radius=False,
                         proofs=["all"], proof_budget=20)
    s = summarize_degradation(rows, EPS_L2, proof=defense.proof_name)
    br = s["bracket"]
    assert br["undecided"] == 0 and br["proven_by"].get("milp", 0) >= 1, br
    by_milp = [i for i, r in enumerate(rows) if r["proven_by"] == "milp"]
    strong = degrade_batch(defense, x[by_milp], y[by_milp], EPS_L2, attack="all", seed=1, steps=100, restarts=4,
                           full_radius=False, proofs=["2eps"])
    assert all(r["degraded_by"] is None for r in strong)
    for r in rows:
        if r["degraded_by"] == "milp":
            assert r["distance"] <= EPS_L2 * (1 + 1e-5) and r["attacks"]["milp"]
    with pytest.raises(InputError):
        degrade_batch(defense, x[:2], y[:2], EPS_L2, attack="pgd", proofs=["bab"])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError):
            degrade_batch(defense, x[:2], y[:2], EPS_L2, attack="pgd", proofs=["all"], proof_budget=bad)
        with pytest.raises(InputError):
            defense.prove(x[:2], EPS_L2, defense.accept(x[:2], EPS_L2), ["milp"], budget=bad)


def test_branch_and_bound_out_of_time_claims_no_floor(tiny):
    """A solve stopped by its budget may have skipped the hardest rivals: it proves nothing and its
    partial bound must not raise the radius floor above ε."""
    net, _, x, y = tiny
    defense = LipschitzDefense(net, 10, EPS_L2, input_shape=(1, 8, 8))
    lab = defense.accept(x, EPS_L2)
    keep = lab != ABSTAIN
    res = defense.prove(x[keep], EPS_L2, lab[keep], ["2eps", "local", "milp"], budget=1e-4)
    for ok, by, fl in zip(res.proven.tolist(), res.method, res.radius_floor.tolist()):
        assert ok == (by is not None)
        if not ok:
            assert fl <= EPS_L2
