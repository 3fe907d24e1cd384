"""Catch-up by diff: a follower that missed entries the leader has compacted away gets the
changes between its own state and the leader's dump instead of the whole dump (DESIGN.md,
"Catch-up by diff").

Leader side (``CatchUpPlanner``): when PySyncObj wants to send its dump to a follower, the
serializer asks for a plan. The first time, the planner answers "wait" and, on the event
loop, talks to the follower's API: it freezes the follower's state (a repair session), walks
the follower's bucket tree top-down where it differs from the dump's (the first 4 bytes of
each digest, only below differing nodes), gets the element hashes of the differing buckets
(the first 4 bytes of each, no keys), and builds a *catch-up container*: the dump's Raft tuple,
the puts that take the follower's state to the dump's, and the deletes — named by bucket and
element hash, which the follower turns into its own keys. If that is not smaller than the
dump file, or planning fails, the dump file is sent instead: logged with its reason and
counted (``CatchUpStats.full_dumps``, ``/metrics``).

A transfer can be cut off (the follower stalls, the leader's connection times out, PySyncObj
cancels the transmission) or its container refused: a new transmission to the same follower
for the same dump sends the container again, up to ``MAX_TRANSFERS`` times, before giving up
for the dump file. Measured cliff this removes: a stalled follower once made the leader send
its whole 171 MB dump instead of a 1.0 MB container (scripts/bench-node on a busy machine).

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
from synapse.security.tls import PeerAccess

if TYPE_CHECKING:
    from synapse.state.processor import CommandProcessor

log = logging.getLogger("synapse.integrity")

MAGIC = b"SYNCATC2"  # v2: deletes named by (bucket, element hash)
_CHECK_TAG = b"SYNCATCM"
# Bytes of a tree digest or an element hash compared over the network. Four: a false match
# (a differing node or element taken for an equal one, about one chance in 2**32 each) makes
# the container miss its target digest; the follower then refuses it and, after
# MAX_TRANSFERS, gets the dump — rare, and never a wrong state. Eight cost twice the bytes:
# 5.2 MB of planning for a 1.0 MB container at 1M keys, 1% changed (scripts/bench-node).
SHORT = 4
MAX_TRANSFERS = 3  # sends of one container to one follower before the dump file is sent
_PLAN_TIMEOUT = 30.0
_API_WAIT = 10.0


class CatchUpError(ValueError):
    pass


def _check(data: bytes) -> bytes:
    return blake3.blake3(_CHECK_TAG + data).digest()[:16]


def encode_container(meta: dict, puts: list[tuple[bytes, bytes]], deletes: list[tuple[int, bytes]]) -> bytes:
    """``deletes``: (bucket, short element hash) of each element the follower must drop."""
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
    try:
        doc = msgpack.unpackb(body, raw=False)
    except Exception as e:  # msgpack raises several types for bad input
        raise CatchUpError(f"{path}: the catch-up container is not msgpack ({type(e).__name__})") from None
    problem = _malformed(doc)
    if problem:
        raise CatchUpError(f"{path}: the catch-up container is malformed: {problem}")
    return doc


def _malformed(doc: Any) -> str | None:
    """What is wrong with a container's structure (None: nothing). The checksum only proves
    the bytes arrived as sent, not that the sender built them right."""
    if not isinstance(doc, dict) or {"meta", "puts", "deletes"} - set(doc):
        return "expected a map with meta, puts and deletes"
    meta = doc["meta"]
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), bytes) for k in ("base", "target")):
        return "meta needs the base and target digests"
    if not isinstance(meta.get("index"), int) or not isinstance(meta.get("cluster"), list) \
            or not all(isinstance(a, str) for a in meta["cluster"]):
        return "meta needs the log index and the cluster's addresses"
    for name in ("last", "prev"):
        entry = meta.get(name)
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], bytes)
                and all(isinstance(x, int) for x in entry[1:])):
            return f"meta.{name} is not a Raft entry"
    if not isinstance(doc["puts"], list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, bytes) for x in p) for p in doc["puts"]):
        return "puts must be [key, value] byte pairs"
    if not isinstance(doc["deletes"], list) or not all(
            isinstance(d, list) and len(d) == 2 and isinstance(d[0], int) and not isinstance(d[0], bool)
            and 0 <= d[0] < _core.BUCKETS and isinstance(d[1], bytes) for d in doc["deletes"]):
        return f"deletes must be [bucket (0 to {_core.BUCKETS - 1}), element hash] pairs"
    return None


def apply_container(store: _core.StateStore, doc: dict) -> int:
    """Applies the container's changes to ``store`` atomically (the caller holds the state
    lock); returns the number of changes. CatchUpError, changing nothing, if the store is
    not the state it was built against or the result is not the dump's state. A store that
    is already at the dump's state (a container received twice) is left as it is."""
    meta = doc["meta"]
    if store.digest() == meta["target"]:
        return 0
    if store.digest() != meta["base"]:
        raise CatchUpError(
            f"this node's state is {store.hexdigest()[:16]}, not the {meta['base'].hex()[:16]} the catch-up was built against"
        )
    # A changed key's old element is among the deletes too: its put replaces it instead.
    puts = {k: v for k, v in doc["puts"]}
    ops = [(k, None) for k in _keys_of(store, doc["deletes"]) if k not in puts] + list(puts.items())
    undo = [(k, store.get(k)) for k, _ in ops]
    store.apply(ops)
    if store.digest() != meta["target"]:
        store.apply(undo)
        raise CatchUpError("the catch-up does not reach the leader's dump digest; nothing was changed")
    return len(ops)


def element_shorts(state: _core.StateStore | _core.FrozenState, buckets: list[int]) -> list[bytes]:
    """Follower side: for each bucket, in order, the short hashes of its elements, concatenated."""
    per_bucket: dict[int, list[bytes]] = {b: [] for b in buckets}
    for key, element in state.bucket_element_hashes(buckets):
        per_bucket[_core.StateStore.bucket_of(key)].append(element[:SHORT])
    return [b"".join(per_bucket[b]) for b in buckets]


def changes_to(target: _core.StateStore, theirs: dict[int, bytes]) -> tuple[list[tuple[bytes, bytes]], list[tuple[int, bytes]]]:
    """Leader side: the puts and the deletes (bucket, short element hash) that take a state
    whose differing buckets hold the elements ``theirs`` (``element_shorts``) to ``target``."""
    their = {b: {packed[i : i + SHORT] for i in range(0, len(packed), SHORT)} for b, packed in theirs.items()}
    ours: dict[int, set[bytes]] = {}
    keys = []
    for key, element in target.bucket_element_hashes(list(their)):
        bucket, short = _core.StateStore.bucket_of(key), element[:SHORT]
        ours.setdefault(bucket, set()).add(short)
        if short not in their[bucket]:
            keys.append(key)
    deletes = [(b, h) for b, hashes in their.items() for h in sorted(hashes - ours.get(b, set()))]
    return list(zip(keys, target.get_many(keys))), deletes


def _keys_of(store: _core.StateStore, deletes: list) -> list[bytes]:
    """This store's keys of the elements named by (bucket, short element hash)."""
    wanted: dict[int, set[bytes]] = {}
    for bucket, short in deletes:
        wanted.setdefault(bucket, set()).add(bytes(short))
    keys = []
    for key, element in store.bucket_element_hashes(sorted(wanted)):
        if element[:SHORT] in wanted.get(_core.StateStore.bucket_of(key), ()):
            keys.append(key)
    return keys


@dataclass
class _Plan:
    dump_index: int
    state: str = "preparing"  # preparing | ready (send the container) | full (send the dump file)
    container: bytes | None = None
    transfers: int = 0  # times the container was sent
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
    full_dumps: dict = field(default_factory=dict)  # why the dump was sent instead: reason -> count
    containers_received: int = 0
    container_bytes_received: int = 0
    last: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CatchUpPlanner:
    """Leader side; ``payload_for`` is called on the tick thread, planning runs on the loop."""

    def __init__(self, node_id: str, read: Callable[[Callable[["CommandProcessor"], Any]], Any], peers: PeerAccess) -> None:
        """``read(fn)``: ``fn(processor)`` on the applied state (the registered nodes' API
        addresses); ``token`` authenticates this node to the follower."""
        self._node_id = node_id
        self._read = read
        self._peers = peers  # this node's own token (never the root token), TLS when served
        self._loop = asyncio.get_running_loop()  # made by the node on its loop
        self._lock = threading.Lock()
        self._plans: dict[str, _Plan] = {}
        self._tasks = TaskGroup(self._loop)
        self.stats = CatchUpStats()

    def payload_for(self, raft_addr: str, dump_path: Path):
        """PLAN_PENDING (send nothing yet), a container (bytes) to send, or None (the file).
        Called when PySyncObj starts a transmission to ``raft_addr`` (tick thread)."""
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
                self._give_up(plan, raft_addr, f"planning took over {_PLAN_TIMEOUT:g} s")
            elif plan.state == "ready" and plan.transfers >= MAX_TRANSFERS:
                self._give_up(plan, raft_addr, f"the container was not installed after {plan.transfers} transfers")
            if plan.state == "ready":
                # Sent before and asked for again: the transfer was cut off (the follower
                # stalled, the connection timed out) or the follower refused the container.
                if plan.transfers:
                    log.warning("node %s: catch-up of %s at dump index %d: sending the container again "
                                "(transfer %d of %d; the last one did not take)", self._node_id, raft_addr, at,
                                plan.transfers + 1, MAX_TRANSFERS)
                plan.transfers += 1
                self.stats.containers_sent += 1
                self.stats.container_bytes_sent += len(plan.container)
                self.stats.last = dict(plan.detail, follower=raft_addr, dump_index=at, transfers=plan.transfers)
                return plan.container
            state = plan.state
        if start:
            try:
                self._loop.call_soon_threadsafe(self._start, raft_addr, dump_path, dump_size, plan)
            except RuntimeError:
                return None
            return PLAN_PENDING
        return PLAN_PENDING if state == "preparing" else None

    def _give_up(self, plan: _Plan, raft_addr: str, reason: str) -> None:
        """The dump file goes to the follower instead of a container (under the lock)."""
        plan.state = "full"
        self.stats.full_dumps_sent += 1
        key = reason.split(":")[0]
        self.stats.full_dumps[key] = self.stats.full_dumps.get(key, 0) + 1
        log.warning("node %s: catch-up of %s at dump index %d: sending the whole dump: %s",
                    self._node_id, raft_addr, plan.dump_index, reason)

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
                    self._give_up(plan, raft_addr, f"the diff is not smaller: {len(container)} bytes for a "
                                  f"{dump_size}-byte dump")
            log.info("node %s: catch-up of %s planned: %s", self._node_id, raft_addr, detail)
        except Exception as e:  # anything: the follower gets the dump file instead
            with self._lock:
                self._give_up(plan, raft_addr, f"planning failed: {type(e).__name__}: {e}")

    async def _build(self, raft_addr: str, dump_path: Path) -> tuple[bytes, dict]:
        members = self._read(lambda p: p.nodes())
        api = next((m["api"] for m in members.values() if m["raft"] == raft_addr), None)
        if api is None:
            raise CatchUpError(f"no registered node has Raft address {raft_addr}")
        loop = asyncio.get_running_loop()
        dump = await loop.run_in_executor(None, read_dump, dump_path)
        base = self._peers.url(api)
        stats = self.stats
        async with self._peers.session(timeout=_PLAN_TIMEOUT) as http:

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
                # Down the tree where it differs (level 0 is the root): 4 rounds, each asking only
                # for the children of the nodes that differed in the round before.
                frontier = [] if status["digest"] == dump.store.digest() else [0]
                for level in range(_core.TREE_DEPTH):
                    if not frontier:
                        break
                    theirs = await call("POST", f"/v1/internal/catchup/{sid}/children", {"level": level, "parents": frontier})
                    mine = dump.store.children_digests(level, frontier)
                    children = [p * _core.FANOUT + c for p in frontier for c in range(_core.FANOUT)]
                    frontier = [b for i, b in enumerate(children)
                                if mine[i * 32 : i * 32 + SHORT] != theirs[i * SHORT : (i + 1) * SHORT]]
                buckets = frontier
                their_elements: dict[int, bytes] = {}
                for start in range(0, len(buckets), 8192):
                    chunk = buckets[start : start + 8192]
                    rows = msgpack.unpackb(await call("POST", f"/v1/internal/catchup/{sid}/elements", {"buckets": chunk}))
                    their_elements.update(zip(chunk, rows))
            finally:
                await call("DELETE", f"/v1/internal/catchup/{sid}")
        puts, deletes = changes_to(dump.store, their_elements)
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
