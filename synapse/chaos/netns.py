"""Real network partitions on one machine: Linux network namespaces, veth pairs, a bridge and
iptables (chaos/DESIGN.md, "Network namespaces"). Root only. Used by the chaos
runs (issue 5) and by tests/test_partition.py.

Topology of one ``Topology`` (every name carries a per-run prefix, ``syn-<pid>-<random>``)::

    <prefix>-br   bridge namespace: br0 with 10.231.0.254/24 (the controlling process's own address)
       |-- veth p1 <-> eth0 in <prefix>-n1 (10.231.0.1/24)
       |-- veth p2 <-> eth0 in <prefix>-n2 (10.231.0.2/24)
       `-- ...

The /24 exists only inside these namespaces (never in the root namespace), so parallel runs
and leftovers of killed runs cannot collide, and the host's network is never touched: every
``ip`` command names one of our namespaces (``ip -n NS`` / ``ip netns exec NS``).

How the controlling process (in the root namespace) reaches the nodes' APIs: through ``call`` (and
``pool``), which run a function on worker threads that have joined the bridge namespace with
``setns(2)``. A network namespace is a per-thread attribute, and a socket stays in the
namespace it was created in, so any blocking client code (``http.client``, ``synapse.client``)
works unchanged from those threads, with no route or address added to the root namespace and
no subprocess per request.

Cutting a node off: ``isolate(node, from_=peers)`` adds iptables DROP rules inside the node's
own namespace (INPUT from and OUTPUT to each peer address); traffic to and from the controller's
address 10.231.0.254 keeps flowing. ``heal(node)`` flushes them.

Teardown (``close``; also registered with ``atexit``, and SIGTERM is turned into
KeyboardInterrupt while a topology is up so that both run) kills the node processes, then
anything else still running in our namespaces, then deletes the namespaces (which destroys
their veths and bridge). It only ever acts on namespaces this object created. Only SIGKILL of
the controlling process can leave namespaces behind; their names (``syn-<pid>-<random>-*``) keep them
from colliding with later runs.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
SUBNET = "10.231.0"
TEST_ADDR = f"{SUBNET}.254"


def _run(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why partitions cannot be made here, or None. Probes by creating (and deleting) a
    namespace of our own."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root, as CI does)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"syn-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        created = _run("ip", "netns", "add", probe, check=False)
        if created.returncode != 0:
            return f"`ip netns add` does not work here: {created.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Moves the calling thread (only) into the named network namespace."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(eq=False)  # identity semantics: kept in a set of live topologies
class Topology:
    size: int
    prefix: str = field(default_factory=lambda: f"syn-{os.getpid()}-{secrets.token_hex(2)}")
    created: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- names and addresses ---

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def ns(self, i: int) -> str:
        """The namespace of node i (1-based)."""
        return f"{self.prefix}-n{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i}"

    # --- set-up ---

    def create(self) -> "Topology":
        atexit.register(self.close)
        _live.add(self)
        _catch_sigterm()
        try:
            self._add_ns(self.bridge_ns)
            br = self.bridge_ns
            _run("ip", "-n", br, "link", "set", "lo", "up")
            _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", br, "addr", "add", f"{TEST_ADDR}/24", "dev", "br0")
            _run("ip", "-n", br, "link", "set", "br0", "up")
            for i in range(1, self.size + 1):
                ns = self.ns(i)
                self._add_ns(ns)
                # Created inside the bridge namespace, the peer end moved straight into the
                # node's: no interface ever appears in the root namespace.
                _run("ip", "-n", br, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "-n", br, "link", "set", f"p{i}", "master", "br0")
                _run("ip", "-n", br, "link", "set", f"p{i}", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=16, thread_name_prefix=f"{self.prefix}-client",
                initializer=enter_netns, initargs=(self.bridge_ns,),
            )
            self._wait_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.created.append(name)

    def _wait_reachable(self, timeout: float = 10.0) -> None:
        """Until the controller's address reaches every node address: a TCP connect to a closed port
        that is refused (not timed out) went there and back."""
        import socket

        def probe(addr: str) -> bool:
            try:
                socket.create_connection((addr, 9), timeout=0.5).close()
                return True
            except ConnectionRefusedError:
                return True
            except OSError:
                return False

        for i in range(1, self.size + 1):
            deadline = time.monotonic() + timeout
            while not self.call(probe, self.addr(i)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.addr(i)} ({self.ns(i)}) is not reachable from {TEST_ADDR}")
                time.sleep(0.05)

    # --- processes ---

    def popen(self, i: int, args: list[str], **kwargs) -> subprocess.Popen:
        """Starts ``args`` inside node i's namespace (`ip netns exec` execs it: same pid)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *args], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    # --- faults ---

    def iptables(self, i: int, *rule: str) -> None:
        _run("ip", "netns", "exec", self.ns(i), "iptables", "-w", *rule)

    def isolate(self, i: int, from_: list[int]) -> None:
        """Drops every packet between node i and the given nodes, in node i's namespace."""
        for j in from_:
            self.iptables(i, "-A", "INPUT", "-s", self.addr(j), "-j", "DROP")
            self.iptables(i, "-A", "OUTPUT", "-d", self.addr(j), "-j", "DROP")

    def heal(self, i: int) -> None:
        self.iptables(i, "-F")

    def rules(self, i: int) -> str:
        return _run("ip", "netns", "exec", self.ns(i), "iptables", "-w", "-S").stdout

    # --- running client code inside the bridge namespace ---

    def call(self, fn, *args, **kwargs):
        """Runs ``fn`` on a thread inside the bridge namespace and returns its result."""
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        assert self._pool is not None, "create() first"
        return self._pool.submit(fn, *args, **kwargs)

    # --- teardown ---

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        _live.discard(self)
        _release_sigterm()
        for proc in self.procs:
            _stop(proc)
        # Anything else still inside our namespaces (they are ours: we created them).
        for name in self.created:
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for name in reversed(self.created):
            _run("ip", "netns", "del", name, check=False)
        self.created.clear()


# atexit does not run when the controlling process is ended by SIGTERM (a cancelled CI job): while a
# topology is up, SIGTERM raises KeyboardInterrupt instead, so fixture finalizers and atexit run.
# Installed only over the default handler, and put back when the last topology is closed.
_live: set = set()
_sigterm_installed = False


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: tearing down our network namespaces")


def _catch_sigterm() -> None:
    global _sigterm_installed
    if (not _sigterm_installed and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def _release_sigterm() -> None:
    global _sigterm_installed
    if (_sigterm_installed and not _live and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is _on_sigterm):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _sigterm_installed = False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
