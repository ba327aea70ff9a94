"""`certaudit degrade`: rows per image, resume, summary that matches the rows, logs, clear errors."""

from __future__ import annotations

import json

import pytest

from certaudit.audits.degradation import summarize_degradation
from certaudit.cli import main
from certaudit.results import read_rows

pytestmark = pytest.mark.usefixtures("one_thread_module")

COMMON = ["--defense", "lipschitz", "--eps", "0.1", "--device", "cpu", "--steps", "10"]


@pytest.fixture(scope="module")
def gloro_model(tmp_path_factory):
    """A GloRo 2C2F on the 8x8 digits (ε = 0.3), about a second on CPU."""
    path = tmp_path_factory.mktemp("models") / "digits_gloro.safetensors"
    rc = main(["train", "--dataset", "digits", "--arch", "2c2f", "--method", "gloro", "--eps", "0.3",
               "--epochs", "5", "--device", "cpu", "--out", str(path), "--json"])
    assert rc == 0
    return path


def _degrade(model, out, *extra):
    return main(["degrade", "--model", str(model), *COMMON, "--out", str(out), *extra])


def test_rows_and_summary(gloro_model, tmp_path, capsys):
    out, png = tmp_path / "rows.jsonl", tmp_path / "fpr.png"
    capsys.readouterr()
    assert _degrade(gloro_model, out, "--limit", "60", "--attack", "all", "--exhaustive", "--plot", str(png),
                    "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    header, rows = read_rows(out)
    assert header["config"]["attacks"] == ["pgd", "pgd-2eps", "margin"]
    assert [r["index"] for r in rows] == list(range(60))
    for r in rows:
        assert set(r) >= {"index", "label", "certified", "certified_2eps", "degraded_by", "distance", "seconds"}
        if r["certified_2eps"]:
            assert r["certified"]
        if r["degraded_by"] is not None:
            assert r["certified"] and 0 <= r["distance"] <= 0.1 * (1 + 1e-5)
            assert not r["certified_2eps"]  # Appendix A: GloRo is monotone
    again = summarize_degradation(rows, 0.1)
    for key in ("testR", "testA_lower", "testA_upper", "fpr_lower", "fpr_upper", "vra_eps", "vra_2eps"):
        assert summary[key] == again[key]
    assert summary["testR"] > 0 and summary["testA_lower"] <= summary["testA_upper"]
    assert summary["invariant"]["lower_subset_upper"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_a_crash(gloro_model, tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert _degrade(gloro_model, full, "--limit", "32", "--chunk", "8") == 0
    assert _degrade(gloro_model, part, "--limit", "16", "--chunk", "8") == 0  # "crashed" after 16 images
    with open(part, "a") as fh:
        fh.write('{"index": 16, "label": 1, "certif')  # torn last line
    assert _degrade(gloro_model, part, "--limit", "32", "--chunk", "8") == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_rows(part)[1]) == strip(read_rows(full)[1])
    # another configuration is refused, not mixed in
    assert _degrade(gloro_model, part, "--limit", "32", "--chunk", "8", "--attack", "pgd") == 2


def test_from_log_reads_our_rows_and_cohen_logs(gloro_model, tmp_path, capsys):
    rows_file = tmp_path / "cert.jsonl"
    assert main(["certify", "--model", str(gloro_model), "--defense", "lipschitz", "--device", "cpu",
                 "--limit", "50", "--out", str(rows_file)]) == 0
    capsys.readouterr()
    assert main(["degrade", "--from-log", str(rows_file), "--eps", "0.1", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    _, rows = read_rows(rows_file)
    correct = [r for r in rows if r["prediction"] == r["label"]]
    assert ours["format"] == "certaudit" and ours["test"] == 50
    assert ours["testR"] == sum(r["radius"] >= 0.1 for r in correct)
    assert ours["testA_2eps_check"] == sum(0.1 <= r["radius"] < 0.2 for r in correct)
    log = tmp_path / "sigma_0.50"
    log.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                   "0\t3\t3\t1.2\t1\t0:00:09.1\n1\t8\t8\t0.7\t1\t0:00:09.2\n2\t0\t-1\t0.0\t0\t0:00:09.0\n")
    png = tmp_path / "curve.png"
    assert main(["degrade", "--from-log", str(log), "--eps", "0.5", "--radii", "0.25,0.5,1", "--plot", str(png),
                 "--json"]) == 0
    cohen = json.loads(capsys.readouterr().out)
    assert cohen["format"] == "cohen" and (cohen["testR"], cohen["testA_2eps_check"]) == (2, 1)
    assert [p["fpr_2r_check"] for p in cohen["fpr_curve"]] == [0.0, 0.5, 1.0]
    assert png.exists()
    # several logs: one summary each, one plot with a curve per log (Fig. 2 style)
    assert main(["degrade", "--from-log", str(log), "--from-log", str(rows_file), "--eps", "0.1", "--plot", str(png),
                 "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [s["format"] for s in both["logs"]] == ["cohen", "certaudit"]
    assert both["logs"][1]["testR"] == ours["testR"]


@pytest.mark.parametrize("args", [
    ["--attack", "spgd"],  # SPGD needs a smoothed model
    ["--attack", "cw"],
    ["--eps", "-1"],
    ["--limit", "0"],
    ["--from-log", "nowhere.tsv"],  # with --model: refused
    ["--proofs", "bab"],  # not a proof of the lipschitz defense
    ["--proofs", ""],
    ["--proofs", "all,bab"],
    ["--proofs", "2eps,,local"],
    ["--proof-budget", "5"],  # without the branch-and-bound proof: nothing to budget
    ["--proof-budget", "0"],
    ["--proof-budget", "nan"],
    ["--upper-n", "1000"],  # the sequential 2ε check is smoothing's
])
def test_bad_input_is_one_line_exit_2(gloro_model, tmp_path, capsys, args):
    capsys.readouterr()
    assert _degrade(gloro_model, tmp_path / "x.jsonl", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("certaudit: error:") and "\n" not in err


def test_needs_model_or_log(capsys):
    assert main(["degrade", "--eps", "0.3"]) == 2
    assert main(["degrade", "--from-log", "/nonexistent/log", "--eps", "0.3"]) == 2


def test_branch_and_bound_keeps_json_clean(gloro_model, tmp_path, capfd):
    """HiGHS prints a banner on the C-level stdout; with --json the output must still be one JSON object."""
    pytest.importorskip("highspy")
    capfd.readouterr()
    assert _degrade(gloro_model, tmp_path / "bab.jsonl", "--limit", "6", "--proofs", "all", "--proof-budget", "1",
                    "--json") == 0
    summary = json.loads(capfd.readouterr().out)
    br = summary["bracket"]
    assert summary["proofs"] == ["2eps", "local", "milp"]
    assert br["degraded"] + br["proven"] + br["undecided"] == summary["testR"]
