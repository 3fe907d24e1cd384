"""The cluster under test: real ``synapse node start`` processes, on loopback or each in its
own network namespace (``netns.py``), with the faults the nemeses need: SIGKILL, SIGSTOP /
SIGCONT, restart, and — in namespaces only — cutting nodes off from each other.

Everything it starts is in its own session and killed on ``close`` (also at exit); in netns
mode the topology tears down its namespaces too. It only ever touches what it started.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from synapse.chaos.netns import Topology, enter_netns, unavailable_reason

API_PORT, RAFT_PORT = 7070, 7071


class ClusterUnderTest:
    def __init__(self, size: int, workdir: Path, mode: str, checkpoint_interval: int = 200) -> None:
        if mode not in ("loopback", "netns"):
            raise ValueError(f"mode must be loopback or netns, not {mode!r}")
        self.size, self.mode, self.workdir = size, mode, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret = self.workdir / "secret"
        self.secret.write_text(secrets.token_hex(32))
        os.chmod(self.secret, 0o600)
        self.topology: Topology | None = None
        if mode == "netns":
            reason = unavailable_reason()
            if reason:
                raise RuntimeError(f"network namespaces are not available: {reason}")
            self.topology = Topology(size).create()
            self.api = {i: f"{Topology.addr(i)}:{API_PORT}" for i in self.ids}
            self.raft = {i: f"{Topology.addr(i)}:{RAFT_PORT}" for i in self.ids}
        else:
            ports = free_ports(2 * size)
            self.api = {i: f"127.0.0.1:{ports[2 * i - 2]}" for i in self.ids}
            self.raft = {i: f"127.0.0.1:{ports[2 * i - 1]}" for i in self.ids}
        self.procs: dict[int, subprocess.Popen] = {}
        self.paused: set[int] = set()
        self.clock: dict[int, str | None] = {}  # the faketime spec each node runs under
        self.checkpoint_interval = checkpoint_interval
        self._token = ""
        # Loopback nodes are started from this one thread, which lives until close(): the
        # parent-death signal (_die_with_parent) fires when the *thread* that forked the node
        # ends, not the process. Started from the nemesis thread, the nodes it restarted were
        # SIGKILLed when that thread returned at the end of a run (a CI run's n1 and n2 died
        # silently before the final checks, and finish() had already found them alive).
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chaos-spawn")
        atexit.register(self.close)

    @property
    def ids(self) -> range:
        return range(1, self.size + 1)

    def name(self, i: int) -> str:
        return f"n{i}"

    def data_dir(self, i: int) -> Path:
        return self.workdir / self.name(i)

    # --- processes ---

    def _args(self, i: int) -> list[str]:
        peers = ",".join(f"{self.name(j)}={self.raft[j]}" for j in self.ids if j != i)
        return [sys.executable, "-m", "synapse.cli.main", "node", "start", "--id", self.name(i),
                "--data-dir", str(self.data_dir(i)), "--api", self.api[i], "--raft", self.raft[i],
                "--peers", peers, "--secret-file", str(self.secret),
                "--checkpoint-interval", str(self.checkpoint_interval), "--debug-fault-injection"]

    def start(self, i: int, clock: str | None = None) -> None:
        """Starts node i; ``clock``: a libfaketime spec (``+1h``, ``+0 x2``...) it runs under."""
        if self.alive(i):
            return
        args = self._args(i)
        if clock is not None:
            args = ["faketime", "-f", clock, *args]
        log = open(self.workdir / f"{self.name(i)}.log", "ab")
        if self.topology is not None:
            self.procs[i] = self.topology.popen(i, args, stdout=log, stderr=subprocess.STDOUT)
        else:
            self.procs[i] = self._spawner.submit(subprocess.Popen, args, stdout=log, stderr=subprocess.STDOUT,
                                                 preexec_fn=_die_with_parent).result()
        self.paused.discard(i)
        self.clock[i] = clock

    def start_all(self, timeout: float = 60.0) -> None:
        for i in self.ids:
            self.start(i)
        self.wait_ready(timeout)

    def alive(self, i: int) -> bool:
        p = self.procs.get(i)
        return p is not None and p.poll() is None

    # Signals go to the node's whole process group (its own session): under the clock nemesis
    # the node is a child of `faketime`, not the process we started.

    def kill(self, i: int) -> None:
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            if i in self.paused:
                _signal_group(p, signal.SIGCONT)
            _signal_group(p, signal.SIGKILL)
            p.wait(10)
        self.paused.discard(i)

    def pause(self, i: int) -> None:
        if self.alive(i):
            _signal_group(self.procs[i], signal.SIGSTOP)
            self.paused.add(i)

    def resume(self, i: int) -> None:
        if self.alive(i) and i in self.paused:
            _signal_group(self.procs[i], signal.SIGCONT)
        self.paused.discard(i)

    # --- network faults (netns only) ---

    @property
    def can_partition(self) -> bool:
        return self.topology is not None

    def isolate(self, i: int, from_: list[int]) -> None:
        self.topology.isolate(i, from_)

    def heal_all(self) -> None:
        for i in self.paused.copy():
            self.resume(i)
        if self.topology is not None:
            for i in self.ids:
                self.topology.heal(i)

    # --- talking to nodes ---

    @property
    def token(self) -> str:
        if not self._token:
            for i in self.ids:
                f = self.data_dir(i) / "root.token"
                if f.exists() and f.read_text().strip():
                    self._token = f.read_text().strip()
                    break
        return self._token

    def enter_network(self) -> None:
        """Call first on any thread that talks to the nodes (netns: join the bridge namespace)."""
        if self.topology is not None:
            enter_netns(self.topology.bridge_ns)

    def request(self, i: int, method: str, path: str, body: dict | None = None, timeout: float = 2.0,
                headers: dict | None = None) -> tuple[int, dict]:
        host, port = self.api[i].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            h = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, json.dumps(body).encode() if body is not None else None, h)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else {})
        finally:
            conn.close()

    def status(self, i: int, timeout: float = 1.0) -> dict | None:
        def get():
            try:
                code, body = self.request(i, "GET", "/v1/cluster/status", timeout=timeout)
                return body if code == 200 else None
            except (OSError, ValueError, http.client.HTTPException):
                return None

        return self.topology.call(get) if self.topology is not None else get()

    def statuses(self) -> dict[str, dict | None]:
        return {self.name(i): self.status(i) for i in self.ids}

    def leader(self) -> int | None:
        for i in self.ids:
            s = self.status(i)
            if s and s.get("is_leader"):
                return i
        return None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.token and all((s := self.status(i)) and s.get("leader") for i in self.ids):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the cluster did not become ready within {timeout:g} s; logs in {self.workdir}")

    def close(self) -> None:
        atexit.unregister(self.close)
        for i in list(self.procs):
            try:
                self.kill(i)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.topology is not None:
            self.topology.close()
        self._spawner.shutdown()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # in the child, between fork and exec
    """Own session (signals to the controller's group do not reach it), and SIGKILL when the
    controlling process dies, however it dies: a chaos run never leaves nodes behind. The
    kernel sends it when the forking *thread* ends: ClusterUnderTest forks from its spawner."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports



