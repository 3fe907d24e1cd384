"""Benchmarks Synapse against etcd and bare PySyncObj, 3 nodes each on 127.0.0.1, in one run.

The systems:

- ``synapse``: 3 ``synapse node start`` processes, the cluster secret on, defaults otherwise
  (``bench_node.SynapseCluster``). No fsync by default (``--raft-fsync`` off);
  ``synapse_fsync`` is the same cluster with ``--raft-fsync``, measured at ``--fsync-levels``.
- ``etcd``: 3 members of Debian's ``etcd-server`` (``/usr/bin/etcd``, 3.4), default settings
  (fsync of the WAL on every Raft batch) but for ``--quota-backend-bytes`` (8 GiB, room for 1M
  keys) and auto-compaction explicitly off; driven through its v3 JSON gateway.
- ``pysyncobj``: 3 bare PySyncObj processes (``bench_node.BaselineCluster``: default
  ``SyncObjConf()``, in-memory log, a ``@replicated`` dict behind a minimal aiohttp front in the
  same process). Its default batch mode sends entries on a 100 ms timer, so its throughput is
  about clients × 10/s; ``pysyncobj_nobatch`` is the same with ``appendEntriesUseBatch=False``
  (each entry sent at once), the stronger bare baseline, reported beside it (no memory figure:
  the same dict).

Every system is driven by the SAME load generator (``bench_node.run_load``: separate Python
processes, asyncio + uvloop + aiohttp, N clients each with one request in flight, only requests
completed inside the measured window count); only the spelling of a request differs (see
``bench_node._loadgen``'s ``protocol``). Values are the same 100 bytes everywhere. With
``--target leader`` (the default) all requests go to the leader of each system (found through
its status API before each level), so none pays a forwarding hop the others do not; with
``--target spread`` client c sends its k-th request to member (c + k) mod 3 of every system,
as users connecting to any node do (followers forward or redirect, each system its own way).
Each level reports ``cpu_us_per_op``: the CPU time of all three members over the measured
window divided by the requests acknowledged in it — on a CPU-bound machine, the cost that
sets throughput.

Per system and concurrency level (``--levels``, default 1,16,64,256): write throughput and
latency (each write a new key ``bench/c<level>/w<worker>/<n>``), then linearizable read
throughput and latency (reads of keys the 256-client writers wrote: Synapse's default
consistency, etcd's default (non-serializable) range, PySyncObj's replicated ``get`` through
the log). Latency CDFs are stored as percentiles (``latency_percentiles_ms``), not samples.
Each level also reports what could disturb it: the generators' and nodes' CPU, completions per
second of the window (``per_second``, ``per_second_cv``: a steady run is flat) and the share
of the run in which tasks stalled on CPU or I/O (``pressure_pct``, Linux PSI). Generators:
``--generators`` processes (default 1), ``--generators-high`` (default 2) from
``--more-generators-from`` clients (default 256): one process held etcd to ~3.8K writes/s at
256 clients where two gave ~4.5–5K; at 64 clients two made no difference.

Failover (Synapse and etcd, ``--failover-trials``, default 5): SIGKILL of the leader → first
acknowledged write on a survivor, measured the same way for both: a new write attempt to every
survivor every 20 ms (1 s timeout each) until one is acknowledged. The killed member restarts
(same data dir and flags) and the cluster must be in steady state (every member up, one leader
and term everywhere, same applied index, held for ``--failover-pause`` s) before the next kill.

Memory (``--rss-keys``, default 1M): a fresh cluster of each system, the keys loaded through
its batch API (Synapse ``POST /v1/txn``, etcd ``/v3/kv/txn``, PySyncObj's ``/v1/txn`` front:
128 puts each), then VmRSS of the leader's process once all members applied everything.

``--profile FILE``: after Synapse's write levels, one extra 64-client write run with py-spy
(``record --nonblocking --threads -f raw``) on the leader and one follower; the summary (top inclusive frames,
per-thread share) goes to ``synapse_profile``; the figures above are not taken from that run.

Output: one JSON object on stdout (and in ``--json FILE``): ``machine``, ``settings``,
``durability``, ``systems`` → ``synapse`` / ``etcd`` / ``pysyncobj`` / ``pysyncobj_nobatch`` /
``synapse_fsync`` →
``writes`` / ``reads`` → level → figures, ``failover``, ``rss_mb_1m_keys``; ``ratios``;
``synapse_over_etcd_writes_64``, ``synapse_over_pysyncobj_writes_64``,
``synapse_over_pysyncobj_nobatch_writes_64``, ``synapse_fsync_writes_64``,
``synapse_fsync_over_etcd_writes_64``; ``targets``; ``notes``.
PNG plots go to ``--plots DIR``.

Every process this script starts is in its own session, gets SIGKILL if this script dies and
is torn down on exit, Ctrl-C or SIGTERM. Only 127.0.0.1 is used. All data dirs are in one
temporary directory (one file system).

Usage: ./scripts/bench-cluster --json FILE --plots DIR [--levels 1,16,64,256] [--duration 10] [--target leader|spread]
       [--skip etcd,pysyncobj,pysyncobj_nobatch,synapse,fsync,writes,reads,failover,rss]
       [--profile FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_node as bn  # noqa: E402  (processes, clusters, load generator: shared)

from synapse.cli.progress import bars  # noqa: E402

SYSTEMS = ("synapse", "etcd", "pysyncobj", "pysyncobj_nobatch")
PHASES = ("writes", "reads", "failover", "rss", "fsync")
ETCD = "/usr/bin/etcd"
# The compact latency CDF kept per system and level (percent).
CDF_PCTS = [0.1, 1, 2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95,
            97, 98, 99, 99.5, 99.9]


def log(msg: str) -> None:
    print(f"bench-cluster [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------------------------


class EtcdCluster:
    """3 (or n) etcd members on loopback, each with its own client and peer port."""

    def __init__(self, root: Path, size: int = 3, quota_bytes: int = 8 << 30) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        ports = bn.free_ports(2 * size)
        names = [f"e{i + 1}" for i in range(size)]
        peer = {n: f"http://{bn.HOST}:{ports[2 * i + 1]}" for i, n in enumerate(names)}
        initial = ",".join(f"{n}={u}" for n, u in peer.items())
        token = f"bench-{uuid.uuid4().hex[:8]}"
        self.members: list[bn.Member] = []
        for i, name in enumerate(names):
            api = f"{bn.HOST}:{ports[2 * i]}"
            args = [ETCD, "--name", name, "--data-dir", str(root / name),
                    "--listen-client-urls", f"http://{api}", "--advertise-client-urls", f"http://{api}",
                    "--listen-peer-urls", peer[name], "--initial-advertise-peer-urls", peer[name],
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", token,
                    "--quota-backend-bytes", str(quota_bytes), "--auto-compaction-retention", "0",
                    "--logger", "zap", "--log-outputs", "stderr"]
            self.members.append(bn.Member(name, api, args, root / name, root / f"{name}.log"))
        self.token = ""
        self.headers: dict[str, str] = {}

    def start(self, timeout: float = 60.0) -> "EtcdCluster":
        for m in self.members:
            m.start()
        self.wait_ready(timeout)
        return self

    def status(self, m: bn.Member, timeout: float = 2.0) -> dict | None:
        """/v3/maintenance/status with the uint64s as ints and ``is_leader``; None if down."""
        try:
            code, body = bn.http_json(m.api, "POST", "/v3/maintenance/status", body={}, timeout=timeout)
        except OSError:
            return None
        if code != 200:
            return None
        me = body.get("header", {}).get("member_id")
        return {"member_id": me, "leader": body.get("leader"), "is_leader": me is not None and body.get("leader") == me,
                "term": int(body.get("raftTerm", 0)), "index": int(body.get("raftIndex", 0)),
                "applied_index": int(body.get("raftAppliedIndex", 0)), "db_size": int(body.get("dbSize", 0))}

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            bad = {}
            for m in self.members:
                if not m.alive():
                    raise RuntimeError(f"etcd member {m.name} exited (code {m.proc.returncode}):\n{m.log_tail()}")
                try:
                    code, body = bn.http_json(m.api, "GET", "/health", timeout=1.0)
                    if code != 200 or body.get("health") != "true":
                        bad[m.name] = f"{code} {body}"
                except OSError as e:
                    bad[m.name] = repr(e)
            if not bad:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {m.name} ({bad.get(m.name)})\n{m.log_tail()}" for m in self.members if m.name in bad)
                raise RuntimeError(f"etcd members {sorted(bad)} not healthy within {timeout} s\n{tails}")
            time.sleep(0.1)

    def leader(self, timeout: float = 30.0) -> bn.Member:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if m.alive():
                    s = self.status(m)
                    if s and s["is_leader"]:
                        return m
            if time.monotonic() > deadline:
                raise RuntimeError("etcd: no leader found via /v3/maintenance/status")
            time.sleep(0.05)

    def wait_converged(self, timeout: float = 60.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            st = {m.name: self.status(m) for m in self.members if m.alive()}
            if all(st.values()) and len({s["applied_index"] for s in st.values()}) == 1:
                return st
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd members did not converge within {timeout} s: {st}")
            time.sleep(0.1)

    def wait_stable(self, hold: float, timeout: float = 60.0) -> dict:
        """Like SynapseCluster.wait_stable: every member up and reporting the same leader and
        term and the same applied index, held for ``hold`` seconds without a break."""
        start = time.monotonic()
        deadline = start + timeout
        first_term = None
        since, key = None, None
        while True:
            st = {m.name: self.status(m, timeout=1.0) for m in self.members if m.alive()}
            good = len(st) == len(self.members) and all(st.values())
            if good:
                terms = {s["term"] for s in st.values()}
                leaders = {s["leader"] for s in st.values()}
                first_term = min(terms) if first_term is None else first_term
                good = (len(terms) == 1 and len(leaders) == 1 and "0" not in leaders and None not in leaders
                        and len({s["applied_index"] for s in st.values()}) == 1)
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
                raise RuntimeError(f"etcd did not become stable within {timeout} s: {st}")
            time.sleep(0.05)

    def key_count(self, m: bn.Member, prefix: str) -> int | None:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        code, body = bn.http_json(m.api, "POST", "/v3/kv/range", timeout=60.0,
                                  body={"key": bn._b64(prefix), "range_end": bn._b64(end), "count_only": True})
        return int(body.get("count", 0)) if code == 200 else None

    # The failover probe, spelled for etcd.
    async def put(self, session, m: bn.Member, key: str, n: int, timeout: float) -> str:
        import aiohttp

        async with session.post(f"http://{m.api}/v3/kv/put", data=bn.etcd_put_body(key, bn.etcd_value_for(n)),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            payload = await r.read()
            if r.status == 200:
                return "200"
            return f"{r.status} {payload[:80].decode(errors='replace')}"

    async def view(self, session, m: bn.Member) -> tuple[bool, int | None]:
        import aiohttp

        async with session.post(f"http://{m.api}/v3/maintenance/status", data=b"{}",
                                timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            s = await r.json(content_type=None)
            me = s.get("header", {}).get("member_id")
            return (me is not None and s.get("leader") == me), int(s.get("raftTerm", 0))


def run_failover(system: str, target, trials: int, pause: float) -> dict:
    results = []
    pre = target.wait_stable(pause, 60)
    for trial in range(trials):
        victim = target.leader()
        r = asyncio.run(bn.failover_trial(target, victim, trial))
        r.update({"trial": trial, "killed": victim.name, "old_term": pre["term"]})
        for k in ("ack_s", "leader_seen_s", "acked_attempt_started_s"):
            if k in r:
                r[k] = round(r[k], 4)
        log(f"{system} failover {trial}: killed {victim.name} (term {pre['term']}) -> "
            + (f"ack after {r['ack_s']:.3f} s by {r.get('acked_by')} (new leader {r.get('new_leader')}, "
               f"term {r.get('new_term')})" if "ack_s" in r else f"NO ack within 30 s; {r['outcomes_before_ack']}"))
        t = time.monotonic()
        victim.start()
        try:
            pre = target.wait_stable(pause, 90)
            r["restart_to_stable_s"] = round(time.monotonic() - t, 3)
        except RuntimeError as e:
            r["recovery_error"] = str(e)[:2000]
            results.append(r)
            log(f"{system} failover {trial}: the cluster did not recover: {str(e)[:500]}")
            break
        results.append(r)
    acks = sorted(r.get("ack_s", float("inf")) for r in results)
    fin = lambda x: None if x is None or x == float("inf") else bn.r3(x)  # noqa: E731
    return {
        "trials": len(results),
        "median_s": fin(statistics.median(acks)) if acks else None,
        "min_s": fin(acks[0]) if acks else None,
        "max_s": fin(acks[-1]) if acks else None,
        "unacknowledged": sum(1 for x in acks if x == float("inf")),
        "ack_s": [fin(r.get("ack_s")) for r in results],
        "leader_seen_s": [fin(r.get("leader_seen_s")) for r in results],
        "detail": results,
    }


# ---------------------------------------------------------------------------------------------
# One system: start, levels, failover, stop
# ---------------------------------------------------------------------------------------------


def start_system(system: str, root: Path, extra: list[str] | None = None):
    """Returns (cluster, protocol, token)."""
    if system in ("synapse", "synapse_fsync"):
        c = bn.SynapseCluster(root, extra=extra).start()
        c.wait_converged(60)
        return c, "synapse", c._token()
    if system == "etcd":
        c = EtcdCluster(root).start()
        c.leader()
        return c, "etcd", ""
    c = bn.BaselineCluster(root, no_batch=system == "pysyncobj_nobatch").start()
    return c, "synapse", ""


def stop_system(cluster) -> None:
    if isinstance(cluster, EtcdCluster):
        # An etcd leader hands leadership over before it stops; stopped together with its
        # followers it waited ~7 s for one. One leader at a time, each hands over at once.
        for _ in cluster.members:
            try:
                leader = cluster.leader(timeout=1.0)
                bn._signal_group(leader.proc, signal.SIGTERM)
                leader.proc.wait(30)
            except (RuntimeError, subprocess.TimeoutExpired):
                break
    for m in cluster.members:
        if m.alive():
            bn._signal_group(m.proc, signal.SIGTERM)
    for m in cluster.members:
        if m.proc is None:
            continue
        try:
            m.proc.wait(30)
        except subprocess.TimeoutExpired:
            log(f"{m.name} did not stop within 30 s of SIGTERM; killing it")
            bn._signal_group(m.proc, signal.SIGKILL)
            m.proc.wait(10)


def converge(system: str, cluster, timeout: float = 300.0) -> None:
    """Until every member has applied everything the leader has."""
    if system.startswith("pysyncobj"):
        deadline = time.monotonic() + timeout
        while True:
            st = []
            for m in cluster.members:
                try:
                    st.append(bn.http_json(m.api, "GET", "/status", timeout=2.0)[1])
                except OSError:
                    st.append({})
            if all(s.get("last_applied") is not None for s in st) and \
                    len({s["last_applied"] for s in st}) == 1 and len({s["keys"] for s in st}) == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pysyncobj members did not converge within {timeout} s: {st}")
            time.sleep(0.2)
    if system.startswith("synapse"):
        cluster.wait_ready(timeout)
    cluster.wait_converged(timeout)


def pressure_totals() -> dict[str, int]:
    """Linux PSI stall totals (µs): time some / all runnable tasks waited for a CPU or for I/O."""
    out = {}
    for res in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{res}") as f:
                for line in f:
                    kind, *fields = line.split()
                    out[f"{res}_{kind}"] = int(dict(x.split("=") for x in fields)["total"])
        except (OSError, KeyError, ValueError):
            pass
    return out


def summarize(r: dict, leader: str) -> dict:
    keys = ("per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "min_ms", "ops", "errors", "error_samples",
            "load_generator_cpu_pct", "load_generator_cpu_pct_per_process", "generators", "node_cpu_pct",
            "node_runqueue_wait_pct", "load_generator_runqueue_wait_pct", "late_start_s", "leader_metrics",
            "latency_percentiles_ms", "per_second", "per_second_cv", "pressure_pct")
    out = {k: r[k] for k in keys if k in r}
    out["leader"] = leader
    return out


def generators_for(args, level: int) -> int:
    return max(1, min(level, args.generators if level < args.more_generators_from else args.generators_high))


def bench_levels(system: str, cluster, protocol: str, token: str, args, mode: str, levels: list[int],
                 prefix_of, extra_of=None) -> dict:
    out = {}
    pids = {m.name: m.pid for m in cluster.members}
    for level in levels:
        leader = cluster.leader()
        gens = generators_for(args, level)
        m0 = bn.scrape_metrics(leader.api, token) if system.startswith("synapse") else {}
        urls = ([f"http://{m.api}" for m in cluster.members] if args.target == "spread" else [f"http://{leader.api}"])
        extra = {"protocol": protocol, "prefix": prefix_of(level), "urls": urls, **(extra_of(level) if extra_of else {})}
        p0, t0 = pressure_totals(), time.monotonic()
        r = bn.run_load(mode, urls[0], token, level, gens, pids, args.warmup, args.duration,
                        extra=extra, percentiles=CDF_PCTS)
        p1, dt = pressure_totals(), time.monotonic() - t0
        # Share of the run (warm-up included) in which tasks stalled on CPU / I/O: a run slowed
        # by something outside the cluster (I/O from another job, say) shows up here.
        r["pressure_pct"] = {k: round((p1[k] - p0[k]) / 1e4 / dt, 1) for k in p1 if k in p0}
        if m0:
            route = "/v1/kv/{key}"
            r["leader_metrics"] = bn.server_side(m0, bn.scrape_metrics(leader.api, token), route)
        out[str(level)] = s = summarize(r, leader.name)
        s["keys_per_worker_min"] = r.get("min_keys_per_worker")
        s["target"] = args.target
        if r["ops"] and r.get("node_cpu_pct"):
            s["cpu_us_per_op"] = round(sum(r["node_cpu_pct"].values()) / 100.0 * args.duration / r["ops"] * 1e6, 1)
        log(f"{system} {mode} x{level}: {r['per_s']} /s (cv {r.get('per_second_cv')}), p50 {r['p50_ms']} ms, p99 "
            f"{r['p99_ms']} ms, errors {r['errors']}, generator CPU {r['load_generator_cpu_pct']} % ({gens} proc), "
            f"nodes CPU {r['node_cpu_pct']}, stalls {r['pressure_pct']}")
    return out


def run_profile(cluster, token: str, args, out_file: Path) -> dict:
    """One extra 64-client write run with py-spy on the leader and one follower (not used for
    the figures). The leader's samples go to ``out_file``, the follower's beside it
    (``<stem>.follower<suffix>``)."""
    leader = cluster.leader()
    follower = next(m for m in cluster.members if m.pid != leader.pid)
    pyspy = Path(sys.executable).with_name("py-spy")
    level = 64
    pids = {m.name: m.pid for m in cluster.members}
    dur = max(5.0, args.duration)
    files = {"leader": out_file, "follower": out_file.with_name(f"{out_file.stem}.follower{out_file.suffix}")}
    spies = []
    for role, member in (("leader", leader), ("follower", follower)):
        # py-spy starts when the measured window does (run_load starts the clients 2 s from now)
        cmd = ["bash", "-c", f"sleep {2.0 + args.warmup:.2f}; exec {pyspy} record --nonblocking --threads "
               f"--nolineno -r 200 -p {member.pid} -d {int(round(dur))} -f raw -o {files[role]}"]
        spies.append(bn.spawn(cmd, files[role].with_suffix(".log")))
    r = bn.run_load("put", f"http://{leader.api}", token, level, generators_for(args, level), pids,
                    args.warmup, dur, extra={"protocol": "synapse", "prefix": "profile"})
    for spy in spies:
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            bn._signal_group(spy, signal.SIGKILL)
    log(f"profile: {r['per_s']} writes/s under py-spy (leader {leader.name}, follower {follower.name}) -> "
        f"{', '.join(map(str, files.values()))}")
    summary = {"run_writes_per_s": r["per_s"], "run_p99_ms": r["p99_ms"], "leader": leader.name,
               "follower": follower.name}
    for role, path in files.items():
        summary[role] = (summarize_profile(path) if path.exists() else
                         {"error": f"py-spy wrote nothing; see {path.with_suffix('.log')}"})
        summary[role]["file"] = str(path)
    return summary


# Frames every stack of a thread passes through (thread start-up, the CLI): not informative.
_WRAPPER_FRAMES = ("(threading.py", "(click/", "<module> (", "node_start (synapse/cli/main.py")


def summarize_profile(path: Path, top: int = 30) -> dict:
    """From py-spy's raw (collapsed) output: the share of samples per thread, the top inclusive
    frames (share of all samples whose stack contains the frame; thread start-up and CLI
    frames left out) and the top self frames (the innermost Python frame)."""
    total = 0
    inclusive: dict[str, int] = {}
    self_: dict[str, int] = {}
    threads: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        total += n
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        threads[thread] = threads.get(thread, 0) + n
        self_[frames[-1]] = self_.get(frames[-1], 0) + n
        for f in set(frames[1:]):
            if not any(w in f for w in _WRAPPER_FRAMES):
                inclusive[f] = inclusive.get(f, 0) + n
    pct = lambda n: round(100.0 * n / total, 1) if total else None  # noqa: E731
    ranked = lambda d: [[f, pct(n)] for f, n in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {
        "samples": total,
        "note": "py-spy --nonblocking, active (non-idle) threads only; percent of all samples of the process."
                " Self time in node_start (synapse/cli/main.py) is the event loop's own C code (uvloop:"
                " socket reads and writes, scheduling), below the Python frames of the main thread.",
        "threads_pct": {k: pct(v) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])},
        "top_inclusive_pct": ranked(inclusive),
        "top_self_pct": ranked(self_),
    }


def bench_system(system: str, args, skip: set[str], tmp: Path, out: dict, profile: Path | None) -> None:
    levels = args.levels
    log(f"{system}: starting 3 nodes")
    extra = ["--raft-fsync"] if system == "synapse_fsync" else None
    cluster, protocol, token = start_system(system, tmp / system, extra)
    res = out.setdefault(system, {})
    res["members"] = {m.name: m.pid for m in cluster.members}
    try:
        if system == "synapse_fsync":
            levels = args.fsync_levels
        top = max(levels)
        if "writes" not in skip or system == "synapse_fsync":
            res["writes"] = bench_levels(system, cluster, protocol, token, args, "put", levels,
                                         lambda lv: f"bench/c{lv}")
            read_keys = res["writes"][str(top)]["keys_per_worker_min"]
        if system == "synapse" and profile is not None:
            res["profile"] = run_profile(cluster, token, args, profile)
        if system == "synapse_fsync":
            return
        if "reads" not in skip:
            if "writes" in skip:  # the readers need keys to read
                leader = cluster.leader()
                r = bn.run_load("put", f"http://{leader.api}", token, top, generators_for(args, top), {}, 0.0, 3.0,
                                extra={"protocol": protocol, "prefix": f"bench/c{top}"})
                read_keys = r["min_keys_per_worker"]
            # each reader reads keys its writer (same worker number, top level) wrote
            res["reads"] = bench_levels(system, cluster, protocol, token, args, "get", levels,
                                        lambda lv: f"bench/c{top}",
                                        lambda lv: {"read_keys_per_worker": max(1, min(64, read_keys))})
        if "failover" not in skip and system in ("synapse", "etcd") and args.failover_trials > 0:
            target = bn.SynapseTarget(cluster) if system == "synapse" else cluster
            log(f"{system}: failover, {args.failover_trials} SIGKILLs of the leader")
            res["failover"] = f = run_failover(system, target, args.failover_trials, args.failover_pause)
            log(f"{system} failover: median {f['median_s']} s, min {f['min_s']}, max {f['max_s']}")
    finally:
        stop_system(cluster)


def rss_system(system: str, args, tmp: Path, out: dict) -> None:
    log(f"{system} rss: starting 3 fresh nodes")
    cluster, protocol, token = start_system(system, tmp / f"{system}-rss")
    res = out.setdefault(system, {})
    try:
        leader = first_leader = cluster.leader()
        empty = {m.name: bn.proc_mem_mb(m.pid) for m in cluster.members}
        log(f"{system} rss: loading {args.rss_keys} keys, 128-put transactions, {args.rss_clients} in flight "
            f"(leader {leader.name}, empty RSS {empty[leader.name]['rss_mb']} MB)")
        r = bn.run_load("txn", f"http://{leader.api}", token, args.rss_clients, 1, {},
                        extra={"protocol": protocol, "first": 0, "count": args.rss_keys, "prefix": "rss",
                               "deadline_s": args.rss_max_load_s, "request_timeout": 30.0})
        loaded = r["loaded"]
        t = time.monotonic()
        converge(system, cluster)
        converge_s = round(time.monotonic() - t, 2)
        time.sleep(2.0)
        leader = cluster.leader()
        mem = {m.name: bn.proc_mem_mb(m.pid) for m in cluster.members}
        rss = mem[leader.name]["rss_mb"]
        count = None
        if system == "etcd":
            count = cluster.key_count(leader, "rss/")
        elif system.startswith("pysyncobj"):
            count = bn.http_json(leader.api, "GET", "/status")[1].get("keys")
        res.update({
            "rss_mb_1m_keys": rss if loaded >= 1_000_000 else None,
            "rss": {"keys_loaded": loaded, "keys_counted": count, "leader": leader.name, "leader_mb": rss,
                    "leader_when_loading_began": first_leader.name,
                    "nodes_mb": mem, "empty_nodes_mb": empty, "load_s": r["elapsed_s"],
                    "load_keys_per_s": round(loaded / max(1e-9, r["elapsed_s"]), 1),
                    "converge_after_load_s": converge_s, "errors": r["errors"], "error_samples": r["error_samples"],
                    "data_dir_mb": round(bn.disk_bytes(cluster.members[0].data_dir) / 2**20, 1)
                    if not system.startswith("pysyncobj") else None},
        })
        log(f"{system} rss: {loaded} keys in {r['elapsed_s']} s, leader {leader.name} RSS {rss} MB "
            f"(anon {mem[leader.name]['anon_mb']}, file {mem[leader.name]['file_mb']}); errors {r['errors']}")
    finally:
        stop_system(cluster)


# ---------------------------------------------------------------------------------------------
# Durability, ratios, targets, plots
# ---------------------------------------------------------------------------------------------


def file_system_of(path: Path) -> dict:
    """The mount holding ``path`` (longest mount point prefix in /proc/self/mounts)."""
    best = ("", "?", "?")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if str(path).startswith(mnt.rstrip("/") + "/") or str(path) == mnt:
                    if len(mnt) > len(best[0]):
                        best = (mnt, dev, fstype)
    except OSError:
        pass
    return {"mount": best[0], "device": best[1], "fs_type": best[2], "st_dev": os.stat(path).st_dev}


def durability(tmp: Path) -> dict:
    fs = file_system_of(tmp)
    return {
        "data_root": str(tmp), "file_system": fs,
        "same_file_system": "every data dir (Synapse nodes, etcd members; PySyncObj keeps none) is under data_root",
        "fsync": {
            "etcd": "fsync per batch (default): the WAL is fdatasync'ed for every Raft batch before a write is"
                    " acknowledged; the bbolt backend commits (with fsync) every 100 ms or 10,000 writes.",
            "synapse": "no fsync by default (--raft-fsync off): Raft log appends go to the page cache (the journal"
                       " survives SIGKILL of every node, not a power loss of a majority); term and vote are"
                       " fsynced; SQLite runs WAL with synchronous=NORMAL (fsync at checkpoints only).",
            "synapse_fsync": "the same cluster with --raft-fsync: every Raft log append is fdatasync'ed before"
                             " PySyncObj acknowledges it (the durability etcd has by default).",
            "pysyncobj": "no fsync and no disk at all: default SyncObjConf() keeps the Raft log in memory"
                         " (no journal file, no dump file); nothing survives the loss of a majority of processes.",
            "pysyncobj_nobatch": "as pysyncobj (appendEntriesUseBatch=False changes only when entries are sent).",
        },
        "comparable": "synapse_fsync vs etcd is the durability-comparable pair; synapse vs pysyncobj both skip fsync.",
    }


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def evaluate(result: dict) -> None:
    s = result["systems"]

    def w(system: str, kind: str, level: int, field: str = "per_s"):
        return ((s.get(system) or {}).get(kind) or {}).get(str(level), {}).get(field)

    levels = result["settings"]["levels"]
    ratios = {}
    for other in ("etcd", "pysyncobj", "pysyncobj_nobatch"):
        for kind in ("writes", "reads"):
            ratios[f"synapse_over_{other}_{kind}"] = {str(lv): _ratio(w("synapse", kind, lv), w(other, kind, lv))
                                                      for lv in levels}
    result["ratios"] = ratios
    result["synapse_over_etcd_writes_64"] = _ratio(w("synapse", "writes", 64), w("etcd", "writes", 64))
    result["synapse_over_pysyncobj_writes_64"] = _ratio(w("synapse", "writes", 64), w("pysyncobj", "writes", 64))
    result["synapse_over_pysyncobj_nobatch_writes_64"] = _ratio(w("synapse", "writes", 64),
                                                                w("pysyncobj_nobatch", "writes", 64))
    result["synapse_over_etcd_reads_64"] = _ratio(w("synapse", "reads", 64), w("etcd", "reads", 64))
    result["synapse_fsync_writes_64"] = w("synapse_fsync", "writes", 64)
    result["synapse_fsync_over_etcd_writes_64"] = _ratio(w("synapse_fsync", "writes", 64), w("etcd", "writes", 64))
    result["synapse_over_etcd_cpu_per_write_64"] = _ratio(w("synapse", "writes", 64, "cpu_us_per_op"),
                                                          w("etcd", "writes", 64, "cpu_us_per_op"))
    fo = lambda system: ((s.get(system) or {}).get("failover") or {}).get("median_s")  # noqa: E731
    p99 = w("synapse", "writes", 64, "p99_ms")
    etcd_p99 = w("etcd", "writes", 64, "p99_ms")
    checks = {
        "synapse_over_etcd_writes_64": (">= 1.0", result["synapse_over_etcd_writes_64"],
                                        lambda v: v >= 1.0),
        "synapse_over_pysyncobj_writes_64": (">= 2.0", result["synapse_over_pysyncobj_writes_64"],
                                             lambda v: v >= 2.0),
        "synapse_write_p99_ms_64": ("<= 20", p99, lambda v: v <= 20.0),
        "synapse_failover_median_s": (f"<= etcd's ({fo('etcd')})", fo("synapse"),
                                      lambda v: fo("etcd") is not None and v <= fo("etcd")),
        # Issue 19's, for the --target of this run.
        "synapse_over_etcd_writes_64_x1.5": (">= 1.5", result["synapse_over_etcd_writes_64"], lambda v: v >= 1.5),
        "synapse_over_etcd_reads_64_x1.5": (">= 1.5", result["synapse_over_etcd_reads_64"], lambda v: v >= 1.5),
        "synapse_write_p99_ms_64_vs_etcd": (f"<= etcd's ({etcd_p99})", p99,
                                            lambda v: etcd_p99 is not None and v <= etcd_p99),
        "synapse_over_etcd_cpu_per_write_64": ("<= 0.6", result["synapse_over_etcd_cpu_per_write_64"],
                                               lambda v: v <= 0.6),
    }
    result["targets"] = {k: {"target": t, "value": v, "met": None if v is None else bool(ok(v))}
                         for k, (t, v, ok) in checks.items()}
    met = [t["met"] for t in result["targets"].values()]
    result["all_targets_met"] = all(met) if None not in met else None


SYSTEM_STYLE = {"synapse": ("Synapse", "tab:blue", "o"), "etcd": ("etcd", "tab:green", "s"),
                "pysyncobj": ("bare PySyncObj (defaults)", "tab:orange", "^"),
                "pysyncobj_nobatch": ("bare PySyncObj, batch off", "tab:red", "v"),
                "synapse_fsync": ("Synapse --raft-fsync", "tab:purple", "D")}


def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    m = result["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m.get('mem_gib')} GiB; {result['date']}"
    written = []
    for kind in ("writes", "reads"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system, (label, color, marker) in SYSTEM_STYLE.items():
            data = (result["systems"].get(system) or {}).get(kind) or {}
            pts = sorted((int(lv), v["per_s"]) for lv, v in data.items() if v.get("per_s"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                        linestyle="-" if len(pts) > 1 else "none")
        ax.set_xscale("log", base=2)
        levels = result["settings"]["levels"]
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.set_xlabel("concurrent clients (one request in flight each)")
        ax.set_ylabel(f"{'writes' if kind == 'writes' else 'linearizable reads'} / s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"3 nodes on 127.0.0.1, 100-byte values: {kind} throughput\n{where}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"throughput_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system, (label, color, _) in SYSTEM_STYLE.items():
            v = ((result["systems"].get(system) or {}).get(kind) or {}).get("64") or {}
            cdf = v.get("latency_percentiles_ms")
            if not cdf:
                continue
            xs = [v.get("min_ms")] + cdf["ms"] + [v.get("max_ms")]
            ys = [0.0] + [q / 100 for q in cdf["pct"]] + [1.0]
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color,
                    label=f"{label}: p50 {v.get('p50_ms')} ms, p99 {v.get('p99_ms')} ms")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{'write' if kind == 'writes' else 'linearizable read'} latency CDF, 64 clients\n{where}",
                     fontsize=9)
        fig.tight_layout()
        path = out_dir / f"latency_cdf_{kind}_64.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--plots", help="write the PNG plots to this directory")
    p.add_argument("--levels", default="1,16,64,256", help="concurrency levels (default 1,16,64,256)")
    p.add_argument("--target", choices=("leader", "spread"), default="leader",
                   help="leader: every request to the leader; spread: client c's k-th request to member (c + k) mod 3")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each (default 2)")
    p.add_argument("--generators", type=int, default=1, help="load-generator processes below --more-generators-from (default 1)")
    p.add_argument("--generators-high", type=int, default=2, help="load-generator processes from --more-generators-from clients on (default 2)")
    p.add_argument("--more-generators-from", type=int, default=256, help="client count from which --generators-high applies (default 256)")
    p.add_argument("--failover-trials", type=int, default=5, help="leader SIGKILLs per system (default 5)")
    p.add_argument("--failover-pause", type=float, default=1.0, help="seconds of steady state before each kill (default 1)")
    p.add_argument("--rss-keys", type=int, default=1_000_000, help="keys loaded for the memory figure (default 1M)")
    p.add_argument("--rss-clients", type=int, default=8, help="128-put transactions in flight while loading (default 8)")
    p.add_argument("--rss-max-load-s", type=float, default=1200.0, help="stop loading after this long and report what loaded")
    p.add_argument("--fsync-levels", default="64", help="levels measured for Synapse with --raft-fsync (default 64)")
    p.add_argument("--profile", help="py-spy raw profiles of the Synapse leader and a follower during an extra 64-client write run")
    p.add_argument("--skip", default="", help=f"comma-separated: systems ({','.join(SYSTEMS)}) and/or phases ({','.join(PHASES)})")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, logs) after the run")
    args = p.parse_args()
    try:
        args.levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
        args.fsync_levels = sorted({int(x) for x in args.fsync_levels.split(",") if x.strip()})
    except ValueError:
        p.error("--levels and --fsync-levels take comma-separated integers, e.g. 1,16,64,256")
    if not args.levels or min(args.levels) < 1:
        p.error("--levels needs at least one positive client count")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(SYSTEMS) - set(PHASES)
    if unknown:
        p.error(f"unknown name(s) in --skip: {', '.join(sorted(unknown))}; systems: {', '.join(SYSTEMS)}; "
                f"phases: {', '.join(PHASES)}")
    if "etcd" not in skip and not os.access(ETCD, os.X_OK):
        p.error(f"{ETCD} is missing: install Debian's etcd-server (./scripts/bench-cluster does), or --skip etcd")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, bn._raise_exit)
    signal.signal(signal.SIGHUP, bn._raise_exit)
    atexit.register(bn.kill_all)
    tmp = bn._WORKDIR = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    log(f"work dir {tmp}")
    etcd_version = None
    if "etcd" not in skip:
        etcd_version = subprocess.run([ETCD, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    result: dict = {
        "machine": {**bn.machine_info(), "etcd": etcd_version},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {"levels": args.levels, "target": args.target, "duration_s": args.duration, "warmup_s": args.warmup,
                     "generators": args.generators, "generators_high": args.generators_high,
                     "more_generators_from": args.more_generators_from, "value_bytes": bn.VALUE_CHARS + 2,
                     "failover_trials": args.failover_trials, "rss_keys_requested": args.rss_keys,
                     "fsync_levels": args.fsync_levels, "skipped": sorted(skip),
                     "latency_cdf_percentiles": CDF_PCTS},
        "durability": durability(tmp),
        "systems": {},
    }
    t_start = time.monotonic()
    failed = None
    try:
        systems = [s for s in SYSTEMS if s not in skip]
        measured = ((systems if not {"writes", "reads", "failover"} <= skip else [])
                    + (["synapse_fsync"] if "synapse" not in skip and "fsync" not in skip else []))
        # pysyncobj_nobatch holds the same dict as pysyncobj: no memory figure of its own
        loaded = [s for s in systems if s != "pysyncobj_nobatch"] if "rss" not in skip and args.rss_keys > 0 else []
        with bars() as shown:
            steps = shown.bar("bench-cluster", total=len(measured) + len(loaded), unit="steps")
            for system in measured:
                steps.step(f"bench-cluster: {system}")
                bench_system(system, args, skip, tmp, result["systems"],
                             Path(args.profile).resolve() if args.profile and system == "synapse" else None)
            for system in loaded:
                steps.step(f"bench-cluster: {system}, memory")
                rss_system(system, args, tmp, result["systems"])
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        failed = e
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
        log(f"FAILED: {result['error'][:2000]}")
    finally:
        bn.kill_all()
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["total_s"] = round(time.monotonic() - t_start, 1)
    result["notes"] = [
        "All systems: 3 nodes on 127.0.0.1, driven by the same load generator (bench_node.run_load: separate"
        " processes, asyncio + uvloop + aiohttp, one request in flight per client, HTTP/1.1 keep-alive), 100-byte"
        " values, every request sent to the leader (found via each system's status API before each level) so no"
        " system pays a forwarding hop.",
        "etcd is driven through its v3 JSON gateway (grpc-gateway on the client port): an HTTP/JSON front like"
        " Synapse's and the PySyncObj baseline's; etcd's native gRPC clients would be faster.",
        "Linearizable reads: Synapse's default consistency; etcd's default range (serializable=false, ReadIndex);"
        " bare PySyncObj has no read index, so its read is a replicated get through the log.",
        "2-core machine shared by the load generators and the 3 nodes of the system under test: compare systems"
        " within one run, as ratios; load_generator_cpu_pct near 100 per process means the generator may limit.",
        "Memory: VmRSS of the leader process after loading and convergence; etcd's bbolt file is mmap'd and counts"
        " as file-backed RSS (see nodes_mb anon/file); PySyncObj's in-memory Raft log still holds the entries"
        " (log compaction waits for 300 s by default).",
    ]
    try:
        evaluate(result)
    except Exception as e:  # a partial run still prints what it measured
        result["evaluate_error"] = repr(e)
    if args.plots and failed is None:
        try:
            result["plots"] = plot(result, Path(args.plots))
        except Exception as e:
            result["plots_error"] = repr(e)
            log(f"plots failed: {e!r}")
    bn.publish(result, args.json, tmp, args.keep, failed, log)


if __name__ == "__main__":
    main()
