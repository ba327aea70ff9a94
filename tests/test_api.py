"""The one-call Python API (`certaudit.audit`) and the CLI's `--model package.module:function --weights`."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import certaudit
from certaudit import zoo
from certaudit.cli import main
from certaudit.errors import InputError
from certaudit.models import load_checkpoint

FACTORY = '''
from certaudit.models import build_model


def make():
    return build_model("2c2f", [1, 8, 8], 10, [0.0], [1.0])


def not_a_module():
    return 42


def broken():
    raise ValueError("bad layer width")
'''


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_arch.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_arch"
    sys.modules.pop("my_arch", None)


def test_one_call_audit_matches_the_cli_and_writes_the_report(tmp_path, capsys):
    path = zoo.model_path("digits_gloro_eps")
    net, _ = load_checkpoint(path)
    x, y = zoo.load_data()
    kw = dict(defense="lipschitz", eps=0.25, stages=("clean", "certify", "degrade"), attack="margin",
              attack_steps=5, chunk=16)
    summary = certaudit.audit(net, x[:24], y[:24], out=tmp_path / "api", **kw)
    assert (tmp_path / "api" / "report.html").is_file() and (tmp_path / "api" / "summary.json").is_file()
    h = summary["headline"]
    assert h["images"] == 24 and 0 < h["vra_eps"] <= h["clean_accuracy"] <= 1
    # the same audit through the CLI on the checkpoint gives the same headline figures
    assert main(["audit", "--model", str(path), "--defense", "lipschitz", "--eps", "0.25", "--dataset", "digits",
                 "--limit", "24", "--stages", "clean,certify,degrade", "--attack", "margin", "--attack-steps", "5",
                 "--chunk", "16", "--out", str(tmp_path / "cli"), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    for key in ("clean_accuracy", "vra_eps", "vra_2eps", "testR", "testA_lower", "fpr_lower", "fpr_upper"):
        assert cli[key] == pytest.approx(h[key]), key  # --json prints the headline
    # rerun: resumes, nothing new, same figures
    again = certaudit.audit(net, x[:24], y[:24], out=tmp_path / "api", **kw)
    assert again["headline"] == h
    assert all(t["new_images"] == 0 for t in again["timings"]["stages"].values())
    # other weights into the same folder are refused, not mixed
    other, _ = load_checkpoint(zoo.model_path("digits_gloro_2eps"))
    with pytest.raises(InputError):
        certaudit.audit(other, x[:24], y[:24], out=tmp_path / "api", **kw)


def test_one_call_audit_refuses_bad_input(tmp_path):
    net, _ = load_checkpoint(zoo.model_path("digits_gaussian"))
    x, y = zoo.load_data()
    with pytest.raises(InputError, match="sigma"):
        certaudit.audit(net, x[:4], y[:4], defense="smoothing", eps=0.25, out=tmp_path / "a")
    with pytest.raises(InputError, match="unknown audit setting"):
        certaudit.audit(net, x[:4], y[:4], defense="smoothing", eps=0.25, sigma=0.25, out=tmp_path / "a", n_samples=3)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        certaudit.audit(net, x[:4] * 2, y[:4], defense="smoothing", eps=0.25, sigma=0.25, out=tmp_path / "a")
    with pytest.raises(InputError, match="eps"):
        certaudit.audit(net, x[:4], y[:4], defense="smoothing", eps=0, sigma=0.25, out=tmp_path / "a")
    with pytest.raises(InputError, match="unknown defense"):
        certaudit.audit(net, x[:4], y[:4], defense="magic", eps=0.1, out=tmp_path / "a")


def test_factory_model_with_weights_certifies_like_the_checkpoint(factory_module, tmp_path, capsys):
    path = zoo.model_path("digits_gloro_eps")
    common = ["--defense", "lipschitz", "--eps", "0.25", "--dataset", "digits", "--limit", "40", "--device", "cpu",
              "--json"]
    assert main(["certify", "--model", str(path), *common]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["certify", "--model", f"{factory_module}:make", "--weights", str(path), *common]) == 0
    got = json.loads(capsys.readouterr().out)
    for key in ("clean_accuracy", "vra_eps", "vra_2eps", "rejection_rate_eps"):
        assert got[key] == pytest.approx(ref[key]), key
    # a state dict saved by torch.save is read with weights_only=True
    net, _ = load_checkpoint(path)
    pt = tmp_path / "w.pt"
    torch.save(net.state_dict(), pt)
    assert main(["certify", "--model", f"{factory_module}:make", "--weights", str(pt), *common]) == 0
    assert json.loads(capsys.readouterr().out)["vra_eps"] == pytest.approx(ref["vra_eps"])


@pytest.mark.parametrize("args, needle", [
    (["--model", "my_arch:make", "--dataset", "digits"], "--weights"),
    (["--model", "my_arch:make", "--weights", "W"], "--dataset"),
    (["--model", "no_such_module_xyz:make", "--weights", "W", "--dataset", "digits"], "cannot import"),
    (["--model", "my_arch:missing", "--weights", "W", "--dataset", "digits"], "no function"),
    (["--model", "my_arch:not_a_module", "--weights", "W", "--dataset", "digits"], "not a torch.nn.Module"),
    (["--model", "my_arch:broken", "--weights", "W", "--dataset", "digits"], "raised ValueError"),
    (["--model", "my_arch:make", "--weights", "W", "--dataset", "fashion-mnist"], "cannot take"),
    (["--model", "my arch:make", "--weights", "W", "--dataset", "digits"], "factory"),
])
def test_factory_model_errors_are_one_line_exit_2(factory_module, tmp_path, capsys, args, needle):
    path = str(zoo.model_path("digits_gloro_eps"))
    args = [path if a == "W" else a for a in args]
    rc = main(["certify", "--defense", "lipschitz", "--eps", "0.25", "--limit", "2", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_factory_weights_that_do_not_match_are_refused(factory_module, tmp_path, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"nope": torch.zeros(3)}, str(bad))
    rc = main(["certify", "--model", "my_arch:make", "--weights", str(bad), "--dataset", "digits",
               "--defense", "lipschitz", "--eps", "0.25", "--limit", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "do not match" in err


def test_the_weights_hash_covers_zero_dim_buffers_and_changes_with_the_weights():
    """ResNets carry 0-dim BatchNorm counters; the audit folder is bound to the weights by this hash."""
    from certaudit.api import weights_sha256
    from certaudit.models import build_model

    m = build_model("resnet20", [3, 32, 32], 10, [0.5] * 3, [0.25] * 3)
    h = weights_sha256(m)
    assert h == weights_sha256(m) and len(h) == 64
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1.0
    assert weights_sha256(m) != h
