"""`certaudit spoof`: rows judged by a fresh CERTIFY, Table 1 summary, grid, resume, clear errors."""

from __future__ import annotations

import json

import pytest

from certaudit.cli import app, main
from certaudit.results import read_rows

pytestmark = pytest.mark.usefixtures("one_thread_module")

if "spoof" not in [c.name for c in app.registered_commands]:  # until cli.COMMAND_MODULES lists it
    from certaudit.commands import spoof as _spoof

    _spoof.register(app)

FAST = ["--steps", "12", "--samples", "16", "--n0", "20", "--n", "200", "--select-n", "40", "--alpha", "0.01",
        "--seed", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def gauss_model(tmp_path_factory):
    """A 2C2F trained with Gaussian noise (σ = 0.25) on the 8x8 digits."""
    path = tmp_path_factory.mktemp("models") / "digits_gauss.safetensors"
    rc = main(["train", "--dataset", "digits", "--arch", "2c2f", "--method", "gaussian", "--sigma", "0.25",
               "--epochs", "10", "--lr", "3e-3", "--device", "cpu", "--out", str(path), "--json"])
    assert rc == 0
    return path


def _spoof(model, *extra):
    return main(["spoof", "--model", str(model), "--defense", "smoothing", *FAST, *extra])


def test_spoof_writes_rows_summary_and_grid(gauss_model, tmp_path, capsys):
    out, grid = tmp_path / "rows.jsonl", tmp_path / "grid.png"
    capsys.readouterr()
    assert _spoof(gauss_model, "--limit", "6", "--stride", "7", "--out", str(out), "--grid", str(grid), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    header, rows = read_rows(out)
    assert header["config"]["settings"]["sigma"] == 0.25  # σ from the checkpoint
    assert header["config"]["shadow"]["channels"] == 1 and header["config"]["spoof_loss"]["samples"] == 16
    assert [r["index"] for r in rows] == [0, 7, 14, 21, 28, 35]
    for r in rows:
        assert r["natural_correct"] == (r["natural_prediction"] == r["label"])
        if r["attacked"]:
            assert r["target"] != r["label"] and r["candidates"] == 9
            assert sum(r["spoofed_counts"]) == 200  # judged by the full CERTIFY
            assert r["success"] == (r["spoofed_prediction"] not in (r["label"], -1))
            assert r["l2"] > 0 and r["linf"] > 0 and r["tv"] > 0 and r["dissim"] == 0.0
        else:
            assert r["natural_prediction"] == -1 and r["spoofed_prediction"] is None
        assert r["seconds"] > 0
    assert summary["images"] == 6 and summary["attacked"] == sum(r["attacked"] for r in rows)
    assert summary["success_rate"] == pytest.approx(sum(r["success"] for r in rows) / summary["attacked"])
    assert summary["success_rate"] >= 0.5  # the attack works on this model
    assert summary["natural_radius_mean"] > 0 and summary["shadow_radius_mean"] > 0
    assert grid.read_bytes()[:4] == b"\x89PNG"


def test_resume_gives_the_rows_of_an_uninterrupted_run(gauss_model, tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert _spoof(gauss_model, "--limit", "5", "--chunk", "5", "--out", str(full)) == 0
    assert _spoof(gauss_model, "--limit", "2", "--chunk", "1", "--out", str(part)) == 0  # "crashed" after 2 images
    with open(part, "a") as fh:
        fh.write('{"index": 2, "label": 1, "natu')  # torn last line
    assert _spoof(gauss_model, "--limit", "5", "--chunk", "2", "--out", str(part)) == 0
    _, a = read_rows(full)
    _, b = read_rows(part)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b]  # chunking changes nothing
    assert _spoof(gauss_model, "--limit", "5", "--channels", "3", "--out", str(part)) == 2  # other config: refused


def test_three_channels_on_grey_digits_reduce_to_one(gauss_model, tmp_path, capsys):
    capsys.readouterr()
    assert _spoof(gauss_model, "--limit", "2", "--channels", "3", "--noise", "fresh", "--optimizer", "adam",
                  "--lr", "0.05", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shadow"]["channels"] == 3 and summary["images"] == 2


@pytest.mark.parametrize("extra, needle", [
    (["--channels", "2"], "channels"),
    (["--steps", "0"], "steps"),
    (["--samples", "0"], "samples"),
    (["--lambda-tv", "-1"], "--lambda-tv"),
    (["--lambda-s", "-0.5"], "--lambda-s"),
    (["--lambda-c", "-2"], "--lambda-c"),
    (["--lr", "0"], "--lr"),
    (["--init", "-0.1"], "--init"),
    (["--optimizer", "lbfgs"], "optimizer"),
    (["--noise", "sometimes"], "noise"),
    (["--loss", "hinge"], "loss"),
    (["--targets", "3,x"], "targets"),
    (["--targets", "12"], "targets"),
    (["--preset", "imagenet"], "preset"),
    (["--stride", "0"], "stride"),
])
def test_bad_input_is_one_line_and_exit_2(gauss_model, extra, needle, capsys):
    capsys.readouterr()
    assert _spoof(gauss_model, "--limit", "1", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("certaudit: error:") and needle in err and "\n" not in err


def test_ce_loss_is_for_smoothing_only(gauss_model, capsys):
    rc = main(["spoof", "--model", str(gauss_model), "--defense", "lipschitz", "--loss", "ce", "--limit", "1",
               "--device", "cpu"])
    assert rc == 2


def test_help_lists_the_papers_options(capsys):
    with pytest.raises(SystemExit) as exc:
        app(["spoof", "--help"], prog_name="certaudit")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--channels", "--steps", "--samples", "--sigma", "--grid", "--lambda-tv", "--noise"):
        assert opt in text


# ------------------------------------------------------------------- perceptual budget (issue 19)

@pytest.mark.parametrize("extra, needle", [
    (["--max-linf", "0"], "--max-linf"),
    (["--max-linf", "-8/255"], "--max-linf"),
    (["--max-linf", "nan"], "--max-linf"),
    (["--max-linf", "inf"], "--max-linf"),
    (["--max-linf", "x"], "--max-linf"),
    (["--min-ssim", "0"], "--min-ssim"),
    (["--min-ssim", "1.5"], "--min-ssim"),
    (["--min-ssim", "-0.2"], "--min-ssim"),
    (["--min-ssim", "nan"], "--min-ssim"),
    (["--lambda-ssim", "-1", "--min-ssim", "0.9"], "--lambda-ssim must be >= 0"),
    (["--lambda-ssim", "5"], "--min-ssim"),  # a weight of a penalty that does not exist: refused, not ignored
    (["--lambda-ssim", "5", "--max-linf", "8/255"], "--min-ssim"),
    (["--max-linf", "2"], "--max-linf must lie in [1e-6, 1]"),  # the range the help and the docs state
    (["--max-linf", "1e-7"], "--max-linf must lie in [1e-6, 1]"),
    (["--min-ssim", "1.5"], "--min-ssim must lie in (0, 1]"),
    (["--sweep-linf", "0,8/255"], "--sweep-linf"),
    (["--sweep-linf", "8/255,,none"], "--sweep-linf"),
    (["--sweep-linf", "8/255,8/255"], "--sweep-linf"),
])
def test_bad_budget_is_one_line_and_exit_2(gauss_model, extra, needle, capsys):
    capsys.readouterr()
    assert _spoof(gauss_model, "--limit", "1", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("certaudit: error:") and needle in err and "\n" not in err


def test_budget_and_sweep_rows_summary_and_resume(gauss_model, tmp_path, capsys):
    out, grid = tmp_path / "rows.jsonl", tmp_path / "grid.png"
    budget = ["--max-linf", "16/255", "--min-ssim", "0.9", "--sweep-linf", "8/255,16/255,none"]
    capsys.readouterr()
    assert _spoof(gauss_model, "--limit", "4", *budget, "--out", str(out), "--grid", str(grid), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    header, rows = read_rows(out)
    assert header["config"]["shadow"]["max_linf"] == pytest.approx(16 / 255)
    assert header["config"]["shadow"]["min_ssim"] == 0.9 and header["config"]["row_format"] == 3
    assert [b["max_linf"] for b in header["config"]["sweep"]] == [pytest.approx(8 / 255), pytest.approx(16 / 255), None]
    for r in (r for r in rows if r["attacked"]):
        assert r["linf"] <= 16 / 255 + 1e-6 and 0 < r["ssim"] <= 1
        assert r["success"] == (r["spoofed_prediction"] not in (r["label"], -1) and r["within_budget"])
        assert len(r["sweep"]) == 3 and r["sweep"][0]["linf"] <= 8 / 255 + 1e-6
        assert r["sweep"][2]["max_linf"] is None and r["sweep"][2]["min_ssim"] is None
    assert summary["budget_label"] == "ℓ∞ ≤ 16/255, SSIM ≥ 0.9"
    assert [e["label"] for e in summary["sweep"]] == ["ℓ∞ ≤ 8/255, SSIM ≥ 0.9", "ℓ∞ ≤ 16/255, SSIM ≥ 0.9", "unbounded"]
    assert summary["ssim_mean"] is not None and summary["linf_max"] <= 16 / 255 + 1e-6
    assert summary["unbounded"]["success_rate"] == summary["sweep"][2]["success_rate"]
    # each budget is its own attack (no candidate borrowed): the row's budget is the sweep's 16/255 entry
    for r in (r for r in rows if r["attacked"]):
        assert {k: r["sweep"][1][k] for k in ("target", "spoofed_radius", "success", "linf", "ssim")} == \
            {k: r[k] for k in ("target", "spoofed_radius", "success", "linf", "ssim")}
    assert [e["primary"] for e in summary["sweep"]] == [False, True, False]
    assert grid.read_bytes()[:4] == b"\x89PNG"
    # a changed budget is refused, not mixed into these rows
    assert _spoof(gauss_model, "--limit", "4", "--max-linf", "8/255", "--min-ssim", "0.9", "--sweep-linf",
                  "8/255,16/255,none", "--out", str(out)) == 2
    assert _spoof(gauss_model, "--limit", "4", "--out", str(out)) == 2  # no budget: refused too
    assert _spoof(gauss_model, "--limit", "4", *budget, "--out", str(out)) == 0  # the same: resumes (nothing to do)


HUGE = "1" + "0" * 400  # beyond the float range: 10^400

HOSTILE_BUDGETS = [
    (["--max-linf", HUGE + "/1"], "--max-linf"),
    (["--max-linf", HUGE], "--max-linf"),
    (["--min-ssim", HUGE + "/3"], "--min-ssim"),
    (["--sweep-linf", "8/255," + HUGE + "/1"], "--sweep-linf"),
    (["--eps", HUGE + "/1"], "--eps"),
    (["--lr", HUGE + "/7"], "--lr"),
    (["--lambda-ssim", HUGE + "/1", "--min-ssim", "0.9"], "--lambda-ssim"),
    (["--init", "-" + HUGE + "/1"], "--init"),
    (["--max-linf", "1e308"], "--max-linf"),
    (["--max-linf", "2"], "--max-linf"),
    (["--max-linf", "1e20"], "--max-linf"),
    (["--max-linf", "1e-300"], "--max-linf"),
    (["--max-linf", "nan"], "--max-linf"),
    (["--min-ssim", "1e-300"], "--min-ssim"),
    (["--min-ssim", "nan"], "--min-ssim"),
    (["--min-ssim", "1e308"], "--min-ssim"),
    (["--sweep-linf", "1e308"], "--sweep-linf"),
    (["--sweep-linf", "8/255,2"], "--sweep-linf"),
    (["--sweep-linf", "1e-300,none"], "--sweep-linf"),
    (["--sweep-linf", "nan"], "--sweep-linf"),
    (["--sweep-linf", "0.0156862745,4/255"], "--sweep-linf"),  # two budgets labelled 4/255
    (["--sweep-linf", "0.1,0.10001"], "--sweep-linf"),  # two budgets labelled 0.1
    (["--sweep-linf", "none,inf"], "--sweep-linf"),
]


@pytest.mark.parametrize("extra, needle", HOSTILE_BUDGETS)
def test_hostile_budget_is_refused_before_anything_loads(tmp_path, extra, needle, capsys):
    """One line naming the flag, exit 2, before the model is read (the model path does not exist)."""
    capsys.readouterr()
    rc = main(["spoof", "--model", str(tmp_path / "missing.safetensors"), "--defense", "smoothing", *FAST, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("certaudit: error:") and needle in err and "\n" not in err, err
    assert len(err) < 300 and HUGE not in err, err  # a 400-digit input is shown shortened


@pytest.mark.parametrize("extra, needle", [
    (["--spoof-max-linf", HUGE + "/1"], "--spoof-max-linf"),
    (["--spoof-min-ssim", HUGE], "--spoof-min-ssim"),
    (["--spoof-sweep", HUGE + "/1,none"], "--spoof-sweep"),
    (["--spoof-max-linf", "1e308"], "--spoof-max-linf"),
    (["--spoof-max-linf", "2"], "--spoof-max-linf"),
    (["--spoof-max-linf", "1e-300"], "--spoof-max-linf"),
    (["--spoof-min-ssim", "1e-300"], "--spoof-min-ssim"),
    (["--spoof-sweep", "1e308"], "--spoof-sweep"),
    (["--spoof-sweep", "2"], "--spoof-sweep"),
    (["--spoof-sweep", "1e-300"], "--spoof-sweep"),
    (["--spoof-sweep", "nan"], "--spoof-sweep"),
    (["--spoof-sweep", "0.0156862745,4/255,none"], "--spoof-sweep"),
])
def test_hostile_audit_budget_is_refused_before_anything_loads(tmp_path, extra, needle, capsys):
    capsys.readouterr()
    rc = main(["audit", "--model", str(tmp_path / "missing.safetensors"), "--defense", "lipschitz", "--eps", "0.25",
               "--out", str(tmp_path / "a"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("certaudit: error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "a").exists()  # nothing ran


def test_image_whose_label_is_the_only_target_is_not_attacked(tmp_path, capsys):
    """--targets 6 and an image labelled 6: it has no (image, target) pair, so it is not attacked and is
    judged on no other image's spoof (the GloRo zoo model: deterministic, every image attacked else)."""
    from certaudit import zoo

    out = tmp_path / "rows.jsonl"
    capsys.readouterr()
    rc = main(["spoof", "--model", str(zoo.model_path("digits_gloro_eps")), "--defense", "lipschitz", "--eps", "0.25",
               "--dataset", "digits", "--limit", "3", "--steps", "2", "--targets", "6", "--device", "cpu",
               "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    _, rows = read_rows(out)
    assert [r["label"] for r in rows] == [4, 5, 6]
    odd = rows[2]
    assert odd["attacked"] is False and odd["target"] is None and odd["success"] is False
    assert odd["spoofed_prediction"] is None and odd["spoofed_radius"] is None and odd.get("candidates") is None
    assert all(r["attacked"] and r["target"] == 6 and r["candidates"] == 1 for r in rows[:2])
    assert summary["attacked"] == 2 and summary["successes"] == sum(r["success"] for r in rows[:2])
    assert summary["natural_radius_mean_attacked"] == pytest.approx(
        sum(r["natural_radius"] for r in rows[:2]) / 2)
    assert summary["l2_mean"] == pytest.approx(sum(r["l2"] for r in rows[:2]) / 2)


def test_sweep_entry_like_the_main_budget_is_merged_into_it(tmp_path, capsys):
    """``--max-linf 0.0627451 --sweep-linf 16/255,none``: 0.0627451 prints as 16/255, so the sweep's 16/255 is
    the main budget: one row of the sweep table per label, the main one marked primary, attacked once."""
    from certaudit import zoo

    out = tmp_path / "rows.jsonl"
    capsys.readouterr()
    rc = main(["spoof", "--model", str(zoo.model_path("digits_gloro_eps")), "--defense", "lipschitz", "--eps", "0.25",
               "--dataset", "digits", "--limit", "2", "--steps", "2", "--device", "cpu", "--max-linf", "0.0627451",
               "--min-ssim", "0.9", "--sweep-linf", "16/255,none", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["label"] for e in summary["sweep"]] == ["ℓ∞ ≤ 16/255, SSIM ≥ 0.9", "unbounded"]
    assert [e["primary"] for e in summary["sweep"]] == [True, False]
    assert summary["sweep"][0]["max_linf"] == 0.0627451  # the main budget's own τ
    header, rows = read_rows(out)
    assert [b["max_linf"] for b in header["config"]["sweep"]] == [0.0627451, None]
    assert all(len(r["sweep"]) == 2 for r in rows if r["attacked"])


def test_smoothing_spoof_writes_rows_in_small_blocks_by_default(gauss_model, tmp_path, monkeypatch):
    """Every image costs Monte Carlo CERTIFYs at every step: rows are written per block of at most 10
    images unless --chunk says otherwise (a whole-budget block wrote nothing for an hour on CIFAR)."""
    from certaudit.audits.session import Session

    seen, run = [], Session.run

    def spy(self, *args, **kwargs):
        seen.append(kwargs["block"])
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Session, "run", spy)
    assert _spoof(gauss_model, "--limit", "1", "--out", str(tmp_path / "a.jsonl")) == 0
    assert _spoof(gauss_model, "--limit", "1", "--chunk", "37", "--out", str(tmp_path / "b.jsonl")) == 0
    assert 1 <= seen[0] <= 10 and seen[1] == 37
