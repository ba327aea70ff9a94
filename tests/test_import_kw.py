"""`certaudit import --format kw`: Wong & Kolter's ℓ∞ models (single 2C2F and cascade stages).

Claims: the imported model computes the same function as their network (with their CIFAR input
normalization moved into the model, so ε is in pixel space); the bound of the imported model at
pixel ε equals Wong & Kolter's own dual bound at ε/std in their normalized space (the oracle,
on images whose ε-box stays inside [0, 1] so clipping plays no part); the checkpoint then
certifies through `certaudit certify --defense interval`; bad requests are one-line errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from certaudit.cli import main
from certaudit.models import load_checkpoint
from conftest import shared_path


def _kw_net(in_ch: int, side: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    flat = 32 * (side // 4) ** 2
    return nn.Sequential(nn.Conv2d(in_ch, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, 10)).eval()


def _their_cifar_input(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    return (x - mean) / 0.225


def test_import_kw_single_model_through_the_cli(tmp_path, capsys):
    theirs = _kw_net(1, 28, 0)
    path = tmp_path / "fashion_mnist.pth"
    torch.save(theirs.state_dict(), path)
    out = tmp_path / "fm.safetensors"
    assert main(["import", "--format", "kw", str(path), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dataset"] == "fashion-mnist" and res["eps"] == 0.1 and res["norm"] == "linf" and res["stage"] == 0
    model, meta = load_checkpoint(out)
    assert meta.method == "kw" and meta.eps == 0.1 and meta.training["reported"]["clean_error"] == 0.2173
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(x), atol=1e-6)


def test_import_kw_cascade_stage_with_normalization_and_pixel_eps(tmp_path, capsys):
    stages = [_kw_net(3, 32, s) for s in range(3)]
    path = tmp_path / "cifar_small_8px.pth"
    torch.save({"state_dict": [s.state_dict() for s in stages], "err": 0.7171, "epoch": 20,
                "sampler_indices": [torch.arange(5), torch.arange(3)]}, path)
    for stage in (0, 2):
        out = tmp_path / f"s{stage}.safetensors"
        args = ["import", "--format", "kw", str(path), "--dataset", "cifar10", "--out", str(out), "--json"]
        assert main(args + ([] if stage == 0 else ["--stage", str(stage)])) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["stage"] == stage and res["eps"] == pytest.approx(8 / 255)
        assert res["mean"] == pytest.approx([0.485, 0.456, 0.406]) and res["std"] == pytest.approx([0.225] * 3)
        model, meta = load_checkpoint(out)
        assert meta.training["cascade_stages"] == 3 and ("note" in meta.training) == (stage > 0)
        x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(stage))
        with torch.no_grad():
            assert torch.allclose(model(x), stages[stage](_their_cifar_input(x)), atol=1e-5)
    # --eps overrides the recorded radius (pixel space)
    out = tmp_path / "e.safetensors"
    assert main(["import", "--format", "kw", str(path), "--dataset", "cifar10", "--eps", "2/255", "--out", str(out)]) == 0
    assert load_checkpoint(out)[1].eps == pytest.approx(2 / 255)


def test_bad_kw_imports_are_one_line_errors(tmp_path, capsys):
    single = tmp_path / "fashion_mnist.pth"
    torch.save(_kw_net(1, 28, 0).state_dict(), single)
    cascade = tmp_path / "cifar_small_8px.pth"
    torch.save({"state_dict": [_kw_net(3, 32, s).state_dict() for s in range(3)]}, cascade)
    odd = tmp_path / "model.pth"
    torch.save(_kw_net(1, 28, 0).state_dict(), odd)
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["import", "--format", "kw", str(cascade), "--stage", "3", "--out", out], "stage 3 does not exist"),
        (["import", "--format", "kw", str(cascade), "--stage", "-1", "--out", out], "--stage"),
        (["import", "--format", "kw", str(single), "--stage", "1", "--out", out], "single model"),
        (["import", "--format", "kw", str(single), "--dataset", "cifar10", "--out", out], "channel"),
        (["import", "--format", "kw", str(single), "--sigma", "0.25", "--out", out], "sigma"),
        (["import", "--format", "kw", str(single), "--eps", "-0.1", "--out", out], "--eps"),
        (["import", "--format", "kw", str(odd), "--out", out], "--dataset"),
        (["import", "--format", "cohen", str(single), "--stage", "0", "--sigma", "0.25", "--out", out], "kw only"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o.safetensors").exists()


def test_published_fashion_mnist_model_imports_and_certifies_through_the_cli(tmp_path, capsys):
    path = shared_path("models", "kw", "fashion_mnist.pth")
    from certaudit.data import load_dataset
    from certaudit.errors import DataNotFoundError

    try:
        load_dataset("fashion-mnist", "test", download=False)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST test set not available")
    out = tmp_path / "kw_fmnist.safetensors"
    assert main(["import", "--format", "kw", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    rows = tmp_path / "rows.jsonl"
    argv = ["certify", "--model", str(out), "--defense", "interval", "--eps", "0.1", "--limit", "3",
            "--out", str(rows), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(s) for s in rows.read_text().splitlines()[1:]]
    # the VRA at ε is the CROWN check at exactly ε (two bound evaluations, no bisection radius)
    assert len(lines) == 3 and all(r["radius"] is None and r["evaluations"] == 2 for r in lines)
    assert summary["vra_eps"] == pytest.approx(
        sum(r["label"] == r["prediction"] and r["certified_at"][repr(0.1)] for r in lines) / 3)
    assert summary["vra_eps"] > 0  # the first test images are verified at 0.1 (about 65% over the test set)


def test_published_cifar_cascade_stage0_matches_the_oracle_in_pixel_space(tmp_path):
    """Stage 0 of the 8px cascade: our CROWN with Wong & Kolter's relaxation at ε = 8/255 on [0, 1]
    images equals their dual bound at 8/255/0.225 on their normalized images (boxes inside [0, 1])."""
    path = shared_path("models", "kw", "cifar_small_8px.pth")
    ca = pytest.importorskip("convex_adversarial")
    from certaudit.defenses.interval import compile_network, convert_kw, spec_bounds, specification
    from certaudit.models import read_state_dict

    model, meta = convert_kw(path, "cifar10", stage=0)
    assert meta.eps == pytest.approx(8 / 255)
    theirs = _kw_net(3, 32, 0)
    theirs.load_state_dict(read_state_dict(path)["state_dict"][0])
    eps = 8 / 255
    x = 0.1 + 0.8 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # boxes stay in [0, 1]
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(_their_cifar_input(x)), atol=1e-5)
        y = model(x).argmax(1)
        c, _ = specification(y, 10, x.dtype)
        ref = ca.DualNetwork(theirs, _their_cifar_input(x), eps / 0.225, bounded_input=False)(c).double()
        net = compile_network(model, (3, 32, 32))
        ours = spec_bounds(net, x, eps, c, "crown", pure=True, lower_slope="parallel", sound=False)
        sound = spec_bounds(net, x, eps, c, "crown", pure=True, lower_slope="parallel")
    assert torch.allclose(ours.double(), ref, atol=2e-4, rtol=1e-4)
    assert bool((sound <= ref + 1e-6).all())
