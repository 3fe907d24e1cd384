"""The scheduler: places pending tasks on execution nodes and marks silent ones down, on the
leader, one log entry per decision round (DESIGN.md)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

log = logging.getLogger("synapse.orchestrator")

ROUND_TASKS = 512  # pending tasks looked at per round
TICK_S = 0.2  # the longest a round waits without news (backoffs, heartbeat timeouts)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Placement:
    task_id: str
    worker_id: str


def place(pending: list[tuple[str, dict]], workers: dict[str, dict], used: dict[str, tuple[int, int]],
          now: int) -> list[Placement]:
    """Pure placement (DESIGN.md): ``pending`` in queue order, ``workers`` the registered ones,
    ``used[worker] = (slots in use, memory_mb reserved)``. Returns the assignments to make."""
    free = {w: [info["slots"] - used.get(w, (0, 0))[0],
                None if info.get("memory_mb") is None else info["memory_mb"] - used.get(w, (0, 0))[1]]
            for w, info in workers.items() if info["state"] == "up"}
    out = []
    for task_id, task in pending:
        if task["state"] != "pending" or task["not_before_ms"] > now:
            continue
        spec = task["spec"]
        want_labels = spec.get("labels", {})
        memory = (spec.get("limits") or {}).get("memory_mb")
        best, best_key = None, None
        for w, (slots, mem) in free.items():
            if slots <= 0:
                continue
            labels = workers[w].get("labels", {})
            if any(labels.get(k) != v for k, v in want_labels.items()):
                continue
            if memory is not None and mem is not None and mem < memory:
                continue
            key = (-slots, -(mem if mem is not None else 0), w)
            if best_key is None or key < best_key:
                best, best_key = w, key
        if best is not None:
            free[best][0] -= 1
            if memory is not None and free[best][1] is not None:
                free[best][1] -= memory
            out.append(Placement(task_id, best))
    return out


class SchedulingCluster(Protocol):
    """What the scheduler needs of the cluster (``synapse.cluster.service.Cluster``)."""

    def read(self, fn: Callable[[Any], Any]) -> Any: ...
    async def propose(self, command: dict, size_hint: int) -> dict: ...
    def is_leader(self) -> bool: ...


class Scheduler:
    """Runs on every node, acts while the node leads and its state is the agreed one
    (``serving()``). ``entry_applied`` is called from the apply thread with each entry's task
    and worker events; the rest runs on the node's loop."""

    def __init__(self, node_id: str, cluster: SchedulingCluster, serving: Callable[[], bool],
                 heartbeat_timeout: float) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._serving = serving
        self.heartbeat_timeout = heartbeat_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._seen: dict[str, float] = {}  # worker -> last heartbeat (monotonic), leader only
        self._worker_news: dict[str, asyncio.Event] = {}
        self._task_ends: dict[str, list] = {}  # task -> [event, waiters]
        self._leading = False
        self._task: asyncio.Task | None = None
        self._closing = False
        self.rounds = 0
        self.assigned = 0
        # Applied on this node since it started: tasks ended, by outcome; and, for each
        # assignment, how long the task had waited (seconds) — to whoever observes it (/metrics).
        self.ended: collections.Counter[str] = collections.Counter()
        self.on_placed: Callable[[float], None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        # The flag, not only the cancel: Python 3.11's wait_for swallows a cancel that arrives
        # as the wake-up it waits for is set, and the loop would then run on.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # --- from the apply thread ---

    def entry_applied(self, events: tuple) -> None:
        if not any(e[0] in ("task", "worker") for e in events):
            return  # checkpoint events: nothing for the scheduler (no cross-thread wake-up)
        for e in events:  # this node's figures of what the log did (every node applies it)
            if e[0] == "task" and e[1] == "ended":
                self.ended[e[4]] += 1
            elif e[0] == "task" and e[1] == "assigned" and self.on_placed is not None:
                self.on_placed(e[4] / 1000)
        workers = {e[3] for e in events if e[0] == "task" and e[1] in ("assigned", "revoked", "ended") and e[3]}
        workers |= {e[1] for e in events if e[0] == "worker"}
        ended = {e[2] for e in events if e[0] == "task" and e[1] == "ended"}
        # The loop needs the news only where something waits for it: the leader's rounds, a
        # worker's long poll, a task's watcher. A follower has none of them most of the time,
        # and waking its idle loop for nothing was ~12% of its apply thread's time under a task
        # load (py-spy). Both dicts are only added to on the loop, and a waiter registers
        # *before* it reads the state: one registered after this check reads a state that
        # already holds this entry. A node that has just become leader runs a round within
        # TICK_S without being woken.
        if not (self._leading or any(w in self._worker_news for w in workers)
                or any(t in self._task_ends for t in ended)):
            return
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._news, workers, ended)
            except RuntimeError:  # the loop is closed: stopping
                pass

    def _news(self, workers: set[str], ended: set[str]) -> None:
        self._wake.set()
        for w in workers:
            event = self._worker_news.get(w)
            if event is not None:
                event.set()
        for t in ended:
            entry = self._task_ends.get(t)
            if entry is not None:
                entry[0].set()

    # --- from the API (the leader's heartbeat endpoint) ---

    def heartbeat(self, worker_id: str) -> None:
        self._seen[worker_id] = time.monotonic()

    def news_for(self, worker_id: str) -> asyncio.Event:
        """Set when something changes for the worker (an assignment, a revoked lease). Clear
        it *before* reading the state, then wait on it: news between the two is not lost."""
        return self._worker_news.setdefault(worker_id, asyncio.Event())

    def watch_task(self, task_id: str) -> asyncio.Event:
        """Set when the task ends. Watch *before* reading its state (an end between the read
        and the wait is not lost); ``unwatch_task`` when done."""
        entry = self._task_ends.setdefault(task_id, [asyncio.Event(), 0])
        entry[1] += 1
        return entry[0]

    def unwatch_task(self, task_id: str) -> None:
        entry = self._task_ends.get(task_id)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:  # the last watcher forgets it
                del self._task_ends[task_id]

    def last_heard(self, worker_id: str) -> float | None:
        """Seconds since the leader last heard the worker (None: not since it became leader)."""
        seen = self._seen.get(worker_id)
        return None if seen is None else time.monotonic() - seen

    # --- the loop ---

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                if not self._is_leader():
                    self._leading = False
                    continue
                if not self._leading:
                    # Nomad's failover grace: a new leader knows no heartbeat times, so every
                    # worker's clock starts now instead of at "never".
                    self._leading = True
                    start = time.monotonic()
                    self._seen = {w: start for w in self._seen} | {
                        w: start for w in self._cluster.read(lambda p: p.workers())}
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed proposal (leader change, timeout): next round retries
                log.info("node %s: scheduling round failed: %s: %s", self._node_id, type(e).__name__, e)
                await asyncio.sleep(TICK_S)

    def _is_leader(self) -> bool:
        return self._cluster.is_leader() and self._serving()

    async def _round(self) -> None:
        now, mono = now_ms(), time.monotonic()
        workers, pending, used = self._cluster.read(_snapshot)
        commands: list[dict[str, Any]] = []
        for w, info in workers.items():
            if info["state"] != "up":
                continue
            seen = self._seen.setdefault(w, mono)  # registered while this node led: its clock starts
            if mono - seen > self.heartbeat_timeout:
                commands.append({"op": "worker_down", "worker_id": w, "epoch": info["epoch"], "now_ms": now,
                                 "reason": f"no heartbeat for {mono - seen:.1f} s"})
                info = dict(info, state="down")
                workers[w] = info
        for p in place(pending, workers, used, now):
            commands.append({"op": "task_assign", "task_id": p.task_id, "worker_id": p.worker_id, "now_ms": now})
        if not commands:
            return
        self.rounds += 1
        results = await asyncio.gather(*(self._cluster.propose(c, 256) for c in commands), return_exceptions=True)
        for c, r in zip(commands, results):
            if isinstance(r, dict) and r.get("ok"):
                if c["op"] == "task_assign":
                    self.assigned += 1
                else:
                    log.warning("node %s: worker %s marked down (%s); requeued %s, lost %s", self._node_id,
                                c["worker_id"], c["reason"], r.get("requeued"), r.get("lost"))
            elif isinstance(r, BaseException):
                raise r


def _snapshot(processor) -> tuple[dict, list, dict]:
    """Under the state lock: the workers, each one's load, and the first pending tasks — only
    as many as could be placed (decoding 512 task records per round, at a round per commit
    under load, cost more CPU than running the tasks)."""
    workers = processor.workers()
    used, free = {}, 0
    for w, info in workers.items():
        if info["state"] != "up":
            continue
        leases = processor.worker_leases(w)
        memory = 0
        if info.get("memory_mb") is not None:
            for t in leases:
                task = processor.task(t)
                memory += ((task["spec"].get("limits") or {}).get("memory_mb") or 0) if task else 0
        used[w] = (len(leases), memory)
        free += max(0, info["slots"] - len(leases))
    # A few times the free slots: room for tasks that wait (backoff) or fit nowhere (labels).
    want = min(ROUND_TASKS, 4 * free)
    pending = [(t, processor.task(t)) for t in processor.pending_tasks(want)] if want else []
    return workers, pending, used
