import json

import pytest

from certaudit.errors import InputError
from certaudit.results import RowWriter, read_rows, write_json_atomic


def test_rows_resume_after_crash_without_loss_or_duplicates(tmp_path):
    path = tmp_path / "rows.jsonl"
    cfg = {"defense": "smoothing", "sigma": 0.25}
    with RowWriter(path, cfg) as w:
        w.write_many([{"index": 0, "v": 1}, {"index": 1, "v": 2}])
    # simulate a crash in the middle of writing row 2
    with open(path, "a") as fh:
        fh.write('{"index": 2, "v"')
    w = RowWriter(path, cfg)
    assert w.done() == {0, 1}
    w.write({"index": 2, "v": 3})
    w.close()
    header, rows = read_rows(path)
    assert header["config"] == cfg
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_rows_refuse_a_different_configuration(tmp_path):
    path = tmp_path / "rows.jsonl"
    RowWriter(path, {"sigma": 0.25}).close()
    with pytest.raises(InputError, match="different configuration"):
        RowWriter(path, {"sigma": 0.5})


def test_rows_refuse_duplicates_and_foreign_files(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowWriter(path, {}) as w:
        w.write({"index": 5})
        with pytest.raises(RuntimeError):
            w.write({"index": 5})
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(InputError, match="not a certaudit results file"):
        RowWriter(other, {})
    with pytest.raises(InputError, match="directory"):
        RowWriter(tmp_path, {})


def test_rows_reject_nan(tmp_path):
    with RowWriter(tmp_path / "r.jsonl", {}) as w:
        with pytest.raises(ValueError):
            w.write({"index": 0, "radius": float("nan")})


def test_write_json_atomic(tmp_path):
    p = write_json_atomic(tmp_path / "a" / "s.json", {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    assert not list((tmp_path / "a").glob("*.tmp"))
