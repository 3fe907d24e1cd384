"""One chaos run: start the cluster under test, drive it with concurrent clients while
nemeses break it on a schedule, heal, then judge the history (DESIGN.md).

The workload: ``clients`` threads, each doing one operation at a time on one of ``keys``
keys — linearizable reads, writes of unique values, and compare-and-set on the version it
last saw — against a random node, each recorded with its invoke and complete times and its
outcome. After the run every fault is healed, the nodes must converge within
``converge_timeout``, every node's final values are read, and each node's data dir is
audited offline.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from synapse.chaos.checkers import convergence, lost_writes
from synapse.chaos.cluster import ClusterUnderTest
from synapse.chaos.history import CAS, FAIL, OK, READ, UNKNOWN, WRITE, Op
from synapse.chaos.linearizability import check
from synapse.integrity.audit import verify

LOOPBACK_NEMESES = ("kill", "kill-leader", "kill-majority", "kill-majority-at-start", "pause", "restart-all", "corrupt",
                    "membership", "clock")
# Not drawn by the random schedule: it opens the run. Within the new cluster's first second
# (writes acknowledged then are in no saved commit index yet), a majority is SIGKILLed, 1-4
# times with 0.2-0.5 s holds and no pause between rounds, so no leader can be elected until
# the last round heals.
AT_START = "kill-majority-at-start"
AT_START_WITHIN, AT_START_ROUNDS, AT_START_HOLD = 1.0, (1, 4), (0.2, 0.5)
# libfaketime specs for the clock nemesis: jumps (the wall clock and the monotonic clock both
# move) and rates (a node whose timers run fast calls elections early; slow, late).
CLOCKS = ("+1h", "-1h", "+0 x2", "+0 x0.5", "+10m x1.5")
NETNS_NEMESES = ("partition-halves", "isolate-leader", "one-way", "ring", "bridge", "packet-loss")
ALL_NEMESES = LOOPBACK_NEMESES + NETNS_NEMESES


@dataclass
class RunConfig:
    nodes: int = 3
    duration: float = 30.0
    clients: int = 8
    keys: int = 6
    nemeses: tuple[str, ...] = ("kill", "pause")
    mode: str = "loopback"
    seed: int = 0
    fault_every: tuple[float, float] = (2.0, 5.0)  # seconds between one heal and the next fault
    fault_for: tuple[float, float] = (1.0, 4.0)  # seconds a fault lasts
    mix: int = 1  # up to this many different faults at once
    converge_timeout: float = 60.0
    request_timeout: float = 2.0


@dataclass
class Fault:
    kind: str
    targets: list[str]
    start: float
    end: float | None = None
    note: str = ""
    removed: bool = False


@dataclass
class RunResult:
    ok: bool
    config: dict
    ops: dict
    faults: list[dict]
    leaders: list[tuple[float, str | None]]
    checks: dict
    workdir: str
    duration_s: float
    history: list[dict] = field(default_factory=list)


class Run:
    def __init__(self, config: RunConfig, workdir: Path) -> None:
        unknown = set(config.nemeses) - set(ALL_NEMESES)
        if unknown:
            raise ValueError(f"unknown nemesis {', '.join(sorted(unknown))}; choose from {', '.join(ALL_NEMESES)}")
        network = set(config.nemeses) & set(NETNS_NEMESES)
        if network and config.mode != "netns":
            raise ValueError(f"{', '.join(sorted(network))} need network namespaces (--mode netns, as root)")
        if "clock" in config.nemeses and shutil.which("faketime") is None:
            raise ValueError("the clock nemesis needs libfaketime's `faketime` (Debian: apt-get install faketime)")
        self.config = config
        self.workdir = Path(workdir)
        self.rnd = random.Random(config.seed)
        self.cluster = ClusterUnderTest(config.nodes, self.workdir / "cluster", config.mode)
        self.history: list[Op] = []
        self.faults: list[Fault] = []
        self.leaders: list[tuple[float, str | None]] = []
        self._lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))
        self._stop = threading.Event()
        self._t0 = self._started = time.monotonic()
        self._threads: list[threading.Thread] = []

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 4)

    # --- workload ---

    def _client(self, client: int) -> None:
        self.cluster.enter_network()
        rnd = random.Random(self.config.seed * 1000 + client)
        seen: dict[str, int] = {}
        seq = 0
        while not self._stop.is_set():
            key = f"chaos/k{rnd.randrange(self.config.keys)}"
            node = rnd.choice(list(self.cluster.ids))
            roll = rnd.random()
            seq += 1
            if roll < 0.5:
                op = self._read(client, node, key)
                if op.outcome == OK:
                    seen[key] = op.output[1]
            elif roll < 0.8:
                op = self._write(client, node, key, f"c{client}-{seq}", None)
            else:
                op = self._write(client, node, key, f"c{client}-{seq}", seen.get(key, 0))
            with self._lock:
                self.history.append(op)

    def _read(self, client: int, node: int, key: str) -> Op:
        t0 = self.now()
        try:
            code, body = self.cluster.request(node, "GET", f"/v1/kv/{quote(key, safe='')}", timeout=self.config.request_timeout)
        except Exception:
            return Op(next(self._ids), client, key, READ, t0, self.now(), FAIL, notes={"node": node})
        t1 = self.now()
        if code == 200:
            return Op(next(self._ids), client, key, READ, t0, t1, OK, output=(body["value"], body["version"]), notes={"node": node})
        if code == 404:
            return Op(next(self._ids), client, key, READ, t0, t1, OK, output=(None, 0), notes={"node": node})
        return Op(next(self._ids), client, key, READ, t0, t1, FAIL, notes={"node": node, "status": code})

    def _write(self, client: int, node: int, key: str, value: str, expect: int | None) -> Op:
        kind = WRITE if expect is None else CAS
        body = {"value": value} if expect is None else {"value": value, "if_version": expect}
        t0 = self.now()
        try:
            code, answer = self.cluster.request(node, "PUT", f"/v1/kv/{quote(key, safe='')}", body,
                                                timeout=self.config.request_timeout,
                                                headers={"X-Request-Id": uuid.uuid4().hex})
        except ConnectionRefusedError:  # nothing listens there (a killed node): it never arrived
            return Op(next(self._ids), client, key, kind, t0, self.now(), FAIL, value, expect, notes={"node": node, "error": "refused"})
        except Exception as e:  # a timeout or a cut connection: it may still apply
            return Op(next(self._ids), client, key, kind, t0, None, UNKNOWN, value, expect, notes={"node": node, "error": type(e).__name__})
        t1 = self.now()
        notes = {"node": node, "status": code}
        if code == 200:
            return Op(next(self._ids), client, key, kind, t0, t1, OK, value, expect, output=True if kind == CAS else answer["version"], notes=notes)
        if code == 409 and kind == CAS:
            return Op(next(self._ids), client, key, kind, t0, t1, OK, value, expect, output=False, notes=notes)
        if code == 503 and (answer.get("outcome_unknown") is False or answer.get("error") == "diverged"):
            return Op(next(self._ids), client, key, kind, t0, t1, FAIL, value, expect, notes=notes)
        if code in (400, 401, 403, 404, 413):
            return Op(next(self._ids), client, key, kind, t0, t1, FAIL, value, expect, notes=notes)
        return Op(next(self._ids), client, key, kind, t0, None, UNKNOWN, value, expect, notes=notes)

    # --- nemeses ---

    def _monitor(self) -> None:
        self.cluster.enter_network()
        last = object()
        while not self._stop.is_set():
            leader = self.cluster.leader()
            name = self.cluster.name(leader) if leader else None
            if name != last:
                self.leaders.append((self.now(), name))
                last = name
            time.sleep(0.25)

    def _inject(self, kind: str) -> Fault:
        c, ids = self.cluster, list(self.cluster.ids)
        leader = c.leader()
        if kind in ("kill", "pause", "corrupt", "packet-loss", "clock"):
            targets = [self.rnd.choice(ids)]
        elif kind == "membership":
            targets = [self.rnd.choice([i for i in ids if i != leader] or ids)]
        elif kind in ("kill-leader", "isolate-leader"):
            targets = [leader or self.rnd.choice(ids)]
        elif kind in ("kill-majority", AT_START):
            targets = self.rnd.sample(ids, len(ids) // 2 + 1)
        elif kind == "restart-all":
            targets = ids
        elif kind == "partition-halves":
            shuffled = self.rnd.sample(ids, len(ids))
            targets = shuffled[: len(ids) // 2]
        else:  # one-way, ring, bridge
            targets = self.rnd.sample(ids, min(2, len(ids)))
        fault = Fault(kind, [c.name(i) for i in targets], self.now())
        others = [i for i in ids if i not in targets]
        if kind.startswith("kill") or kind == "restart-all":
            for i in targets:
                c.kill(i)
        elif kind == "pause":
            c.pause(targets[0])
        elif kind == "corrupt":
            # A key the workload never uses: the node must find and repair it by itself.
            code, body = c.request(targets[0], "POST", "/v1/debug/corrupt", {"key": "chaos/corruptible", "value": "rotten"})
            fault.note = f"HTTP {code}"
        elif kind in ("partition-halves", "isolate-leader"):
            for i in targets:
                c.isolate(i, others)
            for j in others:
                c.isolate(j, targets)
        elif kind == "clock":
            spec = self.rnd.choice(CLOCKS)
            c.kill(targets[0])
            c.start(targets[0], clock=spec)
            fault.note = f"restarted under faketime {spec!r}"
        elif kind == "packet-loss":
            loss = self.rnd.choice([0.1, 0.2, 0.3])
            c.topology.iptables(targets[0], "-A", "INPUT", "-m", "statistic", "--mode", "random",
                                "--probability", str(loss), "-j", "DROP")
            fault.note = f"drops {int(loss * 100)}% of what it receives"
        elif kind == "membership":
            # Removed from the voters (through the leader) while clients go on; added back at heal.
            try:
                code, body = c.request(leader or targets[0], "DELETE", f"/v1/cluster/members/{c.name(targets[0])}", timeout=10)
            except Exception as e:  # timed out: the removal may still happen
                code, body = 0, {"error": type(e).__name__}
            fault.note = f"remove: HTTP {code} {body.get('error', '')}".strip()
            # Anything but a clear refusal may have removed it: heal adds it back either way.
            fault.removed = code not in (400, 404, 409)
        elif kind == "one-way":
            a, b = targets
            c.topology.iptables(a, "-A", "INPUT", "-s", c.topology.addr(b), "-j", "DROP")
            fault.note = f"{c.name(a)} drops what {c.name(b)} sends"
        elif kind == "ring":
            # Each node hears only its two neighbours (with 3 nodes: a full mesh; meaningful at 5).
            for i in ids:
                far = [j for j in ids if j != i and abs(i - j) % len(ids) not in (1, len(ids) - 1)]
                if far:
                    c.isolate(i, far)
        elif kind == "bridge":
            # Two halves that only the bridge node connects.
            bridge = targets[0]
            left = [i for i in ids if i != bridge][: (len(ids) - 1) // 2]
            right = [i for i in ids if i != bridge and i not in left]
            for i in left:
                c.isolate(i, right)
            for j in right:
                c.isolate(j, left)
            fault.note = f"bridge {c.name(bridge)}"
        self.faults.append(fault)
        return fault

    def _heal(self, fault: Fault) -> None:
        c = self.cluster
        c.heal_all()
        for i in c.ids:
            if c.clock.get(i) is not None:  # back to the real clock
                c.kill(i)
        # Every node runs again before a removed voter is added back: with a 3-voter cluster
        # shrunk to 2 and one of them killed, no leader exists to add it until the kill heals.
        for i in c.ids:
            if not c.alive(i):
                c.start(i)
        if fault.kind == "membership" and fault.removed:
            fault.note += "; " + self._add_back(int(fault.targets[0][1:]))
        fault.end = self.now()

    def _add_back(self, i: int) -> str:
        """Makes node ``i`` a registered voter again (its removal may have failed, succeeded
        or timed out with the outcome unknown). Adding is idempotent, so just retry."""
        c = self.cluster
        deadline, last = time.monotonic() + 30, "no leader"
        while time.monotonic() < deadline:  # one membership change at a time: retry
            leader = c.leader()
            if leader is not None:
                try:
                    code, body = c.request(leader, "POST", "/v1/cluster/members",
                                           {"node_id": c.name(i), "raft": c.raft[i], "api": c.api[i]}, timeout=10)
                except Exception as e:  # the leader died or timed out mid-request: ask again
                    code, body = 0, {"error": type(e).__name__}
                if code == 200:
                    return "added back"
                last = f"HTTP {code} {body.get('error', '')}".strip()
            time.sleep(0.5)
        return f"NOT added back ({last})"

    def _nemesis(self) -> None:
        self.cluster.enter_network()
        drawn = [k for k in self.config.nemeses if k != AT_START]
        if AT_START in self.config.nemeses and not self._stop.wait(self.rnd.uniform(0, AT_START_WITHIN)):
            for _ in range(self.rnd.randint(*AT_START_ROUNDS)):
                fault = self._inject(AT_START)
                stopped = self._stop.wait(self.rnd.uniform(*AT_START_HOLD))
                self._heal(fault)
                if stopped:
                    return
        while drawn and not self._stop.wait(self.rnd.uniform(*self.config.fault_every)):
            # Up to ``mix`` different faults at once, healed together.
            kinds = self.rnd.sample(drawn, self.rnd.randint(1, min(self.config.mix, len(drawn))))
            faults = []
            for kind in kinds:
                try:
                    faults.append(self._inject(kind))
                except Exception as e:  # e.g. corrupting a node another fault just killed
                    self.faults.append(Fault(kind, [], self.now(), self.now(), f"not applied: {type(e).__name__}: {e}"))
            stopped = self._stop.wait(self.rnd.uniform(*self.config.fault_for))
            for fault in faults:
                self._heal(fault)
            if stopped:
                break

    # --- the run ---

    def execute(self) -> RunResult:
        """The whole run: faults on a random schedule for ``duration`` seconds."""
        self.start(scheduled_faults=True)
        try:
            time.sleep(self.config.duration)
        finally:
            result = self.finish()
        return result

    def start(self, scheduled_faults: bool = False) -> None:
        """Starts the cluster, the clients and the leader monitor (and, if asked, the random
        fault schedule). Call ``finish`` afterwards, whatever happens."""
        self._started = time.monotonic()
        self.cluster.start_all()
        self._t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.config.clients)]
        self._threads.append(threading.Thread(target=self._monitor, daemon=True))
        if scheduled_faults and self.config.nemeses:
            self._threads.append(threading.Thread(target=self._nemesis, daemon=True))
        for t in self._threads:
            t.start()

    def apply(self, kind: str, hold: float) -> Fault:
        """One fault now, held for ``hold`` seconds, then healed (a step of a given schedule)."""
        if kind not in ALL_NEMESES or (kind in NETNS_NEMESES and not self.cluster.can_partition):
            raise ValueError(f"nemesis {kind!r} is not available in {self.config.mode} mode")
        fault = self._inject(kind)
        time.sleep(hold)
        self._heal(fault)
        return fault

    def finish(self) -> RunResult:
        """Stops the clients, heals everything, judges the history, tears the cluster down."""
        cfg = self.config
        try:
            self._stop.set()
            for t in self._threads:
                t.join(cfg.request_timeout * 3 + 10)
            for fault in self.faults:
                if fault.end is None:
                    self._heal(fault)
            self.cluster.heal_all()
            for i in self.cluster.ids:
                self.cluster.start(i)
            checks = self._judge()
        finally:
            self.cluster.close()
        ok = all(v.get("ok") for v in checks.values())
        counts: dict[str, int] = {}
        for op in self.history:
            counts[f"{op.kind}:{op.outcome}"] = counts.get(f"{op.kind}:{op.outcome}", 0) + 1
        return RunResult(
            ok=ok, config=asdict(cfg), ops=counts, faults=[asdict(f) for f in self.faults], leaders=self.leaders,
            checks=checks, workdir=str(self.workdir), duration_s=round(time.monotonic() - self._started, 2),
            history=[_op_json(o) for o in self.history],
        )

    def _judge(self) -> dict:
        c = self.cluster
        checks: dict = {}
        verdict = check(self.history)
        checks["linearizable"] = {"ok": verdict.ok, "keys": verdict.keys,
                                  "failures": [f.explain() for f in verdict.failures],
                                  "undecided": [u.explain() for u in verdict.undecided]}
        # Convergence within a bounded time after healing. A node is judged only once it has
        # answered a linearizable read: it has then applied every entry committed before —
        # every acknowledged write among them. Restarted nodes know no commit index past the
        # one they last saved (PySyncObj saves it once a second) until a leader commits again;
        # nodes that all restarted before any election agree at once on that older state, and
        # judging that state reported acknowledged writes lost that every log held.
        deadline = time.monotonic() + self.config.converge_timeout
        lagging, conv = set(c.ids), None
        while time.monotonic() < deadline:
            lagging = {i for i in lagging if not self._call(self._caught_up, i)}
            if not lagging:
                conv = convergence(self._call(c.statuses))
                if conv.ok:
                    break
            time.sleep(0.5)
        if lagging:
            detail = f"NOT CAUGHT UP: {', '.join(c.name(i) for i in sorted(lagging))} answered no linearizable read"
        else:
            detail = conv.explain() if conv else "no status"
        checks["converged"] = {"ok": not lagging and bool(conv and conv.ok), "detail": detail}
        finals, unreachable = {}, []
        for i in c.ids:
            try:
                finals[c.name(i)] = self._call(self._finals, i)
            except OSError:  # a node that does not answer cannot show its writes: a violation too
                unreachable.append(c.name(i))
        lost = lost_writes(self.history, finals)
        checks["no_lost_writes"] = {"ok": not lost and not unreachable, "lost": [x.explain() for x in lost[:20]],
                                    "count": len(lost), "unreachable": unreachable}
        # The chain must verify everywhere; a state that differed from the replay is allowed
        # only on a node the corrupt nemesis damaged on purpose (it then repaired itself).
        damaged = {t for f in self.faults if f.kind == "corrupt" for t in f.targets}
        audits = {c.name(i): verify(c.data_dir(i), strict=False) for i in c.ids}
        bad = {n: a for n, a in audits.items() if not a.ok or (a.state_mismatches and n not in damaged)}
        checks["audit"] = {"ok": not bad, "nodes": {
            n: (a.failure or {"entries_replayed": a.entries_replayed, "state_mismatches": len(a.state_mismatches),
                              "first_state_mismatch": a.state_mismatches[0] if a.state_mismatches else None})
            for n, a in audits.items()}}
        return checks

    def _caught_up(self, i: int) -> bool:
        """Whether node ``i`` answers a linearizable read (a committed barrier, then local)."""
        try:
            code, _ = self.cluster.request(i, "GET", f"/v1/kv/{quote('chaos/k0', safe='')}", timeout=self.config.request_timeout)
        except (OSError, ValueError, http.client.HTTPException):
            return False
        return code in (200, 404)

    def _finals(self, i: int) -> dict[str, object]:
        out = {}
        for k in range(self.config.keys):
            key = f"chaos/k{k}"
            code, body = self.cluster.request(i, "GET", f"/v1/kv/{quote(key, safe='')}?consistency=stale", timeout=5)
            out[key] = body.get("value") if code == 200 else None
        return out

    def _call(self, fn, *args):
        t = self.cluster.topology
        return t.call(fn, *args) if t is not None else fn(*args)


def _op_json(op: Op) -> dict:
    return {"id": op.id, "client": op.client, "key": op.key, "kind": op.kind, "invoke": op.invoke,
            "complete": op.complete, "outcome": op.outcome, "value": op.value, "expect": op.expect,
            "output": op.output, "node": op.notes.get("node")}


def write_report(result: RunResult, out_dir: Path) -> tuple[Path, Path]:
    """result.json and report.html (a timeline: operations per client, faults, leaders)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(result)
    (out_dir / "result.json").write_text(json.dumps(data, indent=1, default=str))
    html = out_dir / "report.html"
    html.write_text(_timeline_html(result))
    return out_dir / "result.json", html


_COLORS = {OK: "#3a7", FAIL: "#bbb", UNKNOWN: "#e90"}


def _timeline_html(result: RunResult) -> str:
    end = max([o["complete"] or o["invoke"] for o in result.history] + [1.0]) + 1
    width, row = 1200, 14
    clients = sorted({o["client"] for o in result.history})
    height = (len(clients) + 3) * row + 40
    x = lambda t: 60 + (width - 70) * t / end  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">']
    for f in result.faults:
        x0, x1 = x(f["start"]), x(f["end"] or end)
        parts.append(f'<rect x="{x0:.1f}" y="0" width="{max(1, x1 - x0):.1f}" height="{height}" fill="#f66" opacity="0.15">'
                     f'<title>{f["kind"]} {" ".join(f["targets"])} {f["note"]}</title></rect>')
        parts.append(f'<text x="{x0:.1f}" y="10" fill="#a00">{f["kind"]}</text>')
    for t, leader in result.leaders:
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="14" y2="{height}" stroke="#36c" stroke-dasharray="2,2"/>'
                     f'<text x="{x(t) + 2:.1f}" y="{height - 4}" fill="#36c">{leader or "no leader"}</text>')
    for n, client in enumerate(clients):
        y = 20 + n * row
        parts.append(f'<text x="2" y="{y + 9}">c{client}</text>')
        for o in (o for o in result.history if o["client"] == client):
            x0, x1 = x(o["invoke"]), x(o["complete"] if o["complete"] is not None else end)
            label = f'{o["kind"]} {o["key"]} {o["value"] or ""} → {o["output"]} ({o["outcome"]}, n{o["node"]})'
            parts.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1.0, x1 - x0):.1f}" height="{row - 3}" '
                         f'fill="{_COLORS[o["outcome"]]}"><title>{label}</title></rect>')
    parts.append("</svg>")
    verdicts = "".join(f"<li><b>{name}</b>: {'ok' if v.get('ok') else 'VIOLATION'} "
                       f"<pre>{json.dumps({k: w for k, w in v.items() if k != 'ok'}, indent=1, default=str)[:4000]}</pre></li>"
                       for name, v in result.checks.items())
    return (f"<!doctype html><meta charset=utf-8><title>Synapse chaos run</title>"
            f"<h1>Synapse chaos run: {'PASSED' if result.ok else 'FAILED'}</h1>"
            f"<p>{result.config['nodes']} nodes ({result.config['mode']}), {result.config['duration']} s, "
            f"{result.config['clients']} clients, nemeses {', '.join(result.config['nemeses'])}, seed {result.config['seed']}; "
            f"operations {result.ops}</p><ul>{verdicts}</ul>"
            f"<p>Timeline (green ok, grey failed, orange unknown; red bands faults; blue lines leader changes):</p>"
            + "".join(parts))
