"""One chaos run: start the cluster under test, drive it with concurrent clients while
nemeses break it on a schedule, heal, then judge the history (DESIGN.md).

The workload: ``clients`` threads, each doing one operation at a time on one of ``keys``
keys — linearizable reads, writes of unique values, and compare-and-set on the version it
last saw — against a random node, each recorded with its invoke and complete times and its
outcome. With ``memory_ops`` > 0 that share of the operations are agent-memory operations
instead: remember (one record or a batch, with small vectors derived from the record id),
forget, and linearizable recall by a record's own vector, in ``memory_namespaces``
namespaces. After the run every fault is healed, the nodes must converge within
``converge_timeout``, every node's final values (and memories) are read, each node's memory
index is probed, and each node's data dir is audited offline.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from synapse.chaos.checkers import (convergence, duplicate_memories, index_mismatches, lost_memories, lost_writes,
                                    recall_violations)
from synapse.chaos.cluster import ClusterUnderTest
from synapse.chaos.history import (CAS, FAIL, FORGET, KV_KINDS, MEMORY_KINDS, OK, READ, RECALL, REMEMBER, UNKNOWN,
                                   WRITE, Op)
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
# Memory operations: caller-supplied vectors of this many dimensions, derived from the record
# id (no embedding model runs); a namespace's vectors all have one dimension and one model.
MEMORY_DIM = 8
MEMORY_BATCH = (2, 4)  # records per batch (one log entry)
MEMORY_RECALL_K = 5
MEMORY_INDEX_SAMPLE = 8  # acknowledged records per namespace recalled on every node at the end
_PROGRESS_EVERY = 0.5  # seconds between two reports of a run's progress


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
    memory_ops: float = 0.0  # the share of client operations that are memory operations (0: none)
    memory_namespaces: int = 3
    # The load goes on past ``duration``, faults included, until every kind of operation the
    # workload sends was acknowledged this many times (``acknowledged_kinds``), and stops at
    # ``max_duration`` (0: 10 × duration) whatever happened. A run on a starved machine then
    # still judges a history with something in it, instead of passing on one that holds
    # almost nothing (0: stop at ``duration``).
    min_acknowledged: int = 0
    max_duration: float = 0.0


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
    load_s: float = 0.0  # seconds the clients ran: the duration, or longer with min_acknowledged
    acknowledged: dict = field(default_factory=dict)  # acknowledged_kinds of the history


class Run:
    def __init__(self, config: RunConfig, workdir: Path) -> None:
        unknown = set(config.nemeses) - set(ALL_NEMESES)
        if unknown:
            raise ValueError(f"unknown nemesis {', '.join(sorted(unknown))}; choose from {', '.join(ALL_NEMESES)}")
        network = set(config.nemeses) & set(NETNS_NEMESES)
        if network and config.mode != "netns":
            raise ValueError(f"{', '.join(sorted(network))} need network namespaces (--mode netns, as root)")
        if not 0 <= config.memory_ops <= 1 or config.memory_namespaces < 1:
            raise ValueError("memory_ops is a share from 0 to 1, and memory operations need at least one namespace")
        if config.min_acknowledged < 0 or config.max_duration < 0 or 0 < config.max_duration < config.duration:
            raise ValueError(f"min_acknowledged ({config.min_acknowledged}) must be 0 or more and max_duration "
                             f"({config.max_duration}) 0 or at least the duration ({config.duration})")
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
        self._counted = 0  # history operations _enough_acknowledged has counted
        self._acknowledged: dict[str, int] = {}  # and what they held, per kind

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 4)

    # --- workload ---

    def _client(self, client: int) -> None:
        self.cluster.enter_network()
        rnd = random.Random(self.config.seed * 1000 + client)
        seen: dict[str, int] = {}
        mine = _Memories()
        seq = 0
        while not self._stop.is_set():
            if self.config.memory_ops and rnd.random() < self.config.memory_ops:
                seq += 1
                op = self._memory(client, rnd, mine, f"c{client}-{seq}")
                with self._lock:
                    self.history.append(op)
                continue
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

    # --- memory workload ---

    def _memory(self, client: int, rnd: random.Random, mine: "_Memories", name: str) -> Op:
        """One memory operation. Each client remembers records of its own (unique ids and
        texts), re-sends the text of one of them under a new id (dedup must answer with the
        first), forgets some, and recalls by the vector of one it holds or forgot. Until each
        kind has been answered once, half the draws go to a kind not answered yet: a short run
        under faults must still exercise every check, whatever share the faults refuse."""
        node = rnd.choice(list(self.cluster.ids))
        kind = _memory_kind(rnd, mine)
        if kind == REMEMBER:
            ns = f"chaos/mem{rnd.randrange(self.config.memory_namespaces)}"
            op = self._remember(client, node, ns, [(name, _memory_text(name))])
        elif kind == MEMORY_BATCH_KIND:
            ns = f"chaos/mem{rnd.randrange(self.config.memory_namespaces)}"
            batch = [(f"{name}-{j}", _memory_text(f"{name}-{j}")) for j in range(rnd.randint(*MEMORY_BATCH))]
            op = self._remember(client, node, ns, batch, many=True)
        elif kind == MEMORY_DUPLICATE_KIND:  # the text of a record it holds, under a new id
            ns, _, text = rnd.choice(mine.live)
            op = self._remember(client, node, ns, [(name, text)])
        elif kind == FORGET:
            ns, record_id, text = mine.live.pop(rnd.randrange(len(mine.live)))
            op = self._forget(client, node, ns, record_id)
            if op.outcome == FAIL:  # surely not forgotten
                mine.live.append((ns, record_id, text))
            elif op.outcome == OK and op.output:
                mine.forgotten.append((ns, record_id))
        else:
            ns, record_id = (rnd.choice(mine.forgotten) if mine.forgotten and rnd.random() < 0.25
                             else rnd.choice(mine.live)[:2])
            op = self._recall(client, node, ns, record_id)
        if op.outcome == OK:
            mine.unanswered.discard(kind)
            if op.kind == REMEMBER and kind != MEMORY_DUPLICATE_KIND:
                texts = dict(op.value)
                mine.live += [(ns, sent, texts[sent]) for sent, answered, dup in op.output
                              if not dup and answered == sent]
        return op

    def _remember(self, client: int, node: int, ns: str, records: list[tuple[str, str]], many: bool = False) -> Op:
        sent = [{"id": i, "text": t, "vector": memory_vector(i)} for i, t in records]
        if many:
            method, path, body = "POST", f"/v1/memory/{quote(ns, safe='')}", {"records": sent}
        else:
            method, path = "PUT", f"/v1/memory/{quote(ns, safe='')}/{quote(records[0][0], safe='')}"
            body = {k: v for k, v in sent[0].items() if k != "id"}
        value = [list(r) for r in records]
        t0 = self.now()
        try:
            code, answer = self.cluster.request(node, method, path, body, timeout=self.config.request_timeout,
                                                headers={"X-Request-Id": uuid.uuid4().hex})
        except ConnectionRefusedError:  # nothing listens there: it never arrived
            return Op(next(self._ids), client, ns, REMEMBER, t0, self.now(), FAIL, value,
                      notes={"node": node, "error": "refused"})
        except Exception as e:  # a timeout or a cut connection: it may still apply
            return Op(next(self._ids), client, ns, REMEMBER, t0, None, UNKNOWN, value,
                      notes={"node": node, "error": type(e).__name__})
        t1, notes = self.now(), {"node": node, "status": code}
        if code == 200:
            answers = answer["records"] if many else [answer]
            output = [[i, a["id"], a["duplicate"]] for (i, _), a in zip(records, answers)]
            return Op(next(self._ids), client, ns, REMEMBER, t0, t1, OK, value, output=output, notes=notes)
        outcome = _outcome_of_refusal(code, answer)
        return Op(next(self._ids), client, ns, REMEMBER, t0, t1 if outcome == FAIL else None, outcome, value,
                  notes=notes)

    def _forget(self, client: int, node: int, ns: str, record_id: str) -> Op:
        t0 = self.now()
        try:
            code, answer = self.cluster.request(node, "DELETE", f"/v1/memory/{quote(ns, safe='')}/{quote(record_id, safe='')}",
                                                timeout=self.config.request_timeout,
                                                headers={"X-Request-Id": uuid.uuid4().hex})
        except ConnectionRefusedError:
            return Op(next(self._ids), client, ns, FORGET, t0, self.now(), FAIL, record_id,
                      notes={"node": node, "error": "refused"})
        except Exception as e:
            return Op(next(self._ids), client, ns, FORGET, t0, None, UNKNOWN, record_id,
                      notes={"node": node, "error": type(e).__name__})
        t1, notes = self.now(), {"node": node, "status": code}
        if code == 200:
            return Op(next(self._ids), client, ns, FORGET, t0, t1, OK, record_id, output=answer["deleted"], notes=notes)
        outcome = _outcome_of_refusal(code, answer)
        return Op(next(self._ids), client, ns, FORGET, t0, t1 if outcome == FAIL else None, outcome, record_id, notes=notes)

    def _recall(self, client: int, node: int, ns: str, record_id: str) -> Op:
        t0 = self.now()
        try:
            code, answer = self._recall_request(node, ns, record_id)
        except Exception as e:  # a read: it changed nothing either way
            return Op(next(self._ids), client, ns, RECALL, t0, self.now(), FAIL, record_id,
                      notes={"node": node, "error": type(e).__name__})
        t1, notes = self.now(), {"node": node, "status": code}
        if code == 200:
            return Op(next(self._ids), client, ns, RECALL, t0, t1, OK, record_id,
                      output=[[r["id"], r["score"]] for r in answer["results"]], notes=notes)
        if code == 404:  # the namespace holds no memories: an answer too
            return Op(next(self._ids), client, ns, RECALL, t0, t1, OK, record_id, output=[], notes=notes)
        return Op(next(self._ids), client, ns, RECALL, t0, t1, FAIL, record_id, notes=notes)

    def _recall_request(self, node: int, ns: str, record_id: str) -> tuple[int, dict]:
        body = {"vector": memory_vector(record_id), "k": MEMORY_RECALL_K, "consistency": "linearizable"}
        return self.cluster.request(node, "POST", f"/v1/memory/{quote(ns, safe='')}/recall", body,
                                    timeout=self.config.request_timeout)

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

    def execute(self, progress: Callable[[float, float], None] | None = None) -> RunResult:
        """The whole run: faults on a random schedule for ``duration`` seconds (or longer, with
        ``min_acknowledged``). ``progress(seconds of load so far, seconds it may last)`` about
        twice a second while the load runs, the last time with both at the seconds it ran
        (judging the history takes longer still)."""
        self.start(scheduled_faults=True)
        try:
            self._hold(progress)
        finally:
            result = self.finish()
        return result

    def _hold(self, progress: Callable[[float, float], None] | None) -> None:
        """Waits while the load runs: the run's duration, then (with ``min_acknowledged``)
        until enough of every kind was acknowledged or ``max_duration`` passed, telling
        ``progress`` the seconds gone by."""
        cfg = self.config
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < cfg.duration:
            if progress:
                progress(elapsed, cfg.duration)
            time.sleep(min(_PROGRESS_EVERY, cfg.duration - elapsed))
        longest, ran = cfg.max_duration or 10 * cfg.duration, cfg.duration
        while not self._enough_acknowledged() and (ran := time.monotonic() - began) < longest:
            if progress:
                progress(ran, longest)
            time.sleep(min(0.1, longest - ran))
        if progress:
            progress(ran, ran)

    def workload_kinds(self) -> tuple[str, ...]:
        """Every kind of operation this run's clients send, as ``acknowledged_kinds`` names them."""
        memory = MEMORY_WORKLOAD_KINDS if self.config.memory_ops else ()
        return (KV_WORKLOAD_KINDS if self.config.memory_ops < 1 else ()) + memory

    def _enough_acknowledged(self) -> bool:
        # Counted as the history grows: a long run's history holds ~10^5 operations, and the
        # clients append to it under the same lock.
        with self._lock:
            fresh, self._counted = self.history[self._counted:], len(self.history)
        for kind, n in acknowledged_kinds(fresh).items():
            self._acknowledged[kind] = self._acknowledged.get(kind, 0) + n
        return not self._short_of(self._acknowledged)

    def _short_of(self, acknowledged: dict[str, int]) -> dict[str, int]:
        """The workload's kinds acknowledged fewer than ``min_acknowledged`` times, with their counts."""
        return {k: acknowledged.get(k, 0) for k in self.workload_kinds()
                if acknowledged.get(k, 0) < self.config.min_acknowledged}

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
        load_s = round(time.monotonic() - self._t0, 2)
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
            acknowledged = acknowledged_kinds(self.history)
            checks = self._judge(acknowledged)
        finally:
            self.cluster.close()
        ok = all(v.get("ok") for v in checks.values())
        counts: dict[str, int] = {}
        for op in self.history:
            counts[f"{op.kind}:{op.outcome}"] = counts.get(f"{op.kind}:{op.outcome}", 0) + 1
        return RunResult(
            ok=ok, config=asdict(cfg), ops=counts, faults=[asdict(f) for f in self.faults], leaders=self.leaders,
            checks=checks, workdir=str(self.workdir), duration_s=round(time.monotonic() - self._started, 2),
            history=[_op_json(o) for o in self.history], load_s=load_s, acknowledged=acknowledged,
        )

    def _judge(self, acknowledged: dict[str, int]) -> dict:
        c = self.cluster
        checks: dict = {}
        if self.config.min_acknowledged:
            # Asked for: a history too thin to judge (a starved machine) fails the run by name.
            short = self._short_of(acknowledged)
            checks["enough_acknowledged"] = {
                "ok": not short, "wanted": self.config.min_acknowledged,
                "detail": (f"TOO FEW ACKNOWLEDGED within max_duration: {short}" if short else
                           f"every kind acknowledged at least {self.config.min_acknowledged} times")}
        verdict = check([op for op in self.history if op.kind in KV_KINDS])
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
        if self.config.memory_ops:
            checks.update(self._judge_memory())
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

    def _judge_memory(self) -> dict:
        """The memory checks (checkers.py), from every node's records read after convergence
        and a linearizable recall on every node by the vectors of a sample of them."""
        c, history = self.cluster, [op for op in self.history if op.kind in MEMORY_KINDS]
        namespaces = sorted({op.key for op in history})
        memories, unreachable = {}, []
        for i in c.ids:
            try:
                memories[c.name(i)] = self._call(self._memories, i, namespaces)
            except Exception as e:  # a node that cannot list its memories cannot show them: a violation
                unreachable.append(f"{c.name(i)}: {type(e).__name__}: {e}")
        checks: dict = {}
        lost = lost_memories(history, memories)
        acknowledged = {(op.key, sent) for op in history if op.kind == REMEMBER and op.outcome == OK
                        for sent, answered, dup in op.output if not dup and answered == sent}
        # An unknown outcome may or may not have taken effect: counted, never judged lost.
        unknown = {(op.key, i) for op in history if op.kind == REMEMBER and op.outcome == UNKNOWN for i, _ in op.value}
        held = {(ns, i) for spaces in memories.values() for ns, items in spaces.items() for i, _ in items}
        checks["memory_no_lost"] = {
            "ok": not lost and not unreachable, "lost": [x.explain() for x in lost[:20]], "count": len(lost),
            "acknowledged": len(acknowledged), "unknown_present": len(unknown & held),
            "unknown_absent": len(unknown - held), "unreachable": unreachable}
        dups = duplicate_memories(history, memories)
        checks["memory_no_duplicates"] = {
            "ok": not dups and not unreachable, "violations": [x.explain() for x in dups[:20]], "count": len(dups),
            "records": {n: sum(len(items) for items in spaces.values()) for n, spaces in memories.items()}}
        recalls = recall_violations(history)
        checks["memory_recall"] = {
            "ok": not recalls, "recalls": sum(op.kind == RECALL and op.outcome == OK for op in history),
            "violations": [x.explain() for x in recalls[:20]], "count": len(recalls)}
        # Each node's index against its state: acknowledged records every node holds, recalled
        # by their own vectors (linearizable: after a barrier and the index catching up).
        everywhere = set.intersection(*({(ns, i) for ns, items in spaces.items() for i, _ in items}
                                        for spaces in memories.values())) if memories else set()
        rnd, sample = random.Random(self.config.seed), []
        for ns in namespaces:
            ids = sorted(i for n, i in acknowledged & everywhere if n == ns)
            sample += [(ns, i) for i in rnd.sample(ids, min(MEMORY_INDEX_SAMPLE, len(ids)))]
        answers = {c.name(i): self._call(self._recall_sample, i, sample) for i in c.ids}
        bad = index_mismatches(answers)
        checks["memory_index"] = {"ok": not bad, "sampled": len(sample), "nodes": len(answers),
                                  "violations": [x.explain() for x in bad[:20]], "count": len(bad)}
        return checks

    def _memories(self, i: int, namespaces: list[str]) -> dict[str, list[tuple[str, str]]]:
        """Every record node ``i`` holds in ``namespaces`` (its local state: consistency=stale)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for ns in namespaces:
            items, after = [], None
            while True:
                query = "limit=1000&consistency=stale" + (f"&start_after={quote(after, safe='')}" if after else "")
                code, body = self.cluster.request(i, "GET", f"/v1/memory/{quote(ns, safe='')}?{query}", timeout=10)
                if code != 200:
                    raise RuntimeError(f"listing {ns!r}: HTTP {code} {body.get('error', '')}")
                items += [(m["id"], m["text"]) for m in body["items"]]
                after = body.get("next_start_after")
                if not after:
                    break
            out[ns] = items
        return out

    def _recall_sample(self, i: int, sample: list[tuple[str, str]]) -> dict[tuple[str, str], list | str]:
        """A linearizable recall on node ``i`` by each sampled record's vector; an index still
        rebuilding after a restart answers 503 until it caught up, so retry for a while."""
        deadline, out = time.monotonic() + self.config.converge_timeout / 2, {}
        for ns, record_id in sample:
            while True:
                try:
                    code, body = self._recall_request(i, ns, record_id)
                    why = f"HTTP {code} {body.get('error', '')} {body.get('message', '')}".strip()
                except (OSError, ValueError, http.client.HTTPException) as e:
                    code, why = 0, f"{type(e).__name__}: {e}"
                if code == 200:
                    out[(ns, record_id)] = [[r["id"], r["score"]] for r in body["results"]]
                    break
                if code not in (0, 503) or time.monotonic() > deadline:
                    out[(ns, record_id)] = why
                    break
                time.sleep(0.5)
        return out

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


class _Memories:
    """What one client knows of its own records: acknowledged and not (being) forgotten, and
    acknowledged forgotten."""

    def __init__(self) -> None:
        self.live: list[tuple[str, str, str]] = []  # (namespace, id, text)
        self.forgotten: list[tuple[str, str]] = []  # (namespace, id)
        # The kinds (below) not answered yet, drawn first (Run._memory).
        self.unanswered: set[str] = {MEMORY_BATCH_KIND, MEMORY_DUPLICATE_KIND, FORGET, RECALL}


# A memory operation's kind as the workload draws it: a remember of one record, of a batch, of
# a text already held (a duplicate), a forget or a recall. The history's kinds are coarser (a
# batch and a duplicate are remembers).
MEMORY_BATCH_KIND, MEMORY_DUPLICATE_KIND = "remember-batch", "remember-duplicate"
KV_WORKLOAD_KINDS = (READ, WRITE, CAS)
MEMORY_WORKLOAD_KINDS = (REMEMBER, MEMORY_BATCH_KIND, MEMORY_DUPLICATE_KIND, FORGET, RECALL)
_MEMORY_MIX = ((0.4, REMEMBER), (0.6, MEMORY_BATCH_KIND), (0.67, MEMORY_DUPLICATE_KIND), (0.8, FORGET), (1.0, RECALL))


def _memory_kind(rnd: random.Random, mine: _Memories) -> str:
    """The next operation's kind for a client: with nothing held, a remember; else, while some
    kind has not been answered yet, one of those half the time; else by ``_MEMORY_MIX``."""
    if not mine.live:
        return REMEMBER
    if mine.unanswered and rnd.random() < 0.5:
        return rnd.choice(sorted(mine.unanswered))
    roll = rnd.random()
    return next(kind for upto, kind in _MEMORY_MIX if roll < upto)


def memory_vector(record_id: str) -> list[float]:
    """A record's vector: ``MEMORY_DIM`` numbers in [-1, 1) from a hash of its id (distinct
    records point in distinct directions; a recall by it scores that record ~1)."""
    raw = hashlib.blake2b(record_id.encode(), digest_size=4 * MEMORY_DIM).digest()
    vector = [round(int.from_bytes(raw[4 * k:4 * k + 4], "big") / (1 << 31) - 1, 6) for k in range(MEMORY_DIM)]
    return vector if any(vector) else [1.0] + vector[1:]


def acknowledged_kinds(history: list[Op]) -> dict[str, int]:
    """Acknowledged operations per kind of the workload: reads, writes and compare-and-sets
    answered; remembers of one record, of a batch, and answered as a duplicate; forgets that
    forgot a record; recalls answered."""
    counts: dict[str, int] = {}
    for op in history:
        if op.outcome != OK:
            continue
        kind = op.kind
        if kind == REMEMBER:
            kind = (MEMORY_DUPLICATE_KIND if any(dup for _, _, dup in op.output) else
                    MEMORY_BATCH_KIND if len(op.value) > 1 else REMEMBER)
        elif kind == FORGET and not op.output:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _memory_text(record_id: str) -> str:
    return f"chaos memory {record_id}: unique text for a unique record"


def _outcome_of_refusal(code: int, answer: dict) -> str:
    """A write's outcome from an answer other than 200: ``fail`` when surely nothing was
    appended (a 503 that says so, ``diverged``, or the request refused), else ``unknown``."""
    if code == 503 and (answer.get("outcome_unknown") is False or answer.get("error") == "diverged"):
        return FAIL
    return FAIL if code in (400, 401, 403, 404, 409, 413) else UNKNOWN


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
            f"<p>{result.config['nodes']} nodes ({result.config['mode']}), {result.load_s} s of load, "
            f"{result.config['clients']} clients, nemeses {', '.join(result.config['nemeses'])}, seed {result.config['seed']}; "
            f"operations {result.ops}</p><ul>{verdicts}</ul>"
            f"<p>Timeline (green ok, grey failed, orange unknown; red bands faults; blue lines leader changes):</p>"
            + "".join(parts))
