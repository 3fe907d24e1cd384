"""Real Synapse clusters for tests: each node is a `synapse node start` subprocess on loopback
with its own data dir, so tests kill, pause and restart real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from synapse.chaos.cluster import free_ports  # noqa: F401  (tests import it from here)
from synapse.client import Client

SYNAPSE = [sys.executable, "-m", "synapse.cli.main"]
SECRET = "test-cluster-secret-0123456789abcdef"


def wait_until(predicate, timeout: float, what: str):
    """Polls ``predicate`` until it returns something truthy (returned), or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def post_json(node, path: str, body, token: str, method: str = "POST") -> tuple[int, dict]:
    """One request, no client retries: (status, JSON answer). ``body``: JSON-able, or bytes."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(node.url + path, data, {"Authorization": f"Bearer {token}",
                                                          "Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def scrape(node, token: str) -> dict[str, float]:
    """The node's /metrics samples: ``{'name{label="v"}': value}`` (labels as the text has them)."""
    import urllib.request

    req = urllib.request.Request(node.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


class _Process:
    """A subprocess in its own session, with its output in ``log_path``."""

    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class NodeProc(_Process):
    node_id: str
    api: str
    raft: str
    data_dir: Path
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.api}"


@dataclass
class WorkerProc(_Process):
    """An execution node: `synapse worker start` in its own process group (a SIGKILL of the
    worker leaves its sandboxes to their own death-with-parent, as on a real machine)."""

    worker_id: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None


@dataclass
class Cluster:
    root: Path
    nodes: list[NodeProc] = field(default_factory=list)
    workers: list[WorkerProc] = field(default_factory=list)
    token: str = ""
    # With TLS: every node serves HTTPS and requires client certificates (`synapse tls init`
    # made the CA, a certificate per node and one for the tests' clients, in root/tls).
    tls_dir: Path | None = None

    @classmethod
    def create(cls, root: Path, size: int, storage: str = "sqlite", extra: list[str] | None = None,
               tls: bool = False) -> "Cluster":
        root.mkdir(parents=True, exist_ok=True)
        secret = root / "secret"
        secret.write_text(SECRET)
        ports = free_ports(2 * size)
        cluster = cls(root)
        if tls:
            from synapse.security.tls import init_certificates

            cluster.tls_dir = root / "tls"
            init_certificates(cluster.tls_dir, [f"n{i + 1}" for i in range(size)] + ["client"], [])
        raft = {f"n{i + 1}": f"127.0.0.1:{ports[2 * i + 1]}" for i in range(size)}
        for i in range(size):
            node_id = f"n{i + 1}"
            api = f"127.0.0.1:{ports[2 * i]}"
            peers = ",".join(f"{k}={v}" for k, v in raft.items() if k != node_id)
            args = SYNAPSE + ["node", "start", "--id", node_id, "--data-dir", str(root / node_id),
                              "--api", api, "--raft", raft[node_id], "--storage", storage]
            if size > 1:
                args += ["--peers", peers, "--secret-file", str(secret)]
            args += cluster.tls_args(node_id) + (extra or [])
            cluster.nodes.append(NodeProc(node_id, api, raft[node_id], root / node_id, args, root / f"{node_id}.log",
                                          tls=tls))
        return cluster

    def tls_args(self, node_id: str) -> list[str]:
        if self.tls_dir is None:
            return []
        d = self.tls_dir
        return ["--tls-cert", str(d / f"{node_id}.crt"), "--tls-key", str(d / f"{node_id}.key"),
                "--tls-client-ca", str(d / "ca.crt"), "--tls-ca", str(d / "ca.crt")]

    def client_tls(self) -> dict:
        """The TLS settings of a client of this cluster (empty without TLS)."""
        if self.tls_dir is None:
            return {}
        d = self.tls_dir
        return {"tls_ca": d / "ca.crt", "tls_cert": d / "client.crt", "tls_key": d / "client.key"}

    def new_node(self, node_id: str) -> NodeProc:
        """A node that is not a voter yet: its peers are the current voters. Start it, then
        add it with POST /v1/cluster/members."""
        api, raft = (f"127.0.0.1:{p}" for p in free_ports(2))
        peers = ",".join(f"{n.node_id}={n.raft}" for n in self.nodes)
        args = SYNAPSE + ["node", "start", "--id", node_id, "--data-dir", str(self.root / node_id),
                          "--api", api, "--raft", raft, "--peers", peers, "--secret-file", str(self.root / "secret")]
        if self.tls_dir is not None and not (self.tls_dir / f"{node_id}.crt").exists():
            from synapse.security.tls import init_certificates

            init_certificates(self.tls_dir, [node_id], [])  # signed by the cluster's CA, kept
        args += self.tls_args(node_id)
        node = NodeProc(node_id, api, raft, self.root / node_id, args, self.root / f"{node_id}.log",
                        tls=self.tls_dir is not None)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 30.0) -> "Cluster":
        for n in self.nodes:
            n.start()
        self.wait_ready(timeout)
        self.token = (self.nodes[0].data_dir / "root.token").read_text().strip()
        self.wait_named(timeout)
        return self

    def wait_named(self, timeout: float = 15.0) -> None:
        """Until every live node names every member (its node id and API address applied).
        Ready is not registered: a node writes its own address after it is ready, and until
        each node has applied every registration its status names no leader or member (a CI
        run's overview once found n3 still unnamed)."""
        wait_until(lambda: all(m["node_id"] and m["api"] for s in self.statuses().values() for m in s["members"]),
                   timeout, "every node to name every member")

    def worker(self, worker_id: str, slots: int = 2, extra: list[str] | None = None) -> WorkerProc:
        """An execution node joining this cluster (not started)."""
        args = SYNAPSE + ["worker", "start", "--join", ",".join(n.url for n in self.nodes), "--token", self.token,
                          "--id", worker_id, "--slots", str(slots), *(extra or [])]
        w = WorkerProc(worker_id, args, self.root / f"{worker_id}.log")
        self.workers.append(w)
        return w

    def close(self) -> None:
        for w in self.workers:
            try:
                w.resume()
            except (ProcessLookupError, AttributeError):
                pass
            w.stop()
        for n in self.nodes:
            if n.alive():
                try:
                    n.resume()
                except ProcessLookupError:
                    pass
                n.stop()

    @classmethod
    def quiet(cls, root: Path) -> "Cluster":
        """One started node nothing else writes to (no periodic checkpoints, no embedded
        worker): its state hash changes only by the requests of the test."""
        c = cls.create(root, 1, extra=["--worker-slots", "0", "--checkpoint-interval", "0"]).start()
        c.wait_registered()
        return c

    def wait_registered(self, timeout: float = 15.0) -> dict[str, dict]:
        """Until every node has registered itself, then converged. Registering is the last
        write a node makes of its own after a start (after its root principal and tokens,
        written by the same task, retried every 0.5 s while there is no leader); without a
        worker or periodic checkpoints, the state then changes only by the test's requests."""
        self.wait_named(timeout)
        return self.wait_converged(timeout)

    def node(self, node_id: str) -> NodeProc:
        return next(n for n in self.nodes if n.node_id == node_id)

    def client(self, *nodes: NodeProc, timeout: float = 10.0) -> Client:
        targets = nodes or tuple(n for n in self.nodes if n.alive())
        return Client([n.url for n in targets], self.token, timeout=timeout, **self.client_tls())

    def wait_ready(self, timeout: float = 30.0, nodes: list[NodeProc] | None = None) -> None:
        """Until every given live node has a leader and has applied what it knows is committed."""
        import http.client

        deadline = time.monotonic() + timeout
        pending = [n for n in (nodes or self.nodes) if n.alive()]
        tls = None
        if self.tls_dir is not None:
            from synapse.security.tls import client_context

            files = self.client_tls()
            tls = client_context(files["tls_ca"], files["tls_cert"], files["tls_key"])
        last: dict[str, str] = {}
        while pending:
            token_file = self.nodes[0].data_dir / "root.token"
            token = self.token or (token_file.read_text().strip() if token_file.exists() else "")
            still = []
            for n in pending:
                if not n.alive():
                    raise AssertionError(f"node {n.node_id} exited:\n{n.log()[-3000:]}")
                host, port = n.api.split(":")
                try:
                    if tls is not None:
                        conn = http.client.HTTPSConnection(host, int(port), timeout=1, context=tls)
                    else:
                        conn = http.client.HTTPConnection(host, int(port), timeout=1)
                    conn.request("GET", "/ready", headers={"Authorization": f"Bearer {token}"})
                    resp = conn.getresponse()
                    last[n.node_id] = f"{resp.status} {resp.read()[:300]!r}"
                    if resp.status != 200:
                        still.append(n)
                    conn.close()
                except OSError as e:
                    last[n.node_id] = repr(e)
                    still.append(n)
            pending = still
            if pending and time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.node_id} (/ready: {last.get(n.node_id)})\n{n.log()[-2000:]}" for n in pending)
                raise AssertionError(f"nodes {[n.node_id for n in pending]} not ready in {timeout} s\n{logs}")
            if pending:
                time.sleep(0.1)

    def leader(self, timeout: float = 10.0) -> NodeProc:
        deadline = time.monotonic() + timeout
        while True:
            for n in self.nodes:
                if not n.alive():
                    continue
                try:
                    s = self.client(n, timeout=1).status()
                except Exception:
                    continue
                if s.get("is_leader"):
                    return n
            if time.monotonic() > deadline:
                raise AssertionError("no leader elected")
            time.sleep(0.05)

    def statuses(self) -> dict[str, dict]:
        return {n.node_id: self.client(n, timeout=5).status() for n in self.nodes if n.alive()}

    def wait_converged(self, timeout: float = 15.0) -> dict[str, dict]:
        """Until every live node reports the same applied index and state hash."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.statuses()
            if len({(v["applied_index"], v["state_hash"]) for v in s.values()}) == 1:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes did not converge: { {k: (v['applied_index'], v['state_hash'][:12]) for k, v in s.items()} }")
            time.sleep(0.1)
