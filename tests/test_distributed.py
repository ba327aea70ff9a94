"""Multi-process certify (torchrun, gloo on CPU): same rows as one process; interrupted runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from certaudit.cli import main
from certaudit.distributed import (
    ShardedRowWriter,
    env_from_environ,
    merge_shards,
    shard_files,
    shard_indices,
    shard_path,
)
from certaudit.errors import InputError
from certaudit.results import RowWriter, read_rows

ARGS = ["--defense", "smoothing", "--n0", "20", "--n", "3000", "--alpha", "0.01", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A seeded, untrained 2C2F for the 8x8 digits, marked as Gaussian-trained with σ = 0.25 (rows,
    not accuracy, are under test; training would only cost time)."""
    import torch

    from certaudit.models import ModelMeta, build_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model("2c2f", (1, 8, 8), 10)
    meta = ModelMeta(arch="2c2f", dataset="digits", input_shape=[1, 8, 8], num_classes=10, mean=[0.0], std=[1.0],
                     method="gaussian", sigma=0.25)
    return save_checkpoint(tmp_path_factory.mktemp("dist") / "m.safetensors", net, meta)


def _rows(path):
    _, rows = read_rows(path)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _torchrun(model, out, limit, procs=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "certaudit", "--", "certify", "--model", str(model), *ARGS, "--limit", str(limit),
           "--chunk", "1", "--out", str(out), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


# ---------------------------------------------------------------------------------- helpers

def test_shards_are_disjoint_cover_everything_and_balance():
    items = list(range(100, 117))
    parts = [shard_indices(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_indices(5, 1, 2) == [1, 3]
    with pytest.raises(InputError):
        shard_indices(items, 3, 3)


def test_launcher_environment_is_read_and_checked():
    env = env_from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.distributed, env.is_main) == (3, 4, 1, True, False)
    assert env_from_environ({}).world_size == 1
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(InputError):
            env_from_environ(bad)


def test_merge_sorts_deduplicates_and_refuses_other_configurations(tmp_path):
    out, cfg = tmp_path / "rows.jsonl", {"a": 1}
    with RowWriter(shard_path(out, 1), cfg) as w:
        w.write_many([{"index": 5, "v": 1}, {"index": 1, "v": 1}])
    with RowWriter(shard_path(out, 0), cfg) as w:
        w.write_many([{"index": 4, "v": 0}, {"index": 0, "v": 0}])
    with open(shard_path(out, 0), "a") as fh:
        fh.write('{"index": 9, "v"')  # torn line of a killed rank
    rows = merge_shards(out, cfg)
    assert [r["index"] for r in rows] == [0, 1, 4, 5] and shard_files(out) == []
    with RowWriter(shard_path(out, 2), cfg) as w:  # a shard left after a merge repeats a row
        w.write_many([{"index": 1, "v": 1}, {"index": 7, "v": 2}])
    assert [r["index"] for r in merge_shards(out, cfg)] == [0, 1, 4, 5, 7]
    assert [r["index"] for r in read_rows(out)[1]] == [0, 1, 4, 5, 7]
    with RowWriter(shard_path(out, 0), {"a": 2}) as w:
        w.write_many([{"index": 8}])
    with pytest.raises(InputError, match="different configuration"):
        merge_shards(out, cfg)


def test_single_process_writer_merges_leftover_shards_first(tmp_path):
    out, cfg = tmp_path / "rows.jsonl", {"a": 1}
    with RowWriter(shard_path(out, 1), cfg) as w:
        w.write_many([{"index": 3}])
    with ShardedRowWriter(out, cfg, env_from_environ({})) as w:
        assert w.done() == {3}
        w.write_many([{"index": 0}])
        assert [r["index"] for r in w.finish()] == [3, 0]
    assert [r["index"] for r in read_rows(out)[1]] == [3, 0] and shard_files(out) == []


# ------------------------------------------------------------------------- two processes

def test_two_processes_give_the_rows_of_one_and_an_interrupted_run_resumes(model, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["certify", "--model", str(model), *ARGS, "--limit", "12", "--out", str(one), "--json"]) == 0

    # a 2-process run cancelled mid-way (SIGTERM to torchrun, as a scheduler does; it kills its workers)
    proc = _torchrun(model, two, 12, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        written = sum(max(0, len(p.read_text().splitlines()) - 1) for p in shard_files(two))
        if written >= 1 or proc.poll() is not None:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    killed_early = not two.exists()
    assert killed_early, "the run finished before it could be interrupted; make it longer"
    partial = {r["index"] for p in shard_files(two) for r in read_rows(p)[1]}  # complete rows only
    assert 0 < len(partial) < 12

    # the rerun merges the shards, skips finished images, and ends with the rows of one process
    done = _torchrun(model, two, 12)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["processes"] == 2 and summary["images"] == 12
    assert summary["new_images"] == 12 - len(partial)  # finished images are not redone
    assert shard_files(two) == []
    rows = _rows(two)
    assert [r["index"] for r in rows] == list(range(12))  # sorted, no duplicates, nothing missing
    assert rows == _rows(one)
    assert read_rows(two)[0]["config_hash"] == read_rows(one)[0]["config_hash"]  # same experiment

    # a rerun, here with one process, has nothing left to do
    assert main(["certify", "--model", str(model), *ARGS, "--limit", "12", "--out", str(two), "--json"]) == 0
    assert _rows(two) == _rows(one)


# ------------------------------------------------ degrade and spoof split across ranks too

def _verb_rows(path):
    _, rows = read_rows(path)
    return [{k: v for k, v in r.items() if k not in ("seconds", "attack_seconds")} for r in rows]


VERB_ARGS = {
    # ε tiny enough that the untrained net is certified at ε (the attacks then have work to do);
    # --chunk 2 over 6 images: three attack batches dealt to two ranks as blocks
    "degrade": ["--defense", "interval", "--method", "ibp", "--eps", "0.002", "--attack", "all", "--steps", "5",
                "--chunk", "2", "--seed", "5", "--device", "cpu"],
    "spoof": ["--defense", "interval", "--method", "ibp", "--loss", "margin", "--eps", "0.002", "--steps", "4",
              "--chunk", "2", "--seed", "5", "--device", "cpu"],
}


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
def test_degrade_and_spoof_split_across_two_processes_give_the_rows_of_one(model, tmp_path, verb):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["--model", str(model), *VERB_ARGS[verb], "--limit", "6", "--json"]
    assert main([verb, *args, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "certaudit", "--", verb, *args, "--out", str(two)]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["processes"] == 2 and summary["new_images"] == 6
    assert shard_files(two) == []
    rows = _verb_rows(two)
    assert [r["index"] for r in rows] == list(range(6))
    assert rows == _verb_rows(one)
    if verb == "degrade":
        assert sum(bool(r.get("certified")) for r in rows) > 0, "nothing was certified: the attacks were not exercised"
    else:
        assert sum(bool(r.get("attacked")) for r in rows) > 0, "nothing was attacked"


def test_blocks_are_fixed_by_the_request_dealt_round_robin_and_skip_finished_inputs():
    from certaudit.distributed import shard_blocks

    wanted = list(range(10, 21))  # 11 inputs, blocks of 3: [10..12] [13..15] [16..18] [19, 20]
    r0 = shard_blocks(wanted, 3, 0, 2)
    r1 = shard_blocks(wanted, 3, 1, 2)
    assert r0 == [[10, 11, 12], [16, 17, 18]] and r1 == [[13, 14, 15], [19, 20]]
    assert shard_blocks(wanted, 3, 0, 1) == [[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20]]
    # finished inputs drop out without shifting the other blocks; empty blocks vanish
    assert shard_blocks(wanted, 3, 0, 2, done={10, 11, 12, 17}) == [[16, 18]]
    with pytest.raises(InputError):
        shard_blocks(wanted, 0, 0, 1)
    with pytest.raises(InputError):
        shard_blocks(wanted, 3, 2, 2)


def test_audit_split_across_two_processes_gives_the_rows_and_headline_of_one(model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", str(model), "--defense", "interval", "--method", "ibp", "--eps", "0.002", "--limit", "6",
            "--chunk", "2", "--attack-steps", "5", "--spoof-steps", "4", "--seed", "5", "--device", "cpu",
            "--examples", "2", "--json"]
    assert main(["audit", *args, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "certaudit", "--", "audit", *args, "--out", str(two)]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    headline = json.loads(done.stdout)  # rank 0 alone prints
    for stage in ("clean", "certify", "degrade", "spoof"):
        rows = _verb_rows(two / "rows" / f"{stage}.jsonl")
        assert [r["index"] for r in rows] == list(range(6)), stage
        assert rows == _verb_rows(one / "rows" / f"{stage}.jsonl"), stage
        assert shard_files(two / "rows" / f"{stage}.jsonl") == []
    assert (two / "report.html").is_file() and (two / "summary.json").is_file()
    ref = json.loads((one / "summary.json").read_text())["headline"]
    assert {k: v for k, v in headline.items() if k != "out"} == ref
