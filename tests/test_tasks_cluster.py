"""Task orchestration end to end: a real 3-node cluster, real `synapse worker start`
execution nodes and real sandboxes. Workers are killed, paused and fenced; the leader is
killed while it schedules; every task must end exactly once in the replicated state."""

from __future__ import annotations

import base64
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from synapse.client import SynapseError
from tests.harness import Cluster, scrape, wait_until

HEARTBEAT_TIMEOUT = 2.0
ENDED = ("succeeded", "failed", "timed-out", "cancelled", "lost")


@pytest.fixture
def cluster(tmp_path):
    c = Cluster.create(tmp_path / "cluster", 3, extra=["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]).start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def shared_dir():
    """A directory tasks may be granted: sandboxed tasks run as an unprivileged user, which
    cannot reach pytest's private temporary directories."""
    path = Path(tempfile.mkdtemp(prefix="synapse-task-grant-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _ended(client, task_id: str, timeout: float = 60.0) -> dict:
    return wait_until(lambda: (t := client.task(task_id, wait=2)) and t["state"] in ENDED and t, timeout,
                      f"task {task_id} to end")


def _workers_up(client, n: int) -> None:
    wait_until(lambda: sum(w["state"] == "up" for w in client.status()["workers"]) >= n, 30, f"{n} workers up")


def test_tasks_run_on_execution_nodes_and_report(cluster):
    cluster.worker("w1").start()
    cluster.worker("w2").start()
    client = cluster.client()
    _workers_up(client, 2)
    ids = [client.submit_task({"command": ["python3", "-c", f"print({i} * 7)"]})["task_id"] for i in range(8)]
    done = [_ended(client, t) for t in ids]
    assert [t["state"] for t in done] == ["succeeded"] * 8
    assert {t["worker"] for t in done} == {"w1", "w2"}  # placed on both
    logs = client.task_logs(ids[3])
    assert logs["stdout"] == "21\n"
    result = done[3]["result"]
    assert result["exit_code"] == 0 and len(result["output_hash"]) == 64 and result["usage"]["wall_s"] > 0
    cluster.wait_converged()  # every node holds the same task state, by hash
    # Every node's /metrics tells the same story from the log it applied.
    client.submit_task({"command": ["python3", "-c", "raise SystemExit(3)"]})
    for node in cluster.nodes:
        wait_until(lambda: scrape(node, cluster.token).get('synapse_tasks_ended_total{outcome="failed"}') == 1, 30,
                   f"{node.node_id} counting the failed task")
        m = scrape(node, cluster.token)
        assert m['synapse_tasks_ended_total{outcome="succeeded"}'] == 8
        assert (m['synapse_tasks{state="ended"}'], m['synapse_tasks{state="pending"}']) == (9, 0)
        assert m['synapse_workers{state="up"}'] == 2
        assert m["synapse_task_schedule_seconds_count"] == 9


def test_a_worker_killed_mid_task_is_marked_down_and_the_task_completes_once(cluster, shared_dir):
    marks = shared_dir
    victim = cluster.worker("w1", extra=["--label", "role=first"]).start()
    client = cluster.client()
    _workers_up(client, 1)
    # Each attempt leaves "start"; only a finished attempt leaves "done".
    script = (f"import os, time; open('{marks}/start-' + str(os.getpid()), 'w').close(); time.sleep(2); "
              f"open('{marks}/done-' + str(os.getpid()), 'w').close()")
    task_id = client.submit_task({"command": ["python3", "-c", script], "retries": 1,
                                  "capabilities": {"write_paths": [str(marks)]}})["task_id"]
    wait_until(lambda: client.task(task_id)["state"] == "running", 30, "the task to start")
    victim.kill()
    rescuer = cluster.worker("w2").start()
    task = _ended(client, task_id)
    assert task["state"] == "succeeded" and task["attempts"] == 2 and task["worker"] == "w2"
    assert any("worker down" in h["detail"] for h in task["history"])
    assert len(list(marks.glob("done-*"))) == 1  # the killed attempt never finished
    workers = {w["worker_id"]: w for w in client.status()["workers"]}
    assert workers["w1"]["state"] == "down" and workers["w2"]["state"] == "up"
    rescuer.stop()


def test_leader_kill_while_scheduling_loses_and_doubles_nothing(cluster, shared_dir):
    ran = shared_dir
    cluster.worker("w1", slots=3).start()
    cluster.worker("w2", slots=3).start()
    client = cluster.client()
    _workers_up(client, 2)
    spec = {"command": ["python3", "-c", f"import sys, time; time.sleep(0.3); open('{ran}/' + sys.argv[1], 'a').write('x')"],
            "capabilities": {"write_paths": [str(ran)]}}
    ids = []
    for i in range(24):
        ids.append(client.submit_task(dict(spec, command=spec["command"] + [f"t{i}"]), idempotency_key=f"k{i}")["task_id"])
        if i == 8:
            cluster.leader().kill()
    for t in ids:
        assert _ended(client, t, timeout=90)["state"] == "succeeded"
    counts = {p.name: len(p.read_text()) for p in ran.iterdir()}
    assert counts == {f"t{i}": 1 for i in range(24)}  # each ran exactly once


def test_a_paused_worker_is_fenced_then_takes_new_work(cluster):
    slow = cluster.worker("w1", extra=["--label", "name=w1"]).start()
    client = cluster.client()
    _workers_up(client, 1)
    task_id = client.submit_task({"command": ["sleep", "3"], "retries": 1})["task_id"]
    wait_until(lambda: client.task(task_id)["state"] == "running", 30, "the task to start on w1")
    slow.pause()
    wait_until(lambda: client.task(task_id)["state"] == "pending", 30, "w1 to be marked down")
    cluster.worker("w2").start()
    wait_until(lambda: client.task(task_id)["state"] in ("assigned", "running"), 30, "the task to move to w2")
    slow.resume()  # w1 finishes its copy: the cluster must refuse that result
    task = _ended(client, task_id)
    assert task["worker"] == "w2" and task["result"]["worker"] == "w2" and task["attempts"] == 2
    # w1 learns it was marked down, registers again (a new epoch) and takes new work.
    wait_until(lambda: any(w["worker_id"] == "w1" and w["state"] == "up" and w["epoch"] == 2
                           for w in client.status()["workers"]), 30, "w1 to register again")
    again = client.submit_task({"command": ["true"], "labels": {"name": "w1"}})["task_id"]
    assert _ended(client, again)["worker"] == "w1"
    assert "refused" in slow.log() or "lease" in slow.log()


def test_cancel_stops_a_running_task(tmp_path):
    seconds = f"30.{time.time_ns() % 10**6:06d}"  # names this test's sleep among the machine's processes
    c = Cluster.create(tmp_path / "local", 1, extra=["--worker-slots", "2"]).start()
    try:
        client = c.client()
        task_id = client.submit_task({"command": ["sleep", seconds]})["task_id"]
        wait_until(lambda: client.task(task_id)["state"] == "running", 30, "the task to start")
        wait_until(lambda: _running(f"sleep {seconds}"), 10, "the task's process to show up")
        assert client.cancel_task(task_id)["state"] == "cancelled"
        task = client.task(task_id)
        assert task["state"] == "cancelled"
        # The embedded worker killed the sleep: no process runs it any more.
        wait_until(lambda: not _running(f"sleep {seconds}"), 10, "the cancelled task's process to end")
    finally:
        c.close()


def _running(cmdline: str) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip().decode(errors="replace") == cmdline:
                return True
        except OSError:
            continue
    return False


def test_limits_and_grants_hold_for_tasks_submitted_to_the_cluster(tmp_path, shared_dir):
    """The spec's limits and capabilities reach the sandbox through the log and the worker:
    one local node with its embedded execution node, every limit hit by a real task."""
    c = Cluster.create(tmp_path / "local", 1, extra=["--worker-slots", "4"]).start()
    try:
        client = c.client()
        api_port = c.nodes[0].api.rsplit(":", 1)[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {api_port}), timeout=2); print('connected')"
        # Bounded (60 children), so a broken limit cannot hurt the machine; the refused fork fails it.
        fork_bomb = "import os, time\nfor _ in range(60):\n    if os.fork() == 0:\n        time.sleep(2); os._exit(0)"
        specs = {
            "timeout": ({"command": ["sleep", "30"], "limits": {"wall_s": 1}}, "timed-out", "wall_time"),
            "cpu": ({"command": ["python3", "-c", "while True: pass"], "limits": {"cpu_s": 1}}, "failed", "cpu_limit"),
            "memory": ({"command": ["python3", "-c", "x = bytearray(400 << 20)"], "limits": {"memory_mb": 128}},
                       "failed", "memory_limit"),
            "fork": ({"command": ["python3", "-c", fork_bomb], "limits": {"processes": 10}}, "failed", "process_limit"),
            "flood": ({"command": ["yes"], "limits": {"output_bytes": 1000}}, "failed", "output_limit"),
            "no-network": ({"command": ["python3", "-c", connect]}, "failed", "exit_code"),
            "network": ({"command": ["python3", "-c", connect], "capabilities": {"network": True}}, "succeeded", "ok"),
            "write-denied": ({"command": ["touch", str(shared_dir / "x")]}, "failed", "exit_code"),
            "write-granted": ({"command": ["touch", str(shared_dir / "y")],
                               "capabilities": {"write_paths": [str(shared_dir)]}}, "succeeded", "ok"),
        }
        ids = {name: client.submit_task(spec)["task_id"] for name, (spec, _, _) in specs.items()}
        for name, (spec, state, reason) in specs.items():
            task = _ended(client, ids[name])
            assert (task["state"], task["result"]["reason"]) == (state, reason), (name, task["result"])
        assert client.task_logs(ids["flood"])["stdout_truncated"] is True
        assert len(client.task_logs(ids["flood"])["stdout"]) == 1000
        assert client.task_logs(ids["network"])["stdout"] == "connected\n"
        assert not (shared_dir / "x").exists() and (shared_dir / "y").exists()
    finally:
        c.close()


def test_a_result_too_big_for_the_state_fails_the_task_instead_of_running_it_again(tmp_path, shared_dir):
    c = Cluster.create(tmp_path / "local", 1, extra=["--worker-slots", "1"]).start()
    try:
        client = c.client()
        runs = shared_dir / "runs"
        module = f"def big():\n    open('{runs}', 'a').write('x')\n    return 'y' * (300 << 10)\n"
        task_id = client.submit_task({"entry": "bigmod:big", "files": {"bigmod.py": module},
                                      "capabilities": {"write_paths": [str(shared_dir)]}})["task_id"]
        task = _ended(client, task_id)
        assert (task["state"], task["result"]["reason"]) == ("failed", "result_limit")
        assert runs.read_text() == "x"  # it ran once
    finally:
        c.close()


def test_a_refused_result_report_still_ends_the_task(tmp_path):
    """A finish report the cluster refuses (here: output over the stored bound) is replaced by
    a bare failure, so the task ends instead of being handed out and run again."""
    from synapse.execution.worker import Worker

    c = Cluster.create(tmp_path / "local", 1, extra=["--worker-slots", "0"]).start()
    try:
        client = c.client()
        client.request("POST", "/v1/workers", {"worker_id": "wx", "instance": "i1", "slots": 1})
        task_id = client.submit_task({"command": ["true"]})["task_id"]
        beat = wait_until(lambda: (b := client.request("POST", "/v1/workers/wx/heartbeat", {"epoch": 1, "wait_s": 1}))
                          and b["assign"] and b, 10, "the assignment")
        lease = beat["assign"][0]["lease"]
        huge = base64.b64encode(b"x" * (300 << 10)).decode()
        report = {"kind": "finish", "task_id": task_id, "lease": lease, "outcome": {"status": "succeeded", "stdout": huge}}
        worker = Worker(c.nodes[0].url, c.token, worker_id="wx", slots=1, driver="process")
        (result,) = worker._deliver(client, [report])
        assert result["ok"] is True
        task = client.task(task_id)
        assert (task["state"], task["result"]["reason"]) == ("failed", "report_refused")
    finally:
        c.close()


def test_a_worker_stopped_on_purpose_hands_its_task_to_another_at_once(cluster):
    leaving = cluster.worker("w1").start()
    client = cluster.client()
    _workers_up(client, 1)
    task_id = client.submit_task({"command": ["sleep", "1"]})["task_id"]  # no retries
    wait_until(lambda: client.task(task_id)["state"] == "running", 30, "the task to start")
    cluster.worker("w2").start()
    _workers_up(client, 2)
    leaving.stop()  # SIGTERM: the worker leaves the cluster
    workers = {w["worker_id"]: w for w in client.status()["workers"]}
    assert workers["w1"]["state"] == "down" and workers["w1"]["reason"] == "left"
    task = _ended(client, task_id)
    assert task["state"] == "succeeded" and task["worker"] == "w2" and task["attempts"] == 1


def test_the_heartbeat_revokes_a_cancelled_lease_but_not_one_its_worker_finished(tmp_path):
    """The long poll answers with the leases the worker must stop. A task the worker itself
    reported finished is not one of them (it is not running it): answering for it ended the
    poll at every task's end, a heartbeat round trip per task."""
    c = Cluster.create(tmp_path / "local", 1, extra=["--worker-slots", "0"]).start()
    try:
        client = c.client()
        client.request("POST", "/v1/workers", {"worker_id": "wy", "instance": "i1", "slots": 2})
        done, stopped = (client.submit_task({"command": ["true"]})["task_id"] for _ in range(2))
        leases: dict[str, int] = {}

        def assigned() -> bool:
            beat = client.request("POST", "/v1/workers/wy/heartbeat", {"epoch": 1, "holding": leases, "wait_s": 1})
            leases.update({a["task_id"]: a["lease"] for a in beat["assign"]})
            return len(leases) == 2

        wait_until(assigned, 10, "both assignments")
        finish = {"kind": "finish", "task_id": done, "lease": leases[done], "at_ms": int(time.time() * 1000),
                  "outcome": {"status": "succeeded"}}
        (result,) = client.request("POST", "/v1/workers/wy/reports", {"reports": [finish]})["results"]
        assert result["ok"] is True
        client.cancel_task(stopped)
        beat = client.request("POST", "/v1/workers/wy/heartbeat", {"epoch": 1, "holding": leases, "wait_s": 0})
        assert beat["revoke"] == {stopped: leases[stopped]}
        assert client.task(done)["state"] == "succeeded" and client.task(stopped)["state"] == "cancelled"
        # Only task ids are held: anything else is named, not looked up.
        with pytest.raises(SynapseError) as bad:
            client.request("POST", "/v1/workers/wy/heartbeat", {"epoch": 1, "holding": {"no such/id": 1}})
        assert bad.value.status == 400 and "holding" in str(bad.value)
    finally:
        c.close()
