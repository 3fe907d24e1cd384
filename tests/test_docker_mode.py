"""Docker mode for real (deploy/docker/): the images scripts/docker-build makes, the Compose
stack of deploy/docker/compose.yaml (3 voters, PostgreSQL, Chroma, Redis, a worker that runs
tasks in containers), brought up from nothing under a project name of this session's own
(synapse-test-<pid>, free host ports, a /24 no other network uses), so it never collides with
`./scripts/up --mode docker`. Everything it made (containers, networks, volumes, the task
directory) is removed at the end, also on failure.

The tests run in file order against one stack, and every write a node acknowledged is kept
in ACKED and checked again after each fault: a killed leader, a node cut off the network,
the whole stack taken down and up again. Skips only when no engine answers, unless
SYNAPSE_REQUIRE_DOCKER=1 (scripts/test), where it fails."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "docker" / "compose.yaml"
NODES = ("node1", "node2", "node3")
HEALTHY_S = 240  # a stack from nothing: PostgreSQL initdb, Chroma, three nodes electing


def _engine_problem() -> str | None:
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return "the docker client or docker-compose is not installed"
    done = subprocess.run(["docker", "version"], capture_output=True, timeout=30)
    return None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()


ENGINE_PROBLEM = _engine_problem()
if ENGINE_PROBLEM is not None:
    if os.environ.get("SYNAPSE_REQUIRE_DOCKER") == "1":
        raise RuntimeError(f"SYNAPSE_REQUIRE_DOCKER=1 but no Docker engine answers: {ENGINE_PROBLEM}")
    pytest.skip(f"no Docker engine answers: {ENGINE_PROBLEM}", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_subnet_prefix() -> str:
    """A 10.231.X.0/24 that no Docker network and no host route overlaps."""
    used = []
    ids = subprocess.run(["docker", "network", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
    for line in subprocess.run(["docker", "network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids],
                               capture_output=True, text=True, check=True).stdout.split():
        used.append(ipaddress.ip_network(line, strict=False))
    for line in subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout.splitlines():
        word = line.split()[0] if line.strip() else ""
        if "/" in word:
            used.append(ipaddress.ip_network(word, strict=False))
    for third in random.sample(range(100, 250), 150):
        net = ipaddress.ip_network(f"10.231.{third}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return f"10.231.{third}"
    raise RuntimeError("no free 10.231.X.0/24 for the test stack")


class Stack:
    def __init__(self) -> None:
        self.project = f"synapse-test-{os.getpid()}"
        self.ports = {n: _free_port() for n in NODES}
        self.prefix = _free_subnet_prefix()
        self.secrets = Path(tempfile.mkdtemp(prefix="synapse-docker-test-secrets-"))
        self.task_dir = tempfile.mkdtemp(prefix="synapse-docker-test-tasks-", dir="/var/tmp")
        os.chmod(self.task_dir, 0o711)  # the task uid walks to its working directory
        self.env = {
            **os.environ,
            "SYNAPSE_NODE1_PORT": str(self.ports["node1"]), "SYNAPSE_NODE2_PORT": str(self.ports["node2"]),
            "SYNAPSE_NODE3_PORT": str(self.ports["node3"]), "SYNAPSE_SUBNET_PREFIX": self.prefix,
            "SYNAPSE_SECRETS_DIR": str(self.secrets), "SYNAPSE_TASK_DIR": self.task_dir,
        }
        self.token = ""

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed: {done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def network(self) -> str:
        return f"{self.project}_synapse"

    def health(self) -> dict[str, str]:
        names = [self.container(s) for s in (*NODES, "postgres", "chroma", "redis", "worker")]
        done = subprocess.run(["docker", "inspect", "--format",
                               "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}", *names],
                              capture_output=True, text=True)
        found = {}
        for line in done.stdout.splitlines():
            name, status, health = line.split()
            found[name.lstrip("/").removeprefix(f"{self.project}_").removesuffix("_1")] = health if health != "none" else status
        return found

    def wait_healthy(self, services=(*NODES, "postgres", "chroma", "redis")) -> None:
        deadline = time.monotonic() + HEALTHY_S
        while time.monotonic() < deadline:
            h = self.health()
            if all(h.get(s) == "healthy" for s in services) and h.get("worker") == "running":
                return
            time.sleep(1)
        logs = self.compose("logs", "--tail", "30", check=False).stdout
        raise AssertionError(f"the stack was not healthy within {HEALTHY_S} s: {self.health()}\n{logs[-6000:]}")

    def http(self, node: str, method: str, path: str, body=None, timeout: float = 15) -> tuple[int, object]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[node]}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def inside(self, node: str, path: str) -> int:
        """The HTTP status of a GET made inside the node's own container (on its loopback:
        it answers there even when cut off every network)."""
        done = subprocess.run(["docker", "exec", self.container(node), "curl", "-s", "-o", "/dev/null", "-m", "20",
                               "-w", "%{http_code}", "-H", f"Authorization: Bearer {self.token}",
                               f"http://127.0.0.1:7070{path}"], capture_output=True, text=True, timeout=60)
        return int(done.stdout or 0)

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)
        # Task containers the worker may have left (it runs them through the host's engine).
        subprocess.run(f"docker ps -aq --filter label=org.synapse.task | xargs -r docker rm -f", shell=True,
                       capture_output=True)
        shutil.rmtree(self.secrets, ignore_errors=True)
        shutil.rmtree(self.task_dir, ignore_errors=True)


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
    if os.environ.get("SYNAPSE_DOCKER_BUILT") != "1":  # scripts/test builds before pytest
        done = subprocess.run([str(ROOT / "scripts" / "docker-build")], capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
    s = Stack()
    try:
        # The stack's secrets, as scripts/docker-build makes them for `./scripts/up --mode docker`.
        made = subprocess.run(["bash", "-c", f"cd {ROOT} && source scripts/lib/setup.sh && source scripts/lib/docker.sh "
                               f"&& ensure_docker_secrets {s.secrets}"], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        s.token = (s.secrets / "root_token").read_text().strip()
        s.compose("up", "-d", timeout=HEALTHY_S + 60)
        s.wait_healthy()
        yield s
    finally:
        s.down()
        left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={s.project}"],
                              capture_output=True, text=True).stdout.split()
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={s.project}"],
                                 capture_output=True, text=True).stdout.split()
        assert left == [] and volumes == [], f"the test stack left containers {left} or volumes {volumes}"


def test_stack_comes_up_healthy_from_nothing(stack):
    h = stack.health()
    assert {s: h[s] for s in (*NODES, "postgres", "chroma", "redis")} == dict.fromkeys((*NODES, "postgres", "chroma", "redis"), "healthy")
    assert h["worker"] == "running"
    status, body = stack.http("node1", "GET", "/v1/cluster/status")
    assert status == 200 and body["leader"] in NODES, body
    # Only the APIs are published, on 127.0.0.1.
    ports = subprocess.run(["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project}",
                            "--format", "{{.Names}} {{.Ports}}"], capture_output=True, text=True).stdout
    published = sorted(p.split("->")[0] for line in ports.splitlines() for p in line.split()[1:] if "->" in p)
    assert published == sorted(f"127.0.0.1:{stack.ports[n]}" for n in NODES), ports
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
