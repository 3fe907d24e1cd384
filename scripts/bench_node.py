"""Benchmarks a 3-node Synapse cluster on loopback against bare PySyncObj, in one run.

Prints one JSON object (and writes it to --json FILE):

- ``writes_per_s``, ``write_p50_ms``, ``write_p99_ms``: 64 concurrent clients (``--clients``)
  each doing ``PUT /v1/kv/bench/w<i>/<n>`` with a 100-byte value and an ``X-Request-Id``,
  against the leader, over ``--duration`` seconds after a ``--warmup``.
- ``lin_reads_per_s`` (+ p50/p99): the same clients doing ``GET`` with the default
  (linearizable) consistency, against the leader.
- ``failover_median_s``, ``failover_p90_s``, ``failover_max_s`` and the per-trial list (``failover_tls_*``: the
  same on a cluster with mutual TLS on the API and the Raft port, phase ``failover-tls``): SIGKILL
  of the leader (``--failover-trials``, default 10) → first acknowledged PUT on a survivor;
  the killed node is restarted (same data dir, same flags) and before the next kill the
  cluster must be in steady state: all nodes ready and converged (same applied index and state
  hash), every link connected, one leader and term everywhere, held for ``--failover-pause``.
  Per trial the detail also says which survivor acknowledged, the new term (a jump of more
  than 1 = more than one election round) and how long the restarted node took to rejoin. The
  cluster secret is on (``--secret-file``), as in production.
- ``rss_mb_1m_keys``: VmRSS of the leader holding ``--rss-keys`` keys (default 1M) of 100-byte
  values, loaded through ``POST /v1/txn`` (128 puts per transaction) into a fresh cluster.
  Reported under that name only when 1M keys were really loaded; ``rss_mb_measured`` and
  ``rss_keys`` always say what was measured; ``rss_detail`` splits RSS into anonymous and
  file-backed memory and lists the leader's data files.
- ``checkpoint_overhead_pct``: write throughput of a cluster with a checkpoint every 1,000
  entries against one with none (``--checkpoint-interval 0``), both started side by side and
  driven alternately, ``--checkpoint-rounds`` runs of ``--checkpoint-duration`` s each (median):
  ``(off - on) / off × 100``; ``checkpoint_detail`` says how many checkpoints the runs made.
  ``checkpoint_cpu_overhead_pct`` compares the nodes' CPU time per write instead (medians),
  which a shared machine's swings disturb far less than throughput.
- ``repair_s_1m_100``: in the RSS cluster (1M keys), 100 keys corrupted on one follower behind
  the log's back (``/v1/debug/corrupt``); from asking for a checkpoint to the follower reporting
  its repair done (detection plus repair). ``repair_detail`` also has the time until it serves
  again (the next checkpoint agreed with it) and the node's own repair report (buckets, bytes).
- ``catchup_bytes_ratio``: in the RSS cluster, a follower is stopped, 1% of the keys change
  (``--catchup-fraction``), the others compact their logs past it (``/v1/debug/compact``), and
  it restarts: every byte exchanged to catch it up — the catch-up container received and the
  planning requests and answers both ways — over the size of the leader's full dump.
- ``baseline_writes_per_s`` (+ p50/p99): bare PySyncObj 0.3.17, default ``SyncObjConf()``
  (batch mode on, no password, in-memory log), 3 processes on loopback, a ``@replicated``
  ``set`` on a dict, driven by the SAME load generator code with the same client count.

How the load is generated: one (``--generators``, default 1) separate Python process running
asyncio + uvloop + aiohttp, 64 workers, each with one request in flight. The generator
measures its own CPU time over the measured window (``load_generator_cpu_pct``, percent of one
core, summed over generator processes): near 100 % per process means the generator, not the
cluster, may be the limit. The nodes' CPU over the same window is reported too, and how long
their threads were runnable but waiting for a CPU (``node_runqueue_wait_pct``, schedstat,
summed over threads): a large figure means the machine, not the code, set the pace. For the
Synapse phases ``leader_metrics`` has the leader's own view from ``/metrics`` (server-side
latency histogram, commands per log entry). This machine has 2 cores shared by the generator
and the 3 nodes (and by whatever else runs on it): figures are noisy; compare systems within
one run, as ratios.

"100-byte values": the stored value is the JSON text of a 98-character string, i.e. exactly
100 bytes as Synapse stores it (canonical JSON); the baseline stores the same string.

Every process this script starts is in its own session, gets SIGKILL if this script dies
(PR_SET_PDEATHSIG) and is torn down on exit, Ctrl-C or SIGTERM. Only 127.0.0.1 is used.

Usage: ./scripts/bench-node --json FILE [--duration 10] [--clients 64] [--failover-trials 10]
       [--rss-keys 1000000] [--skip baseline,writes,reads,failover,checkpoint,rss,repair]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from synapse.cli.progress import Bar, bars

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
VALUE_CHARS = 98  # JSON text of the value: 100 bytes
PHASES = ("baseline", "writes", "reads", "failover", "failover-tls", "checkpoint", "rss", "repair", "catchup")
TXN_BATCH = 128  # synapse.state.commands.MAX_TXN_OPS

TARGETS = {
    "writes_vs_baseline": (">=", 2.0),  # writes_per_s / baseline_writes_per_s
    "write_p99_ms": ("<=", 20.0),
    "failover_median_s": ("<=", 0.6),
    "failover_max_s": ("<=", 1.2),
    "rss_mb_1m_keys": ("<=", 500.0),
    "checkpoint_overhead_pct": ("<=", 5.0),
    "repair_s_1m_100": ("<=", 3.0),
    "catchup_bytes_ratio": ("<=", 0.05),
}



def disk_bytes(path: Path) -> int:
    """A file's size, or the total of a directory's files (the Raft log is a directory)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size

def log(msg: str) -> None:
    print(f"bench-node [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: every child in its own session, killed with us, torn down on every exit path.
# ---------------------------------------------------------------------------------------------

_PROCS: list[subprocess.Popen] = []
_WORKDIR: Path | None = None
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def spawn(args: list[str], log_path: Path | None = None, stdout=None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path is not None else stdout
    try:
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT if log_path is not None else None,
                             preexec_fn=_child_setup, cwd=str(ROOT))
    finally:
        if log_path is not None:
            out.close()
    _PROCS.append(p)
    return p


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    # Only while the child is not yet reaped: its pid (= its process group id) is still ours.
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_all() -> None:
    live = [p for p in _PROCS if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + 8
    for p in live:
        try:
            p.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        _signal_group(p, signal.SIGKILL)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    _PROCS[:] = [p for p in _PROCS if p.poll() is None]


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def proc_cpu_s(pid: int, children: bool = False) -> float | None:
    """CPU seconds of a process (``children``: of its reaped children instead)."""
    first = 13 if children else 11
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def runqueue_wait_s(pid: int | str) -> float | None:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat)."""
    total, seen = 0, False
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1])
                    seen = True
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        return None
    return total / 1e9 if seen else None


def proc_mem_mb(pid: int) -> dict:
    """VmRSS (what the target is about), its anonymous / file-backed split (a mmap'd journal
    counts as file-backed), and the peak (VmHWM), in MB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":")[0]
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[name] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mb": round(out.get("VmRSS", float("nan")), 1), "hwm_mb": round(out.get("VmHWM", float("nan")), 1),
            "anon_mb": round(out.get("RssAnon", float("nan")), 1), "file_mb": round(out.get("RssFile", float("nan")), 1)}


def http_json(hostport: str, method: str, path: str, token: str = "", body: dict | None = None,
              timeout: float = 2.0, ssl_context=None) -> tuple[int, dict]:
    host, port = hostport.split(":")
    assert host == HOST, hostport
    if ssl_context is not None:
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {"raw": raw[:300].decode(errors="replace")}
    finally:
        conn.close()


def scrape_metrics(hostport: str, token: str) -> dict[str, float]:
    """The node's Prometheus text, as {'name{labels}': value}; {} if it cannot be read."""
    host, port = hostport.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        text = resp.read().decode()
        if resp.status != 200:
            return {}
    except OSError:
        return {}
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def server_side(before: dict, after: dict, route: str) -> dict:
    """From two scrapes of a node's /metrics: its own request-latency histogram for ``route``
    (the whole phase, warm-up included; percentiles are histogram bucket upper bounds) and the
    group committer's commands per log entry."""
    if not before or not after:
        return {}
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    count = d(f'synapse_http_request_seconds_count{{route="{route}"}}')
    buckets = []
    for k in after:
        if k.startswith("synapse_http_request_seconds_bucket{") and f'route="{route}"' in k:
            le = k.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), d(k)))
    buckets.sort()

    def bound(q: float):
        for le, c in buckets:
            if count and c >= q * count:
                return None if le == float("inf") else le * 1000
        return None

    entries, commands = d("synapse_entries_proposed_total"), d("synapse_commands_proposed_total")
    return {
        "requests": int(count),
        "mean_ms": r3(1000 * d(f'synapse_http_request_seconds_sum{{route="{route}"}}') / count) if count else None,
        "p50_le_ms": bound(0.5), "p90_le_ms": bound(0.9), "p99_le_ms": bound(0.99),
        "log_entries": int(entries), "commands": int(commands),
        "commands_per_entry": round(commands / entries, 1) if entries else None,
    }


def pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))]


def r3(x):
    return None if x is None else round(x, 3)


# ---------------------------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------------------------


class Member:
    def __init__(self, name: str, api: str, args: list[str], data_dir: Path, log_path: Path) -> None:
        self.name, self.api, self.args, self.data_dir, self.log_path = name, api, args, data_dir, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = spawn(self.args, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sigkill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)  # the node has no children; its group is itself
            self.proc.wait(10)

    def log_tail(self, n: int = 2500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def synapse_command() -> list[str]:
    exe = Path(sys.executable).with_name("synapse")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "synapse.cli.main"]


class SynapseCluster:
    """3 (or n) ``synapse node start`` processes on loopback, the cluster secret on."""

    def __init__(self, root: Path, size: int = 3, extra: list[str] | None = None, tls: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        # With ``tls``: HTTPS with mutual TLS, certificates from `synapse tls init` in root/tls;
        # ``tls_files`` are a client's (the load generators').
        self.tls_files: dict[str, str] | None = None
        self.ssl_context = None
        if tls:
            from synapse.security.tls import client_context, init_certificates

            init_certificates(root / "tls", [f"n{i + 1}" for i in range(size)] + ["client"], [])
            self.tls_files = {"ca": str(root / "tls" / "ca.crt"), "cert": str(root / "tls" / "client.crt"),
                              "key": str(root / "tls" / "client.key")}
            self.ssl_context = client_context(*(Path(self.tls_files[k]) for k in ("ca", "cert", "key")))
        secret = root / "secret"
        secret.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        os.chmod(secret, 0o600)
        ports = free_ports(2 * size)
        raft = {f"n{i + 1}": f"{HOST}:{ports[2 * i + 1]}" for i in range(size)}
        self.members: list[Member] = []
        for i in range(size):
            name = f"n{i + 1}"
            api = f"{HOST}:{ports[2 * i]}"
            peers = ",".join(f"{k}={v}" for k, v in raft.items() if k != name)
            args = synapse_command() + [
                "node", "start", "--id", name, "--data-dir", str(root / name), "--api", api,
                "--raft", raft[name], "--peers", peers, "--secret-file", str(secret), *(extra or []),
            ]
            if tls:
                d = root / "tls"
                args += ["--tls-cert", str(d / f"{name}.crt"), "--tls-key", str(d / f"{name}.key"),
                         "--tls-client-ca", str(d / "ca.crt"), "--tls-ca", str(d / "ca.crt")]
            self.members.append(Member(name, api, args, root / name, root / f"{name}.log"))
        self.token = ""

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def start(self, timeout: float = 60.0) -> "SynapseCluster":
        for m in self.members:
            m.start()
        self.wait_ready(timeout)
        return self

    def _token(self) -> str:
        if not self.token:
            for m in self.members:
                f = m.data_dir / "root.token"
                if f.exists() and f.read_text().strip():
                    self.token = f.read_text().strip()
                    break
        return self.token

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.members)
        last: dict[str, str] = {}
        while pending:
            still = []
            for m in pending:
                if not m.alive():
                    raise RuntimeError(f"node {m.name} exited (code {m.proc.returncode}):\n{m.log_tail()}")
                try:
                    status, body = http_json(m.api, "GET", "/ready", self._token(), timeout=1.0,
                                             ssl_context=self.ssl_context)
                    last[m.name] = f"{status} {body}"
                    if status != 200:
                        still.append(m)
                except OSError as e:
                    last[m.name] = repr(e)
                    still.append(m)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {m.name} (/ready: {last.get(m.name)})\n{m.log_tail()}" for m in pending)
                    raise RuntimeError(f"nodes {[m.name for m in pending]} not ready within {timeout} s\n{tails}")
                time.sleep(0.05)

    def status(self, m: Member, timeout: float = 2.0) -> dict | None:
        try:
            code, body = http_json(m.api, "GET", "/v1/cluster/status", self._token(), timeout=timeout,
                                   ssl_context=self.ssl_context)
        except OSError:
            return None
        return body if code == 200 else None

    def leader(self, timeout: float = 30.0) -> Member:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if m.alive():
                    s = self.status(m)
                    if s and s.get("is_leader"):
                        return m
            if time.monotonic() > deadline:
                raise RuntimeError("no leader found via /v1/cluster/status")
            time.sleep(0.05)

    def wait_stable(self, hold: float, timeout: float = 60.0) -> dict:
        """Until, for ``hold`` seconds without a break, every node reports the same leader and
        term, every member connected, and the same applied index and state hash. Returns what
        it saw: how long it took and how many terms passed meanwhile (elections)."""
        start = time.monotonic()
        deadline = start + timeout
        first_term = None
        since, key = None, None
        while True:
            st = {m.name: self.status(m, timeout=1.0) for m in self.members if m.alive()}
            good = len(st) == len(self.members) and all(st.values())
            if good:
                terms = {s["term"] for s in st.values()}
                first_term = min(terms) if first_term is None else first_term
                leaders = {s["leader"] for s in st.values()}
                state = {(s["applied_index"], s["state_hash"]) for s in st.values()}
                connected = all(mm["connected"] for s in st.values() for mm in s["members"])
                good = len(terms) == 1 and len(leaders) == 1 and None not in leaders and len(state) == 1 and connected
            now = time.monotonic()
            if good:
                k = (next(iter(terms)), next(iter(leaders)))
                if k != key:
                    since, key = now, k
                if now - since >= hold:
                    return {"stable_after_s": round(since - start, 3), "term": key[0], "leader": key[1],
                            "terms_passed": key[0] - first_term}
            else:
                since, key = None, None
            if now > deadline:
                view = {k: (v["term"], v["leader"], v["applied_index"], [mm["connected"] for mm in v["members"]])
                        if v else None for k, v in st.items()}
                raise RuntimeError(f"the cluster did not become stable within {timeout} s: {view}")
            time.sleep(0.05)

    def wait_converged(self, timeout: float = 60.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            st = {m.name: self.status(m) for m in self.members if m.alive()}
            ok = all(st.values()) and len({(s["applied_index"], s["state_hash"]) for s in st.values()}) == 1
            if ok:
                return st
            if time.monotonic() > deadline:
                view = {k: (v["applied_index"], v["state_hash"][:12]) if v else None for k, v in st.items()}
                raise RuntimeError(f"nodes did not converge within {timeout} s: {view}")
            time.sleep(0.1)


class BaselineCluster:
    """3 bare PySyncObj processes (this file's ``_baseline-node`` mode), each with an HTTP front."""

    def __init__(self, root: Path, size: int = 3, password: str | None = None, no_batch: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        raft = [f"{HOST}:{ports[2 * i + 1]}" for i in range(size)]
        self.members = []
        for i in range(size):
            api = f"{HOST}:{ports[2 * i]}"
            args = [sys.executable, str(Path(__file__).resolve()), "_baseline-node", "--self", raft[i],
                    "--partners", ",".join(a for a in raft if a != raft[i]), "--http", api]
            if password:
                args += ["--password", password]
            if no_batch:
                args += ["--no-batch"]
            self.members.append(Member(f"b{i + 1}", api, args, root, root / f"b{i + 1}.log"))
        self.token = ""

    def start(self, timeout: float = 60.0) -> "BaselineCluster":
        for m in self.members:
            m.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.leader(timeout=0.0) and all(self._ready(m) for m in self.members):
                    return self
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in self.members)
                raise RuntimeError(f"the PySyncObj baseline did not elect a leader within {timeout} s\n{tails}")
            time.sleep(0.1)

    def _ready(self, m: Member) -> bool:
        try:
            return http_json(m.api, "GET", "/ready", timeout=1.0)[0] == 200
        except OSError:
            return False

    def leader(self, timeout: float = 10.0) -> Member:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if not m.alive():
                    raise RuntimeError(f"baseline node {m.name} exited:\n{m.log_tail()}")
                try:
                    code, body = http_json(m.api, "GET", "/status", timeout=1.0)
                except OSError:
                    continue
                if code == 200 and body.get("is_leader"):
                    return m
            if time.monotonic() > deadline:
                raise RuntimeError("the PySyncObj baseline has no leader")
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The bare PySyncObj node (baseline). Runs in its own process: `bench_node.py _baseline-node`.
# ---------------------------------------------------------------------------------------------


def baseline_node_main(argv: list[str]) -> None:
    """A bare PySyncObj voter with a tiny aiohttp front.

    The HTTP front exists so the baseline gets the same 64 clients through the same load
    generator: Synapse also puts an aiohttp server in front of PySyncObj in the same process,
    so the comparison is like for like (HTTP parsing, JSON, the event loop, the hand-off to the
    tick thread) and differs only in what sits between the HTTP handler and PySyncObj.
    Each PUT calls the replicated ``set`` asynchronously with a callback; the callback (on
    PySyncObj's tick thread) resolves an asyncio future via ``loop.call_soon_threadsafe`` —
    never ``sync=True`` from the event loop (synapse/cluster/DESIGN.md: it deadlocked). Settings are
    PySyncObj's defaults (``SyncObjConf()``: batch mode on, no password, no journal file).

    ``GET /v1/kv/KEY`` is a linearizable read the way bare PySyncObj offers one: the replicated
    ``get`` goes through the log and answers from the state when applied (404 if missing).
    ``POST /v1/txn`` takes Synapse's shape (``{"then": [{"op": "put", ...}]}``, puts only) and
    applies it as one replicated ``set_many``: the bulk load for the memory figure.
    """
    p = argparse.ArgumentParser(prog="bench_node.py _baseline-node")
    p.add_argument("--self", required=True)
    p.add_argument("--partners", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--password", default=None)
    p.add_argument("--no-batch", action="store_true",
                   help="appendEntriesUseBatch=False: send each entry at once instead of on the 100 ms timer")
    a = p.parse_args(argv)

    import uvloop
    from aiohttp import web
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class KV(SyncObj):
        def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
            super().__init__(self_addr, partners, conf)
            self._data: dict[str, str] = {}

        @replicated
        def set(self, key: str, value: str) -> bool:
            self._data[key] = value
            return True

        @replicated
        def set_many(self, items: dict[str, str]) -> int:
            self._data.update(items)
            return len(items)

        @replicated
        def get(self, key: str) -> str | None:
            return self._data.get(key)

    conf = SyncObjConf()  # defaults, as they come
    if a.no_batch:
        conf.appendEntriesUseBatch = False
    if a.password:
        conf.password = a.password
    # Created in the main thread, which then runs the event loop forever: the tick thread lives.
    kv = KV(a.self, a.partners.split(","), conf)

    async def call(method, *args):
        """Calls a replicated method; (result, None) or (None, an error response)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result, err):  # tick thread
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result((result, err)))

        method(*args, callback=done)
        try:
            result, err = await asyncio.wait_for(fut, 5.0)
        except asyncio.TimeoutError:
            return None, web.json_response({"error": "timeout"}, status=503)
        if err != 0:
            return None, web.json_response({"error": f"pysyncobj_fail_{err}"}, status=503)
        return result, None

    async def put(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        body = json.loads(await request.read())
        value = body["value"]
        request.headers.get("X-Request-Id")  # read like Synapse does; bare PySyncObj has no dedup
        result, failed = await call(kv.set, key, value)
        return failed or web.json_response({"key": key, "ok": result})

    async def get(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value, failed = await call(kv.get, key)
        if failed:
            return failed
        if value is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response({"key": key, "value": value})

    async def txn(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        items = {op["key"]: op["value"] for op in body.get("then", []) if op.get("op") == "put"}
        result, failed = await call(kv.set_many, items)
        return failed or web.json_response({"ok": True, "puts": result})

    def leader_addr() -> str | None:
        leader = kv._getLeader()
        return None if leader is None else str(getattr(leader, "address", leader))

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"is_leader": kv._isLeader(), "leader": leader_addr(),
                                  "commit_idx": kv.raftCommitIndex, "last_applied": kv.raftLastApplied,
                                  "keys": len(kv._data)})

    async def ready(request: web.Request) -> web.Response:
        ok = leader_addr() is not None and kv.raftLastApplied >= kv.raftCommitIndex
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def main() -> None:
        app = web.Application()
        app.router.add_put("/v1/kv/{key:.+}", put)
        app.router.add_get("/v1/kv/{key:.+}", get)
        app.router.add_post("/v1/txn", txn)
        app.router.add_get("/status", status)
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = a.http.split(":")
        await web.TCPSite(runner, host, int(port), reuse_address=True).start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        kv.destroy()
        loop.close()
        os._exit(0)  # the tick thread is not a daemon


# ---------------------------------------------------------------------------------------------
# The load generator. Runs in its own process: `bench_node.py _loadgen SPEC_JSON`; writes its
# result as JSON to the file named in the spec.
# ---------------------------------------------------------------------------------------------


def value_for(n: int) -> str:
    tail = f"-{n:012d}"
    return ("v" * (VALUE_CHARS - len(tail))) + tail


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def etcd_value_for(n: int) -> str:
    """The same 100 bytes Synapse stores for ``value_for(n)`` (its canonical JSON text)."""
    return json.dumps(value_for(n))


def etcd_put_body(key: str, value: str) -> bytes:
    return json.dumps({"key": _b64(key), "value": _b64(value)}).encode()


def etcd_range_body(key: str) -> bytes:
    return json.dumps({"key": _b64(key)}).encode()  # serializable=false: linearizable (etcd's default)


def etcd_txn_body(items: list[tuple[str, str]]) -> bytes:
    return json.dumps({"success": [{"requestPut": {"key": _b64(k), "value": _b64(v)}} for k, v in items]}).encode()


def loadgen_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    import uvloop

    result = uvloop.run(_loadgen(spec))
    # A file, not stdout: a result bigger than the pipe buffer came back truncated through stdout.
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.rename(tmp, spec["out"])


async def _loadgen(spec: dict) -> dict:
    """Modes: ``put`` / ``get`` run ``clients`` workers, each with one request in flight, from
    ``start_at`` (time.monotonic, system-wide) until the end of the measured window; only
    requests completed inside [start_at + warmup, + duration] count. ``txn`` loads keys
    ``[first, first + count)`` with 128-put transactions until done or ``deadline_s``.

    ``protocol`` says how a request is spelled, nothing else changes: ``synapse`` (default;
    Synapse and the bare PySyncObj front: ``PUT``/``GET /v1/kv/KEY``, ``POST /v1/txn``) or
    ``etcd`` (etcd's v3 JSON gateway: ``POST /v3/kv/put``, ``/v3/kv/range`` (linearizable),
    ``/v3/kv/txn``; keys and values base64, the value the same 100 bytes)."""
    import aiohttp

    mode, url, token = spec["mode"], spec["url"], spec.get("token", "")
    etcd = spec.get("protocol", "synapse") == "etcd"
    clients, offset = spec["clients"], spec.get("worker_offset", 0)
    prefix = spec.get("prefix", "bench")
    run_id = spec.get("run_id", uuid.uuid4().hex[:8])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tls = None
    if spec.get("tls"):  # {"ca", "cert", "key"}: HTTPS with a client certificate
        from synapse.security.tls import client_context

        tls = client_context(*(Path(spec["tls"][k]) for k in ("ca", "cert", "key")))
    connector = aiohttp.TCPConnector(limit=0, force_close=False, ssl=tls if tls else True)
    timeout = aiohttp.ClientTimeout(total=spec.get("request_timeout", 10.0))
    ok = 0
    errors: dict[str, int] = {}
    samples: list[str] = []
    lat: list[float] = []
    per_second: list[int] = [0] * max(1, math.ceil(spec.get("duration", 0)))  # completions per second of the window
    written: dict[int, int] = {}
    now = time.monotonic

    def error(kind: str, detail: str = "") -> None:
        errors[kind] = errors.get(kind, 0) + 1
        if len(samples) < 5 and detail:
            samples.append(f"{kind}: {detail[:200]}")

    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        start_at = spec.get("start_at", now())
        if mode in ("put", "get"):
            m0 = start_at + spec["warmup"]
            m1 = m0 + spec["duration"]

            # ``urls`` (spread): client c sends its k-th request to urls[(c + k) % len(urls)].
            urls = spec.get("urls") or [url]

            async def worker(wid: int) -> None:
                nonlocal ok
                n = 0
                keys = spec.get("read_keys_per_worker", 64)
                bases = [f"{u}/v1/kv/{prefix}/w{wid}/" for u in urls]
                while True:
                    base = bases[(wid + n) % len(bases)]
                    t0 = now()
                    if t0 >= m1:
                        written[wid] = n
                        return
                    try:
                        if etcd:
                            if mode == "put":
                                body = etcd_put_body(f"{prefix}/w{wid}/{n}", etcd_value_for(n))
                                target = base.split("/v1/kv/")[0] + "/v3/kv/put"
                            else:
                                body = etcd_range_body(f"{prefix}/w{wid}/{n % keys}")
                                target = base.split("/v1/kv/")[0] + "/v3/kv/range"
                            async with session.post(target, data=body) as r:
                                payload = await r.read()
                                status = r.status
                            if mode == "get" and status == 200 and b'"kvs"' not in payload:
                                status = 404  # the key is missing: not a successful read
                        elif mode == "put":
                            body = b'{"value":"' + value_for(n).encode() + b'"}'
                            hdrs = {"X-Request-Id": f"{run_id}-{wid}-{n}", "Content-Type": "application/json"}
                            async with session.put(base + str(n), data=body, headers=hdrs) as r:
                                payload = await r.read()
                                status = r.status
                        else:
                            async with session.get(base + str(n % keys)) as r:
                                payload = await r.read()
                                status = r.status
                        t1 = now()
                        if 200 <= status < 300:
                            if m0 <= t1 < m1:
                                ok += 1
                                lat.append((t1 - t0) * 1000.0)
                                per_second[min(len(per_second) - 1, int(t1 - m0))] += 1
                        else:
                            if m0 <= t1 < m1:
                                error(f"http_{status}", payload.decode(errors="replace"))
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                        if m0 <= now() < m1:
                            error(type(e).__name__, repr(e))
                        await asyncio.sleep(0.01)
                    n += 1

            late = max(0.0, now() - start_at)
            if start_at > now():
                await asyncio.sleep(start_at - now())
            cpu: dict[str, float] = {}

            async def cpu_sampler() -> None:
                await asyncio.sleep(max(0.0, m0 - now()))
                cpu["c0"], cpu["t0"], cpu["w0"] = time.process_time(), now(), runqueue_wait_s("self")
                await asyncio.sleep(max(0.0, m1 - now()))
                cpu["c1"], cpu["t1"], cpu["w1"] = time.process_time(), now(), runqueue_wait_s("self")

            await asyncio.gather(cpu_sampler(), *(worker(offset + i) for i in range(clients)))
            window = spec["duration"]
            return {
                "ok": ok, "errors": errors, "error_samples": samples, "lat_ms": [round(x, 3) for x in lat],
                "per_second": per_second,
                "window_s": window, "late_start_s": round(late, 3), "min_keys_per_worker": min(written.values()),
                "cpu_pct": round(100.0 * (cpu["c1"] - cpu["c0"]) / max(1e-9, cpu["t1"] - cpu["t0"]), 1),
                "runqueue_wait_pct": round(100.0 * (cpu["w1"] - cpu["w0"]) / max(1e-9, cpu["t1"] - cpu["t0"]), 1)
                if cpu["w0"] is not None and cpu["w1"] is not None else None,
            }

        # mode == "txn": bulk load
        first, count = spec["first"], spec["count"]
        deadline = now() + spec["deadline_s"]
        next_i = first
        end = first + count
        loaded = 0
        c0, t0 = time.process_time(), now()

        async def loader(wid: int) -> None:
            nonlocal next_i, loaded
            while next_i < end and now() < deadline:
                lo = next_i
                hi = min(end, lo + TXN_BATCH)
                next_i = hi
                if etcd:  # puts are idempotent: a retry rewrites the same values
                    body = etcd_txn_body([(f"{prefix}/{i:010d}", etcd_value_for(i)) for i in range(lo, hi)])
                    target = url + "/v3/kv/txn"
                else:
                    ops = [{"op": "put", "key": f"{prefix}/{i:010d}", "value": value_for(i)} for i in range(lo, hi)]
                    body = json.dumps({"then": ops}).encode()
                    target = url + "/v1/txn"
                hdrs = {"X-Request-Id": f"{run_id}-txn-{lo}", "Content-Type": "application/json"}
                for attempt in range(8):  # the same request id: a retry applies at most once
                    try:
                        async with session.post(target, data=body, headers=hdrs) as r:
                            payload = await r.read()
                            if r.status == 200:
                                loaded += hi - lo
                                break
                            error(f"http_{r.status}", payload.decode(errors="replace"))
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                        error(type(e).__name__, repr(e))
                    await asyncio.sleep(0.1 * (attempt + 1))

        await asyncio.gather(*(loader(i) for i in range(clients)))
        elapsed = now() - t0
        return {"loaded": loaded, "elapsed_s": round(elapsed, 3), "errors": errors, "error_samples": samples,
                "cpu_pct": round(100.0 * (time.process_time() - c0) / max(1e-9, elapsed), 1)}


def run_load(mode: str, url: str, token: str, clients: int, generators: int, node_pids: dict[str, int],
             warmup: float = 0.0, duration: float = 0.0, extra: dict | None = None,
             workdir: Path | None = None, percentiles: list[float] | None = None) -> dict:
    """Runs ``generators`` load-generator processes and merges their results; samples the
    nodes' CPU over the measured window. With ``percentiles`` (in %), the result also has the
    latency at each (``latency_percentiles_ms``: a compact CDF)."""
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(workdir or _WORKDIR or tempfile.gettempdir())
    outs = [workdir / f"loadgen-{run_id}-{g}.json" for g in range(generators)]
    start_at = time.monotonic() + 2.0  # time for the generator processes to import and connect
    procs = []
    per = [clients // generators + (1 if i < clients % generators else 0) for i in range(generators)]
    offset = 0
    for g in range(generators):
        spec = {"mode": mode, "url": url, "token": token, "clients": per[g], "worker_offset": offset,
                "run_id": f"{run_id}g{g}", "start_at": start_at, "out": str(outs[g]), "warmup": warmup, "duration": duration,
                **(extra or {})}
        if mode == "txn":
            # split the key range between generator processes
            total, first = spec["count"], spec["first"]
            share = total // generators + (1 if g < total % generators else 0)
            spec["first"] = first + sum(total // generators + (1 if i < total % generators else 0) for i in range(g))
            spec["count"] = share
        offset += per[g]
        procs.append(spawn([sys.executable, str(Path(__file__).resolve()), "_loadgen", json.dumps(spec)],
                           stdout=subprocess.DEVNULL))
    node_cpu, node_wait = {}, {}
    if mode in ("put", "get"):
        m0 = start_at + warmup
        m1 = m0 + duration
        time.sleep(max(0.0, m0 - time.monotonic()))
        c0 = {k: proc_cpu_s(p) for k, p in node_pids.items()}
        w0 = {k: runqueue_wait_s(p) for k, p in node_pids.items()}
        t0 = time.monotonic()
        time.sleep(max(0.0, m1 - time.monotonic()))
        c1 = {k: proc_cpu_s(p) for k, p in node_pids.items()}
        w1 = {k: runqueue_wait_s(p) for k, p in node_pids.items()}
        dt = time.monotonic() - t0
        node_cpu = {k: round(100 * (c1[k] - c0[k]) / dt, 1) for k in node_pids if c0[k] is not None and c1[k] is not None}
        node_wait = {k: round(100 * (w1[k] - w0[k]) / dt, 1) for k in node_pids if w0[k] is not None and w1[k] is not None}
    wait_s = 120.0 if mode != "txn" else extra["deadline_s"] + 120.0
    results = []
    for p, out_path in zip(procs, outs):
        try:
            p.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            raise RuntimeError(f"a load generator did not finish within {wait_s} s")
        if p.returncode != 0:
            raise RuntimeError(f"a load generator failed (exit {p.returncode}); see its traceback above")
        results.append(json.loads(out_path.read_text()))
        out_path.unlink()
    merged_errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            merged_errors[k] = merged_errors.get(k, 0) + v
    out = {
        "errors": merged_errors,
        "error_samples": [s for r in results for s in r["error_samples"]][:5],
        "load_generator_cpu_pct": round(sum(r["cpu_pct"] for r in results), 1),
        "load_generator_cpu_pct_per_process": [r["cpu_pct"] for r in results],
        "generators": generators,
    }
    if mode == "txn":
        out["loaded"] = sum(r["loaded"] for r in results)
        out["elapsed_s"] = max(r["elapsed_s"] for r in results)
        return out
    lat = sorted(x for r in results for x in r["lat_ms"])
    ok = sum(r["ok"] for r in results)
    out.update({
        "ops": ok, "per_s": round(ok / duration, 1), "p50_ms": r3(pct(lat, 0.50)), "p90_ms": r3(pct(lat, 0.90)),
        "p99_ms": r3(pct(lat, 0.99)), "max_ms": r3(lat[-1] if lat else None),
        "mean_ms": r3(statistics.fmean(lat) if lat else None),
        "min_keys_per_worker": min(r["min_keys_per_worker"] for r in results),
        "node_cpu_pct": node_cpu, "node_runqueue_wait_pct": node_wait,
        "load_generator_runqueue_wait_pct": [r.get("runqueue_wait_pct") for r in results],
        "loadavg_after": list(os.getloadavg()), "late_start_s": max(r["late_start_s"] for r in results),
    })
    if percentiles:
        out["latency_percentiles_ms"] = {"pct": list(percentiles),
                                         "ms": [r3(pct(lat, q / 100.0)) for q in percentiles]}
        out["min_ms"] = r3(lat[0] if lat else None)
        # completions in each second of the window, all generators: a steady run has a flat series
        series = [sum(col) for col in zip(*(r["per_second"] for r in results))]
        out["per_second"] = series
        if len(series) > 1 and statistics.fmean(series):
            out["per_second_cv"] = round(statistics.pstdev(series) / statistics.fmean(series), 3)
    return out


# ---------------------------------------------------------------------------------------------
# Failover
# ---------------------------------------------------------------------------------------------


class SynapseTarget:
    """A SynapseCluster as a failover target: how to write and how to ask who leads (other
    systems' targets, e.g. etcd's in bench_cluster.py, spell the same two calls)."""

    def __init__(self, cluster: SynapseCluster) -> None:
        self.cluster = cluster
        self.members = cluster.members
        self.ssl_context = cluster.ssl_context

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cluster._token()}"}

    def leader(self) -> Member:
        return self.cluster.leader()

    def wait_stable(self, hold: float, timeout: float = 60.0) -> dict:
        self.cluster.wait_ready(timeout)
        return self.cluster.wait_stable(hold, timeout)

    async def put(self, session, m: Member, key: str, n: int, timeout: float) -> str:
        import aiohttp

        body = json.dumps({"value": value_for(n)}).encode()
        hdrs = {"X-Request-Id": f"{key}-{uuid.uuid4().hex[:6]}", "Content-Type": "application/json"}
        async with session.put(f"{self.cluster.scheme}://{m.api}/v1/kv/{key}", data=body, headers=hdrs,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            payload = await r.read()
            if r.status == 200:
                return "200"
            try:
                j = json.loads(payload)
                return f"{r.status} {j.get('error')}/{j.get('reason', '')}"
            except ValueError:
                return str(r.status)

    async def view(self, session, m: Member) -> tuple[bool, int | None]:
        import aiohttp

        async with session.get(f"{self.cluster.scheme}://{m.api}/v1/cluster/status",
                               timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            s = await r.json()
            return bool(s.get("is_leader")), s.get("term")


async def failover_trial(target, victim: Member, trial: int, max_wait: float = 30.0,
                          interval: float = 0.02, attempt_timeout: float = 1.0) -> dict:
    """SIGKILLs ``victim``; returns the time until the first acknowledged write on a survivor.
    Against every survivor a new write attempt starts every ``interval`` s (each with its own
    timeout and key) until one is acknowledged, so the figure is within ``interval`` of the
    first moment the cluster acknowledged a write. A poller records when a survivor first
    reports itself leader."""
    import aiohttp

    survivors = [m for m in target.members if m is not victim and m.alive()]
    outcomes: dict[str, int] = {}
    done = asyncio.Event()
    res: dict = {}
    loop = asyncio.get_running_loop()
    tls = getattr(target, "ssl_context", None)  # a Synapse cluster served over HTTPS
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=tls or True),
                                     headers=target.headers) as session:
        for m in survivors:  # warm the connections
            try:
                await target.view(session, m)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                pass
        tasks: set[asyncio.Task] = set()
        seq = 0

        async def attempt(m: Member, n: int, started: float) -> None:
            try:
                kind = await target.put(session, m, f"failover/{trial}/{m.name}/{n}", n, attempt_timeout)
                if kind == "200" and not done.is_set():
                    res.update(ack_s=loop.time() - t0, acked_by=m.name, acked_attempt_started_s=started - t0)
                    done.set()
                    return
            except asyncio.TimeoutError:
                kind = "client_timeout"
            except (aiohttp.ClientError, OSError) as e:
                kind = type(e).__name__
            if not done.is_set() or kind != "200":
                outcomes[kind] = outcomes.get(kind, 0) + 1

        async def ask(m: Member) -> None:
            try:
                is_leader, term = await target.view(session, m)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                return
            if is_leader and "leader_seen_s" not in res:
                res.update(leader_seen_s=loop.time() - t0, new_leader=m.name, new_term=term)

        async def leader_poller() -> None:
            # every survivor at once: a member busy electing may not answer within the timeout
            while not done.is_set() and "leader_seen_s" not in res:
                await asyncio.gather(*(ask(m) for m in survivors))
                await asyncio.sleep(0.02)

        t0 = loop.time()
        os.killpg(victim.pid, signal.SIGKILL)  # reaped after the trial, not on the clock
        poller = asyncio.create_task(leader_poller())
        while not done.is_set() and loop.time() - t0 < max_wait:
            started = loop.time()
            for m in survivors:
                seq += 1
                t = asyncio.create_task(attempt(m, seq, started))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            try:
                await asyncio.wait_for(done.wait(), interval)
            except asyncio.TimeoutError:
                pass
        poller.cancel()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(poller, *tasks, return_exceptions=True)
        if "new_leader" not in res:  # acknowledged before the poller saw the leader: ask once
            for m in survivors:
                try:
                    is_leader, term = await target.view(session, m)
                    if is_leader:
                        res.update(new_leader=m.name, new_term=term)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                    pass
    victim.proc.wait(10)
    res["attempts"] = seq
    res["outcomes_before_ack"] = outcomes
    return res


def run_failover(cluster: SynapseCluster, trials: int, pause: float) -> dict:
    results = []
    # Before each kill the cluster must be in steady state: every node ready, converged, every
    # link connected, one leader and term on all nodes, all held for `pause` seconds. (Right
    # after a restart a link can stay down for up to PySyncObj's connectionRetryTime, and a
    # kill then needs several election rounds: that is reported, not measured as failover.)
    pre = cluster.wait_stable(pause, 60)
    for trial in range(trials):
        victim = cluster.leader()
        term = pre["term"]
        r = asyncio.run(failover_trial(SynapseTarget(cluster), victim, trial, max_wait=30.0, interval=0.02, attempt_timeout=1.0))
        r.update({"trial": trial, "killed": victim.name, "old_term": term})
        if "ack_s" not in r:
            log(f"failover trial {trial}: NO acknowledged write within 30 s; outcomes {r['outcomes_before_ack']}")
        else:
            log(f"failover trial {trial}: killed {victim.name} (term {term}) -> ack after {r['ack_s']:.3f} s "
                f"by {r.get('acked_by')} (new leader {r.get('new_leader')}, term {r.get('new_term')})")
        t = time.monotonic()
        victim.start()
        try:
            cluster.wait_ready(60)
            cluster.wait_converged(60)
            r["restart_to_converged_s"] = round(time.monotonic() - t, 3)
            pre = cluster.wait_stable(pause, 60)
            r["restart_to_stable_s"] = round(time.monotonic() - t, 3)
            # Elections after the failover one, while the restarted node rejoined (no kill).
            r["extra_terms_during_rejoin"] = pre["term"] - (r.get("new_term") or pre["term"])
        except RuntimeError as e:
            r["recovery_error"] = str(e)[:2000]
            results.append(r)
            log(f"failover trial {trial}: the cluster did not recover: {str(e)[:500]}")
            break
        for k in ("ack_s", "leader_seen_s", "acked_attempt_started_s"):
            if k in r:
                r[k] = round(r[k], 4)
        results.append(r)
    # A trial without an acknowledged write (30 s) counts as infinitely slow; JSON gets null.
    acks = [r["ack_s"] if "ack_s" in r else float("inf") for r in results]
    s = sorted(acks)
    finite = lambda x: None if x is None or math.isinf(x) else r3(x)  # noqa: E731
    out = {
        "failover_trials": len(results),
        "failover_s": [finite(x) for x in acks],
        "failover_unacknowledged": sum(1 for x in acks if math.isinf(x)),
        "failover_median_s": finite(statistics.median(s)) if s else None,
        "failover_p90_s": finite(pct(s, 0.90)),
        "failover_max_s": finite(s[-1]) if s else None,
        "failover_min_s": finite(s[0]) if s else None,
        "failover_rejoin_extra_terms": [r.get("extra_terms_during_rejoin") for r in results],
        "failover_restart_to_stable_s": [r.get("restart_to_stable_s") for r in results],
        "failover_detail": results,
    }
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for mod in ("pysyncobj", "aiohttp", "uvloop"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "kernel": platform.release(),
            "python": platform.python_version(), **versions, "git": commit,
            "loadavg_at_start": list(os.getloadavg())}


def evaluate(result: dict) -> None:
    if result.get("writes_per_s") and result.get("baseline_writes_per_s"):
        result["writes_vs_baseline"] = round(result["writes_per_s"] / result["baseline_writes_per_s"], 2)
    result["targets"] = {
        "writes_per_s": ">= 2 x baseline_writes_per_s",
        "write_p99_ms": "<= 20",
        "failover_median_s": "<= 0.6 (cluster secret on)",
        "failover_max_s": "<= 1.2 (cluster secret on)",
        "rss_mb_1m_keys": "<= 500",
        "checkpoint_overhead_pct": "<= 5 (writes with a checkpoint every 1,000 entries vs none)",
        "repair_s_1m_100": "<= 3 (1M keys, 100 corrupted on one node: detection plus repair)",
        "catchup_bytes_ratio": "<= 0.05 (a node that missed changes to 1% of 1M keys: bytes both ways / dump size)",
    }
    met = {}
    for key, (op, bound) in TARGETS.items():
        v = result.get(key)
        name = "writes_per_s" if key == "writes_vs_baseline" else key
        met[name] = None if v is None else (v <= bound if op == "<=" else v >= bound)
    if result.get("failover_unacknowledged"):  # some kill was never followed by a write: missed
        met["failover_max_s"] = False
        if result.get("failover_median_s") is None:
            met["failover_median_s"] = False
    if result.get("failover_trials") is not None and result["failover_trials"] < 10:
        result["failover_note"] = f"only {result['failover_trials']} trials; the target asks for >= 10"
    result["targets_met"] = met
    result["all_targets_met"] = all(v is True for v in met.values()) if all(v is not None for v in met.values()) else None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        return loadgen_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline-node":
        return baseline_node_main(sys.argv[2:])

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per throughput phase (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each (default 2)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--generators", type=int, default=1, help="load-generator processes sharing the clients (default 1)")
    p.add_argument("--failover-trials", type=int, default=10, help="leader SIGKILLs (default 10)")
    p.add_argument("--failover-pause", type=float, default=1.0, help="seconds of calm before each kill (default 1)")
    p.add_argument("--rss-keys", type=int, default=1_000_000, help="keys to load for the RSS figure (default 1M)")
    p.add_argument("--rss-clients", type=int, default=8, help="concurrent 128-put transactions while loading (default 8)")
    p.add_argument("--rss-max-load-s", type=float, default=1800.0, help="stop loading after this long and report what loaded")
    p.add_argument("--baseline-password", action="store_true",
                   help="also measure PySyncObj with a password (Fernet on), as baseline_password_writes_per_s")
    p.add_argument("--checkpoint-rounds", type=int, default=3, help="alternated runs per setting for checkpoint_overhead_pct")
    p.add_argument("--checkpoint-duration", type=float, default=30.0,
                   help="seconds per run for checkpoint_overhead_pct (at ~75 entries/s a checkpoint every 1,000 entries comes every ~13 s)")
    p.add_argument("--repair-keys", type=int, default=100, help="keys corrupted on one node for repair_s_1m_100")
    p.add_argument("--catchup-fraction", type=float, default=0.01, help="share of the keys changed while a node is down, for catchup_bytes_ratio")
    p.add_argument("--skip", default="", help=f"comma-separated phases to skip: {','.join(PHASES)}")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (node logs) after the run")
    args = p.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) in --skip: {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")

    # Ctrl-C must stop the run even when started in the background of a script (which starts
    # us with SIGINT ignored, so Python would not install its KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    atexit.register(kill_all)
    global _WORKDIR
    tmp = _WORKDIR = Path(tempfile.mkdtemp(prefix="bench-node-"))
    log(f"work dir {tmp}")
    result: dict = {"machine": machine_info(), "settings": {
        "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
        "generators": args.generators, "value_bytes": VALUE_CHARS + 2, "failover_trials": args.failover_trials,
        "rss_keys_requested": args.rss_keys, "skipped": sorted(skip)}}
    t_start = time.monotonic()
    failed = None
    try:
        with bars() as shown:
            planned = [p for p in PHASES if p not in skip]
            planned += ["baseline_password"] if args.baseline_password and "baseline" in planned else []
            run_phases(args, skip, tmp, result, shown.bar("bench-node", total=len(planned), unit="phases"))
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        failed = e
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        log(f"FAILED: {result['error'][:2000]}")
    finally:
        kill_all()
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["total_s"] = round(time.monotonic() - t_start, 1)
    result["notes"] = [
        "2-core machine shared by the load generator, the 3 nodes and any other work on it: figures are noisy;"
        " compare Synapse with the baseline within one run, as ratios.",
        "baseline: bare PySyncObj with default SyncObjConf() (batch mode on, no password, in-memory log) behind a"
        " minimal aiohttp front in the leader's process; Synapse runs with the cluster secret (Fernet) on,"
        " a disk journal and a SQLite materializer.",
        "load_generator_cpu_pct is percent of one core per generator process, summed; ~100 per process means the"
        " generator may be the bottleneck.",
    ]
    evaluate(result)
    publish(result, args.json, tmp, args.keep, failed, log)


def publish(result: dict, json_path: str | None, tmp: Path, keep: bool, failed: BaseException | None,
            say=log) -> None:
    """The end of every bench script: the JSON on stdout (and in ``json_path``), the work dir
    kept when asked or when the run failed, and the exit status the failure calls for."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    if keep or failed is not None:
        say(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(failed, KeyboardInterrupt):
        sys.exit(130)
    if isinstance(failed, SystemExit):
        sys.exit(failed.code)
    if failed is not None:
        sys.exit(1)


def run_phases(args, skip: set[str], tmp: Path, result: dict, phases: Bar) -> None:
    """The phases not in ``skip``, each a ``phases.step``."""
    if "baseline" not in skip:
        variants = [("baseline", None)] + ([("baseline_password", uuid.uuid4().hex)] if args.baseline_password else [])
        for name, password in variants:
            phases.step(f"bench-node: {name}")
            log(f"{name}: starting 3 bare PySyncObj nodes")
            base = BaselineCluster(tmp / name, password=password).start()
            leader = base.leader()
            pids = {m.name: m.pid for m in base.members}
            log(f"{name}: {args.clients} clients, PUT, {args.duration:g} s (leader {leader.name})")
            r = run_load("put", f"http://{leader.api}", "", args.clients, args.generators, pids,
                         args.warmup, args.duration)
            result.update({
                f"{name}_writes_per_s": r["per_s"], f"{name}_write_p50_ms": r["p50_ms"],
                f"{name}_write_p99_ms": r["p99_ms"], f"{name}_detail": r,
            })
            log(f"{name}: {r['per_s']} writes/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}")
            for m in base.members:
                _signal_group(m.proc, signal.SIGKILL)
                m.proc.wait(10)

    if not {"writes", "reads", "failover"} <= skip:
        log("synapse: starting a 3-node cluster (cluster secret on)")
        cluster = SynapseCluster(tmp / "synapse").start()
        cluster.wait_converged(30)
        pids = {m.name: m.pid for m in cluster.members}
        if "writes" not in skip:
            phases.step("bench-node: writes")
            leader = cluster.leader()
            log(f"writes: {args.clients} clients, PUT, {args.duration:g} s (leader {leader.name})")
            m0 = scrape_metrics(leader.api, cluster.token)
            r = run_load("put", f"http://{leader.api}", cluster.token, args.clients, args.generators, pids,
                         args.warmup, args.duration)
            r["leader_metrics"] = server_side(m0, scrape_metrics(leader.api, cluster.token), "/v1/kv/{key}")
            read_keys = r["min_keys_per_worker"]
            result.update({"writes_per_s": r["per_s"], "write_p50_ms": r["p50_ms"], "write_p99_ms": r["p99_ms"],
                           "load_generator_cpu_pct": r["load_generator_cpu_pct"], "writes_detail": r})
            log(f"writes: {r['per_s']} /s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, generator CPU "
                f"{r['load_generator_cpu_pct']} %, nodes CPU {r['node_cpu_pct']} %, nodes waiting for a CPU "
                f"{r['node_runqueue_wait_pct']} %, errors {r['errors']}")
        if "reads" not in skip:
            phases.step("bench-node: reads")
            leader = cluster.leader()
            if "writes" in skip:  # the readers need keys to read
                log("reads: writing the keys to read first")
                read_keys = run_load("put", f"http://{leader.api}", cluster.token, args.clients, 1, pids,
                                     0.0, 3.0)["min_keys_per_worker"]
            log(f"reads: {args.clients} clients, linearizable GET, {args.duration:g} s (leader {leader.name})")
            m0 = scrape_metrics(leader.api, cluster.token)
            # each reader reads keys its writer wrote (a generator process's workers are numbered
            # after the previous process's, in both phases)
            r = run_load("get", f"http://{leader.api}", cluster.token, args.clients, args.generators, pids,
                         args.warmup, args.duration, extra={"read_keys_per_worker": max(1, min(64, read_keys))})
            r["leader_metrics"] = server_side(m0, scrape_metrics(leader.api, cluster.token), "/v1/kv/{key}")
            result.update({"lin_reads_per_s": r["per_s"], "lin_read_p50_ms": r["p50_ms"],
                           "lin_read_p99_ms": r["p99_ms"], "reads_detail": r})
            result.setdefault("load_generator_cpu_pct", r["load_generator_cpu_pct"])
            log(f"reads: {r['per_s']} /s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, generator CPU "
                f"{r['load_generator_cpu_pct']} %, nodes CPU {r['node_cpu_pct']} %, nodes waiting for a CPU "
                f"{r['node_runqueue_wait_pct']} %, errors {r['errors']}")
        if "failover" not in skip and args.failover_trials > 0:
            phases.step("bench-node: failover")
            log(f"failover: {args.failover_trials} SIGKILLs of the leader")
            result.update(run_failover(cluster, args.failover_trials, args.failover_pause))
            log(f"failover: median {result['failover_median_s']} s, p90 {result['failover_p90_s']} s, "
                f"max {result['failover_max_s']} s")
        stop_cluster(cluster)

    if "failover-tls" not in skip and args.failover_trials > 0:
        # The same trials on a cluster with mutual TLS on the API and the Raft port.
        phases.step("bench-node: failover-tls")
        log("failover-tls: starting a 3-node cluster with TLS (API and Raft port)")
        cluster = SynapseCluster(tmp / "synapse-tls", tls=True).start()
        cluster.wait_converged(30)
        tls = run_failover(cluster, args.failover_trials, args.failover_pause)
        result.update({k.replace("failover", "failover_tls", 1): v for k, v in tls.items()})
        log(f"failover-tls: median {result['failover_tls_median_s']} s, max {result['failover_tls_max_s']} s")
        stop_cluster(cluster)

    if "checkpoint" not in skip:
        phases.step("bench-node: checkpoint")
        result.update(run_checkpoint_overhead(args, tmp, phases))

    if "rss" not in skip and args.rss_keys > 0:
        phases.step("bench-node: rss")
        log("rss: starting a fresh 3-node cluster")
        cluster = SynapseCluster(tmp / "synapse-rss", extra=["--debug-fault-injection"]).start()
        cluster.wait_converged(30)
        leader = cluster.leader()
        empty = {m.name: proc_mem_mb(m.pid) for m in cluster.members}
        log(f"rss: loading {args.rss_keys} keys with {TXN_BATCH}-put transactions, {args.rss_clients} in flight "
            f"(leader {leader.name}, empty RSS {empty[leader.name]['rss_mb']} MB)")
        r = run_load("txn", f"http://{leader.api}", cluster.token, args.rss_clients, args.generators,
                     {}, extra={"first": 0, "count": args.rss_keys, "deadline_s": args.rss_max_load_s,
                                "prefix": "rss", "request_timeout": 30.0})
        loaded = r["loaded"]
        log(f"rss: loaded {loaded} keys in {r['elapsed_s']} s ({loaded / max(1e-9, r['elapsed_s']):.0f} keys/s), "
            f"errors {r['errors']}; waiting for the nodes to converge")
        t = time.monotonic()
        conv_err = None
        try:
            cluster.wait_ready(300)
            cluster.wait_converged(300)
        except RuntimeError as e:
            conv_err = str(e)[:1000]
        converge_s = time.monotonic() - t
        time.sleep(2.0)
        leader_now = cluster.leader()
        leader_status = cluster.status(leader_now) or {}
        mem = {m.name: proc_mem_mb(m.pid) for m in cluster.members}
        rss = mem[leader_now.name]["rss_mb"]
        result.update({
            "rss_keys": loaded,
            "rss_mb_measured": rss,
            "rss_mb_1m_keys": rss if loaded >= 1_000_000 else None,
            "rss_detail": {
                "leader": leader_now.name, "leader_applied_index": leader_status.get("applied_index"),
                "nodes_mb": mem, "empty_nodes_mb": empty,
                "leader_files_mb": {f.name: round(disk_bytes(f) / 2**20, 1)
                                    for f in sorted(leader_now.data_dir.iterdir())},
                "load_s": r["elapsed_s"], "load_keys_per_s": round(loaded / max(1e-9, r["elapsed_s"]), 1),
                "converge_after_load_s": round(converge_s, 2), "converge_error": conv_err,
                "errors": r["errors"], "error_samples": r["error_samples"],
                "load_generator_cpu_pct": r["load_generator_cpu_pct"],
                "bytes_per_key_over_empty": round((rss - empty[leader_now.name]["rss_mb"]) * 1024 * 1024 / max(1, loaded), 1),
            },
        })
        log(f"rss: leader {leader_now.name} RSS {rss} MB holding {loaded} keys; all nodes {mem}")
        if "repair" not in skip:
            phases.step("bench-node: repair")
            result.update(run_repair(cluster, loaded, args.repair_keys))
        if "catchup" not in skip:
            phases.step("bench-node: catchup")
            result.update(run_catchup(cluster, loaded, args.catchup_fraction))
        stop_cluster(cluster)


def run_catchup(cluster: SynapseCluster, loaded: int, fraction: float) -> dict:
    leader = cluster.leader()
    lagging = next(m for m in cluster.members if m is not leader)
    up = [m for m in cluster.members if m is not lagging]
    _signal_group(lagging.proc, signal.SIGTERM)
    lagging.proc.wait(60)
    count = max(1, int(loaded * fraction))
    step = max(1, loaded // count)
    keys = [f"rss/{i:010d}" for i in range(step // 2, loaded, step)][:count]
    log(f"catchup: {lagging.name} stopped; changing {len(keys)} of {loaded} keys")
    for start in range(0, len(keys), TXN_BATCH):
        ops = [{"op": "put", "key": k, "value": "changed while a node was down"} for k in keys[start : start + TXN_BATCH]]
        code, body = http_json(leader.api, "POST", "/v1/txn", cluster.token, {"then": ops}, timeout=30)
        if code != 200:
            raise RuntimeError(f"catchup: a write failed: {code} {body}")
    from synapse.cluster.dump import dump_index

    for m in up:
        path = m.data_dir / "raft.dump"
        before = dump_index(path) if path.exists() else 0
        http_json(m.api, "POST", "/v1/debug/compact", cluster.token, {})
        deadline = time.monotonic() + 120
        while not (path.exists() and dump_index(path) > before):
            if time.monotonic() > deadline:
                raise RuntimeError(f"catchup: {m.name} did not write a new dump")
            time.sleep(0.1)
    leader = cluster.leader()
    dump_bytes = (leader.data_dir / "raft.dump").stat().st_size
    before = {m.name: (cluster.status(m) or {}).get("catchup") or {} for m in up}
    t0 = time.monotonic()
    lagging.start()
    cluster.wait_ready(300)
    cluster.wait_converged(300)
    caught_up_s = round(time.monotonic() - t0, 2)
    got = (cluster.status(lagging) or {}).get("catchup") or {}
    after = {m.name: (cluster.status(m) or {}).get("catchup") or {} for m in up}

    def delta(name: str) -> int:
        return sum(after[m].get(name, 0) - before[m].get(name, 0) for m in after)

    # Every byte of every container transfer the leaders started (a cut-off transfer is sent
    # again), or what the follower received if no leader reported one.
    container = delta("container_bytes_sent") or got.get("container_bytes_received", 0)
    probe = delta("probe_bytes_sent") + delta("probe_bytes_received")
    full_sent = delta("full_dumps_sent")
    ratio = round((container + probe) / dump_bytes, 4) if got.get("containers_received") else None
    log(f"catchup: {lagging.name} caught up in {caught_up_s} s: container {container} bytes + planning {probe} bytes "
        f"vs dump {dump_bytes} bytes -> ratio {ratio}; full dumps sent {full_sent}")
    return {
        "catchup_bytes_ratio": ratio if loaded >= 1_000_000 and abs(fraction - 0.01) < 1e-9 else None,
        "catchup_detail": {
            "keys": loaded, "changed": len(keys), "node": lagging.name, "dump_bytes": dump_bytes,
            "container_bytes": container, "planning_bytes_both_ways": probe, "full_dumps_sent": full_sent,
            "ratio_measured": ratio, "caught_up_s": caught_up_s, "follower_report": got,
            "leader_reports": after,
        },
    }


def stop_cluster(cluster: SynapseCluster) -> None:
    for m in cluster.members:
        _signal_group(m.proc, signal.SIGTERM)
    for m in cluster.members:
        try:
            m.proc.wait(30)
        except subprocess.TimeoutExpired:
            log(f"synapse node {m.name} did not stop within 30 s of SIGTERM; killing it")
            _signal_group(m.proc, signal.SIGKILL)
            m.proc.wait(10)


def run_checkpoint_overhead(args, tmp: Path, phase: Bar) -> dict:
    """Write throughput with a checkpoint every 1,000 entries vs none: two clusters, runs
    alternated (off, on, off, on, ...) so drift on a shared machine hits both alike."""
    log("checkpoint: starting two 3-node clusters (checkpoints off / every 1,000 entries)")
    clusters = {
        "off": SynapseCluster(tmp / "ck-off", extra=["--checkpoint-interval", "0"]).start(),
        "on": SynapseCluster(tmp / "ck-on", extra=["--checkpoint-interval", "1000", "--checkpoint-seconds", "86400"]).start(),
    }
    runs: dict[str, list[float]] = {"off": [], "on": []}
    # CPU the 3 nodes spent per acknowledged write (ms): steadier than throughput on a shared
    # machine, where a run's throughput swings by ±20% with whatever else is running.
    cpu_ms: dict[str, list[float]] = {"off": [], "on": []}
    made_before = {}
    try:
        for c in clusters.values():
            c.wait_converged(30)
        leader = clusters["on"].leader()
        made_before = http_json(leader.api, "GET", "/v1/checkpoints?limit=256", clusters["on"].token)[1]["checkpoints"]
        for rnd in range(args.checkpoint_rounds):
            for name in ("off", "on"):
                phase.describe(f"bench-node: checkpoint, round {rnd + 1}/{args.checkpoint_rounds}, checkpoints {name}")
                c = clusters[name]
                leader = c.leader()
                pids = {m.name: m.pid for m in c.members}
                r = run_load("put", f"http://{leader.api}", c.token, args.clients, args.generators, pids,
                             args.warmup, args.checkpoint_duration)
                runs[name].append(r["per_s"])
                cpu = sum(v for v in (r.get("node_cpu_pct") or {}).values() if v is not None)
                cpu_ms[name].append(round(cpu / 100 / r["per_s"] * 1000, 4) if r["per_s"] else None)
                log(f"checkpoint: round {rnd + 1} checkpoints {name}: {r['per_s']} writes/s, p99 {r['p99_ms']} ms, "
                    f"{cpu_ms[name][-1]} ms of node CPU per write")
        leader = clusters["on"].leader()
        made = http_json(leader.api, "GET", "/v1/checkpoints?limit=256", clusters["on"].token)[1]["checkpoints"]
        status = http_json(leader.api, "GET", "/v1/cluster/status", clusters["on"].token)[1]
    finally:
        for c in clusters.values():
            stop_cluster(c)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    new = [ck for ck in made if ck["index"] not in {b["index"] for b in made_before}]
    overhead = round((off - on) / off * 100, 2) if off else None
    cpu_off = round(statistics.median([x for x in cpu_ms["off"] if x is not None] or [0]), 4)
    cpu_on = round(statistics.median([x for x in cpu_ms["on"] if x is not None] or [0]), 4)
    cpu_overhead = round((cpu_on - cpu_off) / cpu_off * 100, 2) if cpu_off else None
    log(f"checkpoint: node CPU per write {cpu_off} ms without, {cpu_on} ms with ({cpu_overhead} % more)")
    log(f"checkpoint: median {off} writes/s without, {on} with ({overhead} % overhead); "
        f"{len(new)} checkpoints made, {sum(1 for ck in new if ck['agreed'])} agreed")
    return {
        "checkpoint_overhead_pct": overhead,
        "checkpoint_cpu_overhead_pct": cpu_overhead,
        "checkpoint_detail": {
            "node_cpu_ms_per_write_off": cpu_ms["off"], "node_cpu_ms_per_write_on": cpu_ms["on"],
            "writes_per_s_off": runs["off"], "writes_per_s_on": runs["on"],
            "median_off": off, "median_on": on, "checkpoints_made": len(new),
            "checkpoints_agreed": sum(1 for ck in new if ck["agreed"]),
            "log_entries_written": status.get("applied_index"),
            "note": "positive: slower with checkpoints; runs alternate to share the machine's drift",
        },
    }


def run_repair(cluster: SynapseCluster, loaded: int, count: int) -> dict:
    """Corrupts ``count`` keys on one follower holding ``loaded`` keys, asks for a checkpoint,
    and times detection plus repair (until the node reports its repair done), then until it
    serves again (the next checkpoint agreed with it)."""
    leader = cluster.leader()
    victim = next(m for m in cluster.members if m is not leader)
    step = max(1, loaded // count)
    keys = [f"rss/{i:010d}" for i in range(0, loaded, step)][:count]
    for key in keys:
        code, body = http_json(victim.api, "POST", "/v1/debug/corrupt", cluster.token, {"key": key, "value": "rotten"})
        if code != 200:
            raise RuntimeError(f"repair: corrupting {key} on {victim.name} failed: {code} {body}")
    log(f"repair: corrupted {len(keys)} of {loaded} keys on {victim.name}; asking for a checkpoint")
    t0 = time.monotonic()
    code, made = http_json(leader.api, "POST", "/v1/checkpoints", cluster.token, {"label": "repair-bench"})
    if code != 200:
        raise RuntimeError(f"repair: POST /v1/checkpoints failed: {code} {made}")
    repaired_s = serving_s = None
    report = None
    deadline = t0 + 120
    while time.monotonic() < deadline:
        s = cluster.status(victim) or {}
        ck = s.get("checkpoint") or {}
        report = ck.get("repair")
        if repaired_s is None and ck.get("repairs", 0) >= 1:
            repaired_s = round(time.monotonic() - t0, 3)
        if repaired_s is not None and ck.get("service") == "serving":
            serving_s = round(time.monotonic() - t0, 3)
            break
        time.sleep(0.02)
    wrong = []
    for key in keys[:10]:
        code, body = http_json(victim.api, "GET", f"/v1/kv/{key}?consistency=stale", cluster.token)
        if code != 200 or body.get("value") == "rotten":
            wrong.append(key)
    log(f"repair: repaired after {repaired_s} s, serving after {serving_s} s; last repair {report}; still wrong: {wrong}")
    return {
        "repair_s_1m_100": repaired_s if loaded >= 1_000_000 and count == 100 and not wrong else None,
        "repair_detail": {
            "keys": loaded, "corrupted": len(keys), "victim": victim.name, "checkpoint": made.get("index"),
            "detect_and_repair_s": repaired_s, "until_serving_s": serving_s, "node_report": report,
            "sampled_keys_still_wrong": wrong,
        },
    }


if __name__ == "__main__":
    main()
