"""Distributed mode's Compose file (deploy/distributed/compose.yaml): voters and execution
nodes as hosts of their own, on their own networks — 3 voters and 2 workers in containers.
A task is scheduled onto a worker; that worker's container is killed; the task is
rescheduled onto the other worker and ends there. The workers cannot reach the voters'
Raft ports (only the voters share that network). Skips only when no engine answers, unless
SYNAPSE_REQUIRE_DOCKER=1 (scripts/test)."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.docker_stack import NODES, ROOT, Stack, build_images, require_engine

require_engine()

COMPOSE_FILE = ROOT / "deploy" / "distributed" / "compose.yaml"
WORKERS = ("worker1", "worker2")


@pytest.fixture(scope="module")
def stack():
    build_images()
    s = Stack(COMPOSE_FILE, healthy=NODES, running=WORKERS, network="api")
    try:
        s.up(*NODES, *WORKERS)
        yield s
    finally:
        s.down()
        left, volumes = s.left_behind()
        assert left == [] and volumes == [], f"the test stack left containers {left} or volumes {volumes}"


def _until(what: str, within: float, check):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def _workers_up(stack: Stack) -> set[str]:
    status, body = stack.http("node1", "GET", "/v1/workers")
    return {w["worker_id"] for w in body.get("workers", []) if w.get("state") == "up"} if status == 200 else set()


def test_the_workers_reach_the_apis_but_not_the_raft_ports(stack):
    _until("both workers registered and up", 60, lambda: _workers_up(stack) >= set(WORKERS))
    probe = "import socket, sys; s = socket.socket(); s.settimeout(3); sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"
    api = subprocess.run(["docker", "exec", stack.container("worker1"), "python3", "-c", probe, "node1", "7070"])
    raft = subprocess.run(["docker", "exec", stack.container("worker1"), "python3", "-c", probe,
                           f"{stack.raft_prefix}.11", "7071"])
    assert api.returncode == 0 and raft.returncode != 0, (api.returncode, raft.returncode)


def test_a_task_on_a_killed_worker_is_rescheduled_onto_the_other(stack):
    _until("both workers registered and up", 60, lambda: _workers_up(stack) >= set(WORKERS))
    status, body = stack.http("node1", "POST", "/v1/tasks", {
        "command": ["python3", "-c", "import time; time.sleep(12); print('finished')"],
        "limits": {"wall_s": 120}, "retries": 1})  # a lost worker uses one attempt of the budget
    assert status == 201, body
    task_id = body["task_id"]

    def running_on():
        code, task = stack.http("node2", "GET", f"/v1/tasks/{task_id}")
        return task.get("worker") if code == 200 and task.get("state") == "running" else None

    first = _until("the task running on a worker", 60, running_on)
    assert first in WORKERS
    subprocess.run(["docker", "kill", stack.container(first)], check=True, capture_output=True)
    (other,) = set(WORKERS) - {first}

    def ended():
        code, task = stack.http("node3", "GET", f"/v1/tasks/{task_id}")
        return task if code == 200 and task.get("state") in ("succeeded", "failed", "timed-out", "cancelled", "lost") else None

    task = _until("the task to end on the other worker", 120, ended)
    assert task["state"] == "succeeded" and task["worker"] == other, task
    status, logs = stack.http("node1", "GET", f"/v1/tasks/{task_id}/logs")
    assert status == 200 and "finished" in str(logs), logs
    down = _until(f"{first} reported down", 30, lambda: first not in _workers_up(stack) and _workers_up(stack))
    assert other in down
