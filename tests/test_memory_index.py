"""The memory index's reconcile against a real embedded Chroma: it checks that the vector index
finds every record by its own vector, and adds again one it lacks (Chroma 1.5.9, reopened,
sometimes lacks a record its metadata holds: synapse/memory/DESIGN.md, "Measured cliffs")."""

from __future__ import annotations

import struct

import pytest

from synapse.memory.index import VERIFY_K, VERIFY_REPAIRS, ChromaBackend, IndexUnavailable, MemoryIndex
from synapse.state import keys, memory
from synapse.state.memory import MemoryRecord

NS = "agents/a1"
DIM = 8


def vector(i: int) -> bytes:
    # Distinct directions: one axis each, plus a little of the next.
    values = [0.0] * DIM
    values[i % DIM], values[(i + 1) % DIM] = 1.0, 0.1 * (1 + i // DIM)
    return struct.pack(f"<{DIM}f", *values)


def record(i: int, vec: bytes | None = None, mod_index: int | None = None) -> MemoryRecord:
    text = f"text {i}"
    return MemoryRecord(NS, f"r{i:03}", text, b"", vec or vector(i), memory.content_hash(text), 1, 1, 0, i + 1,
                        mod_index or i + 1)


class State:
    """What the index reads of the applied state: one namespace's records."""

    def __init__(self, records: list[MemoryRecord]) -> None:
        self.records = {r.id: r for r in records}

    def memory_namespaces(self):
        return [(NS, {"model": "external:unnamed", "dim": DIM, "count": len(self.records)})]

    def memory_namespace(self, ns):
        return self.memory_namespaces()[0][1] if ns == NS and self.records else None

    def memory_scan_rows(self, ns, prefix, limit, after):
        ids = sorted(i for i in self.records if after is None or i > after)[:limit]
        return [(memory.record_key(ns, i), memory.encode_record(self.records[i], keys.pack)) for i in ids]


class LosingCollection:
    """A Chroma collection whose vector search lacks the ids in ``lost`` (its metadata keeps
    them) — as the reopened embedded index sometimes does — until they are deleted and added
    again, unless ``for_good``."""

    def __init__(self, col, lost: set[str], for_good: bool = False) -> None:
        self._col, self.lost, self.for_good = col, set(lost), for_good
        self.deleted: list[str] = []

    def __getattr__(self, name):
        return getattr(self._col, name)

    def delete(self, ids):
        self.deleted += ids
        if not self.for_good:
            self.lost -= set(ids)
        return self._col.delete(ids=ids)

    def query(self, query_embeddings, n_results, include):
        found = self._col.query(query_embeddings=query_embeddings, n_results=n_results + len(self.lost),
                                include=include)
        for row, ids in enumerate(found["ids"]):
            keep = [j for j, i in enumerate(ids) if i not in self.lost][:n_results]
            for field in ("ids", "distances"):
                found[field][row] = [found[field][row][j] for j in keep]
        return found


def make_index(tmp_path, state: State, lost: set[str], for_good: bool = False):
    """An index over a Chroma directory an earlier process (another client) filled with the
    state's records: what a node finds at start."""
    earlier = MemoryIndex(ChromaBackend("chroma", tmp_path, "n1"), lambda fn: fn(state))
    earlier._reconcile_now()
    earlier.stop()
    backend = ChromaBackend("chroma", tmp_path, "n1")
    index = MemoryIndex(backend, lambda fn: fn(state))
    wrapped: dict[str, LosingCollection] = {}
    collection = backend.collection

    def losing(ns, model, dim, create):
        col = collection(ns, model, dim, create)
        if col is not None and ns not in wrapped:
            wrapped[ns] = LosingCollection(col, lost, for_good)
        return wrapped.get(ns, col)

    backend.collection = losing
    return index, wrapped


def test_a_record_the_vector_index_lacks_is_added_again_by_the_reconcile(tmp_path):
    state = State([record(i) for i in range(40)])
    index, wrapped = make_index(tmp_path, state, lost={"r007", "r023"})
    index._reconcile_now()
    col = wrapped[NS]
    assert sorted(col.deleted) == ["r007", "r023"] and index.repaired == 2
    for i in (7, 23, 5):
        found = col.query(query_embeddings=[memory_vector(i)], n_results=1, include=["distances"])
        assert found["ids"] == [[f"r{i:03}"]]
    # Verified once per Chroma client: a reconcile in the same one (a long backlog) does not
    # query every record again; one after a new client (a server's failure) does.
    col.lost.add("r011")
    index._reconcile_now()
    assert index.repaired == 2 and sorted(col.deleted) == ["r007", "r023"]
    index.backend._client = None
    index.backend._collections.clear()  # as forget() does for a server
    index._reconcile_now()
    assert index.repaired == 3 and col.deleted[-1] == "r011" and index.backend.opens == 2
    index.stop()


def test_a_record_that_stays_missing_fails_the_reconcile_by_name(tmp_path):
    index, _ = make_index(tmp_path, State([record(i) for i in range(10)]), lost={"r004"}, for_good=True)
    with pytest.raises(IndexUnavailable, match=f"'r004'.*after {VERIFY_REPAIRS} repairs"):
        index._reconcile_now()
    index.stop()


def test_records_sharing_one_vector_are_not_taken_for_missing(tmp_path):
    twins = [record(i, vec=vector(0)) for i in range(VERIFY_K + 2)]
    index, wrapped = make_index(tmp_path, State(twins + [record(i) for i in range(10, 20)]), lost=set())
    index._reconcile_now()
    assert index.repaired == 0 and wrapped[NS].deleted == []
    index.stop()


def test_a_record_just_written_is_checked_and_added_again_if_missing(tmp_path):
    # A deleted index directory rebuilt at start: the reconcile's own writes are checked as
    # they are written (a live index has lacked a record just written, too).
    state = State([record(i) for i in range(10)])
    backend = ChromaBackend("chroma", tmp_path, "n1")
    index = MemoryIndex(backend, lambda fn: fn(state))
    collection, wrapped = backend.collection, {}

    def losing(ns, model, dim, create):
        return wrapped.setdefault(ns, LosingCollection(collection(ns, model, dim, create), {"r003"}))

    backend.collection = losing
    index._reconcile_now()
    assert index.repaired == 1 and wrapped[NS].deleted == ["r003"] and wrapped[NS].lost == set()
    index.stop()


def test_a_record_changed_after_the_reconcile_read_it_is_left_to_the_writer(tmp_path):
    state = State([record(i) for i in range(10)])
    index, wrapped = make_index(tmp_path, state, lost=set())
    scan = state.memory_scan_rows
    calls = []

    def changing(ns, prefix, limit, after):
        calls.append(after)
        if len(calls) == 3:  # the verification's first page: r003 changed meanwhile, not indexed yet
            state.records["r003"] = record(3, vec=vector(5), mod_index=99)
        return scan(ns, prefix, limit, after)

    state.memory_scan_rows = changing
    index._reconcile_now()
    assert index.repaired == 0 and wrapped[NS].deleted == []
    index.stop()


def memory_vector(i: int) -> list[float]:
    return list(struct.unpack(f"<{DIM}f", vector(i)))
