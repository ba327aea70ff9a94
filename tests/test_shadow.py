"""Shadow Attack: the paper's penalties, exact loss scaling, chunking, 1-channel δ, and success that
only a real CERTIFY grants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certaudit.attacks.shadow import (
    DefenseMargin,
    ShadowConfig,
    SmoothedCrossEntropy,
    color_penalty,
    dissim_penalty,
    expand_delta,
    mix_seed,
    noise_key,
    shadow_attack,
    shadow_objective,
    tv_penalty,
    wrong_class_pairs,
)
from certaudit.audits.spoofing import ROLE_FINAL, certify_images, save_grid, spoof_batch, summarize
from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm
from certaudit.defenses.smoothing import SmoothedClassifier
from certaudit.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_net(channels: int = 3, classes: int = 4, size: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * size * size, classes)).eval()


@pytest.fixture(scope="module")
def digits_model():
    """A 2C2F trained under Gaussian noise (σ = 0.25) on the 8x8 digits (a few seconds on CPU)."""
    from certaudit.data import load_dataset
    from certaudit.models import build_model
    from certaudit.train import TrainConfig, train

    x_tr, y_tr = load_dataset("digits", "train")
    x_te, y_te = load_dataset("digits", "test")
    model = build_model("2c2f", (1, 8, 8), 10)
    train(model, x_tr, y_tr, TrainConfig(method="gaussian", sigma=0.25, epochs=10, lr=3e-3, seed=0),
          device=torch.device("cpu"), progress=False)
    return model.eval(), x_te, y_te


# ------------------------------------------------------------------------------- penalties

def test_penalties_match_hand_computed_values():
    d = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]],  # R
                       [[0.0, 0.0], [0.0, 1.0]],  # G
                       [[-1.0, 1.0], [1.0, -1.0]]]])  # B  -> (1, 3, 2, 2)
    # C: mean |δ_c| = (6/4, 1/4, 4/4) -> ‖·‖₂ = sqrt(2.25 + 0.0625 + 1)
    assert color_penalty(d).item() == pytest.approx(math.sqrt(2.25 + 0.0625 + 1.0))
    assert color_penalty(d, "l2").item() == pytest.approx(math.sqrt(1 + 4 + 9 + 1 + 4 * 1))
    # TV: vertical (row1 - row0) and horizontal (col1 - col0) differences, squared, all channels.
    # R: vert (-1, 5), horiz (-3, 3) -> 1 + 25 + 9 + 9 = 44; G: vert (0, 1), horiz (0, 1) -> 2;
    # B: vert (2, -2), horiz (2, -2) -> 16.
    assert tv_penalty(d).item() == pytest.approx(44 + 2 + 16)
    # Dissim: ‖((R−G)², (R−B)², (G−B)²)‖₂ over all pixels.
    rg = [1, -2, 0, 2]
    rb = [2, -3, -1, 4]
    gb = [1, -1, -1, 2]
    expected = math.sqrt(sum(v ** 4 for v in rg + rb + gb))
    assert dissim_penalty(d).item() == pytest.approx(expected)
    # One channel: no dissimilarity; a grey δ copied to 3 channels has none either.
    assert dissim_penalty(d[:, :1]).item() == 0.0
    assert dissim_penalty(expand_delta(d[:, :1], 3)).item() == 0.0


def test_penalties_are_per_example_and_zero_at_zero():
    d = torch.zeros(3, 3, 5, 5)
    d[1] = torch.randn(3, 5, 5)
    for f in (color_penalty, tv_penalty, dissim_penalty):
        v = f(d)
        assert v.shape == (3,) and v[0] == 0 and v[2] == 0 and v[1] > 0
    # the penalties have finite (zero) gradients at δ = 0, so the zero start is safe
    z = torch.zeros(1, 3, 4, 4, requires_grad=True)
    (color_penalty(z) + dissim_penalty(z) + tv_penalty(z)).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() == 0


# --------------------------------------------------------------------------- loss scaling

def reference_pair_objective(model, x, delta, t, eps, sigma, cfg):
    """One (image, target) pair, written naively: a Python loop over the noise copies."""
    eff = delta.expand(x.shape[0], -1, -1) if delta.shape[0] == 1 else delta  # (C, H, W)
    xa = (x + eff).clamp(0, 1)
    ce = [F.cross_entropy(model((xa + sigma * eps[k])[None]), torch.tensor([t])) for k in range(eps.shape[0])]
    loss = sum(ce) / len(ce)  # the mean over this pair's copies, nothing else
    mean_abs = torch.stack([eff[c].abs().mean() for c in range(eff.shape[0])])
    color = torch.sqrt((mean_abs ** 2).sum())
    tv = sum(((eff[:, i + 1, :] - eff[:, i, :]) ** 2).sum() for i in range(eff.shape[1] - 1)) + \
        sum(((eff[:, :, j + 1] - eff[:, :, j]) ** 2).sum() for j in range(eff.shape[2] - 1))
    if delta.shape[0] == 3:  # a 1-channel δ has no dissimilarity (and sqrt(0) has no derivative)
        r, g, b = eff
        dissim = torch.sqrt(((r - g) ** 4).sum() + ((r - b) ** 4).sum() + ((g - b) ** 4).sum())
    else:
        dissim = torch.zeros(())
    return -loss - cfg.lambda_c * color - cfg.lambda_tv * tv - cfg.lambda_s * dissim


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_gradient_equals_each_pairs_own_gradient(channels):
    """The batched objective is a sum of per-pair objectives: no pair's classification gradient is
    divided by the number of copies (the 1/n bug that silently disables the attack)."""
    model = tiny_net()
    s, sigma = 16, 0.3
    cfg = ShadowConfig(channels=channels, lambda_c=0.7, lambda_tv=0.05, lambda_s=0.4)
    loss = SmoothedCrossEntropy(model, sigma, samples=s)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 6, 6, generator=gen)
    image, target = wrong_class_pairs(torch.tensor([0, 2]), 4)  # 6 pairs
    cd = 1 if channels == 1 else 3
    delta = 0.2 * torch.randn(6, cd, 6, 6, generator=gen)
    keys = torch.tensor([noise_key(5, int(i)) for i in image])
    obj, grad, parts = shadow_objective(loss, x[image], delta, target, keys, cfg)
    for p in range(6):
        eps = loss.copies(int(keys[p]), 0, (3, 6, 6))
        d = delta[p].clone().requires_grad_(True)
        ref = reference_pair_objective(model, x[image[p]], d, int(target[p]), eps, sigma, cfg)
        (ref_grad,) = torch.autograd.grad(ref, d)
        assert obj[p].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad[p], ref_grad, rtol=1e-4, atol=1e-6)
    # The classification term alone: its gradient is the mean over copies, not 1/S of it.
    plain = ShadowConfig(channels=channels, lambda_c=0.0, lambda_tv=0.0, lambda_s=0.0)
    _, g_cls, _ = shadow_objective(loss, x[image], delta, target, keys, plain)
    eps = loss.copies(int(keys[0]), 0, (3, 6, 6))
    d = delta[0].clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(reference_pair_objective(model, x[image[0]], d, int(target[0]), eps, sigma, plain), d)
    ratio = (g_cls[0].norm() / g_ref.norm()).item()
    assert ratio == pytest.approx(1.0, rel=1e-4)  # the bug would give 1/16


def test_chunked_gradient_equals_unchunked_objective():
    model = tiny_net()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    image, target = wrong_class_pairs(torch.tensor([1, 0, 3]), 4)
    keys = torch.tensor([noise_key(0, int(i)) for i in image])
    delta = 0.1 * torch.randn(len(target), 3, 6, 6, generator=torch.Generator().manual_seed(2))
    cfg = ShadowConfig(channels=3)
    whole = SmoothedCrossEntropy(model, 0.25, samples=10, chunk_rows=10_000)
    chunked = SmoothedCrossEntropy(model, 0.25, samples=10, chunk_rows=7)  # chunks straddle pairs
    o1, g1, p1 = shadow_objective(whole, x[image], delta, target, keys, cfg)
    o2, g2, p2 = shadow_objective(chunked, x[image], delta, target, keys, cfg)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p1["loss"], p2["loss"], rtol=1e-5, atol=1e-6)
    # and whole attacks agree, whatever the chunk and image-group sizes
    a = shadow_attack(whole, x, target, ShadowConfig(steps=4, channels=3), image=image, seed=3)
    b = shadow_attack(chunked, x, target, ShadowConfig(steps=4, channels=3), image=image, seed=3, images_per_group=1)
    torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=1e-6)
    assert chunked.rows_per_chunk((3, 6, 6)) == 7
    auto = SmoothedCrossEntropy(model, 0.25, samples=10)
    assert 1 <= auto.rows_per_chunk((3, 6, 6)) <= 65536  # from memory


def test_batched_untargeted_attack_equals_a_loop_over_targets_and_images():
    model = tiny_net()
    loss = SmoothedCrossEntropy(model, 0.25, samples=8)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([3, 1])
    image, target = wrong_class_pairs(y, 4)
    cfg = ShadowConfig(steps=5, channels=3, optimizer="adam", lr=0.05)
    batched = shadow_attack(loss, x, target, cfg, image=image, indices=[10, 20], seed=9)
    for p in range(len(target)):
        i = int(image[p])
        alone = shadow_attack(loss, x[i:i + 1], target[p:p + 1], cfg, indices=[[10, 20][i]], seed=9)
        torch.testing.assert_close(alone.delta[0], batched.delta[p], rtol=1e-4, atol=1e-6)
        assert alone.loss[0].item() == pytest.approx(batched.loss[p].item(), rel=1e-5)


def test_wrong_class_pairs_cover_every_wrong_class_once():
    image, target = wrong_class_pairs(torch.tensor([2, 0]), 4)
    assert list(zip(image.tolist(), target.tolist())) == [(0, 0), (0, 1), (0, 3), (1, 1), (1, 2), (1, 3)]
    image, target = wrong_class_pairs(torch.tensor([2, 0]), 4, candidates=[0, 2])
    assert list(zip(image.tolist(), target.tolist())) == [(0, 0), (1, 2)]
    with pytest.raises(InputError):
        wrong_class_pairs(torch.tensor([0]), 4, candidates=[7])


# -------------------------------------------------------------------------------- channels

def test_one_channel_delta_is_identical_across_channels():
    model = tiny_net()
    loss = SmoothedCrossEntropy(model, 0.25, samples=4)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.25
    res = shadow_attack(loss, x, torch.tensor([1, 2]), ShadowConfig(steps=3, channels=1), seed=0)
    assert res.delta.shape == (2, 3, 6, 6)
    assert torch.equal(res.delta[:, 0], res.delta[:, 1]) and torch.equal(res.delta[:, 0], res.delta[:, 2])
    assert (res.dissim == 0).all()
    torch.testing.assert_close(res.x_adv, (x + res.delta).clamp(0, 1))
    three = shadow_attack(loss, x, torch.tensor([1, 2]), ShadowConfig(steps=3, channels=3), seed=0)
    assert not torch.equal(three.delta[:, 0], three.delta[:, 1])
    assert (three.dissim > 0).all()


def test_three_channel_mode_reduces_to_one_channel_on_grey_images():
    model = tiny_net(channels=1)
    loss = SmoothedCrossEntropy(model, 0.25, samples=4)
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    a = shadow_attack(loss, x, torch.tensor([1, 2]), ShadowConfig(steps=3, channels=3), seed=0)
    b = shadow_attack(loss, x, torch.tensor([1, 2]), ShadowConfig(steps=3, channels=1), seed=0)
    assert a.delta.shape == (2, 1, 6, 6)
    torch.testing.assert_close(a.delta, b.delta)
    assert (a.dissim == 0).all()


def test_images_are_clipped_inside_the_loop():
    """The image optimized is the image certified: x + δ never leaves [0, 1]."""
    model = tiny_net()
    loss = SmoothedCrossEntropy(model, 0.25, samples=4)
    x = torch.ones(1, 3, 6, 6) * 0.95
    res = shadow_attack(loss, x, torch.tensor([2]), ShadowConfig(steps=3, channels=3, init=0.5), seed=0)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert float((x + res.delta).max()) > 1.0  # δ itself is unbounded


# ------------------------------------------------------------------------------ randomness

def test_fixed_noise_stays_and_fresh_noise_changes():
    model = tiny_net()
    fixed = SmoothedCrossEntropy(model, 0.25, samples=4, noise="fixed")
    fresh = SmoothedCrossEntropy(model, 0.25, samples=4, noise="fresh")
    assert torch.equal(fixed.copies(7, 0, (3, 6, 6)), fixed.copies(7, 5, (3, 6, 6)))
    assert not torch.equal(fresh.copies(7, 0, (3, 6, 6)), fresh.copies(7, 5, (3, 6, 6)))
    assert not torch.equal(fixed.copies(7, 0, (3, 6, 6)), fixed.copies(8, 0, (3, 6, 6)))
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    cfg = ShadowConfig(steps=3, channels=3)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    a = shadow_attack(fresh, x, torch.tensor([1]), cfg, generator=g1)
    b = shadow_attack(fresh, x, torch.tensor([1]), cfg, generator=g2)
    torch.testing.assert_close(a.delta, b.delta)  # the same generator state gives the same attack
    c = shadow_attack(fresh, x, torch.tensor([1]), cfg, seed=12)
    assert not torch.equal(a.delta, c.delta)


# -------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"), ({"lambda_tv": -1.0}, "lambda_tv"), ({"lambda_c": -0.1}, "lambda_c"),
    ({"lambda_s": float("nan")}, "lambda_s"), ({"channels": 2}, "channels"), ({"lr": 0.0}, "lr"),
    ({"optimizer": "rmsprop"}, "optimizer"), ({"color": "hsv"}, "color"), ({"init": -1}, "init"),
])
def test_bad_configuration_is_an_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        ShadowConfig(**kwargs)


def test_bad_loss_settings_and_calls_are_input_errors():
    model = tiny_net()
    with pytest.raises(InputError, match="samples"):
        SmoothedCrossEntropy(model, 0.25, samples=0)
    with pytest.raises(InputError, match="noise"):
        SmoothedCrossEntropy(model, 0.25, noise="sometimes")
    loss = SmoothedCrossEntropy(model, 0.25, samples=2)
    with pytest.raises(InputError):
        shadow_attack(loss, torch.rand(1, 3, 6, 6) + 1.0, torch.tensor([0]))
    with pytest.raises(InputError):
        shadow_attack(loss, torch.rand(2, 3, 6, 6), torch.tensor([0, 1, 2]))


def test_crown_ibp_preset_is_the_papers_section_5_setting():
    cfg = ShadowConfig.crown_ibp()
    assert (cfg.lambda_tv, cfg.lambda_c, cfg.color, cfg.lr, cfg.channels) == (9e-6, 0.02, "l2", 200.0, 1)
    paper = ShadowConfig()
    assert (paper.steps, paper.lr, paper.lambda_tv, paper.lambda_c, paper.lambda_s) == (300, 0.1, 0.3, 1.0, 0.5)


# ---------------------------------------------------------------------- against a real model

def test_attack_raises_the_targets_smoothed_probability(digits_model):
    model, x_te, y_te = digits_model
    smoothed = SmoothedClassifier(model, 10, 0.25, batch_size=512)
    x, y = x_te[:6], y_te[:6]
    target = (y + 3) % 10
    loss = SmoothedCrossEntropy(model, 0.25, samples=32)
    res = shadow_attack(loss, x, target, ShadowConfig(steps=30), seed=0)
    before = smoothed.sample_counts(x, 400, seed=1).double() / 400  # (B, K) fresh noise
    after = smoothed.sample_counts(res.x_adv, 400, seed=1).double() / 400
    p0 = before.gather(1, target[:, None]).squeeze(1)
    p1 = after.gather(1, target[:, None]).squeeze(1)
    assert (p1 > p0).all()
    assert p1.mean() > 0.5 and p0.mean() < 0.1


def test_defense_margin_works_through_the_protocol(digits_model):
    """Any defense's margin(x, r, t) serves as the spoofing loss (smoothing's soft margin here)."""
    model, x_te, y_te = digits_model
    smoothed = SmoothedClassifier(model, 10, 0.25)
    loss = DefenseMargin(smoothed, 0.1, n_samples=16)
    x, y = x_te[:4], y_te[:4]
    target = (y + 1) % 10
    keys = torch.tensor([noise_key(0, i) for i in range(4)])
    value, grad = loss(x, target, keys, 0)
    assert value.shape == (4,) and grad.shape == x.shape and torch.isfinite(grad).all()
    res = shadow_attack(loss, x, target, ShadowConfig(steps=15, optimizer="adam", lr=0.05), seed=0)
    m0 = smoothed.margin(x, 0.1, target, n_samples=256, generator=torch.Generator().manual_seed(0))
    m1 = smoothed.margin(res.x_adv, 0.1, target, n_samples=256, generator=torch.Generator().manual_seed(0))
    assert (m1 > m0).all()


# ------------------------------------------------------------------ success needs a real CERTIFY

class ConstantDefense(Defense):
    """A deterministic defense that certifies class ``label`` with radius 1 for every input, and
    whose margin *pretends* every target is certified (a lying surrogate)."""

    norm = Norm.L2

    def __init__(self, model, label: int):
        super().__init__(model, 4)
        self.label = label
        self.calls: list[torch.Tensor] = []

    def certify(self, x, *, seed=None, indices=None):
        self.calls.append(x.detach().clone())
        b = x.shape[0]
        return Certificates(torch.full((b,), self.label), torch.ones(b), Norm.L2)

    def margin(self, x, eps, target):
        return 10.0 + 0.0 * x.flatten(1).sum(dim=1)


def test_success_is_counted_only_after_a_real_certify():
    model = tiny_net()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    liar = ConstantDefense(model, label=1)
    out = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3), skip_abstained=False)
    # the surrogate claims every target is certified; CERTIFY says class 1 for everything
    assert [r["spoofed_prediction"] for r in out.rows] == [1, 1, 1]
    assert [r["success"] for r in out.rows] == [True, False, True]  # image 1's true label is 1
    assert all(r["spoof_loss"] == -10.0 for r in out.rows)
    # natural, selection (every candidate), then the judging CERTIFY of the chosen images
    assert [c.shape[0] for c in liar.calls] == [3, 9, 3]
    torch.testing.assert_close(liar.calls[-1], out.x_adv)
    s = summarize(out.rows, eps=0.5)
    assert s["success_rate"] == pytest.approx(2 / 3)
    assert s["attack_error"] == pytest.approx(1 / 3)
    assert s["robust_error"] == pytest.approx(2 / 3)  # only image 1 is certified correctly


def test_judging_certify_is_fresh_and_reproducible(digits_model):
    model, x_te, y_te = digits_model
    smoothed = SmoothedClassifier(model, 10, 0.25, batch_size=512)
    x, y = x_te[:4], y_te[:4]
    loss = SmoothedCrossEntropy(model, 0.25, samples=16)
    opts = {"n0": 32, "n": 300}
    out = spoof_batch(smoothed, loss, x, y, ShadowConfig(steps=15), indices=[0, 1, 2, 3], seed=5,
                      certify_options=opts, select_options={"n0": 32, "n": 64})
    attacked = [b for b, r in enumerate(out.rows) if r["attacked"]]
    assert attacked
    judge = certify_images(smoothed, out.x_adv[attacked], seed=mix_seed(5, ROLE_FINAL), indices=attacked, **opts)
    for a, b in enumerate(attacked):
        row = out.rows[b]
        assert row["spoofed_prediction"] == int(judge.label[a])
        assert row["spoofed_radius"] == pytest.approx(float(judge.radius[a]))
        assert row["success"] == (row["spoofed_prediction"] not in (row["label"], ABSTAIN))
        assert sum(row["spoofed_counts"]) == 300  # the full count, not the selection's 64
    assert sum(r["success"] for r in out.rows) >= len(attacked) // 2


def test_summary_reproduces_table_1_definitions():
    rows = [
        {"index": 0, "label": 0, "natural_prediction": 0, "natural_radius": 0.2, "attacked": True,
         "spoofed_prediction": 3, "spoofed_radius": 0.4, "success": True, "l2": 1.0, "linf": 0.2, "tv": 3.0},
        {"index": 1, "label": 1, "natural_prediction": 1, "natural_radius": 0.4, "attacked": True,
         "spoofed_prediction": 1, "spoofed_radius": 0.3, "success": False, "l2": 2.0, "linf": 0.4, "tv": 5.0},
        {"index": 2, "label": 2, "natural_prediction": ABSTAIN, "natural_radius": 0.0, "attacked": False,
         "spoofed_prediction": None, "spoofed_radius": None, "success": False},
        {"index": 3, "label": 3, "natural_prediction": 3, "natural_radius": 0.6, "attacked": True,
         "spoofed_prediction": 2, "spoofed_radius": 0.2, "success": True, "l2": 3.0, "linf": 0.6, "tv": 7.0},
    ]
    s = summarize(rows, eps=0.25)
    assert s["attacked"] == 3 and s["successes"] == 2
    assert s["success_rate"] == pytest.approx(2 / 3)
    assert s["natural_radius_mean"] == pytest.approx(0.4)
    assert s["natural_radius_std"] == pytest.approx(math.sqrt(((0.2 - 0.4) ** 2 + 0 + 0.2 ** 2) / 3))
    assert s["shadow_radius_mean"] == pytest.approx(0.3) and s["shadow_radius_std"] == pytest.approx(0.1)
    assert s["shadow_radius_mean_all"] == pytest.approx(0.6 / 3)
    assert s["spoofed_beats_natural"] == pytest.approx(1 / 3)
    assert s["l2_mean"] == pytest.approx(2.0)
    assert s["robust_error"] == pytest.approx(1 - 2 / 4)  # images 1 and 3 are certified correctly at 0.25
    assert s["attack_error"] == pytest.approx(1 - 1 / 4)  # only image 0's spoof is certified at 0.25


def test_grid_is_written(tmp_path):
    x = torch.rand(2, 3, 6, 6)
    d = torch.randn(2, 3, 6, 6) * 0.1
    path = save_grid(tmp_path / "g.png", x, d, (x + d).clamp(0, 1), [("cat, r=0.3", "dog (wrong), r=0.4")] * 2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- perceptual budget (issue 19)

from certaudit.attacks.budget import (  # noqa: E402
    SMALL_WINDOW,
    Budget,
    linf_text,
    parse_linf_list,
    run_budgets,
    ssim,
    ssim_at_least,
    ssim_window,
    sweep_budgets,
)


class StepSpy:
    """A spoofing loss that records every image it is asked about (one call per step) and pushes
    the target logit of the tiny net up (gradients large enough to leave any small box)."""

    def __init__(self, model):
        self.model = model
        self.seen: list[torch.Tensor] = []

    def __call__(self, x_adv, target, keys, step):
        self.seen.append(x_adv.detach().clone())
        xa = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value = F.cross_entropy(self.model(xa), target, reduction="none")
            (g,) = torch.autograd.grad(value.sum(), xa)
        return value.detach(), g

    def settings(self):
        return {"loss": "spy"}

    def max_images(self, shape):
        return 64


def test_ssim_is_one_on_identical_images_and_falls_with_noise():
    from certaudit.data import load_dataset

    x, _ = load_dataset("digits", "test")
    x = x[:16]
    assert ssim_window(8, 8) == (SMALL_WINDOW, 1.0) and ssim_window(32, 32) == (11, 1.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pytorch-msssim warns when its window does not fit the image
        torch.testing.assert_close(ssim(x, x), torch.ones(16))
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(x.shape, generator=gen)
        values = [float(ssim(x, (x + s * noise).clamp(0, 1)).mean()) for s in (0.01, 0.05, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2] > values[3]
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(rgb, rgb), torch.ones(2))
    assert float(ssim(rgb, (rgb + 0.1).clamp(0, 1)).max()) < 1.0


@pytest.mark.parametrize("optimizer, lr", [("sgd", 200.0), ("adam", 0.5)])
def test_linf_projection_holds_at_every_step(optimizer, lr):
    """Every image the loss sees, and the returned δ, lie within the ℓ∞ box and in [0, 1]; a 1-channel
    δ on an RGB image keeps every channel in [0, 1]; no step moves δ by more than τ/4 in ℓ∞."""
    model = tiny_net()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    x[0, :, :2] = 1.0  # saturated pixels: the box meets [0, 1]
    tau = 8 / 255
    for channels in (1, 3):
        spy = StepSpy(model)
        cfg = ShadowConfig(steps=8, channels=channels, lr=lr, optimizer=optimizer, max_linf=tau, lambda_c=0.0,
                           lambda_tv=0.0, lambda_s=0.0)  # only the spoofing loss, which pushes out of any box
        res = shadow_attack(spy, x, torch.tensor([1, 2]), cfg, seed=0)
        assert len(spy.seen) == 8
        for seen in spy.seen:
            assert float((seen - x).abs().max()) <= tau + 1e-6
        for before, after in zip(spy.seen, spy.seen[1:]):  # the step cap (the box leaves x + δ unclipped)
            assert float((after - before).abs().max()) <= tau / 4 + 1e-6
        assert float(res.delta.abs().max()) <= tau + 1e-7
        assert float((x + res.delta).min()) >= 0.0 and float((x + res.delta).max()) <= 1.0
        torch.testing.assert_close(res.x_adv, x + res.delta)  # nothing left to clip
        assert float(res.delta.abs().max()) > 0.9 * tau  # the box binds: this loss pushes hard
    # without the budget the same attack leaves the box after one step
    spy = StepSpy(model)
    shadow_attack(spy, x, torch.tensor([1, 2]), ShadowConfig(steps=3, lr=lr, optimizer=optimizer), seed=0)
    assert float((spy.seen[-1] - x).abs().max()) > 2 * tau


def test_per_pair_budgets_in_one_batch():
    """A sweep is one attack: each pair is held to its own τ; unbounded pairs are left alone."""
    model = tiny_net()
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    image, target = torch.zeros(3, dtype=torch.long), torch.tensor([1, 1, 1])
    taus = torch.tensor([4 / 255, 32 / 255, math.inf])
    res = shadow_attack(StepSpy(model), x, target, ShadowConfig(steps=5, lr=200.0), image=image, max_linf=taus, seed=0)
    linf = res.delta.flatten(1).abs().amax(dim=1)
    assert float(linf[0]) <= 4 / 255 + 1e-7 and float(linf[1]) <= 32 / 255 + 1e-7 and float(linf[2]) > 32 / 255
    # the bounded pairs are the unbounded attack's start, scaled into the box
    alone = shadow_attack(StepSpy(model), x, target[:1], ShadowConfig(steps=5, lr=200.0, max_linf=4 / 255), seed=0)
    torch.testing.assert_close(alone.delta[0], res.delta[0])
    with pytest.raises(InputError):
        shadow_attack(StepSpy(model), x, target, ShadowConfig(steps=1), image=image, max_linf=torch.tensor([0.0, 1, 1]))


def test_min_ssim_penalty_keeps_a_feasible_iterate():
    model = tiny_net()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(9)) * 0.6 + 0.2
    cfg = ShadowConfig(steps=10, lr=0.5, init=0.0, lambda_c=0.0, lambda_tv=0.0)  # only the spoofing loss
    free = shadow_attack(StepSpy(model), x, torch.tensor([1, 2]), cfg, seed=0)
    assert float(free.ssim.max()) < 0.9  # the unbudgeted attack wrecks the structure
    res = shadow_attack(StepSpy(model), x, torch.tensor([1, 2]), cfg.with_(min_ssim=0.95, lambda_ssim=50.0), seed=0)
    assert bool((res.ssim >= 0.95).all())  # δ = 0 (the start) is feasible, so a feasible iterate is returned
    torch.testing.assert_close(res.ssim, ssim(x, res.x_adv))
    assert float(res.delta.abs().max()) > 0.05  # and it moved
    start, _ = StepSpy(model)(x, torch.tensor([1, 2]), None, 0)  # the loss at δ = 0
    assert bool((res.loss < start).all())  # it moved toward the targets


def test_budget_validation_and_labels():
    assert Budget(16 / 255, 0.9).label == "ℓ∞ ≤ 16/255, SSIM ≥ 0.9" and Budget().label == "unbounded"
    assert [b.label for b in sweep_budgets([None, 16 / 255, 4 / 255], 0.9)] == [
        "ℓ∞ ≤ 4/255, SSIM ≥ 0.9", "ℓ∞ ≤ 16/255, SSIM ≥ 0.9", "unbounded"]
    assert sorted([Budget(), Budget(None, 0.9), Budget(1.0, 0.9)], key=Budget.sort_key)[-1] == Budget()
    assert Budget(1.0).label == "ℓ∞ ≤ 255/255"  # τ = 1 is allowed (no ℓ∞ bound in effect), above it is not
    for kwargs in ({"max_linf": 0.0}, {"max_linf": -0.1}, {"max_linf": float("nan")}, {"max_linf": 2.0},
                   {"max_linf": 1e308}, {"max_linf": 1e-300}, {"max_linf": 1e-7}, {"min_ssim": 0.0},
                   {"min_ssim": 1.5}, {"min_ssim": float("nan")}, {"min_ssim": 1e-300}):
        with pytest.raises(InputError):
            ShadowConfig(**kwargs)
    for text in ("1e308", "2", "1e-300", "0.0156862745,4/255", "0.1,0.10001", "none,inf"):
        with pytest.raises(InputError, match="--sweep-linf"):
            parse_linf_list(text, "--sweep-linf")
    with pytest.raises(InputError, match="twice"):
        sweep_budgets([4 / 255, 0.0156862745], 0.9)
    assert linf_text(1e308) == "1e+308"  # no OverflowError, whatever reaches it


def test_ssim_bound_is_compared_in_float32_by_attack_and_judge():
    """One rule: an SSIM of exactly float32(0.9) = 0.89999998 satisfies SSIM ≥ 0.9 both for the attack's
    feasible iterate and for the judge."""
    s32 = float(torch.tensor(0.9, dtype=torch.float32))
    assert s32 < 0.9 and ssim_at_least(s32, 0.9) and Budget(None, 0.9).within(0.0, s32)
    assert bool(ssim_at_least(torch.tensor([s32]), torch.tensor([0.9], dtype=torch.float64)).all())
    assert not Budget(None, 0.9).within(0.0, 0.8999)


def test_success_counts_only_spoofs_within_the_budget(monkeypatch):
    """The liar certifies class 1 for everything: without a budget every image not of class 1 is
    'spoofed'. With SSIM ≥ 1 the only feasible point is x itself (δ = 0): the 'successes' are then
    exactly the images the defense already labelled wrong, which the summary counts apart. A judged
    image outside the budget is never a success, whatever its label."""
    model = tiny_net()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    liar = ConstantDefense(model, label=1)
    free = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3), skip_abstained=False)
    assert [r["success"] for r in free.rows] == [True, False, True]
    strict = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3, min_ssim=1.0),
                         skip_abstained=False, eps=0.5)
    assert [r["spoofed_prediction"] for r in strict.rows] == [1, 1, 1]
    assert float(strict.delta.abs().max()) == 0.0  # the feasible start, halved to 0, and nothing better
    assert [r["within_budget"] for r in strict.rows] == [True, True, True]
    assert [r["success"] for r in strict.rows] == [True, False, True]
    s = summarize(strict.rows, eps=0.5)
    assert s["successes"] == 2 and s["successes_natural_wrong"] == 2  # no attack needed for either
    assert s["attacked_natural_correct"] == 1 and s["success_rate_natural_correct"] == 0.0
    assert s["budget_label"] == "SSIM ≥ 1" and s["ssim_mean"] == 1.0 and s["unbounded"] is None
    # a judged image whose SSIM is below the bound is no success (here: an SSIM of 0.5 everywhere, so no
    # iterate is ever feasible and the judge gets the attack's 0.5 for the image it returns)
    import certaudit.attacks.shadow as shadow_mod

    monkeypatch.setattr(shadow_mod, "ssim", lambda a, b: torch.full((a.shape[0],), 0.5))
    judged = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3, min_ssim=0.9),
                         skip_abstained=False, eps=0.5)
    assert [r["spoofed_prediction"] for r in judged.rows] == [1, 1, 1]
    assert [r["within_budget"] for r in judged.rows] == [False, False, False]
    assert [r["success"] for r in judged.rows] == [False, False, False]
    s = summarize(judged.rows, eps=0.5)
    assert s["success_rate"] == 0.0 and s["attack_error"] == 1.0 and s["within_budget_rate"] == 0.0
    boxed = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3, max_linf=4 / 255),
                        skip_abstained=False)
    assert [r["success"] for r in boxed.rows] == [True, False, True]
    assert all(r["linf"] <= 4 / 255 + 1e-6 and 0 < r["ssim"] <= 1 for r in boxed.rows)


def test_budget_sweep_rows_and_summary():
    model = tiny_net()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    liar = ConstantDefense(model, label=1)
    sweep = sweep_budgets([4 / 255, 16 / 255, None], 0.5)
    out = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3, max_linf=16 / 255,
                                                                         min_ssim=0.5),
                      skip_abstained=False, sweep=sweep)
    # one natural CERTIFY, one selection of every (image, target, budget), one judging CERTIFY per (image, budget)
    assert [c.shape[0] for c in liar.calls] == [3, 3 * 3 * 3, 3 * 3]
    for r in out.rows:
        assert [(e["max_linf"], e["min_ssim"]) for e in r["sweep"]] == [(4 / 255, 0.5), (16 / 255, 0.5), (None, None)]
        small, mid, free = r["sweep"]
        assert small["linf"] <= 4 / 255 + 1e-6 and mid["linf"] <= 16 / 255 + 1e-6
        assert {k: mid[k] for k in mid} == {k: r[k] for k in mid}  # the row's own budget is the sweep's 16/255
        for e in r["sweep"]:
            assert e["success"] == (e["spoofed_prediction"] != r["label"] and e["within_budget"])
            assert 0 < e["ssim"] <= 1
    s = summarize(out.rows)
    assert [e["label"] for e in s["sweep"]] == [b.label for b in sweep]
    assert [e["success_rate"] for e in s["sweep"]] == [pytest.approx(2 / 3)] * 3
    assert s["unbounded"]["success_rate"] == pytest.approx(2 / 3)
    assert s["sweep"][0]["linf_max"] <= 4 / 255 + 1e-6 and s["ssim_mean"] is not None
    # the liar labels every natural image 1: images 0 and 2 were certified wrong before any attack
    assert s["successes_natural_wrong"] == 2 and s["sweep"][2]["successes_natural_wrong"] == 2
    assert all(e["primary"] == (e["label"] == "ℓ∞ ≤ 16/255, SSIM ≥ 0.5") for e in s["sweep"])
    assert s["sweep"][1]["natural_radius_mean_successes"] == pytest.approx(1.0)  # the liar's radius, images 0, 2
    assert s["natural_radius_mean_attacked"] == pytest.approx(1.0) and s["natural_certified"] == 3
    # a primary budget the sweep does not name is listed in the sweep's table all the same
    out = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3, max_linf=8 / 255,
                                                                         min_ssim=0.5),
                      skip_abstained=False, sweep=sweep)
    s = summarize(out.rows)
    assert [e["label"] for e in s["sweep"]] == ["ℓ∞ ≤ 4/255, SSIM ≥ 0.5", "ℓ∞ ≤ 8/255, SSIM ≥ 0.5",
                                              "ℓ∞ ≤ 16/255, SSIM ≥ 0.5", "unbounded"]
    assert [e["primary"] for e in s["sweep"]] == [False, True, False, False]
    assert s["sweep"][1]["success_rate"] == s["success_rate"] and s["sweep"][1]["linf_max"] == s["linf_max"]


class NetDefense(Defense):
    """A deterministic defense whose certificate depends on the input: the tiny net's label, radius =
    its top-2 logit gap (a Lipschitz-1 certificate), and the matching differentiable margin."""

    norm = Norm.L2

    def __init__(self, model):
        super().__init__(model, 4)
        self.calls: list[torch.Tensor] = []

    def certify(self, x, *, seed=None, indices=None):
        self.calls.append(x.detach().clone())
        with torch.no_grad():
            top = self.model(x).topk(2, dim=1)
        return Certificates(top.indices[:, 0], (top.values[:, 0] - top.values[:, 1]).double(), Norm.L2)

    def margin(self, x, eps, target):
        z = self.model(x)
        other = z.masked_fill(F.one_hot(target, z.shape[1]).bool(), -math.inf).amax(dim=1)
        return z.gather(1, target[:, None])[:, 0] - other - eps


def test_images_without_a_target_are_not_attacked():
    """With candidates = {1}, image 1 (label 1) has no (image, target) pair: it is not attacked, is
    never judged on another image's candidate, and enters no spoof figure."""
    model = tiny_net()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    liar = ConstantDefense(model, label=1)
    for sweep in (None, sweep_budgets([8 / 255, None], 0.5)):
        liar.calls.clear()
        out = spoof_batch(liar, DefenseMargin(liar, 0.5), x, y, ShadowConfig(steps=2, channels=3), candidates=[1],
                          skip_abstained=False, sweep=sweep)
        n_bud = len({(b.max_linf, b.min_ssim) for b in (sweep or [])} | {(None, None)})
        assert [c.shape[0] for c in liar.calls] == [3, 2 * n_bud, 2 * n_bud]  # images 0 and 2 only
        row = out.rows[1]
        assert row["attacked"] is False and row["target"] is None and row["success"] is False
        assert row["spoofed_prediction"] is None and row["spoofed_radius"] is None and "sweep" not in row
        assert float(out.delta[1].abs().max()) == 0.0 and torch.equal(out.x_adv[1], x[1])
        assert [r["target"] for r in out.rows] == [1, None, 1]
        s = summarize(out.rows)
        assert s["attacked"] == 2 and s["successes"] == 2 and s["success_rate"] == 1.0
        if sweep is not None:
            assert all(e["attacked"] == 2 for e in s["sweep"])
    # no image with a target at all: nothing is attacked (no empty attack, no error)
    out = spoof_batch(liar, DefenseMargin(liar, 0.5), x[1:2], y[1:2], ShadowConfig(steps=2), candidates=[1],
                      skip_abstained=False)
    assert out.rows[0]["attacked"] is False and summarize(out.rows)["attacked"] == 0


def test_selection_refuses_a_group_without_candidates():
    from certaudit.audits.spoofing import _select

    group = np.array([0, 0, 2])
    ok = np.array([True, False, True])
    with pytest.raises(RuntimeError, match="no candidate"):
        _select(group, ok, ok, np.ones(3), np.zeros(3), 3)
    assert _select(np.array([0, 1, 1]), ok, ok, np.array([1.0, 0.5, 0.7]), np.zeros(3), 2) == [0, 2]


def test_each_budget_is_its_own_attack():
    """A budget's row is the same whether or not other budgets were swept with it (no candidate is
    borrowed), and the sweep's unbounded entry is the paper's attack run alone."""
    model = tiny_net(seed=3)
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(4)) * 0.6 + 0.2
    y = torch.tensor([0, 1, 2, 3])
    net = NetDefense(model)
    cfg = ShadowConfig(steps=6, channels=3, lr=0.5, max_linf=16 / 255, min_ssim=0.5)
    keys = ("target", "spoofed_prediction", "spoofed_radius", "success", "within_budget", "linf", "ssim")

    def run(config, sweep=None):
        return spoof_batch(net, DefenseMargin(net, 0.0), x, y, config, skip_abstained=False, sweep=sweep).rows

    alone = run(cfg)
    swept = run(cfg, sweep_budgets([4 / 255, 8 / 255, 64 / 255, None], 0.5))
    for a, b in zip(alone, swept):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys})
    paper = run(cfg.with_(max_linf=None, min_ssim=None))
    for a, b in zip(paper, swept):
        assert {k: a[k] for k in keys} == pytest.approx({k: b["sweep"][-1][k] for k in keys})


def test_budgeted_steps_keep_the_smooth_direction_and_start_feasible():
    """With the CROWN-IBP preset's lr = 200, an uncapped step lands every pixel on a corner of the ±τ
    box (a sign attack). Capped at τ/4 per step, the attack keeps its direction: on a small smooth
    RGB case fewer than half the pixels end at |δ| = τ; the start is feasible (SSIM ≥ s at the first
    step), every step moves δ by at most τ/4, the result is within the budget and not δ = 0, also
    from ``init = 0``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 4)).eval()
    ramp = torch.linspace(0.2, 0.8, 16)
    x = torch.stack([torch.stack([ramp[None, :].expand(16, 16), ramp[:, None].expand(16, 16),
                                  torch.full((16, 16), c)]) for c in (0.3, 0.6)])  # (2, 3, 16, 16), smooth
    tau, s = 16 / 255, 0.9
    for init in (0.5, 0.0):
        spy = StepSpy(net)
        cfg = ShadowConfig.crown_ibp(steps=12, init=init, max_linf=tau, min_ssim=s)
        res = shadow_attack(spy, x, torch.tensor([1, 2]), cfg, seed=0)
        assert bool((ssim(x, spy.seen[0]) >= s).all())  # feasible start
        for before, after in zip(spy.seen, spy.seen[1:]):
            assert float((after - before).abs().max()) <= tau / 4 + 1e-6
        at_corner = (res.delta.abs() >= tau - 1e-6).float().mean(dim=(1, 2, 3))
        assert bool((at_corner < 0.5).all()), at_corner
        assert bool(ssim_at_least(res.ssim, s).all()) and float(res.delta.abs().max()) <= tau + 1e-7
        assert bool((res.delta.flatten(1).abs().amax(dim=1) > tau / 8).all())  # it moved, from δ0 = 0 too


# ---------------------------------------------------------------- review fixes (issue 19, round 2)

def test_config_and_audit_settings_store_the_checked_numbers():
    """Numbers given as text are checked *and stored* as numbers: a ShadowConfig built with
    ``max_linf="16/255"`` holds 16/255 (the attack computes with it), and so do AuditSettings."""
    from certaudit.audits.pipeline import AuditSettings

    cfg = ShadowConfig(steps=3.0, lr="1/10", max_linf="16/255", min_ssim="0.9", lambda_ssim="5", init="0.25",
                       channels=3.0)
    assert (cfg.steps, cfg.lr, cfg.max_linf, cfg.min_ssim, cfg.lambda_ssim, cfg.init, cfg.channels) == (
        3, 0.1, 16 / 255, 0.9, 5.0, 0.25, 3)
    assert type(cfg.steps) is int and type(cfg.channels) is int and type(cfg.max_linf) is float
    assert cfg.budget == Budget(16 / 255, 0.9) and cfg.with_(lr="2").lr == 2.0
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    res = shadow_attack(StepSpy(tiny_net()), x, torch.tensor([1]), cfg, seed=0)  # no ValueError on a string
    assert float(res.delta.abs().max()) <= 16 / 255 + 1e-7
    s = AuditSettings(eps="0.25", alpha="1/1000", sigma="0.5", spoof_max_linf="16/255", spoof_min_ssim="0.9",
                      spoof_sweep=("8/255", None)).check()
    assert (s.eps, s.alpha, s.sigma, s.spoof_max_linf, s.spoof_min_ssim) == (0.25, 0.001, 0.5, 16 / 255, 0.9)
    assert s.spoof_sweep == (8 / 255, None)
    assert AuditSettings(eps=0.25, spoof_sweep="4/255,none").check().spoof_sweep == (4 / 255, None)
    for bad in ({"spoof_sweep": (4 / 255, 0.0156862745)}, {"spoof_sweep": ()}, {"spoof_max_linf": "2"},
                {"eps": "1" + "0" * 400}, {"alpha": "1"}):
        with pytest.raises(InputError):
            AuditSettings(**{"eps": 0.25, **bad}).check()


def test_sweep_entry_printed_like_the_primary_is_the_primary():
    """``--max-linf 0.0627451 --sweep-linf 16/255,none``: the sweep's 16/255 prints like the primary
    budget, so it is that budget (the primary's exact τ), attacked and listed once, marked primary."""
    primary = Budget(0.0627451, 0.9)
    assert primary != Budget(16 / 255, 0.9) and primary.label == Budget(16 / 255, 0.9).label
    sweep = sweep_budgets([16 / 255, None], 0.9, primary)
    assert sweep == [primary, Budget()]
    assert run_budgets(primary, sweep) == [primary, Budget()]
    assert sweep_budgets([8 / 255, None], 0.9, primary) == [Budget(8 / 255, 0.9), Budget()]  # nothing alike
    model = tiny_net()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    liar = ConstantDefense(model, label=1)
    out = spoof_batch(liar, DefenseMargin(liar, 0.5), x, torch.tensor([0, 1]),
                      ShadowConfig(steps=2, channels=3, max_linf=0.0627451, min_ssim=0.9), skip_abstained=False,
                      sweep=sweep)
    s = summarize(out.rows)
    assert [e["label"] for e in s["sweep"]] == ["ℓ∞ ≤ 16/255, SSIM ≥ 0.9", "unbounded"]
    assert [e["primary"] for e in s["sweep"]] == [True, False] and s["sweep"][0]["max_linf"] == 0.0627451
    assert [c.shape[0] for c in liar.calls] == [2, 2 * 3 * 2, 2 * 2]  # two budgets attacked, not three


def test_attack_returns_the_ssim_it_accepted_its_iterate_with(monkeypatch):
    """The SSIM of a kept feasible iterate is the value it was accepted with, not a recomputation. Simulated
    with an SSIM that reads 0.01 higher inside the objective (autograd on) than elsewhere: the returned SSIM
    of every bounded pair is the accepted one, so it satisfies the bound the attack checked."""
    import certaudit.attacks.shadow as shadow_mod

    real = shadow_mod.ssim
    monkeypatch.setattr(shadow_mod, "ssim", lambda a, b: real(a, b) + (0.01 if torch.is_grad_enabled() else 0.0))
    model = tiny_net()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(9)) * 0.6 + 0.2
    cfg = ShadowConfig(steps=10, lr=0.5, init=0.0, lambda_c=0.0, lambda_tv=0.0, min_ssim=0.95, lambda_ssim=2.0)
    res = shadow_attack(StepSpy(model), x, torch.tensor([1, 2]), cfg, seed=0)
    assert bool(ssim_at_least(res.ssim, 0.95).all())
    torch.testing.assert_close(res.ssim, real(x, res.x_adv) + 0.01)  # the accepted value, offset included


def test_judge_uses_the_ssim_the_attack_accepted(monkeypatch):
    """pytorch-msssim's SSIM of one pair of images differs in the last bits with the size of its batch.
    Simulated, enlarged: an SSIM that grows by 1e-3 per image in the batch, and the attack's batch of every
    (image, target, budget) is larger than any the judge would use. Every spoof the attack kept within the
    budget is still judged within it: the judge compares the SSIM the attack accepted, not its own."""
    import certaudit.attacks.budget as budget_mod
    import certaudit.attacks.shadow as shadow_mod

    real = budget_mod.ssim

    def batch_dependent(a, b):
        return real(a, b) + 1e-3 * a.shape[0]

    for mod in (budget_mod, shadow_mod):
        monkeypatch.setattr(mod, "ssim", batch_dependent)
    model = tiny_net(seed=3)
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(4)) * 0.6 + 0.2
    net = NetDefense(model)
    # only the spoofing loss and the SSIM hinge: the kept iterates end near the bound
    cfg = ShadowConfig(steps=8, channels=3, lr=2.0, init=0.0, lambda_c=0.0, lambda_tv=0.0, lambda_s=0.0,
                       max_linf=64 / 255, min_ssim=0.97, lambda_ssim=1.0)
    out = spoof_batch(net, DefenseMargin(net, 0.0), x, torch.tensor([0, 1, 2, 3]), cfg, skip_abstained=False,
                      sweep=sweep_budgets([32 / 255, None], 0.97))
    entries = [e for r in out.rows for e in [r, *r["sweep"]] if e["min_ssim"] is not None]
    assert len(entries) == 8  # the row's 64/255 and the sweep's 32/255, 4 images
    for e in entries:
        assert e["within_budget"] and ssim_at_least(e["ssim"], 0.97), e
    # a recomputation in a batch of 4 would have put them below the bound (what the judge used to do)
    assert bool((batch_dependent(x, out.x_adv) < 0.97).any())
