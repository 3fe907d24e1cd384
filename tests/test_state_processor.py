"""``CommandProcessor`` on the real Rust ``StateStore``, against synapse/state/DESIGN.md:
op semantics, versions, transactions, exactly-once request ids and their bounded table, the
kv change stream, one Rust batch per entry, and the never-raises / deterministic rules."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse._core import StateStore
from synapse.state import keys
from synapse.state.commands import CommandError, encode_entry, validate_command
from synapse.state.processor import DEDUP_CAPACITY, CommandProcessor, EntryOutcome, _EntryRun
from synapse.state.records import KvChange, KvRecord


class CountingStore:
    """The real store, counting calls to ``apply`` (and able to make it fail once)."""

    def __init__(self) -> None:
        self.inner = StateStore()
        self.applies: list[list[tuple[bytes, bytes | None]]] = []
        self.fail_next_apply = False

    def apply(self, ops):
        self.applies.append(list(ops))
        if self.fail_next_apply:
            self.fail_next_apply = False
            raise TypeError("injected failure")
        return self.inner.apply(ops)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def proc() -> CommandProcessor:
    return CommandProcessor(StateStore())


class Log:
    """Feeds entries at increasing log indexes."""

    def __init__(self, processor: CommandProcessor) -> None:
        self.processor = processor
        self.index = 0

    def entry(self, *commands) -> EntryOutcome:
        self.index += 1
        outcome = self.processor.apply_entry(self.index, encode_entry(commands))
        for result in outcome.results:  # results are stored in the state and sent over HTTP
            assert msgpack.unpackb(msgpack.packb(result, use_bin_type=True), raw=False) == result
        return outcome

    def one(self, command) -> dict:
        (result,) = self.entry(command).results
        return result


@pytest.fixture
def log(proc) -> Log:
    return Log(proc)


def put(key, value=b"1", **extra):
    return {"op": "put", "key": key, "value": value, **extra}


def delete(key, **extra):
    return {"op": "delete", "key": key, **extra}


def state_items(processor: CommandProcessor) -> list[tuple[bytes, bytes]]:
    """The state but the audit chain head (which every entry extends)."""
    return [(k, v) for k, v in processor.store.scan() if k != keys.CHAIN]


def drop_messages(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "message"}


# --- put / delete / versions ----------------------------------------------------------------------


def test_put_versions_and_indexes(log, proc):
    assert log.one(put("a", b'"x"')) == {"ok": True, "key": "a", "version": 1, "index": 1}
    assert proc.get("a") == KvRecord("a", b'"x"', 1, 1, 1)
    log.entry({"op": "noop"})
    assert log.one(put("a", b'"y"')) == {"ok": True, "key": "a", "version": 2, "index": 3}
    assert proc.get("a") == KvRecord("a", b'"y"', 2, 1, 3)
    assert proc.store.get(b"kv/a") == msgpack.packb([b'"y"', 2, 1, 3], use_bin_type=True)


def test_delete_removes_and_a_later_put_starts_again(log, proc):
    log.entry(put("a"), put("a"))
    assert log.one(delete("a")) == {"ok": True, "key": "a", "deleted": True, "index": 2}
    assert proc.get("a") is None and b"kv/a" not in proc.store
    assert log.one(delete("a")) == {"ok": True, "key": "a", "deleted": False, "index": 3}
    assert log.one(put("a")) == {"ok": True, "key": "a", "version": 1, "index": 4}
    assert proc.get("a") == KvRecord("a", b"1", 1, 4, 4)


def test_commands_in_one_entry_apply_in_order(log, proc):
    results = log.entry(put("a", b"1"), put("a", b"2", if_version=1), delete("a"), put("a", b"3")).results
    assert [r.get("version", r.get("deleted")) for r in results] == [1, 2, True, 1]
    assert all(r["index"] == 1 for r in results)
    assert proc.get("a") == KvRecord("a", b"3", 1, 1, 1)


def test_if_version(log, proc):
    assert log.one(put("a", if_version=0))["ok"]
    conflict = log.one(put("a", b"2", if_version=0))
    assert drop_messages(conflict) == {"ok": False, "error": "conflict", "key": "a", "current_version": 1}
    assert "if_version" in conflict["message"] and "retry" in conflict["message"]
    assert log.one(put("a", b"2", if_version=1))["version"] == 2
    assert log.one(put("a", b"3", if_version=1))["current_version"] == 2
    assert log.one(put("b", if_version=4))["current_version"] == 0
    assert log.one(delete("a", if_version=1))["error"] == "conflict"
    assert log.one(delete("b", if_version=0)) == {"ok": True, "key": "b", "deleted": False, "index": 7}
    assert log.one(delete("a", if_version=2))["deleted"] is True
    assert proc.get("a") is None and proc.get("b") is None


def test_a_conflict_changes_nothing(log, proc):
    log.one(put("a"))
    before = state_items(proc)
    outcome = log.entry(put("a", b"9", if_version=5))
    assert outcome.changes == [] and state_items(proc) == before


# --- transactions ---------------------------------------------------------------------------------


def test_txn_then_branch_sees_its_own_writes(log, proc):
    log.one(put("a", b"1"))
    result = log.one(
        {
            "op": "txn",
            "if": [{"key": "a", "version": 1}, {"key": "a", "value": b"1"}, {"key": "b", "exists": False}],
            "then": [
                {"op": "put", "key": "b", "value": b"2"},
                {"op": "get", "key": "b"},
                {"op": "put", "key": "b", "value": b"3"},
                {"op": "delete", "key": "a"},
                {"op": "get", "key": "a"},
                {"op": "delete", "key": "zz"},
            ],
            "else": [{"op": "put", "key": "never", "value": b"1"}],
        }
    )
    assert result == {
        "ok": True,
        "succeeded": True,
        "results": [
            {"op": "put", "key": "b", "version": 1},
            {"op": "get", "key": "b", "value": b"2", "version": 1},
            {"op": "put", "key": "b", "version": 2},
            {"op": "delete", "key": "a", "deleted": True},
            {"op": "get", "key": "a", "value": None, "version": 0},
            {"op": "delete", "key": "zz", "deleted": False},
        ],
        "index": 2,
    }
    assert proc.get("b") == KvRecord("b", b"3", 2, 2, 2) and proc.get("a") is None
    assert proc.get("never") is None


@pytest.mark.parametrize(
    "cond",
    [
        {"key": "a", "version": 2},
        {"key": "a", "version": 0},
        {"key": "a", "value": b"2"},
        {"key": "a", "value": b" 1"},  # byte-for-byte, not JSON equality
        {"key": "a", "exists": False},
        {"key": "missing", "exists": True},
        {"key": "missing", "value": b"null"},
        {"key": "missing", "version": 1},
    ],
)
def test_txn_else_branch_when_any_condition_fails(log, proc, cond):
    log.one(put("a", b"1"))
    result = log.one(
        {
            "op": "txn",
            "if": [{"key": "a", "exists": True}, cond],
            "then": [{"op": "put", "key": "a", "value": b"9"}],
            "else": [{"op": "get", "key": "a"}, {"op": "put", "key": "c", "value": b"7"}],
        }
    )
    assert result["ok"] and result["succeeded"] is False
    assert result["results"] == [
        {"op": "get", "key": "a", "value": b"1", "version": 1},
        {"op": "put", "key": "c", "version": 1},
    ]
    assert proc.get("a").value == b"1" and proc.get("c").value == b"7"


def test_txn_without_branches(log, proc):
    assert log.one({"op": "txn"}) == {"ok": True, "succeeded": True, "results": [], "index": 1}
    assert log.one({"op": "txn", "if": [{"key": "x", "exists": True}]})["succeeded"] is False
    assert state_items(proc) == []


# --- nodes and noop -------------------------------------------------------------------------------


def test_nodes(log, proc):
    assert log.one({"op": "noop"}) == {"ok": True, "index": 1}
    assert log.one({"op": "register_node", "node_id": "n2", "api": "h2:1", "raft": "h2:2"}) == {
        "ok": True,
        "index": 2,
    }
    log.one({"op": "register_node", "node_id": "n1", "api": "h1:1", "raft": "h1:2"})
    assert proc.nodes() == {
        "n1": {"api": "h1:1", "raft": "h1:2", "index": 3},
        "n2": {"api": "h2:1", "raft": "h2:2", "index": 2},
    }
    assert list(proc.nodes()) == ["n1", "n2"]
    log.one({"op": "register_node", "node_id": "n2", "api": "h9:1", "raft": "h9:2"})
    assert proc.nodes()["n2"] == {"api": "h9:1", "raft": "h9:2", "index": 4}
    assert log.one({"op": "unregister_node", "node_id": "n2"}) == {"ok": True, "index": 5}
    assert log.one({"op": "unregister_node", "node_id": "absent"}) == {"ok": True, "index": 6}
    assert list(proc.nodes()) == ["n1"]
    assert proc.get("n1") is None  # nodes are not kv keys


# --- exactly once ---------------------------------------------------------------------------------


def test_a_retry_returns_the_first_result_and_changes_nothing(log, proc):
    first = log.one(put("a", b"1", rid="r1"))
    log.one(put("a", b"2"))
    before = state_items(proc)
    outcome = log.entry(put("a", b"1", rid="r1"))
    assert outcome.results == [first] and first["index"] == 1
    assert outcome.changes == [] and state_items(proc) == before
    assert proc.get("a").value == b"2"
    # The rid, not the body, identifies the request.
    assert log.one({"op": "noop", "rid": "r1"}) == first
    assert log.one({"op": "bogus", "rid": "r1"}) == first


def test_a_retried_conflict_returns_the_same_conflict(log, proc):
    log.one(put("a"))
    conflict = log.one(put("a", b"2", if_version=0, rid="cas"))
    assert conflict["error"] == "conflict"
    log.one(delete("a"))  # now the condition would hold
    assert log.one(put("a", b"2", if_version=0, rid="cas")) == conflict
    assert proc.get("a") is None


def test_a_rid_twice_in_one_entry(log, proc):
    results = log.entry(put("a", b"1", rid="r"), put("a", b"2", rid="r"), put("a", b"3", rid="s")).results
    assert results[0] == results[1] == {"ok": True, "key": "a", "version": 1, "index": 1}
    assert results[2]["version"] == 2


def test_bad_and_internal_commands_are_not_recorded(log, proc):
    assert log.one(put("", rid="r"))["error"] == "bad_command"
    assert state_items(proc) == []
    assert log.one(put("a", rid="r"))["ok"]  # the fixed retry applies


def test_dedup_table_layout(log, proc):
    result = log.entry({"op": "noop", "rid": "b"}, {"op": "noop", "rid": "a"}).results[0]
    assert msgpack.unpackb(proc.store.get(b"rid/b"), raw=False) == [1, result]
    assert [k for k, _ in proc.store.scan_prefix(b"ridx/")] == [keys.ridx_key(1, "a"), keys.ridx_key(1, "b")]
    assert proc.store.get(b"ridx/" + (1).to_bytes(8, "big") + b"a") == b""
    assert msgpack.unpackb(proc.store.get(b"meta/rid_count")) == 2


def test_dedup_capacity_evicts_the_oldest():
    proc = CommandProcessor(StateStore(), dedup_capacity=3)
    log = Log(proc)
    assert DEDUP_CAPACITY == 100_000 and CommandProcessor(StateStore()).dedup_capacity == DEDUP_CAPACITY
    for rid in ["r1", "r2", "r3", "r4"]:
        log.one(put("k", rid=rid))

    def rids():
        return sorted(k[4:].decode() for k, _ in proc.store.scan_prefix(b"rid/"))

    assert rids() == ["r2", "r3", "r4"]
    assert [keys.split_ridx(k) for k, _ in proc.store.scan_prefix(b"ridx/")] == [
        (2, "r2"),
        (3, "r3"),
        (4, "r4"),
    ]
    assert msgpack.unpackb(proc.store.get(b"meta/rid_count")) == 3
    # An evicted rid applies again; a kept one does not.
    assert log.one(put("k", rid="r1"))["version"] == 5
    assert log.one(put("k", rid="r4"))["version"] == 4
    assert rids() == ["r1", "r3", "r4"]
    # More new rids in one entry than the capacity: ridx order within an index is rid order.
    results = log.entry(*[put("k", rid=r) for r in ["e", "c", "d", "b", "e"]]).results
    assert [r["version"] for r in results] == [6, 7, 8, 9, 6]
    assert rids() == ["c", "d", "e"]
    assert msgpack.unpackb(proc.store.get(b"meta/rid_count")) == 3
    assert proc.store.recompute_digest() == proc.store.digest()


def test_dedup_capacity_zero_still_dedups_within_an_entry():
    proc = CommandProcessor(StateStore(), dedup_capacity=0)
    results = proc.apply_entry(1, encode_entry([put("k", rid="r"), put("k", rid="r")])).results
    assert results[0] == results[1]
    assert [k for k, _ in proc.store.scan()] == [b"kv/k", keys.CHAIN, b"meta/rid_count"]


@pytest.mark.parametrize("capacity", [-1, 1.5, None])
def test_dedup_capacity_must_be_a_count(capacity):
    with pytest.raises(ValueError, match="dedup_capacity"):
        CommandProcessor(StateStore(), dedup_capacity=capacity)


# --- changes and batching -------------------------------------------------------------------------


def test_changes_in_apply_order(log):
    log.one(put("gone"))
    outcome = log.entry(
        put("a", b"1"),
        delete("absent"),
        {
            "op": "txn",
            "then": [
                {"op": "put", "key": "a", "value": b"2"},
                {"op": "delete", "key": "gone"},
                {"op": "get", "key": "a"},
            ],
        },
        put("b", b"3", if_version=7),  # conflict: no change
        {"op": "register_node", "node_id": "n", "api": "h:1", "raft": "h:2"},
        put("a", b"4", rid="x"),
        put("a", b"4", rid="x"),  # duplicate: no change
    )
    assert outcome.changes == [
        KvChange("a", b"1", 1, 2, 2, 2),
        KvChange("a", b"2", 2, 2, 2, 2),
        KvChange("gone", None, 0, 0, 0, 2),
        KvChange("a", b"4", 3, 2, 2, 2),
    ]


def test_one_rust_batch_per_entry_in_first_write_order():
    store = CountingStore()
    proc = CommandProcessor(store, kv_fast_path=False)  # the Python path's batch
    proc.apply_entry(
        1, encode_entry([put("b"), put("a"), put("b", b"2"), {"op": "noop", "rid": "r"}, delete("a")])
    )
    assert len(store.applies) == 1
    assert [k for k, _ in store.applies[0]] == [
        b"kv/b",
        b"kv/a",
        b"rid/r",
        keys.ridx_key(1, "r"),
        b"meta/rid_count",
        keys.CHAIN,
    ]
    assert store.applies[0][1] == (b"kv/a", None)
    proc.apply_entry(2, encode_entry([{"op": "noop"}, delete("zz")]))
    proc.apply_entry(3, b"garbage")
    # Nothing else to write: one crossing each, for the audit chain alone.
    assert [[k for k, _ in batch] for batch in store.applies[1:]] == [[keys.CHAIN], [keys.CHAIN]]


# --- never raises ---------------------------------------------------------------------------------


def test_bad_entries_give_one_bad_entry_result_and_change_nothing(proc):
    proc.apply_entry(1, encode_entry([put("a")]))
    before = state_items(proc)
    for payload in [
        b"",
        b"\x93\x01\x02\x03",
        msgpack.packb([2, []]),
        None,
        "text",
        5,
        bytearray(b"\x90"),
        memoryview(b""),
    ]:
        (result,) = proc.apply_entry(2, payload).results
        assert result["ok"] is False and result["error"] == "bad_entry"
        assert result["message"].startswith("entry:")
    assert state_items(proc) == before
    empty = proc.apply_entry(2, encode_entry([]))
    assert (empty.results, empty.changes) == ([], [])


@pytest.mark.parametrize("index", [-1, 1 << 64, "1", 1.0, None, True])
def test_an_impossible_index_is_an_internal_result(proc, index):
    (result,) = proc.apply_entry(index, encode_entry([put("a")])).results
    assert result["error"] == "internal" and result["message"].startswith("index:")
    assert state_items(proc) == []


def test_an_internal_error_discards_that_commands_writes_only(log, proc):
    proc.store.apply([(b"kv/corrupt", b"\xc1")])
    outcome = log.entry(
        put("a", b"1"),
        {
            "op": "txn",
            "then": [
                {"op": "put", "key": "b", "value": b"1"},
                {"op": "put", "key": "corrupt", "value": b"1"},
            ],
            "rid": "t",
        },
        put("c", b"1"),
        delete("corrupt", rid="d"),
    )
    first, txn, third, fourth = outcome.results
    assert first["ok"] and third["ok"]
    for failed in (txn, fourth):
        assert drop_messages(failed) == {"ok": False, "error": "internal"}
        assert "changed nothing" in failed["message"]
    assert outcome.changes == [KvChange("a", b"1", 1, 1, 1, 1), KvChange("c", b"1", 1, 1, 1, 1)]
    assert proc.get("b") is None and proc.store.get(b"kv/corrupt") == b"\xc1"
    assert proc.store.get(b"rid/t") is None and proc.store.get(b"rid/d") is None


def test_an_unexpected_exception_mid_transaction(log, proc, monkeypatch):
    original = _EntryRun._put

    def exploding_put(self, key, record, value):
        if key == "boom":
            raise RuntimeError(f"object at {id(self):#x}")  # text that must not reach the state
        return original(self, key, record, value)

    monkeypatch.setattr(_EntryRun, "_put", exploding_put)
    txn = {
        "op": "txn",
        "then": [{"op": "put", "key": "x", "value": b"1"}, {"op": "put", "key": "boom", "value": b"1"}],
    }
    outcome = log.entry(put("x", b"0"), txn, {"op": "txn", "then": [{"op": "get", "key": "x"}]})
    assert outcome.results[1]["error"] == "internal" and "RuntimeError" in outcome.results[1]["message"]
    assert "0x" not in outcome.results[1]["message"]
    assert outcome.results[2]["results"] == [{"op": "get", "key": "x", "value": b"0", "version": 1}]
    assert outcome.changes == [KvChange("x", b"0", 1, 1, 1, 1)]


def test_a_failing_store_apply_gives_internal_results_and_changes_nothing():
    store = CountingStore()
    # The Python path's own failure handling (the Rust fast path changes nothing when its
    # store batch fails, and leaves the entry to this path).
    proc = CommandProcessor(store, kv_fast_path=False)
    store.fail_next_apply = True
    outcome = proc.apply_entry(1, encode_entry([put("a"), put("b")]))
    assert [r["error"] for r in outcome.results] == ["internal", "internal"]
    assert outcome.changes == [] and [k for k, _ in store.inner.scan()] == [keys.CHAIN]
    assert proc.apply_entry(1, encode_entry([put("a")])).results[0]["ok"]


def _assert_sane(proc: CommandProcessor, before: list, outcome: EntryOutcome) -> None:
    assert isinstance(outcome.results, list)
    for result in outcome.results:
        assert type(result["ok"]) is bool
        msgpack.packb(result, use_bin_type=True)
        assert result["ok"] or result["error"] in ("bad_entry", "bad_command", "conflict", "internal")
    if all(r.get("error") in ("bad_entry", "bad_command") for r in outcome.results):
        assert state_items(proc) == before
    assert proc.store.digest() == proc.store.recompute_digest()


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(payload):
    proc = CommandProcessor(StateStore())
    proc.apply_entry(1, encode_entry([put("seed")]))
    before = state_items(proc)
    outcome = proc.apply_entry(2, payload)
    _assert_sane(proc, before, outcome)


names = st.sampled_from(
    [
        "op",
        "key",
        "value",
        "rid",
        "if_version",
        "if",
        "then",
        "else",
        "version",
        "exists",
        "node_id",
        "api",
        "raft",
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.sampled_from(
        ["put", "delete", "txn", "get", "noop", "register_node", "unregister_node", "a", "", "h:1"]
    )
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=3))
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(names | st.text(max_size=2), inner, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(commands=st.lists(structures, max_size=4), version=st.sampled_from([1, 1, 1, 0, 2, "1", None]))
def test_fuzz_msgpack_structures(commands, version):
    proc = CommandProcessor(StateStore())
    proc.apply_entry(
        1, encode_entry([put("a"), {"op": "register_node", "node_id": "n", "api": "h:1", "raft": "h:2"}])
    )
    before = state_items(proc)
    payload = msgpack.packb([version, commands], use_bin_type=True)
    outcome = proc.apply_entry(2, payload)
    _assert_sane(proc, before, outcome)
    assert len(outcome.results) == (len(commands) if version == 1 else 1)


fuzz_keys = st.sampled_from(["a", "b", "c/d"])
fuzz_values = st.sampled_from([b"1", b'"x"', b"[]", b"{}"])
fuzz_txops = st.one_of(
    st.fixed_dictionaries({"op": st.just("put"), "key": fuzz_keys, "value": fuzz_values}),
    st.fixed_dictionaries({"op": st.sampled_from(["delete", "get"]), "key": fuzz_keys}),
)
fuzz_conds = st.one_of(
    st.fixed_dictionaries({"key": fuzz_keys, "version": st.integers(0, 2)}),
    st.fixed_dictionaries({"key": fuzz_keys, "value": fuzz_values}),
    st.fixed_dictionaries({"key": fuzz_keys, "exists": st.booleans()}),
)
fuzz_rid = {"rid": st.sampled_from(["r1", "r2", "r3"])}
valid_commands = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("put"), "key": fuzz_keys, "value": fuzz_values},
        optional={"if_version": st.integers(0, 2), **fuzz_rid},
    ),
    st.fixed_dictionaries(
        {"op": st.just("delete"), "key": fuzz_keys}, optional={"if_version": st.integers(0, 2), **fuzz_rid}
    ),
    st.fixed_dictionaries(
        {"op": st.just("txn")},
        optional={
            "if": st.lists(fuzz_conds, max_size=3),
            "then": st.lists(fuzz_txops, max_size=3),
            "else": st.lists(fuzz_txops, max_size=3),
            **fuzz_rid,
        },
    ),
    st.fixed_dictionaries({"op": st.just("noop")}, optional=fuzz_rid),
    st.fixed_dictionaries(
        {"op": st.just("register_node"), "node_id": fuzz_keys, "api": st.just("h:1"), "raft": st.just("h:2")}
    ),
    st.fixed_dictionaries({"op": st.just("unregister_node"), "node_id": fuzz_keys}, optional=fuzz_rid),
)


@st.composite
def mutated_commands(draw):
    """Valid commands, some with one field replaced, removed or added (at the top level or
    inside a transaction's first operation)."""
    command = draw(valid_commands)
    target = command
    if command["op"] == "txn" and command.get("then") and draw(st.booleans()):
        target = command["then"][0]
    action = draw(st.sampled_from(["keep", "keep", "replace", "drop", "add"]))
    field = draw(st.sampled_from(sorted(target)))
    if action == "replace":
        target[field] = draw(structures)
    elif action == "drop":
        del target[field]
    elif action == "add":
        target[draw(names)] = draw(structures)
    return command


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(st.lists(mutated_commands(), max_size=5), min_size=1, max_size=4))
def test_fuzz_mutated_commands(entries):
    proc = CommandProcessor(StateStore(), dedup_capacity=2)
    for index, commands in enumerate(entries, start=1):
        before = state_items(proc)
        outcome = proc.apply_entry(index, encode_entry(commands))
        _assert_sane(proc, before, outcome)
        assert len(outcome.results) == len(commands)
        assert not any(r.get("error") == "internal" for r in outcome.results), outcome.results


# --- local reads ----------------------------------------------------------------------------------


def test_get_and_scan(log, proc):
    names_ = ["a", "a/1", "a/2", "a/3", "a/é", "a0", "b", "a/\U0001f600"]
    log.entry(*[put(n, f'"{i}"'.encode()) for i, n in enumerate(names_)])

    def scan(*args, **kwargs):
        return [r.key for r in proc.scan(*args, **kwargs)]

    assert scan("a/", None) == ["a/1", "a/2", "a/3", "a/é", "a/\U0001f600"]  # UTF-8 byte order
    assert scan("a/", 2) == ["a/1", "a/2"]
    assert scan("a/", 2, start_after="a/2") == ["a/3", "a/é"]
    assert scan("a/", None, start_after="a/é") == ["a/\U0001f600"]
    assert scan("a/", None, start_after="a") == scan("a/", None)
    assert scan("a/", None, start_after="b") == []
    assert scan("a/", 0) == []
    assert scan("", None) == sorted(names_, key=str.encode)
    assert scan("zz", None) == []
    assert proc.scan("b", 1) == [KvRecord("b", b'"6"', 1, 1, 1)]
    assert proc.get("a/é") == KvRecord("a/é", b'"4"', 1, 1, 1)
    assert proc.get("nope") is None
    for impossible in ["", "a\x00", "k" * 1025, "\ud800", 5, None]:
        assert proc.get(impossible) is None
    with pytest.raises(CommandError, match="limit"):
        proc.scan("a", -1)


# --- determinism across processes -----------------------------------------------------------------

DETERMINISM_SCRIPT = textwrap.dedent(
    """
    from synapse._core import StateStore
    from synapse.state.commands import encode_entry
    from synapse.state.processor import CommandProcessor

    proc = CommandProcessor(StateStore(), dedup_capacity=50)
    results = []
    for i in range(1, 301):
        key = f"k{i * 7 % 23}"
        commands = [
            {"op": "put", "key": key, "value": str(i).encode(), "rid": f"r{i % 97}"},
            {"op": "txn", "if": [{"key": key, "exists": True}, {"key": f"k{i % 5}", "version": i % 3}],
             "then": [{"op": "delete", "key": f"k{i % 11}"}, {"op": "get", "key": key}],
             "else": [{"op": "put", "key": f"k{i % 13}", "value": b"[]"}], "rid": f"t{i % 61}"},
            {"op": "delete", "key": f"k{i % 17}", "if_version": i % 4},
            {"op": "register_node", "node_id": f"n{i % 4}", "api": "h:1", "raft": "h:2"},
        ]
        results.append(proc.apply_entry(i, encode_entry(commands)).results)
    print(proc.store.hexdigest())
    print(repr(results))
    """
)


def test_same_digest_in_processes_with_different_hash_seeds():
    outputs = []
    for seed in ("1", "2", "31337"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0]) > 10_000


# --- the audit chain and checkpoints ---------------------------------------------------------------


def test_every_entry_extends_the_audit_chain_bad_ones_included(proc):
    from synapse import _core

    payloads = [encode_entry([put("a")]), b"garbage", encode_entry([]), encode_entry([put("", rid="x")])]
    for i, payload in enumerate(payloads, start=1):
        outcome = proc.apply_entry(i, payload)
        assert outcome.chain == proc.chain()[1]
    expected = _core.chain_many(keys.GENESIS_CHAIN, list(enumerate(payloads, start=1)))
    assert proc.chain() == (4, expected[-1])
    replica = CommandProcessor(StateStore())
    for i, payload in enumerate(payloads, start=1):
        replica.apply_entry(i, payload)
    assert replica.store.digest() == proc.store.digest()


def _register(log, *node_ids):
    for n in node_ids:
        log.one({"op": "register_node", "node_id": n, "api": f"{n}:1", "raft": f"{n}:2"})


def _report(log, checkpoint, node_id, digest, chain=b"c" * 32):
    return log.one({"op": "checkpoint_report", "checkpoint": checkpoint, "node_id": node_id, "digest": digest, "chain": chain})


def test_a_checkpoint_is_agreed_when_a_majority_reports_the_same_digest(log, proc):
    _register(log, "n1", "n2", "n3")
    made = log.one({"op": "checkpoint", "label": "before-upgrade", "created_ms": 1234})
    index = made["checkpoint"]
    assert made == {"ok": True, "index": index, "checkpoint": index}
    good, bad = b"g" * 32, b"b" * 32
    assert _report(log, index, "n1", good)["agreed"] is False
    assert _report(log, index, "n3", bad)["agreed"] is False
    second = _report(log, index, "n2", good)
    assert second["newly_agreed"] is True and second["matches"] is True
    late = _report(log, index, "n3", bad)  # still wrong: recorded, and it does not match
    assert late["agreed"] is True and late["newly_agreed"] is False and late["matches"] is False
    ((ci, record),) = proc.checkpoints()
    assert ci == index and record["label"] == "before-upgrade" and record["created_ms"] == 1234
    assert record["agreed"] == [good, b"c" * 32] and record["agreed_index"] == second["index"]
    assert record["reports"] == {"n1": [good, b"c" * 32], "n3": [bad, b"c" * 32], "n2": [good, b"c" * 32]}


def test_reports_for_unknown_checkpoints_or_nodes_are_refused(log, proc):
    _register(log, "n1")
    index = log.one({"op": "checkpoint"})["checkpoint"]
    assert _report(log, index + 100, "n1", b"d" * 32)["error"] == "unknown_checkpoint"
    assert _report(log, index, "stranger", b"d" * 32)["error"] == "unknown_node"
    assert proc.checkpoint(index)["reports"] == {}
    bad = log.one({"op": "checkpoint_report", "checkpoint": index, "node_id": "n1", "digest": b"short", "chain": b"c" * 32})
    assert bad["error"] == "bad_command" and bad["message"].startswith("digest:")
    assert log.one({"op": "checkpoint", "label": "x" * 200})["error"] == "bad_command"


def test_old_checkpoint_records_are_evicted(log, proc, monkeypatch):
    import synapse.state.processor as processor

    monkeypatch.setattr(processor, "CHECKPOINT_RECORDS", 3)
    made = [log.one({"op": "checkpoint"})["checkpoint"] for _ in range(5)]
    assert [i for i, _ in proc.checkpoints()] == made[:1:-1]
    assert proc.checkpoint(made[0]) is None


def test_a_checkpoint_is_snapshotted_unless_it_says_not(log, proc):
    # Entries written before the flag existed have none: they were all snapshotted.
    plain = log.entry({"op": "checkpoint"})
    index = plain.results[0]["checkpoint"]
    assert ("checkpoint", index) in plain.events and ("snapshot", index) in plain.events
    skipped = log.entry({"op": "checkpoint", "snapshot": False})
    index = skipped.results[0]["checkpoint"]
    assert ("checkpoint", index) in skipped.events and ("snapshot", index) not in skipped.events
    # A periodic checkpoint without a snapshot and one asked for, in the same entry: one each.
    both = log.entry({"op": "checkpoint", "snapshot": False}, {"op": "checkpoint", "label": "asked"})
    index = both.results[0]["checkpoint"]
    assert both.events.count(("checkpoint", index)) == 1 and both.events.count(("snapshot", index)) == 1
    with pytest.raises(CommandError, match="snapshot: expected true or false"):
        validate_command({"op": "checkpoint", "snapshot": "yes"})


def test_rollback_announces_an_agreed_checkpoint_and_must_be_alone(log, proc):
    _register(log, "n1")
    index = log.one({"op": "checkpoint"})["checkpoint"]
    assert log.one({"op": "rollback", "checkpoint": index})["error"] == "not_agreed"
    assert log.one({"op": "rollback", "checkpoint": 999})["error"] == "unknown_checkpoint"
    _report(log, index, "n1", b"d" * 32, b"c" * 32)
    log.one(put("later"))
    outcome = log.entry({"op": "rollback", "checkpoint": index})
    (result,) = outcome.results
    assert result == {"ok": True, "index": log.index, "rollback_to": index, "undone_entries": log.index - index - 1}
    assert ("rollback", index, b"d" * 32, b"c" * 32) in outcome.events
    mixed = log.entry({"op": "rollback", "checkpoint": index}, put("x"))
    assert [r["error"] for r in mixed.results] == ["bad_entry", "bad_entry"] and proc.get("x") is None


def test_finish_rollback_continues_the_chain_and_keeps_the_agreement(proc):
    proc.apply_entry(1, encode_entry([{"op": "checkpoint"}]))
    proc.finish_rollback(9, b"z" * 32, 1, [b"d" * 32, b"c" * 32], proc.store.clone())
    assert proc.chain() == (9, b"z" * 32)
    assert proc.checkpoint(1)["agreed"] == [b"d" * 32, b"c" * 32]
    assert keys.decode_rollback(proc.store.get(keys.ROLLBACK)) == (9, 1)


def test_the_store_lock_is_held_only_around_the_entrys_one_batch():
    """Readers on other threads take the store lock for a lookup; the applier takes it only
    around the Rust batch an entry ends with, never while its commands run (a read would
    otherwise wait behind up to 1024 commands of Python, synapse/cluster/DESIGN.md)."""

    class Probe:
        held, entered = False, 0

        def __enter__(self):
            Probe.held, Probe.entered = True, Probe.entered + 1

        def __exit__(self, *exc):
            Probe.held = False

    class WatchedStore(CountingStore):
        def get(self, key):
            assert not Probe.held, "a command ran under the store lock"
            return self.inner.get(key)

        def apply(self, ops):
            assert Probe.held, "the store changed outside the store lock"
            return super().apply(ops)

    store = WatchedStore()
    # The Python path (an entry of puts and deletes goes to Rust whole, under the lock, when
    # the fast path is on: tests/test_kv_fast_path.py).
    proc = CommandProcessor(store, store_lock=Probe(), kv_fast_path=False)
    outcome = proc.apply_entry(1, encode_entry([put(f"k{i}", rid=f"r{i}") for i in range(200)] + [delete("k3")]))
    assert all(r["ok"] for r in outcome.results)
    assert Probe.entered == 1 and len(store.applies) == 1
    store.fail_next_apply = True  # the batch fails: the entry still extends the chain, under the lock
    proc.apply_entry(2, encode_entry([put("x")]))
    assert Probe.entered == 3


def test_a_transaction_that_only_reads_leaves_no_dedup_record(log, proc):
    """A token that may only read must not be able to fill the bounded dedup table (and so
    evict the records that make the writers' retries safe): a read-only or empty transaction
    changes nothing at all, its request id included."""
    log.one(put("a"))
    before = state_items(proc)
    assert log.one({"op": "txn", "if": [], "then": [], "else": [], "rid": "empty"})["succeeded"] is True
    assert log.one({"op": "txn", "then": [{"op": "get", "key": "a"}], "rid": "reader"})["results"][0]["version"] == 1
    assert state_items(proc) == before
    # A transaction that may write is remembered, whichever branch ran.
    log.one({"op": "txn", "if": [{"key": "a", "version": 7}], "then": [{"op": "delete", "key": "a"}], "rid": "w"})
    assert state_items(proc) != before
