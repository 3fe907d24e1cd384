"""The memory index: ChromaDB as a derived view of the replicated memory records.

The records in the state are the truth; Chroma only answers "which ids are nearest this
vector". The index follows the applied changes (handed over from PySyncObj's tick thread, like
the storage view's materializer), and is *reconciled* against the state — every record's
``mod_index`` compared with what Chroma holds, differences written, strays deleted — at start,
after a rollback, a dump or catch-up install, a repair, and whenever the backlog grows past
``MAX_BACKLOG`` changes. Writes are upserts keyed by record id carrying the record's log
index, so applying a change twice, or a change the reconcile already covered, is harmless.

All Chroma calls run on one writer thread (writes stay in log order) and a small query pool;
Chroma is opened only once there is something to index or to query, so a node that holds no
memories never pays its import (~0.8 s, ~80 MB).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synapse.memory.libraries import load
from synapse.memory.query_batch import QueryBatcher
from synapse.state import keys, memory
from synapse.state.memory import MemoryChange, MemoryRecord

log = logging.getLogger(__name__)

MAX_BACKLOG = 20_000  # queued changes beyond this are dropped for a reconcile (bounded memory)
WRITE_BATCH = 1_000  # records per Chroma upsert
RECONCILE_PAGE = 2_000  # state records read per page while reconciling
INDEX_KEY = "_i"  # Chroma metadata: the log index of the record version indexed
START_WAIT_S = 120.0  # the first reconcile waits at most this long for the start's log replay
QUERY_WORKERS = 2  # Chroma calls answering recalls at once (each a batch: query_batch.py)
VERIFY_EVERY_S = 30.0  # while idle, the index's counts are compared with the state's this often
VERIFY_PAGE = 500  # records per query while a reconcile checks the vector index finds each one
VERIFY_K = 4  # neighbours asked per record checked
VERIFY_REPAIRS = 3  # re-adds of records the vector index lacks before the reconcile fails


class IndexUnavailable(RuntimeError):
    """The memory index cannot be opened or used (Chroma missing, server unreachable...)."""


def collection_name(ns: str) -> str:
    # Chroma names allow 3-512 characters of [a-zA-Z0-9._-]; namespaces have '/'.
    return "m" + hashlib.blake2b(ns.encode(), digest_size=16).hexdigest()


def _metadata(record: MemoryRecord) -> dict[str, Any]:
    meta = json.loads(record.meta) if record.meta else {}
    meta[INDEX_KEY] = record.mod_index
    return meta


def _vector(record: MemoryRecord):
    return load("numpy").frombuffer(record.vec, dtype="<f4")


def _add(col, records: list[MemoryRecord]) -> None:
    col.upsert(ids=[r.id for r in records], embeddings=load("numpy").stack([_vector(r) for r in records]),
               metadatas=[_metadata(r) for r in records])


class ChromaBackend:
    """One Chroma database for this node: embedded (``PersistentClient`` on a directory only
    this process opens — two processes on one path corrupted it) or a Chroma server
    (``HttpClient``; one database per node, so the nodes' views stay apart)."""

    def __init__(self, spec: str, data_dir: Path, node_id: str) -> None:
        self.spec, self._data_dir, self._node_id = spec, data_dir, node_id
        self._client = None
        self.opens = 0  # clients made: each one loads Chroma's files afresh
        self._collections: dict[str, Any] = {}
        self._lock = threading.Lock()

    def may_hold_data(self) -> bool:
        """False only when nothing was ever indexed here (no embedded index directory)."""
        return self.spec != "chroma" or (self._data_dir / "memory-index").exists()

    def describe(self) -> str:
        return f"chroma ({self.spec})"

    @property
    def opened(self) -> bool:
        return self._client is not None

    def client(self):
        # Under self._lock (collection, drop, drop_others).
        if self._client is None:
            self._client = self._open()
            self.opens += 1
        return self._client

    def _open(self):
        try:
            chromadb = load("chromadb")
            Settings = load("chromadb.config").Settings
        except ImportError as e:
            raise IndexUnavailable(f"chromadb is not installed ({e.name}); pip install chromadb==1.5.9") from None
        settings = Settings(anonymized_telemetry=False, allow_reset=False)
        try:
            if self.spec == "chroma":
                path = self._data_dir / "memory-index"
                path.mkdir(parents=True, exist_ok=True)
                return chromadb.PersistentClient(path=str(path), settings=settings)
            host, _, port = self.spec.removeprefix("chroma+http://").rstrip("/").rpartition(":")
            database = "synapse-" + self._node_id
            admin = chromadb.AdminClient(Settings(anonymized_telemetry=False, chroma_server_host=host,
                                                  chroma_server_http_port=int(port),
                                                  chroma_api_impl="chromadb.api.fastapi.FastAPI"))
            try:
                admin.get_database(database)
            except Exception:
                admin.create_database(database)
            return chromadb.HttpClient(host=host, port=int(port), database=database, settings=settings)
        except IndexUnavailable:
            raise
        except Exception as e:
            raise IndexUnavailable(f"the memory index {self.spec} cannot be opened: {type(e).__name__}: {e}") from None

    def collection(self, ns: str, model: str, dim: int, create: bool):
        """The namespace's collection for vectors of ``model``; one holding another model's
        vectors (left by a namespace emptied and refilled) is dropped first. None if absent
        and not ``create``."""
        with self._lock:
            return self._collection(ns, model, dim, create)

    def _collection(self, ns: str, model: str, dim: int, create: bool):
        name = collection_name(ns)
        col = self._collections.get(name)
        if col is not None and col.metadata.get("model") == model and col.metadata.get("dim") == dim:
            return col
        client = self.client()
        try:
            col = client.get_collection(name)
        except Exception:  # NotFoundError (its class moved between Chroma versions)
            col = None
        if col is not None and (col.metadata.get("model") != model or col.metadata.get("dim") != dim):
            client.delete_collection(name)
            col = None
        if col is None:
            if not create:
                return None
            col = client.create_collection(name, embedding_function=None,
                                           configuration={"hnsw": {"space": "cosine"}},
                                           metadata={"namespace": ns, "model": model, "dim": dim})
        self._collections[name] = col
        return col

    def drop_others(self, keep: set[str]) -> None:
        """Deletes the collections of namespaces that no longer hold records."""
        with self._lock:
            client = self.client()
            for col in client.list_collections():
                name = col if isinstance(col, str) else col.name
                if name.startswith("m") and name not in keep:
                    client.delete_collection(name)
                    self._collections.pop(name, None)

    def forget(self) -> None:
        """After a failure: the client and collection handles are made again at next use (a
        Chroma server that restarted empty has lost this node's database too)."""
        with self._lock:
            self._collections.clear()
            if self.spec != "chroma":
                self._client = None

    def drop(self, ns: str) -> None:
        name = collection_name(ns)
        with self._lock:
            self._collections.pop(name, None)
            try:
                self.client().delete_collection(name)
            except Exception:  # NotFoundError: nothing to drop
                pass


class MemoryIndex:
    """Follows the applied memory changes into Chroma and answers nearest-neighbour queries."""

    def __init__(self, backend: ChromaBackend, read: Callable[[Callable], Any],
                 catching_up: Callable[[], str | None] = lambda: None) -> None:
        self.backend = backend
        self._read = read  # fn(processor) on the applied state (Cluster.read)
        # Why the node has not applied all it knows of yet (Cluster.catching_up): the first
        # reconcile waits for the log replayed at start.
        self._catching_up = catching_up
        self._lock = threading.Lock()  # shared with the tick thread
        self._pending: collections.deque[MemoryChange] = collections.deque()
        self._reconcile = True  # at start: Chroma may be behind the state, or gone
        self._queued_upto = 0  # the last log index handed over (changes or a reconcile)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_scheduled = False
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memory-index")
        self._queries = concurrent.futures.ThreadPoolExecutor(QUERY_WORKERS, thread_name_prefix="memory-query")
        self.recall_batches = QueryBatcher(self._query_batch, self._queries, QUERY_WORKERS)
        # Event-loop side.
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self.indexed_upto = 0  # every change up to this log index is in Chroma
        self.last_error: str | None = None
        self.reconciles = 0
        self.repaired = 0  # records a reconcile found missing from the vector index and added again
        self._verified_opens = 0  # backend.opens when a reconcile last verified the whole vector index
        # The index holds the whole state as of indexed_upto: False until the first reconcile
        # (at start) and again from a failure or a damage found until the next reconcile.
        self._whole = False
        self._stopping = False

    # --- the tick thread: hand over, never block or raise -----------------------------------

    def submit(self, index: int, changes: tuple[MemoryChange, ...]) -> None:
        with self._lock:
            if not self._reconcile:
                self._pending.extend(changes)
                if len(self._pending) > MAX_BACKLOG:
                    self._pending.clear()
                    self._reconcile = True
            self._queued_upto = max(self._queued_upto, index)
            self._wake_locked()

    def resync(self, index: int) -> None:
        """The state was replaced or repaired at ``index``: reconcile against it."""
        with self._lock:
            self._pending.clear()  # the reconcile covers them
            self._reconcile = True
            self._queued_upto = max(self._queued_upto, index)
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._loop is not None and not self._wake_scheduled:
            self._wake_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop closed: the node is stopping; the next start reconciles
                pass

    # --- the event loop ---------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = loop
        # At start the log replays while this runs: a reconcile against a half-replayed state
        # deleted, as strays, the records not replayed yet, and the replay then put them all
        # back (a 100K-memory node: ~22% of its start). Wait for the replay (bounded: a node
        # that finds no leader still gets its index).
        deadline = loop.time() + START_WAIT_S
        while self._catching_up() is not None and loop.time() < deadline and not self._stopping:
            await asyncio.sleep(0.1)
        delay = 0.1
        while not self._stopping:
            with self._lock:
                self._wake_scheduled = False
                reconcile, self._reconcile = self._reconcile, False
                changes = list(self._pending)
                self._pending.clear()
                upto = self._queued_upto
            try:
                if reconcile:
                    await loop.run_in_executor(self._writer, self._reconcile_now)
                    self.reconciles += 1
                elif changes:
                    await loop.run_in_executor(self._writer, self._write, changes)
            except Exception as e:
                self.backend.forget()  # handles to collections of a server that may have restarted
                self._whole = False
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("memory index: %s failed (%s); reconciling in %.1f s",
                            "reconcile" if reconcile else "write", self.last_error, delay)
                with self._lock:
                    self._reconcile = True  # what failed is rebuilt from the state
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay, self.last_error = 0.1, None
            async with self._progress:
                self.indexed_upto = max(self.indexed_upto, upto)
                self._whole = True
                self._progress.notify_all()
            with self._lock:
                idle = not self._pending and not self._reconcile and self._queued_upto == upto
            if idle:
                try:
                    await asyncio.wait_for(self._wake.wait(), VERIFY_EVERY_S)
                except asyncio.TimeoutError:
                    # Idle: check the index still holds what the state says (a Chroma server
                    # may have come back empty). A count per namespace: cheap.
                    try:
                        whole = await loop.run_in_executor(self._writer, self._counts_agree)
                    except Exception:
                        whole = False
                    if not whole:
                        self._damaged()
                self._wake.clear()

    @property
    def whole(self) -> bool:
        """Whether the index holds the whole state as of ``indexed_upto``."""
        return self._whole

    async def wait_for(self, index: int, timeout: float) -> None:
        """Returns once every change up to log ``index`` this node applied is indexed."""
        async def indexed() -> None:
            async with self._progress:
                while not self._whole or self.indexed_upto < min(index, self._queued_upto):
                    await self._progress.wait()
        try:
            await asyncio.wait_for(indexed(), timeout)
        except asyncio.TimeoutError:
            reason = f" (last error: {self.last_error})" if self.last_error else ""
            raise IndexUnavailable(f"the memory index did not catch up with log index {index} within "
                                   f"{timeout:g} s{reason}; retry, or read with consistency=stale") from None

    async def query(self, ns: str, model: str, dim: int, vector: bytes, k: int, where: dict | None,
                    timeout: float) -> list[tuple[str, float]]:
        """[(id, cosine distance)] of the ``k`` nearest records, nearest first. Concurrent
        queries with the same namespace, k and filter share one Chroma call (query_batch.py)."""
        key = (ns, model, dim, k, json.dumps(where, sort_keys=True) if where else None)
        try:
            return await asyncio.wait_for(self.recall_batches.ask(key, vector), timeout)
        except asyncio.TimeoutError:
            raise IndexUnavailable(f"the memory index ({self.backend.describe()}) did not answer within "
                                   f"{timeout:g} s; retry") from None

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._writer.shutdown(wait=True)
        self._queries.shutdown(wait=True)

    # --- Chroma calls (writer thread / query pool) ---

    def _query_batch(self, key, vectors: list[bytes]) -> list[list[tuple[str, float]]]:
        ns, model, dim, k, where = key
        try:
            col = self.backend.collection(ns, model, dim, create=False)
            if col is not None:
                np = load("numpy")
                found = col.query(query_embeddings=[np.frombuffer(v, dtype="<f4") for v in vectors], n_results=k,
                                  where=None if where is None else json.loads(where), include=["distances"])
                return [list(zip(ids, distances)) for ids, distances in zip(found["ids"], found["distances"])]
        except Exception as e:  # the where filter was checked before: this is the index failing
            self._damaged()
            raise IndexUnavailable(f"the memory index ({self.backend.describe()}) cannot answer: "
                                   f"{type(e).__name__}: {e}; it is being rebuilt from the state, retry") from None
        # The namespace holds records (the caller read it from the state) but the index has no
        # collection for it. Behind the state (a stale read of a namespace just made, or
        # writes that came after a linearizable read's barrier), that is nothing yet; caught
        # up, the index lost it (a Chroma server that came back empty).
        with self._lock:
            behind = bool(self._pending) or self._reconcile or self.indexed_upto < self._queued_upto
        if behind or not self._whole:
            return [[] for _ in vectors]
        self._damaged()
        raise IndexUnavailable(f"the memory index ({self.backend.describe()}) lost namespace {ns!r}; it is being "
                               "rebuilt from the state, retry shortly")

    def _damaged(self) -> None:
        """Any thread: the index is not what the state says; reconcile it."""
        with self._lock:
            self._whole = False
            self._reconcile = True
            self._wake_locked()

    def _write(self, changes: list[MemoryChange]) -> None:
        last: dict[tuple[str, str], MemoryChange] = {}
        for change in changes:  # the last change of a record wins
            last.pop((change.ns, change.id), None)
            last[(change.ns, change.id)] = change
        by_ns: dict[str, list[MemoryChange]] = collections.defaultdict(list)
        for change in last.values():
            by_ns[change.ns].append(change)
        for ns, group in by_ns.items():
            space = self._read(lambda p: p.memory_namespace(ns))
            if space is None:
                # The namespace holds no records now (removed by these changes or later ones,
                # which are queued): its collection goes with them.
                self.backend.drop(ns)
                continue
            col = self.backend.collection(ns, space["model"], space["dim"], create=True)
            # A record of the namespace's earlier life (another model) is no longer in it.
            upserts = [c.record for c in group if c.record is not None and len(c.record.vec) == 4 * space["dim"]]
            removals = [c.id for c in group if c.record is None]
            if removals:
                col.delete(ids=removals)
            for start in range(0, len(upserts), WRITE_BATCH):
                self._upsert(col, upserts[start:start + WRITE_BATCH])

    def _upsert(self, col, records: list[MemoryRecord]) -> None:
        """Writes ``records``, then checks the vector index finds each by its own vector: Chroma
        1.5.9's index has lacked a record just written by a live process, as well as one
        loaded from its files (DESIGN.md, "Measured cliffs")."""
        _add(col, records)
        self._repair(col, self._unfound(col, records))

    def _repair(self, col, missing: list[MemoryRecord]) -> None:
        """Deletes and adds again the records the vector index lacks, until it finds them."""
        for _ in range(VERIFY_REPAIRS):
            if not missing:
                return
            log.warning("memory index: %d record(s) of namespace %r missing from the vector index (e.g. %r); "
                        "adding them again", len(missing), missing[0].ns, missing[0].id)
            self.repaired += len(missing)
            col.delete(ids=[r.id for r in missing])
            _add(col, missing)
            missing = self._unfound(col, missing)
        if missing:
            raise IndexUnavailable(f"{len(missing)} record(s) of namespace {missing[0].ns!r} (e.g. {missing[0].id!r}) "
                                   f"are still missing from the vector index after {VERIFY_REPAIRS} repairs")

    def _reconcile_now(self) -> None:
        """Makes Chroma hold exactly the state's records (each at its ``mod_index``)."""
        spaces = self._spaces()
        if not spaces and not self.backend.opened and not self.backend.may_hold_data():
            return  # nothing to index, nothing indexed: do not open Chroma at all
        live = set()
        for ns, space in spaces:
            live.add(collection_name(ns))
            col = self.backend.collection(ns, space["model"], space["dim"], create=True)
            held = self._held(col)
            seen, stale, after = set(), [], None
            # id -> mod_index of the records Chroma held from before it was opened (the ones it
            # loaded from its files); what this reconcile writes is not in doubt.
            loaded: dict[str, int] = {}
            while True:
                rows = self._read(lambda p: p.memory_scan_rows(ns, "", RECONCILE_PAGE, after))
                if not rows:
                    break
                for key, raw in rows:
                    _, record_id = memory.split_record_key(key)
                    record = memory.decode_record(ns, record_id, raw, keys.unpack)
                    seen.add(record_id)
                    if held.get(record_id) == record.mod_index:
                        loaded[record_id] = record.mod_index
                    else:
                        stale.append(record)
                        if len(stale) >= WRITE_BATCH:
                            self._upsert(col, stale)
                            stale = []
                after = memory.split_record_key(rows[-1][0])[1]
            if stale:
                self._upsert(col, stale)
            strays = [i for i in held if i not in seen]
            for start in range(0, len(strays), WRITE_BATCH):
                col.delete(ids=strays[start:start + WRITE_BATCH])
            if self.backend.opens != self._verified_opens:
                self._verify(ns, col, loaded)
        self.backend.drop_others(live)
        self._verified_opens = self.backend.opens

    def _verify(self, ns: str, col, loaded: dict[str, int]) -> None:
        """Every record of ``ns`` Chroma loaded from its files (``loaded``: id -> mod_index; a
        record changed since is the writer's next job) is found by its own vector; one the
        vector index lacks is deleted and added again. Chroma 1.5.9's embedded index, reopened,
        sometimes lacks a record its metadata holds — no query finds it, whatever k or filter
        (DESIGN.md, "Measured cliffs") — and the id comparison above cannot see that. Once
        per Chroma client made (at start; with a server, again after a failure): a reconcile
        for a long backlog, in the same client, would pay a query per record for nothing."""
        if not loaded:
            return
        after, missing = None, []
        while True:
            rows = self._read(lambda p: p.memory_scan_rows(ns, "", VERIFY_PAGE, after))
            if not rows:
                break
            records = [memory.decode_record(ns, memory.split_record_key(key)[1], raw, keys.unpack) for key, raw in rows]
            missing += self._unfound(col, [r for r in records if loaded.get(r.id) == r.mod_index])
            after = memory.split_record_key(rows[-1][0])[1]
        self._repair(col, missing)

    @staticmethod
    def _unfound(col, records: list[MemoryRecord]) -> list[MemoryRecord]:
        """The records a query by their own vector does not find. Records sharing one vector
        can crowd each other out of the k nearest: all k at distance ~0 counts as found."""
        if not records:
            return []
        np = load("numpy")
        found = col.query(query_embeddings=np.stack([_vector(r) for r in records]), n_results=VERIFY_K,
                          include=["distances"])
        return [r for r, ids, distances in zip(records, found["ids"], found["distances"])
                if r.id not in ids and not (len(ids) == VERIFY_K and distances[-1] <= 1e-6)]

    def _spaces(self) -> list[tuple[str, dict]]:
        """[(namespace, {"model", "dim", "count"})] of every namespace holding records."""
        return self._read(lambda p: p.memory_namespaces())

    def _counts_agree(self) -> bool:
        if not self.backend.opened:
            return True  # nothing was ever indexed by this process; the start reconcile covered it
        spaces = self._spaces()
        for ns, space in spaces:
            col = self.backend.collection(ns, space["model"], space["dim"], create=False)
            if col is None or col.count() != space["count"]:
                return False
        return True

    @staticmethod
    def _held(col) -> dict[str, int]:
        """{id: indexed log index} of everything in the collection."""
        held, offset = {}, 0
        while True:
            page = col.get(include=["metadatas"], limit=10_000, offset=offset)
            for record_id, meta in zip(page["ids"], page["metadatas"]):
                held[record_id] = (meta or {}).get(INDEX_KEY, -1)
            if len(page["ids"]) < 10_000:
                return held
            offset += 10_000
