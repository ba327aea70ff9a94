import json

import pytest

from certaudit.cli import main


def _run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "digits.safetensors"
    rc = main(["train", "--dataset", "digits", "--arch", "2c2f", "--method", "gaussian", "--sigma", "0.25",
               "--epochs", "8", "--lr", "3e-3", "--batch-size", "64", "--out", str(path), "--json"])
    assert rc == 0
    return path


def test_train_and_evaluate_json(trained, capsys):
    rc, out, _ = _run(capsys, "evaluate", "--model", str(trained), "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["dataset"] == "digits" and res["images"] == 360 and res["clean_accuracy"] > 0.5
    rc, out, _ = _run(capsys, "evaluate", "--model", str(trained), "--limit", "10")
    assert rc == 0 and "clean accuracy" in out


def test_help_on_every_verb(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for verb in ("train", "evaluate", "demo"):
        assert verb in out
        rc, out2, _ = _run(capsys, verb, "--help")
        assert rc == 0 and "--" in out2


@pytest.mark.parametrize("args, needle", [
    (["train", "--dataset", "nope", "--out", "x.safetensors"], "unknown dataset"),
    (["train", "--dataset", "digits", "--arch", "vgg", "--out", "x.safetensors", "--epochs", "1"], "unknown architecture"),
    (["train", "--dataset", "digits", "--method", "gaussian", "--sigma", "-1", "--out", "x.safetensors"], "sigma"),
    (["train", "--dataset", "digits", "--method", "gaussian", "--sigma", "nan", "--out", "x.safetensors"], "finite"),
    (["train", "--dataset", "digits", "--epochs", "-3", "--out", "x.safetensors"], "epochs"),
    (["train", "--dataset", "digits", "--limit", "0", "--out", "x.safetensors"], "--limit"),
    (["evaluate", "--model", "/nonexistent/model.safetensors"], "not found"),
    (["evaluate"], "--model"),
    (["frobnicate"], "No such command"),
    (["train", "--dataset", "digits", "--out", "x.safetensors", "--epochs", "many"], "epochs"),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certaudit: error:"), err
    assert needle.lower() in lines[0].lower()


def test_corrupt_model_file_gives_exit_2(tmp_path, capsys, trained):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(trained.read_bytes()[:500])
    rc, _, err = _run(capsys, "evaluate", "--model", str(bad))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    pickled = tmp_path / "model.pth"
    pickled.write_bytes(b"\x80\x04garbage")
    rc, _, err = _run(capsys, "evaluate", "--model", str(pickled))
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_wrong_dataset_for_model(trained, capsys):
    rc, _, err = _run(capsys, "evaluate", "--model", str(trained), "--dataset", "cifar10")
    assert rc == 2 and "expects inputs" in err


def test_train_method_options_reach_the_method(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    common = ["train", "--dataset", "digits", "--epochs", "1", "--limit", "64", "--device", "cpu", "--out", str(out)]
    assert main([*common, "--method", "gloro", "--eps", "0.1", "--eps-warmup", "0.5", "--option", "trades=0.5",
                 "--json"]) == 0
    assert main([*common, "--method", "gloro", "--eps", "0.1", "--option", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main([*common, "--method", "gaussian", "--sigma", "0.25", "--option", "trades=1"]) == 2
    assert main([*common, "--method", "gloro", "--eps", "0.1", "--option", "trades"]) == 2
    assert main([*common, "--method", "gloro", "--eps", "0.1", "--eps-warmup", "2"]) == 2
