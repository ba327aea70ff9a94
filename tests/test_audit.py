"""The one-command audit: files written, summary schema, resume after a crash, CLI, the zoo."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from certaudit import zoo
from certaudit.audits import pipeline
from certaudit.audits.pipeline import SUMMARY_SCHEMA, AuditSettings, AuditSource, run_audit
from certaudit.cli import main
from certaudit.data import load_dataset
from certaudit.models import load_checkpoint
from certaudit.results import read_rows

pytestmark = pytest.mark.usefixtures("one_thread_module")

EPS = 0.25
CDS = ("clean", "certify", "degrade")
FAST = dict(eps=EPS, chunk=4, attack_steps=5, spoof_steps=8, spoof_images=3, examples=2)


# ---------------------------------------------------------------- a small JSON-schema validator
# (the subset of draft 2020-12 that SUMMARY_SCHEMA uses; jsonschema is not a dependency)

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name):
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def validate(value, schema, path="$"):
    """Errors (list of strings) of ``value`` against ``schema``."""
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return errors + [f"{path}: {type(value).__name__} is not {types}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                errors += validate(sub, props[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(sub, schema["additionalProperties"], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zoo_digits():
    return zoo.load_data()


def _audit(out, model_name, defense, data, n_images=8, **kw):
    net, meta = load_checkpoint(zoo.model_path(model_name))
    x, y = data
    src = AuditSource(model=model_name, model_sha256=None, defense=defense, dataset="digits", split="test",
                      indices=list(range(n_images)), arch=meta.arch)
    return run_audit(out, net, meta, src, x, y, AuditSettings(**{**FAST, **kw}))


@pytest.fixture(scope="module")
def gloro_audit(tmp_path_factory, zoo_digits):
    from certaudit.report import write_report

    out = tmp_path_factory.mktemp("audit") / "gloro"
    summary = _audit(out, "digits_gloro_eps", "lipschitz", zoo_digits, n_images=8)
    write_report(out)
    return out, summary


# ------------------------------------------------------------------------------------- tests

def test_audit_writes_every_file(gloro_audit):
    out, summary = gloro_audit
    for stage in ("clean", "certify", "degrade", "spoof"):
        header, rows = read_rows(out / "rows" / f"{stage}.jsonl")
        assert header["config"]["stage"] == stage
        want = 8 if stage != "spoof" else 3
        assert sorted(r["index"] for r in rows) == list(range(want))
    for name in ("summary.json", "report.html", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_summary_validates_against_schema(gloro_audit):
    _, summary = gloro_audit
    assert validate(json.loads(json.dumps(summary)), SUMMARY_SCHEMA) == []
    h = summary["headline"]
    for key in ("clean_accuracy", "vra_eps", "vra_2eps", "fpr_lower", "fpr_upper", "spoof_success_rate"):
        assert key in h
    assert summary["versions"]["torch"] == torch.__version__ and summary["seed"] == 0
    assert set(summary["timings"]["stages"]) == {"clean", "certify", "degrade", "spoof"}


def test_validator_rejects_broken_summaries(gloro_audit):
    _, summary = gloro_audit
    bad = json.loads(json.dumps(summary))
    del bad["headline"]
    assert any("headline" in e for e in validate(bad, SUMMARY_SCHEMA))
    bad = json.loads(json.dumps(summary))
    bad["headline"]["vra_eps"] = 1.5
    assert any("vra_eps" in e for e in validate(bad, SUMMARY_SCHEMA))
    bad = json.loads(json.dumps(summary))
    bad["config"]["norm"] = "l3"
    assert validate(bad, SUMMARY_SCHEMA)


def test_headline_figures_agree_with_rows(gloro_audit):
    """The summary is a function of the rows: recompute the headline from them."""
    out, summary = gloro_audit
    h = summary["headline"]
    _, clean = read_rows(out / "rows" / "clean.jsonl")
    _, cert = read_rows(out / "rows" / "certify.jsonl")
    _, deg = read_rows(out / "rows" / "degrade.jsonl")
    assert h["clean_accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in clean]))
    ok = [r["prediction"] == r["label"] and r["radius"] >= EPS for r in cert]
    assert h["vra_eps"] == pytest.approx(np.mean(ok))
    test_r = [r for r in deg if r["certified"] and r["correct"]]
    assert h["testR"] == len(test_r)
    # the certify stage and the degrade stage's clean check agree for a deterministic defense
    assert h["testR"] == sum(ok)
    # Appendix A on a monotone certifier (GloRo): every degraded input is not certified at 2ε
    assert all(not r["certified_2eps"] for r in test_r if r["degraded_by"])
    assert h["testA_lower"] <= h["testA_upper"] and h["lower_subset_upper"] is True
    assert h["fpr_lower"] <= h["fpr_upper"] + 1e-12


def test_crash_midway_then_resume_without_duplicates(tmp_path, zoo_digits, monkeypatch):
    """An exception after the first degradation chunk; the rerun finishes without redoing or duplicating rows."""
    real = pipeline.degrade_batch
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "degrade_batch", crashing)
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _audit(out, "digits_gloro_2eps", "lipschitz", zoo_digits, n_images=8, stages=CDS)
    _, partial = read_rows(out / "rows" / "degrade.jsonl")
    assert sorted(r["index"] for r in partial) == [0, 1, 2, 3]  # the first chunk only
    assert not (out / "summary.json").exists()

    seen = []

    def counting(defense, x, y, eps, **kwargs):
        seen.extend(kwargs["indices"])
        return real(defense, x, y, eps, **kwargs)

    monkeypatch.setattr(pipeline, "degrade_batch", counting)
    summary = _audit(out, "digits_gloro_2eps", "lipschitz", zoo_digits, n_images=8, stages=CDS)
    assert seen == list(range(4, 8))  # only the missing images were attacked
    for stage in ("clean", "certify", "degrade"):
        lines = (out / "rows" / f"{stage}.jsonl").read_text().splitlines()
        idx = [json.loads(line)["index"] for line in lines[1:]]
        assert sorted(idx) == list(range(8)) and len(idx) == len(set(idx))
    assert summary["timings"]["stages"]["degrade"]["new_images"] == 4
    assert summary["timings"]["stages"]["clean"]["new_images"] == 0
    # a different configuration is refused, not mixed in
    with pytest.raises(Exception, match="different configuration"):
        _audit(out, "digits_gloro_2eps", "lipschitz", zoo_digits, n_images=8, attack_steps=6, stages=CDS)


def test_killed_subprocess_resumes(tmp_path):
    """SIGKILL while rows are being written, then rerun the same command: complete, no duplicates."""
    model = zoo.model_path("digits_gloro_eps")
    out = tmp_path / "killed"
    args = ["audit", "--model", str(model), "--defense", "lipschitz", "--eps", str(EPS), "--dataset", "digits",
            "--limit", "12", "--chunk", "2", "--attack-steps", "3", "--stages", "clean,certify,degrade",
            "--examples", "1", "--device", "cpu", "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "certaudit.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = out / "rows" / "degrade.jsonl"
    deadline = time.time() + 90
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if rows.exists() and len(rows.read_text().splitlines()) >= 3:  # header + some rows
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert main(args) == 0
    for stage in ("clean", "certify", "degrade"):
        lines = (out / "rows" / f"{stage}.jsonl").read_text().splitlines()
        idx = [json.loads(line)["index"] for line in lines[1:]]
        assert len(idx) == len(set(idx))
        assert sorted(idx) == list(range(12))
    assert (out / "report.html").is_file()
    if not killed:  # pragma: no cover - the machine was fast enough to finish first
        pytest.skip("the audit finished before it could be killed")


def test_smoothing_audit_all_stages(tmp_path, zoo_digits):
    """Randomized smoothing through every stage, with SPGD among the attacks and a judged spoof."""
    s = _audit(tmp_path / "rs", "digits_gaussian", "smoothing", zoo_digits, n_images=6, n0=20, n=200, attack_samples=4,
               spoof_samples=4, spoof_select_n=50, spoof_images=2)
    assert s["config"]["defense_settings"]["sigma"] == pytest.approx(0.25)
    assert "spgd" in s["degradation"]["per_attack"]
    assert s["spoofing"]["images"] == 2
    assert validate(json.loads(json.dumps(s)), SUMMARY_SCHEMA) == []


def test_audit_cli_and_bad_input(tmp_path, capsys):
    model = zoo.model_path("digits_gloro_2eps")
    base = ["audit", "--model", str(model), "--defense", "lipschitz", "--dataset", "digits", "--limit", "4",
            "--attack-steps", "3", "--spoof-steps", "3", "--spoof-images", "1", "--chunk", "4"]
    assert main([*base, "--eps", "0.25", "--out", str(tmp_path / "a"), "--json"]) == 0
    head = json.loads(capsys.readouterr().out)
    assert head["images"] == 4 and head["defense"] == "lipschitz"
    for extra, needle in ((["--eps", "-1"], "eps"), (["--eps", "0.25", "--stages", "clean,bogus"], "stage"),
                          (["--eps", "0.25", "--defense", "nope"], "defense"), (["--eps", "0.25", "--limit", "0"], "limit"),
                          (["--eps", "0.25", "--defense", "interval", "--method", "magic"], "method"),
                          (["--eps", "0.25", "--spoof-max-linf", "0"], "spoof-max-linf"),
                          (["--eps", "0.25", "--spoof-min-ssim", "nan"], "spoof-min-ssim"),
                          (["--eps", "0.25", "--spoof-sweep", "8/255,-1"], "spoof-sweep")):
        rc = main([*base, *extra, "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0].lower(), err


def test_zoo_matches_loader_and_manifest():
    x, y = zoo.load_data()
    xd, yd = load_dataset("digits", "test")
    assert torch.equal(x, xd[:len(x)]) and torch.equal(y, yd[:len(y)]) and 200 <= len(y) <= 1000
    man = zoo.manifest()
    total = sum((zoo.ZOO_DIR / f).stat().st_size for f in [m["file"] for m in man["models"].values()] + [man["data"]["file"]])
    assert total < 2 * 2**20  # the digits zoo: a tiny fixture
    assert sum(p.stat().st_size for p in zoo.ZOO_DIR.iterdir() if p.is_file()) < 5 * 2**20  # all zoos: a few MB
    metas = {name: load_checkpoint(zoo.model_path(name))[1] for name in man["models"]}
    assert metas["digits_gaussian"].method == "gaussian" and metas["digits_gaussian"].sigma == pytest.approx(man["sigma"])
    assert metas["digits_gloro_eps"].eps == pytest.approx(man["eps"])
    assert metas["digits_gloro_2eps"].eps == pytest.approx(2 * man["eps"])


def test_own_pytorch_model_with_normalization_through_the_python_api(tmp_path, zoo_digits):
    """The README's recipe: any nn.Module, its normalization inside, audited without a checkpoint."""
    from certaudit import ModelMeta
    from certaudit.models import Normalize
    from certaudit.report import write_report

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10))
    model = torch.nn.Sequential(Normalize([0.3], [0.4]), net).eval()
    meta = ModelMeta(arch="mynet", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.3], std=[0.4])
    x, y = zoo_digits
    src = AuditSource(model="mynet", model_sha256=None, defense="lipschitz", dataset="digits", split="test",
                      indices=list(range(6)))
    s = run_audit(tmp_path / "mine", model, meta, src, x, y,
                  AuditSettings(eps=0.01, attack_steps=3, stages=("clean", "certify", "degrade")))
    assert s["stages"] == ["clean", "certify", "degrade"] and "spoofing" not in s
    assert validate(json.loads(json.dumps(s)), SUMMARY_SCHEMA) == []
    with torch.no_grad():
        want = (model(x[:6]).argmax(1) == y[:6]).float().mean().item()
    assert s["headline"]["clean_accuracy"] == pytest.approx(want)
    paths = write_report(tmp_path / "mine")
    assert "Spoofing examples" in paths["html"].read_text()


def test_a_setting_refused_before_any_stage_is_one_line_from_a_real_process(tmp_path):
    """As a user sees it (stderr not captured by pytest): no stray progress-bar line before the error."""
    import subprocess
    import sys

    model = zoo.model_path("digits_gloro_2eps")
    done = subprocess.run([sys.executable, "-m", "certaudit", "audit", "--model", str(model), "--defense", "interval",
                           "--method", "magic", "--eps", "0.25", "--limit", "2", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["certaudit: error: unknown bound method 'magic'; choose one of: ibp, crown-ibp, crown, alpha-crown"]
