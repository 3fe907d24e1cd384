"""Self-repair of a diverged node from a healthy peer, by bucket diff (DESIGN.md).

Both sides freeze their state right after the same log index J. The repairing node walks the
peer's bucket tree of that view top-down (one request per level, only for the nodes that
differ), fetches the entries of the differing buckets, and builds the diff from its own view;
the diff must reach the peer's digest at J. A worker thread thaws the local view and applies
the diff (digest-checked), the entries applied here since J are replayed onto it, and the
repaired store is swapped in at an entry boundary. The node then asks for a checkpoint and
serves again once that checkpoint agrees with it.

``RepairSessions`` is the serving side: frozen views held for a peer, with an expiry.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import aiohttp

from synapse import _core
from synapse.integrity.checkpoints import CheckpointTracker, Service
from synapse.state import keys
from synapse.state.processor import CommandProcessor
from synapse.security.tls import PeerAccess
from synapse.state.records import KvChange
from synapse.timeline import Timeline

log = logging.getLogger("synapse.integrity")

# How far ahead of both nodes the shared freeze index is placed, in log entries.
_MARGIN = 3
_FREEZE_TIMEOUT = 10.0
_SESSION_TTL = 60.0
_MAX_SESSIONS = 4


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


class RepairError(RuntimeError):
    pass


class Replica(Protocol):
    """The replica's hooks a repair uses (``synapse.cluster.raft.ReplicatedLog``)."""

    def applied(self) -> tuple[int, bytes]: ...
    def freeze_at(self, index: int) -> concurrent.futures.Future: ...
    def cancel_freeze(self, fut: concurrent.futures.Future) -> None: ...
    def start_capture(self) -> None: ...
    def stop_capture(self) -> None: ...
    def captured(self, after: int) -> list[tuple[int, bytes]]: ...
    def processor_for(self, store: _core.StateStore) -> CommandProcessor: ...
    def install_repaired(self, processor: CommandProcessor, at_index: int,
                         replayed: list[tuple[int, bytes, bytes]]) -> tuple[int, _core.StateStore]: ...


class RepairingCluster(Protocol):
    """What a repair needs of the cluster (``synapse.cluster.service.Cluster``)."""

    replica: Replica

    def read(self, fn: Callable[[CommandProcessor], Any]) -> Any: ...
    async def barrier_entry(self, timeout: float | None = None) -> None: ...
    def step_down(self) -> None: ...


class RepairBusy(RepairError):
    """Every repair session slot is taken: the caller should retry shortly (HTTP 429)."""


@dataclass
class _Session:
    index: int
    frozen: _core.FrozenState
    expires: float = field(default_factory=lambda: time.monotonic() + _SESSION_TTL)


class RepairSessions:
    """Frozen views this node holds for peers that repair from it."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self._sessions: dict[str, _Session] = {}

    async def open(self, index: int) -> tuple[str, int, bytes]:
        """Freezes this node's state right after entry ``index`` (waiting for it to be
        applied) and returns (session id, index, digest). ValueError if already past it."""
        self._expire()
        if len(self._sessions) >= _MAX_SESSIONS:
            raise RepairBusy(f"{_MAX_SESSIONS} repair sessions are open already; retry shortly")
        fut = self._replica.freeze_at(index)
        try:
            at, frozen = await asyncio.wait_for(asyncio.wrap_future(fut), _FREEZE_TIMEOUT)
        except asyncio.TimeoutError:
            self._replica.cancel_freeze(fut)
            raise RepairError(f"this node did not reach index {index} within {_FREEZE_TIMEOUT:g} s") from None
        sid = secrets.token_hex(8)
        self._sessions[sid] = _Session(at, frozen)
        return sid, at, frozen.digest()

    def get(self, sid: str) -> _core.FrozenState:
        self._expire()
        session = self._sessions.get(sid)
        if session is None:
            raise KeyError(sid)
        session.expires = time.monotonic() + _SESSION_TTL
        return session.frozen

    def close(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            del self._sessions[sid]


@dataclass
class RepairReport:
    """What the last repair did, for status and metrics."""

    checkpoint: int
    peer: str | None = None
    index: int | None = None
    differing_buckets: int = 0
    records: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    # Seconds per step: freeze (both sides at the same index), walk (tree and buckets over
    # HTTP), rebuild (thaw, diff, replay), install (swap, view), prove (a checkpoint proposed).
    steps: dict = field(default_factory=dict)
    outcome: str = "running"
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Repairer:
    """Runs repairs for a node: at most one at a time, retried until one succeeds.
    ``send_to_view(index, changes)`` hands the kv changes a repair made to the SQL view;
    ``token`` authenticates this node to its peers."""

    def __init__(self, node_id: str, cluster: RepairingCluster, tracker: CheckpointTracker,
                 send_to_view: Callable[[int, list[KvChange]], None], peers: PeerAccess,
                 timeline: Timeline | None = None) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._tracker = tracker
        self._send_to_view = send_to_view
        self._peers = peers  # this node's own token (never the root token), TLS when served
        self._timeline = timeline or Timeline(node_id)
        self._task: asyncio.Task | None = None
        self.last: RepairReport | None = None
        self.repairs = 0
        self._again: int | None = None

    def start(self, checkpoint: int) -> None:
        if self._task is not None and not self._task.done():
            # One repair at a time; a divergence found while it finishes is repaired next.
            self._again = checkpoint
            return
        self._task = asyncio.get_running_loop().create_task(self._run(checkpoint), name="repair")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, checkpoint: int) -> None:
        self._tracker.repairing()
        # A diverged leader answers with results computed from the wrong state.
        self._cluster.step_down()
        delay = 0.5
        while True:
            report = RepairReport(checkpoint)
            self.last = report
            started = time.monotonic()
            try:
                await self._repair_once(report)
                report.outcome = "repaired"
                report.seconds = round(time.monotonic() - started, 3)
                self.repairs += 1
                log.warning(
                    "node %s: repaired from %s at index %d: %d differing buckets, %d records, %d bytes in %.2f s",
                    self._node_id, report.peer, report.index, report.differing_buckets, report.records,
                    report.bytes_received, report.seconds,
                )
                self._timeline.record(
                    "repaired", f"repaired from {report.peer}: {report.records} record{'s' * (report.records != 1)}, "
                    f"{report.bytes_received} bytes in {report.seconds:.2f} s", peer=report.peer, index=report.index,
                    records=report.records, bytes=report.bytes_received, seconds=report.seconds)
                again, self._again = self._again, None
                if again is None or self._tracker.service != Service.DIVERGED:
                    return
                checkpoint = again  # diverged again while this repair finished: repair again
                self._tracker.repairing()
                continue
            except asyncio.CancelledError:
                self._cluster.replica.stop_capture()
                raise
            except Exception as e:  # any failure: report it, try again (maybe another peer)
                self._cluster.replica.stop_capture()
                report.outcome, report.error = "failed", f"{type(e).__name__}: {e}"
                report.seconds = round(time.monotonic() - started, 3)
                log.error("node %s: repair attempt failed: %s; retrying in %.1f s", self._node_id, report.error, delay)
                self._timeline.record("repair_failed", f"a repair attempt failed ({report.error}); retrying",
                                      peer=report.peer)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _healthy_peers(self, checkpoint: int) -> list[tuple[str, str]]:
        """(node_id, api address) of the peers to repair from: those whose report matched
        the agreed digest of ``checkpoint`` — or of the newest agreed checkpoint when that one
        is unknown (a divergence found at an entry, not a checkpoint) — then the rest."""
        me = self._node_id

        def pick(processor) -> list[tuple[str, str]]:
            members = processor.nodes()
            record = processor.checkpoint(checkpoint)
            if record is None or record["agreed"] is None:
                record = next((r for _, r in processor.checkpoints() if r["agreed"] is not None), None)
            agreeing = [] if record is None else [
                n for n, report in record["reports"].items() if report == record["agreed"]
            ]
            ordered = agreeing + sorted(set(members) - set(agreeing))
            return [(n, members[n]["api"]) for n in ordered if n != me and n in members]

        return self._cluster.read(pick)

    async def _repair_once(self, report: RepairReport) -> None:
        peers = self._healthy_peers(report.checkpoint)
        if not peers:
            raise RepairError(f"no healthy peer is known for checkpoint {report.checkpoint}")
        last_error: Exception | None = None
        async with self._peers.session(timeout=30) as http:
            for peer_id, api in peers:
                try:
                    await self._repair_from(http, self._peers.url(api), peer_id, report)
                    return
                except (aiohttp.ClientError, asyncio.TimeoutError, RepairError) as e:
                    last_error = e
                    log.warning("node %s: repair from %s failed: %s", self._node_id, peer_id, e)
        raise RepairError(f"every healthy peer failed; last: {last_error}")

    async def _repair_from(self, http: aiohttp.ClientSession, base: str, peer_id: str, report: RepairReport) -> None:
        raft = self._cluster.replica
        report.peer = peer_id

        async def call(path: str, body: dict) -> dict:
            data = _json_bytes(body)
            report.bytes_sent += len(data)
            async with http.post(base + path, data=data, headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
                report.bytes_received += len(raw)
                payload = _json_loads(raw)
                if resp.status != 200:
                    raise RepairError(f"{path}: {resp.status} {payload.get('error')}: {payload.get('message')}")
                return payload

        mark = time.monotonic()

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            report.steps[name] = round(now - mark, 3)
            mark = now

        # 1. Both sides freeze right after the same index, a little ahead of both.
        async with http.get(base + "/v1/cluster/status") as resp:
            peer_applied = (await resp.json())["applied_index"]
        target = max(raft.applied()[0], peer_applied) + _MARGIN
        raft.start_capture()
        local = raft.freeze_at(target)
        # Both sides wait for the log to reach the target: push it (on an idle cluster nothing
        # else would) until this node's view is frozen.
        pusher = asyncio.get_running_loop().create_task(self._push_log_until(local))
        try:
            opened = await call("/v1/internal/repair/sessions", {"index": target})
        except BaseException:
            pusher.cancel()
            raft.cancel_freeze(local)
            raise
        sid = opened["session"]
        try:
            try:
                at, mine = await asyncio.wait_for(asyncio.wrap_future(local), _FREEZE_TIMEOUT)
            except asyncio.TimeoutError:
                raft.cancel_freeze(local)
                raise RepairError(f"this node did not reach index {target} in time") from None
            finally:
                pusher.cancel()
            peer_digest = unb64(opened["digest"])
            report.index = at
            step("freeze")
            # 2. Walk the tree where it differs, then fetch the differing buckets.
            frontier = [0] if mine.digest() != peer_digest else []
            for level in range(_core.TREE_DEPTH):
                if not frontier:
                    break
                remote = await call(f"/v1/internal/repair/sessions/{sid}/children", {"level": level, "parents": frontier})
                frontier = mine.compare_children(level, frontier, unb64(remote["digests"]))
            report.differing_buckets = len(frontier)
            remote_entries: list[tuple[bytes, bytes]] = []
            if frontier:
                fetched = await call(f"/v1/internal/repair/sessions/{sid}/buckets", {"buckets": frontier})
                remote_entries = [(unb64(k), unb64(v)) for k, v in fetched["entries"]]
        finally:
            await _quietly(http.delete(base + f"/v1/internal/repair/sessions/{sid}"))
        loop = asyncio.get_running_loop()

        # 3. Off the event loop and the tick thread: thaw, apply the diff, replay what came since.
        def rebuild():
            diff = mine.diff_buckets(frontier, remote_entries)
            if diff.to_digest != peer_digest:
                raise RepairError("the peer's buckets do not add up to its digest; the peer changed or is unhealthy")
            t0 = time.monotonic()
            store = _core.StateStore.thaw(mine)
            t1 = time.monotonic()
            store.apply_diff(diff)  # digest-checked: refuses to land anywhere but peer_digest
            t2 = time.monotonic()
            processor = raft.processor_for(store)
            replayed: list[tuple[int, bytes, bytes]] = []
            for index, payload in raft.captured(after=at):
                outcome = processor.apply_entry(index, payload)
                replayed.append((index, outcome.chain, processor.store.digest()))
            report.steps["rebuild_detail"] = {"thaw": round(t1 - t0, 3), "apply_diff": round(t2 - t1, 3),
                                              "replay": round(time.monotonic() - t2, 3), "replayed": len(replayed)}
            return processor, replayed, len(diff)

        step("walk")
        processor, replayed, records = await loop.run_in_executor(None, rebuild)
        step("rebuild")
        report.records = records
        applied, old, installed = raft.install_repaired(processor, replayed[-1][0] if replayed else at, replayed)
        self._send_changes_to_view(old, installed, applied)
        self._tracker.repaired(proof_after=applied + 1)
        step("install")
        await self._tracker.propose_checkpoint(label=f"repair of {self._node_id}")
        step("prove")

    async def _push_log_until(self, fut) -> None:
        """Commits barrier entries until ``fut`` (a freeze at a future index) is done."""
        while not fut.done():
            try:
                await self._cluster.barrier_entry(1.0)
            except Exception:
                await asyncio.sleep(0.05)

    def _send_changes_to_view(self, old: _core.StateStore, new: _core.FrozenState, index: int) -> None:
        """The SQL view follows the state: send it the kv keys the repair changed (``old`` is
        no one's any more; ``new`` is the installed state frozen at ``index``)."""
        diff = old.freeze().diff(new)
        changes = []
        for key, value in diff.added + diff.changed:
            if key.startswith(keys.KV):
                r = keys.decode_kv(keys.kv_name(key), value)
                changes.append(KvChange(r.key, r.value, r.version, r.create_index, r.mod_index, index))
        for key in diff.removed:
            if key.startswith(keys.KV):
                changes.append(KvChange(keys.kv_name(key), None, 0, 0, 0, index))
        if changes:
            self._send_to_view(index, changes)


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _json_loads(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": "bad_response", "message": raw[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"error": "bad_response", "message": "not an object"}


async def _quietly(request) -> None:
    try:
        async with request:
            pass
    except Exception:
        pass
