"""Catch-up by diff: a follower that missed entries the leader has compacted away gets the
changes between its own state and the leader's dump instead of the whole dump (DESIGN.md,
"Catch-up by diff").

Leader side (``CatchUpPlanner``): when PySyncObj wants to send its dump to a follower, the
serializer asks for a plan. The first time, the planner answers "wait" and, on the event
loop, talks to the follower's API: it freezes the follower's state (a repair session), gets
its 65,536 bucket digests (8 bytes each), compares them with the dump's, gets the keys and
element hashes (8 bytes) of the differing buckets only, and builds a *catch-up container*:
the dump's Raft tuple plus the puts and deletes that take the follower's state to the dump's.
If that is not smaller than the dump file, or anything fails, the dump file is sent as
before. A follower gets at most one container per dump: a second transfer is the full file.

Follower side (``apply_container``): PySyncObj renames what it received over ``raft.dump``
and asks our deserializer for it. A container is applied to the current state (it must
start from exactly the digest it was built against, and reach the dump's digest, or
nothing changes), then a full dump of the new state replaces the container before PySyncObj
cuts the log — so the data dir is always restartable.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
import blake3
import msgpack

from synapse import _core
from synapse.background import TaskGroup
from synapse.cluster.dump import PLAN_PENDING, dump_index, read_dump, write_dump

if TYPE_CHECKING:
    from synapse.state.processor import CommandProcessor

log = logging.getLogger("synapse.integrity")

MAGIC = b"SYNCATCH"
_CHECK_TAG = b"SYNCATCM"
SHORT = 8  # bytes of a bucket digest or element hash compared over the network
_PLAN_TIMEOUT = 30.0
_API_WAIT = 10.0


class CatchUpError(ValueError):
    pass


def _check(data: bytes) -> bytes:
    return blake3.blake3(_CHECK_TAG + data).digest()[:16]


def encode_container(meta: dict, puts: list[tuple[bytes, bytes]], deletes: list[bytes]) -> bytes:
    body = msgpack.packb({"meta": meta, "puts": puts, "deletes": deletes}, use_bin_type=True)
    return MAGIC + struct.pack("<Q", len(body)) + body + _check(body)


def is_container(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_container(path: Path) -> dict:
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 8 + 16:
        raise CatchUpError(f"{path}: not a catch-up container")
    (size,) = struct.unpack_from("<Q", data, len(MAGIC))
    body = data[len(MAGIC) + 8 : len(MAGIC) + 8 + size]
    if len(body) != size or _check(body) != data[len(MAGIC) + 8 + size :]:
        raise CatchUpError(f"{path}: the catch-up container is damaged (length or checksum)")
    doc = msgpack.unpackb(body, raw=False)
    if not isinstance(doc, dict) or {"meta", "puts", "deletes"} - set(doc):
        raise CatchUpError(f"{path}: the catch-up container is malformed")
    return doc


def apply_container(store: _core.StateStore, doc: dict) -> int:
    """Applies the container's changes to ``store`` atomically (the caller holds the state
    lock); returns the number of changes. CatchUpError, changing nothing, if the store is
    not the state it was built against or the result is not the dump's state."""
    meta = doc["meta"]
    if store.digest() != meta["base"]:
        raise CatchUpError(
            f"this node's state is {store.hexdigest()[:16]}, not the {meta['base'].hex()[:16]} the catch-up was built against"
        )
    ops = [(k, v) for k, v in doc["puts"]] + [(k, None) for k in doc["deletes"]]
    undo = [(k, store.get(k)) for k, _ in ops]
    store.apply(ops)
    if store.digest() != meta["target"]:
        store.apply(undo)
        raise CatchUpError("the catch-up does not reach the leader's dump digest; nothing was changed")
    return len(ops)


@dataclass
class _Plan:
    dump_index: int
    state: str = "preparing"  # preparing | ready | full (send the dump file) | served
    container: bytes | None = None
    started: float = field(default_factory=time.monotonic)
    detail: dict = field(default_factory=dict)


@dataclass
class CatchUpStats:
    """Bytes of catch-ups, each way, for status and metrics."""

    containers_sent: int = 0
    container_bytes_sent: int = 0
    probe_bytes_sent: int = 0  # to the follower while planning (requests)
    probe_bytes_received: int = 0  # from the follower while planning (digests, hashes)
    full_dumps_sent: int = 0
    containers_received: int = 0
    container_bytes_received: int = 0
    last: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CatchUpPlanner:
    """Leader side; ``payload_for`` is called on the tick thread, planning runs on the loop."""

    def __init__(self, read: Callable[[Callable[["CommandProcessor"], Any]], Any], token: str) -> None:
        """``read(fn)``: ``fn(processor)`` on the applied state (the registered nodes' API
        addresses); ``token`` authenticates this node to the follower."""
        self._read = read
        self._token = token
        self._loop = asyncio.get_running_loop()  # made by the node on its loop
        self._lock = threading.Lock()
        self._plans: dict[str, _Plan] = {}
        self._tasks = TaskGroup(self._loop)
        self.stats = CatchUpStats()

    def payload_for(self, raft_addr: str, dump_path: Path):
        """PLAN_PENDING (send nothing yet), a container (bytes) to send, or None (the file)."""
        try:
            at, dump_size = dump_index(dump_path), dump_path.stat().st_size
        except (OSError, ValueError):
            return None
        with self._lock:
            plan = self._plans.get(raft_addr)
            if plan is None or plan.dump_index != at:
                plan = self._plans[raft_addr] = _Plan(at)
                start = True
            else:
                start = False
            if plan.state == "preparing" and time.monotonic() - plan.started > _PLAN_TIMEOUT:
                plan.state = "full"
            state = plan.state
        if start:
            try:
                self._loop.call_soon_threadsafe(self._start, raft_addr, dump_path, dump_size, plan)
            except RuntimeError:
                return None
            return PLAN_PENDING
        if state == "preparing":
            return PLAN_PENDING
        if state == "ready":
            with self._lock:
                plan.state = "served"  # at most one container per dump: a retry gets the file
                self.stats.containers_sent += 1
                self.stats.container_bytes_sent += len(plan.container)
                self.stats.last = dict(plan.detail, follower=raft_addr, dump_index=at)
            return plan.container
        with self._lock:
            self.stats.full_dumps_sent += 1
        return None

    def _start(self, raft_addr: str, dump_path: Path, dump_size: int, plan: _Plan) -> None:
        self._tasks.spawn(self._prepare(raft_addr, dump_path, dump_size, plan), name="catch-up plan")

    async def close(self) -> None:
        await self._tasks.close()

    async def _prepare(self, raft_addr: str, dump_path: Path, dump_size: int, plan: _Plan) -> None:
        try:
            container, detail = await self._build(raft_addr, dump_path)
            detail["dump_bytes"] = dump_size
            detail["container_bytes"] = len(container)
            with self._lock:
                plan.detail = detail
                if len(container) < dump_size:
                    plan.container, plan.state = container, "ready"
                else:
                    plan.state = "full"
            log.info("catch-up of %s: %s", raft_addr, detail)
        except Exception as e:  # anything: the follower gets the dump file instead
            log.warning("catch-up of %s by diff not possible (%s: %s); sending the dump", raft_addr, type(e).__name__, e)
            with self._lock:
                plan.state = "full"

    async def _build(self, raft_addr: str, dump_path: Path) -> tuple[bytes, dict]:
        members = self._read(lambda p: p.nodes())
        api = next((m["api"] for m in members.values() if m["raft"] == raft_addr), None)
        if api is None:
            raise CatchUpError(f"no registered node has Raft address {raft_addr}")
        loop = asyncio.get_running_loop()
        dump = await loop.run_in_executor(None, read_dump, dump_path)
        base = f"http://{api}"
        headers = {"Authorization": f"Bearer {self._token}"}
        stats = self.stats
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=_PLAN_TIMEOUT)) as http:

            async def call(method: str, path: str, body: dict | None = None) -> bytes:
                data = msgpack.packb(body) if body is not None else b""
                stats.probe_bytes_sent += len(data)
                async with http.request(method, base + path, data=data,
                                        headers={"Content-Type": "application/msgpack"}) as resp:
                    raw = await resp.read()
                    stats.probe_bytes_received += len(raw)
                    if resp.status != 200:
                        raise CatchUpError(f"{path}: {resp.status} {raw[:200]!r}")
                    return raw

            # A restarted follower's Raft port can be up a moment before its API: wait for it.
            deadline = time.monotonic() + _API_WAIT
            while True:
                try:
                    status = msgpack.unpackb(await call("GET", "/v1/internal/catchup/state"), raw=False)
                    break
                except aiohttp.ClientConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            sid = status["session"]
            try:
                theirs = await call("GET", f"/v1/internal/catchup/{sid}/buckets")
                mine = dump.store.node_digests(_core.TREE_DEPTH)
                buckets = [
                    b for b in range(_core.BUCKETS)
                    if mine[b * 32 : b * 32 + SHORT] != theirs[b * SHORT : (b + 1) * SHORT]
                ]
                their_hashes: dict[bytes, bytes] = {}
                for start in range(0, len(buckets), 8192):
                    chunk = buckets[start : start + 8192]
                    rows = msgpack.unpackb(await call("POST", f"/v1/internal/catchup/{sid}/keys", {"buckets": chunk}), raw=False)
                    their_hashes.update((k, h) for k, h in rows)
            finally:
                await call("DELETE", f"/v1/internal/catchup/{sid}")
        my_rows = dump.store.bucket_element_hashes(buckets)
        mine_keys = {k for k, _ in my_rows}
        changed = [k for k, h in my_rows if their_hashes.get(k) != h[:SHORT]]
        values = dump.store.get_many(changed)
        puts = list(zip(changed, values))
        deletes = [k for k in their_hashes if k not in mine_keys]
        meta = {
            "base": status["digest"],
            "target": dump.store.digest(),
            "last": list(dump.last),
            "prev": list(dump.prev),
            "cluster": dump.cluster,
            "index": dump.info.log_index,
        }
        detail = {"differing_buckets": len(buckets), "puts": len(puts), "deletes": len(deletes),
                  "follower_index": status["index"]}
        return encode_container(meta, puts, deletes), detail


def full_dump_from(store: _core.StateStore, doc: dict, path: Path) -> None:
    """Replaces the applied container at ``path`` by a full dump of ``store`` (synchronous:
    PySyncObj cuts the log as soon as the deserializer returns)."""
    meta = doc["meta"]
    write_dump(path, store, (tuple(meta["last"]), tuple(meta["prev"]), meta["cluster"]))


class ContainerLoader:
    """Follower side, for ``ReplicatedLog.catchup_loader`` (called on the tick thread)."""

    def __init__(self, stats: CatchUpStats) -> None:
        self._stats = stats

    @staticmethod
    def is_container(path: Path) -> bool:
        return is_container(path)

    def install(self, path: Path, store: _core.StateStore) -> tuple[int, tuple, tuple, list[str]]:
        size = path.stat().st_size
        doc = read_container(path)
        changes = apply_container(store, doc)
        full_dump_from(store, doc, path)
        meta = doc["meta"]
        self._stats.containers_received += 1
        self._stats.container_bytes_received += size
        self._stats.last = {"received_bytes": size, "changes": changes, "index": meta["index"]}
        return meta["index"], tuple(meta["last"]), tuple(meta["prev"]), meta["cluster"]
