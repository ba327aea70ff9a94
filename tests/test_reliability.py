"""Never destroy a user's file, one writer per results file, no duplicated rows, no orphaned workers
(issue 16, items 1-4). The CLI is the subject, run in a fresh subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from certaudit import zoo

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "certaudit", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _certify(out: Path, *extra: str) -> subprocess.CompletedProcess:
    model = zoo.model_path("digits_gloro_eps")
    return _cli("certify", "--model", str(model), "--defense", "lipschitz", "--limit", "8", "--device", "cpu",
                "--out", str(out), *extra)


def _one_line_exit_2(done: subprocess.CompletedProcess, needle: str) -> None:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["model", "text-without-newline", "symlink-to-model", "binary"])
def test_out_refuses_a_foreign_file_untouched(kind, tmp_path):
    model = zoo.model_path("digits_gloro_eps")
    if kind == "model":
        target = tmp_path / "m.safetensors"
        target.write_bytes(model.read_bytes())
        out = target
    elif kind == "text-without-newline":
        target = out = tmp_path / "notes.txt"
        target.write_text("line one\nline two without a final newline")
    elif kind == "symlink-to-model":
        target = tmp_path / "m.safetensors"
        target.write_bytes(model.read_bytes())
        out = tmp_path / "link.jsonl"
        out.symlink_to(target)
    else:
        target = out = tmp_path / "blob.jsonl"
        target.write_bytes(bytes(range(256)) * 4)
    before = target.read_bytes()
    _one_line_exit_2(_certify(out), "not a certaudit results file")
    assert target.read_bytes() == before
    assert not Path(str(out) + ".lock").exists()  # a refused run leaves nothing next to the user's file


def test_a_user_file_named_like_the_lock_is_never_overwritten(tmp_path):
    out = tmp_path / "rows.jsonl"
    lock = tmp_path / "rows.jsonl.lock"
    lock.write_text("my own notes, not a pid\n")
    _one_line_exit_2(_certify(out), "not a certaudit lock file")
    assert lock.read_text() == "my own notes, not a pid\n"


def test_a_torn_row_of_our_own_file_is_the_only_thing_cut(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert _certify(out, "--limit", "4").returncode == 0
    good = out.read_bytes()
    out.write_bytes(good + b'{"index": 4, "lab')
    assert _certify(out, "--limit", "6").returncode == 0
    lines = out.read_text().splitlines()
    assert out.read_bytes().startswith(good) and len(lines) == 1 + 6
    assert [json.loads(x)["index"] for x in lines[1:]] == list(range(6))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "rows.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from certaudit.results import lock_file
        fh = lock_file({str(out)!r})
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = _certify(out)
        _one_line_exit_2(done, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder: the next run takes it
    assert _certify(out).returncode == 0


def test_two_identical_runs_at_once_never_duplicate_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    model = zoo.model_path("digits_gaussian")
    args = [sys.executable, "-m", "certaudit", "certify", "--model", str(model), "--defense", "smoothing",
            "--n", "2000", "--limit", "40", "--chunk", "4", "--device", "cpu", "--out", str(out)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the loser is refused (or both ran one after the other)
    rows = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert sorted(r["index"] for r in rows) == list(range(40))


def test_duplicated_rows_and_edited_headers_are_refused(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert _certify(out).returncode == 0
    lines = out.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(lines + [lines[3]]) + "\n")
    before = dup.read_bytes()
    _one_line_exit_2(_certify(dup), "more than one row")
    assert dup.read_bytes() == before
    _one_line_exit_2(_cli("degrade", "--from-log", str(dup), "--eps", "0.1"), "more than one row")
    # a header whose configuration was edited while its hash was left as is
    header = json.loads(lines[0])
    header["config"]["settings"]["eps"] = 0.5
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    _one_line_exit_2(_certify(edited), "does not match its hash")


def test_workers_die_with_their_parent(tmp_path):
    """SIGKILL of the parent (as of `certaudit demo`) takes its pool workers with it."""
    pidfile = tmp_path / "worker.pid"
    script = textwrap.dedent(f"""
        import multiprocessing as mp, os, time
        from concurrent.futures import ProcessPoolExecutor
        from certaudit.commands.demo import die_with_parent

        def task(path):
            open(path, "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                pool.submit(task, {str(pidfile)!r}).result()
        """)
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], env=ENV)
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        worker = int(pidfile.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_run_loop_projects_the_remaining_time_once(tmp_path, capsys):
    from certaudit.audits.runner import run_rows
    from certaudit.commands._common import say_if_long
    from certaudit.distributed import DistEnv

    calls = []
    res = run_rows(lambda idx: (time.sleep(0.01), [{"index": i} for i in idx])[1], list(range(10)), out=None,
                   config={}, env=DistEnv(rank=0, world_size=1, local_rank=0), block=3,
                   estimate=lambda s, n: calls.append((s, n)))
    assert [r["index"] for r in res.rows] == list(range(10)) and len(calls) == 1
    seconds, images = calls[0]
    assert images == 7 and seconds > 0
    say_if_long(True)(3600.0 * 3, 7)  # a long run says so, once, on stderr
    assert "about 3.0 h" in capsys.readouterr().err
    say_if_long(True)(5.0, 7)
    assert capsys.readouterr().err == ""


def test_ctrl_c_says_where_the_rows_are_and_that_rerunning_resumes(tmp_path):
    out = tmp_path / "rows.jsonl"
    model = zoo.model_path("digits_gaussian")
    proc = subprocess.Popen([sys.executable, "-m", "certaudit", "certify", "--model", str(model), "--defense",
                             "smoothing", "--n", "5000000", "--limit", "200", "--chunk", "1", "--device", "cpu",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            # a shell may start tests with SIGINT ignored; a user's terminal does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):  # wait for the first rows
        if out.exists() and len(out.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    rows = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert rows and len({r["index"] for r in rows}) == len(rows)


def test_a_corrupt_rank_shard_is_refused_untouched(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert _certify(out, "--limit", "4").returncode == 0
    shard = tmp_path / "rows.jsonl.rank1"
    shard.write_text(out.read_text().splitlines()[0] + "\n{corrupt\n")
    before = (out.read_bytes(), shard.read_bytes())
    _one_line_exit_2(_certify(out), "corrupt row")
    assert (out.read_bytes(), shard.read_bytes()) == before
