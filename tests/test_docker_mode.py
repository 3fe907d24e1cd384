"""Docker mode for real (deploy/docker/): the images scripts/docker-build makes, the Compose
stack of deploy/docker/compose.yaml (3 voters, PostgreSQL, Chroma, Redis, a worker that runs
tasks in containers, Prometheus scraping the voters), brought up from nothing under a project name of this session's own
(synapse-test-<pid>, free host ports, a /24 no other network uses), so it never collides with
`./scripts/up --mode docker`. Everything it made (containers, networks, volumes, the task
directory) is removed at the end, also on failure.

The tests run in file order against one stack, and every write a node acknowledged is kept
in ACKED and checked again after each fault: a killed leader, a node cut off the network,
the whole stack taken down and up again. Skips only when no engine answers, unless
SYNAPSE_REQUIRE_DOCKER=1 (scripts/test), where it fails."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from tests.docker_stack import HEALTHY_S, NODES, ROOT, Stack, build_images, require_engine
from tests.test_monitoring import dashboard_panels, grafana_expr

COMPOSE_FILE = ROOT / "deploy" / "docker" / "compose.yaml"
GRAFANA_COMPOSE_FILE = ROOT / "deploy" / "monitoring" / "grafana" / "compose.yaml"
HEALTHY = (*NODES, "postgres", "chroma", "redis", "prometheus")

require_engine()


# key -> value: every write a node acknowledged.
ACKED: dict[str, int] = {}


def put(stack: Stack, node: str, key: str, value: int) -> bool:
    status, _ = stack.http(node, "PUT", f"/v1/kv/{key}", {"value": value})
    if status == 200:
        ACKED[key] = value
    return status == 200


def put_until_acked(stack: Stack, nodes, key: str, value: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for node in nodes:
            if put(stack, node, key, value):
                return
        time.sleep(0.2)
    raise AssertionError(f"no node of {nodes} acknowledged {key} within {within} s")


def assert_all_acked(stack: Stack, node: str) -> None:
    for key, value in ACKED.items():
        status, body = stack.http(node, "GET", f"/v1/kv/{key}")
        assert status == 200 and body["value"] == value, (node, key, status, body)


@pytest.fixture(scope="module")
def stack():
    build_images()
    s = Stack(COMPOSE_FILE, healthy=HEALTHY, running=("worker",))
    try:
        s.up()
        yield s
    finally:
        s.down()
        left, volumes = s.left_behind()
        assert left == [] and volumes == [], f"the test stack left containers {left} or volumes {volumes}"


def test_the_grafana_compose_file_adds_grafana_to_the_stack():
    # Grafana cannot run here (no image: deploy/monitoring/README.md); its Compose file must at
    # least merge with the stack's, with its mounts resolving to the provisioning and dashboards.
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-f", str(GRAFANA_COMPOSE_FILE), "config"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    grafana = yaml.safe_load(done.stdout)["services"]["grafana"]
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    sources = [v.split(":")[0] for v in grafana["volumes"] if v.startswith("/")]
    assert sorted(sources) == [str(ROOT / "deploy/monitoring/grafana/dashboards"), str(ROOT / "deploy/monitoring/grafana/provisioning")]


def test_stack_comes_up_healthy_from_nothing(stack):
    h = stack.health()
    assert {s: h[s] for s in HEALTHY} == dict.fromkeys(HEALTHY, "healthy")
    assert h["worker"] == "running"
    status, body = stack.http("node1", "GET", "/v1/cluster/status")
    assert status == 200 and body["leader"] in NODES, body
    # Only the APIs and Prometheus are published, on 127.0.0.1.
    ports = subprocess.run(["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project}",
                            "--format", "{{.Names}} {{.Ports}}"], capture_output=True, text=True).stdout
    published = sorted(p.split("->")[0] for line in ports.splitlines() for p in line.split()[1:] if "->" in p)
    assert published == sorted([*(f"127.0.0.1:{stack.ports[n]}" for n in NODES), f"127.0.0.1:{stack.prometheus_port}"]), ports
    # The state view is in PostgreSQL, one schema per node.
    sql = "select schema_name from information_schema.schemata where schema_name like 'synapse_%'"
    done = subprocess.run(["docker", "exec", stack.container("postgres"), "sh", "-c",
                           f'PGPASSWORD="$(cat /run/secrets/postgres_password)" psql -h 127.0.0.1 -U synapse -d synapse -Atc "{sql}"'],
                          capture_output=True, text=True)
    assert sorted(done.stdout.split()) == ["synapse_node1", "synapse_node2", "synapse_node3"], done


def test_write_through_node1_is_read_on_node3(stack):
    assert put(stack, "node1", "docker/first", 1)
    status, body = stack.http("node3", "GET", "/v1/kv/docker/first")
    assert status == 200 and body["value"] == 1, body


def test_memory_recall_through_the_chroma_container(stack):
    status, body = stack.http("node1", "POST", "/v1/memory/docker-test", {"records": [
        {"text": "the cat sleeps on the warm windowsill", "id": "cat"},
        {"text": "quarterly revenue grew by twelve percent", "id": "revenue"},
        {"text": "postgres stores the key value view", "id": "pg"}]})
    assert status == 200, body
    status, found = stack.http("node2", "POST", "/v1/memory/docker-test/recall", {"query": "where does the kitten nap?", "k": 2})
    assert status == 200 and found["results"][0]["id"] == "cat", found
    # The index is the Chroma server's: a database per node there.
    out = subprocess.run(["docker", "exec", stack.container("chroma"), "curl", "-fsS",
                          "http://127.0.0.1:8000/api/v2/tenants/default_tenant/databases"], capture_output=True, text=True).stdout
    assert {d["name"] for d in json.loads(out)} >= {"synapse-node1", "synapse-node2", "synapse-node3"}, out


def test_prometheus_scrapes_every_node_and_the_dashboard_sees_them(stack):
    deadline = time.monotonic() + 30  # a scrape every 5 s
    while True:
        targets = stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == "synapse"}
        if health == dict.fromkeys(NODES, "up"):
            break
        assert time.monotonic() < deadline, f"Prometheus's targets are not all up: {targets}"
        time.sleep(0.5)
    panels = {p["title"]: p for p in dashboard_panels()}

    def answer(title: str) -> list[dict]:
        body = stack.prometheus("/api/v1/query", query=grafana_expr(panels[title]["targets"][0]["expr"]))
        assert body["status"] == "success", body
        return body["data"]["result"]

    # A series per node, named as the nodes name each other.
    assert sorted(r["metric"]["instance"] for r in answer("Applied index lag")) == list(NODES)
    # The leader sees all three voters up: first live, from the leader itself, then in a scrape
    # taken after that. A sample scraped before (up to 5 s old) shows the cluster as it was
    # then — during the previous test's load, say — which this test did not look at.
    leader, since = leader_view_all_up(stack), time.time()
    while True:
        (sample,) = stack.prometheus("/api/v1/query", query=f'timestamp(synapse_is_leader{{instance="{leader}"}})')["data"]["result"]
        if float(sample["value"][1]) > since:
            break
        assert time.monotonic() < deadline + 30, f"Prometheus did not scrape {leader} again: {sample}"
        time.sleep(0.5)
    (voters_up,) = answer("Voters up (leader's view)")
    assert voters_up["value"][1] == "3", (voters_up, stack.prometheus("/api/v1/query", query="synapse_voter_up[30s]"),
                                          stack.prometheus("/api/v1/query", query="synapse_raft_longest_tick_gap_seconds"))


def leader_view_all_up(stack: Stack, timeout: float = 15.0) -> str:
    """The leader's name, once its /v1/cluster/status says it hears every voter (the view
    the dashboard's panel shows). Waited for, not assumed: the test before may have left a
    voter's last contact older than the up window for a moment. Fails with the statuses and
    each node's longest Raft thread stall if it does not come."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {n: stack.http(n, "GET", "/v1/cluster/status") for n in NODES}
        leaders = [n for n, (code, body) in statuses.items() if code == 200 and body["is_leader"]]
        if len(leaders) == 1 and all(m["up"] for m in statuses[leaders[0]][1]["members"]):
            return leaders[0]
        assert time.monotonic() < deadline, (statuses, stack.prometheus(
            "/api/v1/query", query="synapse_raft_longest_tick_gap_seconds"))
        time.sleep(0.5)


def _run_task(stack: Stack, spec: dict) -> dict:
    status, body = stack.http("node1", "POST", "/v1/tasks", spec)
    assert status == 201, body
    task_id = body["task_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, task = stack.http("node1", "GET", f"/v1/tasks/{task_id}")
        if status == 200 and task["state"] in ("succeeded", "failed", "timed-out", "cancelled"):
            status, logs = stack.http("node1", "GET", f"/v1/tasks/{task_id}/logs")
            return {**task, "logs": logs}
        time.sleep(0.3)
    logs = stack.compose("logs", "--tail", "40", "worker", check=False).stdout
    raise AssertionError(f"task {task_id} did not end within 60 s: {task}\n{logs}")


def test_a_task_runs_in_a_container_and_its_limits_hold(stack):
    t = _run_task(stack, {"command": ["sh", "-c", "id -u; cat /proc/net/dev | tail -n +3 | cut -d: -f1; test ! -e /var/run/docker.sock"],
                          "limits": {"memory_mb": 64, "wall_s": 60}})
    assert (t["state"], t["result"]["driver"]) == ("succeeded", "container"), t
    out = json.dumps(t["logs"])
    assert "65534" in out and "lo" in out and "eth0" not in out, t["logs"]
    t = _run_task(stack, {"command": ["python3", "-c", "x = bytearray(1 << 30)"], "limits": {"memory_mb": 128}})
    assert (t["state"], t["result"]["reason"]) == ("failed", "memory_limit"), t
    t = _run_task(stack, {"command": ["python3", "-c", "while True: pass"], "limits": {"cpu_s": 1, "wall_s": 60}})
    assert (t["state"], t["result"]["reason"]) == ("failed", "cpu_limit"), t
    t = _run_task(stack, {"command": ["sleep", "60"], "limits": {"wall_s": 2}})
    assert (t["state"], t["result"]["reason"]) == ("timed-out", "wall_time"), t
    # No task container is left behind.
    left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=org.synapse.task"], capture_output=True, text=True).stdout.split()
    assert left == []


def test_a_node_cut_off_the_network_stops_serving_and_catches_up(stack):
    node, net = "node3", stack.network()
    ip = f"{stack.prefix}.13"
    subprocess.run(["docker", "network", "disconnect", net, stack.container(node)], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 60
        while stack.inside(node, "/v1/kv/docker/first") != 503:
            assert time.monotonic() < deadline, "the cut-off node still served a linearizable read after 60 s"
            time.sleep(0.5)
        for i in range(20):
            put_until_acked(stack, ("node1", "node2"), f"docker/cut/{i}", i)
        assert stack.inside(node, "/v1/kv/docker/cut/0") == 503
    finally:
        # Back with its address and name (the others know it by both).
        subprocess.run(["docker", "network", "connect", "--ip", ip, "--alias", node, net, stack.container(node)],
                       check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while True:
        status, body = stack.http(node, "GET", "/v1/kv/docker/cut/19")
        if status == 200 and body["value"] == 19:
            break
        assert time.monotonic() < deadline, f"{node} did not catch up within 60 s: {status} {body}"
        time.sleep(0.5)
    assert_all_acked(stack, node)


def test_killing_the_leader_loses_nothing_acknowledged(stack):
    status, body = stack.http("node1", "GET", "/v1/cluster/status")
    leader = body["leader"]
    others = [n for n in NODES if n != leader]
    subprocess.run(["docker", "kill", stack.container(leader)], check=True, capture_output=True)
    for i in range(30):
        put_until_acked(stack, others, f"docker/after-kill/{i}", i)
    for node in others:
        assert_all_acked(stack, node)
    subprocess.run(["docker", "start", stack.container(leader)], check=True, capture_output=True)
    stack.wait_healthy()
    assert_all_acked(stack, leader)


def test_down_then_up_keeps_every_acknowledged_write(stack):
    stack.compose("down", "--timeout", "30")
    assert subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}"],
                          capture_output=True, text=True).stdout.split() == []
    stack.compose("up", "-d", timeout=HEALTHY_S + 60)
    stack.wait_healthy()
    for node in NODES:
        assert_all_acked(stack, node)
    status, found = stack.http("node3", "POST", "/v1/memory/docker-test/recall", {"query": "a sleepy cat", "k": 1})
    assert status == 200 and found["results"][0]["id"] == "cat", found
