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


def _assert_passed(result: dict) -> None:
    failed = {k: v for k, v in result["checks"].items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert not result["checks"]["linearizable"]["undecided"]
    assert sum(n for k, n in result["ops"].items() if k.endswith(":ok")) > 100


def test_loopback_run_with_kills_pauses_and_a_corrupted_replica(tmp_path):
    clock = ("clock",) if shutil.which("faketime") else ()  # scripts/test installs it as root
    result = _run(tmp_path, duration=8.0, clients=6, keys=6, nemeses=("kill", "kill-leader", "pause", "corrupt", *clock),
                  mode="loopback", seed=3, fault_every=(0.5, 1.5), fault_for=(0.5, 1.5))
    _assert_passed(result)
    assert result["faults"], "the nemesis made no fault"


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"needs network namespaces: {unavailable_reason()}")
def test_netns_run_with_partitions(tmp_path):
    result = _run(tmp_path, duration=10.0, clients=6, keys=6, nemeses=("partition-halves", "isolate-leader", "one-way"),
                  mode="netns", seed=5, fault_every=(0.5, 1.5), fault_for=(1.0, 2.5))
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
