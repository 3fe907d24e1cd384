"""A Compose stack of this project's (deploy/docker/compose.yaml, deploy/distributed/compose.yaml)
brought up under a project name of its own (synapse-test-<pid> or the caller's), free host
ports and a /24 no other network or route uses, and removed with everything it made: used
by tests/test_docker_mode.py, tests/test_distributed_mode.py and scripts/bench_footprint.py."""

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
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODES = ("node1", "node2", "node3")
HEALTHY_S = 240  # a stack from nothing: PostgreSQL initdb, Chroma, three nodes electing


def engine_problem() -> str | None:
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return "the docker client or docker-compose is not installed"
    done = subprocess.run(["docker", "version"], capture_output=True, timeout=30)
    return None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_subnet_prefix(taken: tuple[str, ...] = ()) -> str:
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
        if f"10.231.{third}" in taken:
            continue
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return f"10.231.{third}"
    raise RuntimeError("no free 10.231.X.0/24 for the test stack")


class Stack:
    """``healthy``: the services with a healthcheck that must pass; ``running``: the others
    (workers) that must just run."""

    def __init__(self, compose_file: Path, healthy: tuple[str, ...], running: tuple[str, ...],
                 project: str | None = None, network: str = "synapse") -> None:
        self.compose_file, self.healthy, self.running = compose_file, healthy, running
        self.project = project or f"synapse-test-{os.getpid()}"
        self._network = network
        self.ports = {n: free_port() for n in NODES}
        self.prometheus_port = free_port()  # docker mode's Prometheus (deploy/monitoring/)
        self.prefix = free_subnet_prefix()
        self.raft_prefix = free_subnet_prefix(taken=(self.prefix,))  # distributed mode's second network
        self.secrets = Path(tempfile.mkdtemp(prefix="synapse-docker-test-secrets-"))
        self.task_dir = tempfile.mkdtemp(prefix="synapse-docker-test-tasks-", dir="/var/tmp")
        os.chmod(self.task_dir, 0o711)  # the task uid walks to its working directory
        self.env = {
            **os.environ,
            "SYNAPSE_NODE1_PORT": str(self.ports["node1"]), "SYNAPSE_NODE2_PORT": str(self.ports["node2"]),
            "SYNAPSE_NODE3_PORT": str(self.ports["node3"]), "SYNAPSE_PROMETHEUS_PORT": str(self.prometheus_port),
            "SYNAPSE_SUBNET_PREFIX": self.prefix,
            "SYNAPSE_RAFT_SUBNET_PREFIX": self.raft_prefix,
            "SYNAPSE_SECRETS_DIR": str(self.secrets), "SYNAPSE_TASK_DIR": self.task_dir,
        }
        self.token = ""

    def make_secrets(self) -> None:
        """The stack's secrets, as scripts/docker-build makes them for `./scripts/up --mode docker`."""
        made = subprocess.run(["bash", "-c", f"cd {ROOT} && source scripts/lib/setup.sh && source scripts/lib/docker.sh "
                               f"&& ensure_docker_secrets {self.secrets}"], capture_output=True, text=True)
        if made.returncode != 0:
            raise AssertionError(f"the stack's secrets could not be made: {made.stderr}")
        self.token = (self.secrets / "root_token").read_text().strip()

    def up(self, *services: str) -> None:
        """Secrets, then ``up -d`` (of ``services``, or all), then until healthy."""
        if not self.token:
            self.make_secrets()
        self.compose("up", "-d", *services, timeout=HEALTHY_S + 60)
        self.wait_healthy()

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker-compose", "-f", str(self.compose_file), "-p", self.project, *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed: {done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def network(self) -> str:
        return f"{self.project}_{self._network}"

    def health(self) -> dict[str, str]:
        names = [self.container(s) for s in (*self.healthy, *self.running)]
        done = subprocess.run(["docker", "inspect", "--format",
                               "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}", *names],
                              capture_output=True, text=True)
        found = {}
        for line in done.stdout.splitlines():
            name, status, health = line.split()
            found[name.lstrip("/").removeprefix(f"{self.project}_").removesuffix("_1")] = health if health != "none" else status
        return found

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTHY_S
        while time.monotonic() < deadline:
            h = self.health()
            if all(h.get(s) == "healthy" for s in self.healthy) and all(h.get(s) == "running" for s in self.running):
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

    def prometheus(self, path: str, **params) -> dict:
        """A GET of the stack's Prometheus API (published on 127.0.0.1), its JSON answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.prometheus_port}{path}{query}", timeout=15) as r:
            return json.loads(r.read())

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
        subprocess.run("docker ps -aq --filter label=org.synapse.task | xargs -r docker rm -f", shell=True,
                       capture_output=True)
        shutil.rmtree(self.secrets, ignore_errors=True)
        shutil.rmtree(self.task_dir, ignore_errors=True)

    def left_behind(self) -> tuple[list[str], list[str]]:
        """Containers and volumes of this project still there (none after ``down``)."""
        label = f"label=com.docker.compose.project={self.project}"
        left = subprocess.run(["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True).stdout.split()
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", label],
                                 capture_output=True, text=True).stdout.split()
        return left, volumes


def require_engine() -> None:
    """Skips the calling test module when no engine answers — fails instead under
    SYNAPSE_REQUIRE_DOCKER=1 (scripts/test) — and builds the images unless scripts/test did."""
    import pytest

    problem = engine_problem()
    if problem is not None:
        if os.environ.get("SYNAPSE_REQUIRE_DOCKER") == "1":
            raise RuntimeError(f"SYNAPSE_REQUIRE_DOCKER=1 but no Docker engine answers: {problem}")
        pytest.skip(f"no Docker engine answers: {problem}", allow_module_level=True)


def build_images() -> None:
    if os.environ.get("SYNAPSE_DOCKER_BUILT") != "1":  # scripts/test builds before pytest
        done = subprocess.run([str(ROOT / "scripts" / "docker-build")], capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]


