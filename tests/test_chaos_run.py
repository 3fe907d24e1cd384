"""Smoke runs of `synapse chaos run` against real clusters: on loopback (kills, pauses, a
corrupted replica) and, as root, in network namespaces (partitions). Each must pass every
check; the long campaigns are run by hand (README)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from synapse.chaos.cluster import ClusterUnderTest
from synapse.chaos.netns import unavailable_reason
from synapse.chaos.runner import Run, RunConfig, write_report


def _run(tmp_path: Path, **kw) -> dict:
    result = Run(RunConfig(**kw), tmp_path / "run").execute()
    result_json, report = write_report(result, tmp_path / "run")
    assert report.read_text().startswith("<!doctype html>") and "<svg" in report.read_text()
    return json.loads(result_json.read_text())


# Reads, writes and compare-and-sets each acknowledged this many times at least: the load goes
# on past the duration until they are (RunConfig.min_acknowledged), so a slow machine still
# yields a history worth judging instead of failing on what fitted in the duration.
ENOUGH = 20


def _assert_passed(result: dict) -> None:
    failed = {k: v for k, v in result["checks"].items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert not result["checks"]["linearizable"]["undecided"]
    assert "enough_acknowledged" in result["checks"]
    assert sum(n for k, n in result["ops"].items() if k.endswith(":ok")) >= 3 * ENOUGH


def test_loopback_run_with_kills_pauses_and_a_corrupted_replica(tmp_path):
    clock = ("clock",) if shutil.which("faketime") else ()  # scripts/test installs it as root
    result = _run(tmp_path, duration=8.0, clients=6, keys=6, nemeses=("kill", "kill-leader", "pause", "corrupt", *clock),
                  mode="loopback", seed=3, fault_every=(0.5, 1.5), fault_for=(0.5, 1.5), min_acknowledged=ENOUGH)
    _assert_passed(result)
    assert result["faults"], "the nemesis made no fault"


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"needs network namespaces: {unavailable_reason()}")
def test_netns_run_with_partitions(tmp_path):
    result = _run(tmp_path, duration=10.0, clients=6, keys=6, nemeses=("partition-halves", "isolate-leader", "one-way"),
                  mode="netns", seed=5, fault_every=(0.5, 1.5), fault_for=(1.0, 2.5), min_acknowledged=ENOUGH)
    _assert_passed(result)
    assert any(f["kind"] in ("partition-halves", "isolate-leader", "one-way") for f in result["faults"])


def test_the_command_refuses_network_faults_on_loopback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "synapse.cli.main", "chaos", "run", "--mode", "loopback",
                        "--nemesis", "partition-halves", "--duration", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "network namespaces" in r.stderr


def test_a_node_restarted_from_a_thread_that_ends_keeps_running(tmp_path):
    """The nemesis thread restarts nodes and then returns at the end of a run. A node must
    outlive the thread that asked for it: the parent-death signal that ties a node to the
    controller fires when the forking thread ends (a CI run's restarted nodes died so, silently,
    just before the final checks)."""
    cluster = ClusterUnderTest(1, tmp_path / "c", "loopback")
    try:
        starter = threading.Thread(target=cluster.start, args=(1,))
        starter.start()
        starter.join()
        cluster.wait_ready(30)  # seconds after the starting thread ended: a node killed with it never answers
        assert cluster.alive(1), cluster.data_dir(1)
    finally:
        cluster.close()
    assert not cluster.alive(1)


def test_the_load_goes_on_until_every_kind_was_acknowledged_and_no_longer_than_asked(tmp_path):
    """min_acknowledged: the clients go on past the duration until reads, writes and
    compare-and-sets were each acknowledged that often; a run that cannot get there by
    max_duration fails by name instead of judging a thin history."""
    result = _run(tmp_path / "a", duration=0.2, clients=4, keys=3, nemeses=(), seed=21, min_acknowledged=60)
    _assert_passed(result)
    assert all(result["acknowledged"][k] >= 60 for k in ("read", "write", "cas")), result["acknowledged"]
    assert result["load_s"] >= 0.2 and "enough_acknowledged" in result["checks"]
    short = _run(tmp_path / "b", duration=0.2, clients=2, keys=3, nemeses=(), seed=22, min_acknowledged=100_000,
                 max_duration=0.5)
    check = short["checks"]["enough_acknowledged"]
    assert not short["ok"] and not check["ok"] and "TOO FEW ACKNOWLEDGED" in check["detail"]
    assert "'cas'" in check["detail"]


def test_acknowledged_kinds_counts_what_each_kind_of_operation_got_answered():
    from synapse.chaos.history import CAS, FAIL, FORGET, OK, READ, RECALL, REMEMBER, UNKNOWN, Op
    from synapse.chaos.runner import acknowledged_kinds

    ops = [Op(1, 0, "k", READ, 0, 1, OK, output=(None, 0)), Op(2, 0, "k", READ, 0, 1, FAIL),
           Op(3, 0, "k", CAS, 0, 1, OK, "v", 1, output=False), Op(4, 0, "k", CAS, 0, None, UNKNOWN, "v", 1),
           Op(5, 0, "m", REMEMBER, 0, 1, OK, [["a", "t"]], output=[["a", "a", False]]),
           Op(6, 0, "m", REMEMBER, 0, 1, OK, [["b", "t"], ["c", "u"]], output=[["b", "b", False], ["c", "c", False]]),
           Op(7, 0, "m", REMEMBER, 0, 1, OK, [["d", "t"]], output=[["d", "a", True]]),
           Op(8, 0, "m", FORGET, 0, 1, OK, "a", output=True), Op(9, 0, "m", FORGET, 0, 1, OK, "z", output=False),
           Op(10, 0, "m", RECALL, 0, 1, OK, "a", output=[])]
    assert acknowledged_kinds(ops) == {"read": 1, "cas": 1, "remember": 1, "remember-batch": 1,
                                       "remember-duplicate": 1, "forget": 1, "recall": 1}


def test_bad_load_limits_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="min_acknowledged"):
        Run(RunConfig(min_acknowledged=-1), tmp_path)
    for longest in (5, -1):
        with pytest.raises(ValueError, match="max_duration"):
            Run(RunConfig(duration=10, max_duration=longest), tmp_path)
    r = subprocess.run([sys.executable, "-m", "synapse.cli.main", "chaos", "run", "--duration", "10",
                        "--max-duration", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--max-duration (5.0)" in r.stderr
