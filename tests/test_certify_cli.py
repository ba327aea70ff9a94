"""`certaudit certify`: rows as produced, resume after a crash, summary, clear errors."""

from __future__ import annotations

import json

import pytest

from certaudit.audits.certified import certified_accuracy, rejection_rate, summarize
from certaudit.cli import main
from certaudit.results import read_rows

COMMON = ["--n0", "20", "--n", "400", "--alpha", "0.01", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def gauss_model(tmp_path_factory):
    """A 2C2F trained with Gaussian noise (σ = 0.25) on the 8x8 digits, a few seconds on CPU."""
    path = tmp_path_factory.mktemp("models") / "digits_gauss.safetensors"
    rc = main(["train", "--dataset", "digits", "--arch", "2c2f", "--method", "gaussian", "--sigma", "0.25",
               "--epochs", "15", "--lr", "3e-3", "--device", "cpu", "--out", str(path), "--json"])
    assert rc == 0
    return path


def _certify(model, out, *extra):
    return main(["certify", "--model", str(model), "--defense", "smoothing", *COMMON, "--out", str(out), *extra])


def test_certify_writes_one_row_per_image_and_a_summary(gauss_model, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    capsys.readouterr()
    assert _certify(gauss_model, out, "--limit", "24", "--eps", "0.25", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    header, rows = read_rows(out)
    assert header["config"]["settings"]["sigma"] == 0.25  # σ from the checkpoint
    assert [r["index"] for r in rows] == list(range(24))
    for r in rows:
        assert sum(r["counts"]) == 400 and sum(r["counts_selection"]) == 20
        assert r["correct"] == (r["prediction"] == r["label"])
        assert r["radius"] == 0.0 if r["prediction"] == -1 else r["radius"] > 0.0
        assert r["seconds"] > 0
    assert summary["images"] == 24
    assert summary["clean_accuracy"] == pytest.approx(certified_accuracy(rows, 0.0))
    assert summary["clean_accuracy"] > 0.3  # the model is trained: the smoothed classifier works
    assert summary["vra_eps"] == pytest.approx(certified_accuracy(rows, 0.25))
    assert summary["vra_2eps"] == pytest.approx(certified_accuracy(rows, 0.5))
    assert summary["rejection_rate_eps"] == pytest.approx(rejection_rate(rows, 0.25))
    accs = [c["accuracy"] for c in summary["certified_accuracy"]]
    assert accs == sorted(accs, reverse=True)  # certified accuracy falls with the radius
    assert summary["samples_per_second_this_run"] > 0


def test_resume_after_a_crash_gives_the_rows_of_an_uninterrupted_run(gauss_model, tmp_path, capsys):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert _certify(gauss_model, full, "--limit", "12", "--chunk", "5") == 0
    assert _certify(gauss_model, part, "--limit", "7", "--chunk", "3") == 0  # the run "crashed" after 7 images
    with open(part, "a") as fh:
        fh.write('{"index": 7, "label": 1, "predic')  # torn last line
    capsys.readouterr()
    assert _certify(gauss_model, part, "--limit", "12", "--chunk", "4", "--batch-size", "96") == 0
    assert "resuming" in capsys.readouterr().err
    _, rows_full = read_rows(full)
    _, rows_part = read_rows(part)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_part) == strip(rows_full)  # same noise per image whatever the chunking/batch size


def test_skip_and_radii_and_table_output(gauss_model, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert _certify(gauss_model, out, "--skip", "100", "--limit", "5", "--radii", "0,1/8,0.5") == 0
    text = capsys.readouterr().out
    assert "certified accuracy" in text and "0.125" in text and "abstention rate" in text
    _, rows = read_rows(out)
    assert [r["index"] for r in rows] == [100, 101, 102, 103, 104]


def test_a_different_configuration_refuses_to_mix_rows(gauss_model, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert _certify(gauss_model, out, "--limit", "2") == 0
    capsys.readouterr()
    assert _certify(gauss_model, out, "--limit", "2", "--sigma", "0.5") == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--n", "0"], "n must be"),
    (["--n0", "0"], "n0 must be"),
    (["--alpha", "1.5"], "alpha"),
    (["--sigma", "0"], "sigma"),
    (["--defense", "magic"], "unknown defense"),
    (["--precision", "fp8"], "precision"),
    (["--limit", "0"], "--limit"),
    (["--skip", "100000"], "past the end"),
    (["--radii", "0,-1"], "--radii"),
    (["--eps", "0"], "--eps"),
    (["--dataset", "cifar10"], "expects inputs"),
    (["--method", "ibp"], "--defense interval only"),
])
def test_bad_input_is_one_line_and_exit_2(gauss_model, tmp_path, capsys, extra, needle):
    capsys.readouterr()
    rc = main(["certify", "--model", str(gauss_model), *COMMON, "--limit", "2", "--out", str(tmp_path / "r.jsonl"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_missing_sigma_on_a_standard_model(tmp_path, capsys):
    path = tmp_path / "std.safetensors"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--out", str(path), "--json"]) == 0
    capsys.readouterr()
    assert main(["certify", "--model", str(path), *COMMON, "--limit", "1"]) == 2
    assert "--sigma" in capsys.readouterr().err


def test_summary_of_hand_made_rows():
    rows = [
        {"index": 0, "label": 1, "prediction": 1, "radius": 0.6, "seconds": 0.5},
        {"index": 1, "label": 2, "prediction": -1, "radius": 0.0, "seconds": 0.5},
        {"index": 2, "label": 0, "prediction": 3, "radius": 0.9, "seconds": 0.5},
        {"index": 3, "label": 0, "prediction": 0, "radius": 0.2, "seconds": 0.5},
    ]
    s = summarize(rows, [0, 0.25, 0.5, 1.0], eps=0.25)
    assert [c["accuracy"] for c in s["certified_accuracy"]] == [0.5, 0.25, 0.25, 0.0]
    assert s["clean_accuracy"] == 0.5 and s["abstain_rate"] == 0.25
    assert s["vra_eps"] == 0.25 and s["vra_2eps"] == 0.25
    assert s["rejection_rate_eps"] == 0.5  # the abstention and the radius-0.2 image
    assert s["images_per_second"] == 2.0


def test_plot_of_certified_accuracy_against_radius(gauss_model, tmp_path, capsys):
    from certaudit.audits.certified import accuracy_curve

    out, png = tmp_path / "r.jsonl", tmp_path / "curve.png"
    assert _certify(gauss_model, out, "--limit", "6", "--eps", "0.25", "--plot", str(png), "--json") == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    _, rows = read_rows(out)
    grid, acc = accuracy_curve(rows)
    for r, a in zip(grid, acc):  # the plotted curve is the certified accuracy, radius by radius
        assert a == pytest.approx(certified_accuracy(rows, float(r)))
    assert _certify(gauss_model, out, "--limit", "6", "--plot", str(tmp_path / "curve.txt")) == 2
    assert "--plot" in capsys.readouterr().err


def test_interval_method_is_chosen_and_ibp_certifies_no_more_than_crown(gauss_model, tmp_path, capsys):
    radii = {}
    for method in ("ibp", "crown"):
        out = tmp_path / f"{method}.jsonl"
        assert main(["certify", "--model", str(gauss_model), "--defense", "interval", "--method", method,
                     "--device", "cpu", "--limit", "4", "--out", str(out), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["settings"]["method"] == method
        radii[method] = [r["radius"] for r in read_rows(out)[1]]
    # CROWN is never looser than IBP (radii within the bisection tolerance of 1e-3)
    assert all(c >= i - 1e-3 for c, i in zip(radii["crown"], radii["ibp"]))
    assert main(["certify", "--model", str(gauss_model), "--defense", "interval", "--method", "bogus",
                 "--device", "cpu", "--limit", "1"]) == 2
