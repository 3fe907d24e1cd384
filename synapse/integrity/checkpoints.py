"""This node's side of checkpoints (DESIGN.md): it remembers its own digest and audit-chain
head at every checkpoint it applies, reports them through the log, watches the agreement the
state records, and says when this node has diverged. On the leader it also proposes the
periodic checkpoints.

``entry_applied`` runs on PySyncObj's tick thread and only records and hands over; everything
that proposes runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from synapse.background import TaskGroup
from synapse.cluster.committer import ProposalError
from synapse.timeline import Timeline

if TYPE_CHECKING:
    from synapse.state.processor import CommandProcessor, EntryOutcome

log = logging.getLogger("synapse.integrity")

# How many of its own checkpoint digests a node remembers (a report usually lands within
# milliseconds; a node that restarts replays the entries and remembers them again).
_REMEMBERED = 64


@dataclass(frozen=True)
class CheckpointPolicy:
    every_entries: int = 1000  # 0 turns periodic checkpoints off
    every_seconds: float = 60.0  # ...and at least this often while entries change the state
    # A periodic checkpoint is snapshotted (a rollback target) only if the last snapshot is at
    # least this old; 0: every one. On-demand checkpoints always are.
    snapshot_seconds: float = 30.0


class Service:
    """Whether this node serves kv requests, by integrity state."""

    SERVING = "serving"
    DIVERGED = "diverged"  # found, not repaired yet
    REPAIRING = "repairing"
    PROVING = "proving"  # repaired; waiting for a checkpoint that agrees with this node


class CheckpointTracker:
    def __init__(
        self,
        node_id: str,
        loop: asyncio.AbstractEventLoop,
        propose: Callable[[dict, int], Awaitable[dict]],
        read: Callable[[Callable[["CommandProcessor"], object]], object],
        on_diverged: Callable[[int], None],
        policy: CheckpointPolicy = CheckpointPolicy(),
        is_leader: Callable[[], bool] = lambda: False,
        timeline: Timeline | None = None,
    ) -> None:
        self.node_id = node_id
        self.policy = policy
        self._loop = loop
        self._propose = propose
        self._read = read
        self._on_diverged = on_diverged
        self._is_leader = is_leader
        self._timeline = timeline or Timeline(node_id)
        self._lock = threading.Lock()  # the tick thread writes, the loop reads
        self._mine: OrderedDict[int, list[bytes]] = OrderedDict()
        self.service = Service.SERVING
        self.diverged_at: int | None = None
        self.proof_after = 0  # in PROVING: the first checkpoint that can prove the repair
        self.last_checkpoint = 0
        self.last_agreed: int | None = None  # newest agreed checkpoint this node matched
        self._changed_since_checkpoint = False
        self._last_checkpoint_time = time.monotonic()
        # When this node last applied a snapshotted checkpoint (None: not since it started).
        # Every node sees the same entries, so a new leader goes on from where the last left.
        self._last_snapshot_time: float | None = None
        self._proposing = False
        self._tasks = TaskGroup(loop)

    # --- tick thread ---

    def entry_applied(self, index: int, outcome: "EntryOutcome", digest: bytes) -> None:
        if outcome.changes:
            self._changed_since_checkpoint = True
        if (
            # Cheapest test first: this runs on the tick thread for every entry.
            self.policy.every_entries > 0 and index - self.last_checkpoint >= self.policy.every_entries
            and not self._proposing and self._is_leader()
        ):
            # Right at the K-th entry rather than at the next poll: under load the log moves
            # dozens of entries between polls.
            self._call(self._spawn_periodic, index)
        for event in outcome.events:
            if event[0] == "checkpoint":
                with self._lock:
                    self._mine[index] = [digest, outcome.chain]
                    while len(self._mine) > _REMEMBERED:
                        self._mine.popitem(last=False)
                    self.last_checkpoint = max(self.last_checkpoint, index)
                self._changed_since_checkpoint = False
                self._last_checkpoint_time = time.monotonic()
                self._call(self._report, index, digest, outcome.chain)
            elif event[0] == "snapshot":
                self._last_snapshot_time = time.monotonic()
            elif event[0] == "report" and event[3] is not None:
                self._judge(event[1], event[3])

    def state_replaced(self, index: int) -> None:
        """A dump replaced the state: digests remembered before it say nothing about it."""
        with self._lock:
            self._mine.clear()
            self.last_checkpoint = max(self.last_checkpoint, index)

    def _judge(self, checkpoint: int, agreed: list[bytes]) -> None:
        with self._lock:
            mine = self._mine.get(checkpoint)
            if mine is None:
                return  # not applied here since the last restart or dump: nothing to compare
            if mine == agreed:
                if self.last_agreed is None or checkpoint > self.last_agreed:
                    self.last_agreed = checkpoint
                if self.service == Service.PROVING and checkpoint >= self.proof_after:
                    self.service, self.diverged_at = Service.SERVING, None
                    self._changed(f"checkpoint {checkpoint} agrees with this node again: serving", checkpoint)
                    log.warning("node %s: checkpoint %d agrees with this node again; serving", self.node_id, checkpoint)
                return
            if self.service not in (Service.SERVING, Service.PROVING):
                return
            self.service, self.diverged_at = Service.DIVERGED, checkpoint
            self._changed(f"diverged: at checkpoint {checkpoint} this node's digest differs from the agreed one",
                          checkpoint)
        log.error(
            "node %s: DIVERGED: at checkpoint %d this node's digest %s differs from the agreed %s; "
            "refusing kv requests until repaired",
            self.node_id, checkpoint, mine[0].hex()[:16], agreed[0].hex()[:16],
        )
        self._call(self._on_diverged, checkpoint)

    def cannot_follow(self, index: int, why: str) -> None:
        """This node could not apply entry ``index`` as the others did (tick thread): its
        state differs from theirs from here on. Repair now rather than at the next checkpoint."""
        with self._lock:
            if self.service not in (Service.SERVING, Service.PROVING):
                return
            self.service, self.diverged_at = Service.DIVERGED, index
            self._changed(f"diverged: could not apply entry {index} as the others did ({why})", index)
        log.error("node %s: DIVERGED at entry %d: %s; repairing from a peer", self.node_id, index, why)
        self._call(self._on_diverged, index)

    def _changed(self, message: str, index: int | None) -> None:
        """Under the lock, right after ``service`` changed: on the timeline in the order it changed."""
        self._timeline.record("service", message, service=self.service, index=index)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the node is stopping
            pass

    # --- event loop ---

    def repairing(self) -> None:
        with self._lock:
            self.service = Service.REPAIRING
            self._changed("repairing from a peer", self.diverged_at)

    def repaired(self, proof_after: int) -> None:
        """The state was repaired at index ``proof_after - 1``: serve again once a checkpoint at
        or after ``proof_after`` agrees with this node."""
        with self._lock:
            self.service, self.proof_after = Service.PROVING, proof_after
            self._changed(f"repaired; proving: serves again once a checkpoint from entry {proof_after} on agrees",
                          proof_after)
            # Digests recorded before the repaired state was installed describe the damaged
            # state: judged after the repair, they would declare it diverged again.
            for index in [i for i in self._mine if i < proof_after]:
                del self._mine[index]

    def _report(self, index: int, digest: bytes, chain: bytes) -> None:
        self._spawn(self._send_report(index, digest, chain))

    async def _send_report(self, index: int, digest: bytes, chain: bytes) -> None:
        command = {"op": "checkpoint_report", "checkpoint": index, "node_id": self.node_id, "digest": digest, "chain": chain}
        for attempt in range(8):
            record = self._read(lambda p: p.checkpoint(index))
            if record is None or self.node_id in record["reports"]:
                return  # evicted, or already reported (a restarted node replaying its log)
            try:
                # A retry after an unknown outcome lands once; a report refused because this
                # node is not registered yet (a checkpoint right after start) is sent anew.
                result = await self._propose(dict(command, rid=f"ckpt-report/{index}/{self.node_id}/{attempt}"), 160)
                if result.get("ok") or result.get("error") != "unknown_node":
                    return
            except ProposalError as e:
                log.info("node %s: report for checkpoint %d not committed (%s); retrying", self.node_id, index, e.reason)
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    async def propose_checkpoint(self, label: str | None = None, periodic: bool = False) -> dict:
        command: dict = {"op": "checkpoint", "created_ms": int(time.time() * 1000)}
        if label is not None:
            command["label"] = label
        if periodic and not self.snapshot_due():
            command["snapshot"] = False
        return await self._propose(command, 200)

    def snapshot_due(self) -> bool:
        """Whether the next periodic checkpoint should be snapshotted. Snapshots write the whole
        state: one every 1,000 entries made each write cost O(state) (measured: throughput fell
        by a third between 40K and 160K keys)."""
        last = self._last_snapshot_time
        return last is None or time.monotonic() - last >= self.policy.snapshot_seconds

    def checkpoint_due(self, applied_index: int) -> bool:
        if self.policy.every_entries <= 0 or self._proposing:
            return False
        if applied_index - self.last_checkpoint >= self.policy.every_entries:
            return True
        return self._changed_since_checkpoint and (
            time.monotonic() - self._last_checkpoint_time >= self.policy.every_seconds
        )

    async def propose_if_due(self, applied_index: int) -> None:
        """Leader only: one periodic checkpoint at a time."""
        if not self.checkpoint_due(applied_index):
            return
        self._proposing = True
        try:
            await self.propose_checkpoint(periodic=True)
        except ProposalError as e:
            log.info("node %s: periodic checkpoint not committed (%s)", self.node_id, e.reason)
        finally:
            self._proposing = False

    def _spawn_periodic(self, index: int) -> None:
        if not self._proposing:
            self._spawn(self.propose_if_due(index))

    def _spawn(self, coro) -> None:
        self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.close()

    def status(self) -> dict:
        with self._lock:
            return {
                "service": self.service,
                "diverged_at": self.diverged_at,
                "last_checkpoint": self.last_checkpoint or None,
                "last_agreed": self.last_agreed,
            }
