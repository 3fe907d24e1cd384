"""Stateful test: ``CommandProcessor`` on the real ``StateStore`` and a plain-dict model of
DESIGN.md, driven side by side with the same entries.

In the style of zarr-python's ``zarr.testing.stateful``: every rule applies one entry of random
puts, deletes, conditional writes, transactions, node changes, malformed commands and retries
(same request id, same or different body) to both; after every entry the results and kv
changes must equal the model's, the kv contents, nodes and dedup table must match it, the
incremental digest must equal the recomputed one, and a second processor fed the same entries
from an empty store must reach the same digest (determinism).
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import note
from hypothesis.stateful import (
    RuleBasedStateMachine,
    Settings,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from synapse._core import StateStore
from synapse.state.commands import encode_entry
from synapse.state.processor import CommandProcessor
from synapse.state.records import KvChange

CAPACITY = 4  # small, so eviction happens often

keys = st.sampled_from(["a", "b", "c", "dir/x", "dir/é"])
values = st.sampled_from([b"1", b'"x"', b"[1,2]", b"{}", b"null"])
versions = st.integers(0, 3)
rids = st.sampled_from([f"r{i}" for i in range(8)])


def with_rid(base: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.tuples(base, st.none() | rids).map(lambda t: t[0] if t[1] is None else {**t[0], "rid": t[1]})


txops = st.one_of(
    st.builds(lambda k, v: {"op": "put", "key": k, "value": v}, keys, values),
    st.builds(lambda k: {"op": "delete", "key": k}, keys),
    st.builds(lambda k: {"op": "get", "key": k}, keys),
)
conds = st.one_of(
    st.builds(lambda k, n: {"key": k, "version": n}, keys, versions),
    st.builds(lambda k, v: {"key": k, "value": v}, keys, values),
    st.builds(lambda k, b: {"key": k, "exists": b}, keys, st.booleans()),
)
valid = with_rid(
    st.one_of(
        st.builds(lambda k, v: {"op": "put", "key": k, "value": v}, keys, values),
        st.builds(
            lambda k, v, n: {"op": "put", "key": k, "value": v, "if_version": n}, keys, values, versions
        ),
        st.builds(lambda k: {"op": "delete", "key": k}, keys),
        st.builds(lambda k, n: {"op": "delete", "key": k, "if_version": n}, keys, versions),
        st.builds(
            lambda c, t, e: {"op": "txn", "if": c, "then": t, "else": e},
            st.lists(conds, max_size=3),
            st.lists(txops, max_size=4),
            st.lists(txops, max_size=4),
        ),
        st.just({"op": "noop"}),
        st.builds(
            lambda n, p: {"op": "register_node", "node_id": n, "api": f"h{p}:1", "raft": f"h{p}:2"},
            st.sampled_from(["n1", "n2"]),
            st.integers(1, 3),
        ),
        st.builds(lambda n: {"op": "unregister_node", "node_id": n}, st.sampled_from(["n1", "n2"])),
    )
)
# Malformed commands; the model knows them by the marker the strategy pairs them with.
invalid = with_rid(
    st.sampled_from(
        [
            {"op": "put", "key": "", "value": b"1"},
            {"op": "put", "key": "a", "value": "not bytes"},
            {"op": "put", "key": "k" * 1025, "value": b"1"},
            {"op": "delete", "key": "a", "if_version": -1},
            {"op": "txn", "then": [{"op": "put", "key": "a", "value": b"1"}, {"op": "bogus", "key": "a"}]},
            {"op": "noop", "extra": 1},
        ]
    )
)
commands = st.one_of(valid.map(lambda c: (c, True)), invalid.map(lambda c: (c, False)))


class Model:
    """DESIGN.md as plain dicts: what each command must return and do."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.kv: dict[str, list[Any]] = {}  # key -> [value, version, create_index, mod_index]
        self.nodes: dict[str, dict[str, Any]] = {}
        self.rids: dict[str, tuple[int, dict]] = {}

    def apply_entry(self, index: int, entry: list[tuple[dict, bool]]) -> tuple[list[dict], list[KvChange]]:
        results: list[dict] = []
        changes: list[KvChange] = []
        for command, is_valid in entry:
            rid = command.get("rid")
            if rid in self.rids:
                results.append(self.rids[rid][1])
                continue
            if not is_valid:
                results.append({"ok": False, "error": "bad_command"})
                continue
            result = self.apply(index, command, changes)
            reads_only = command["op"] == "txn" and all(
                t["op"] == "get" for branch in ("then", "else") for t in command.get(branch, []))
            if rid is not None and not reads_only:  # a transaction that only reads is not remembered
                self.rids[rid] = (index, result)
            results.append(result)
        # Eviction: oldest by (log index, rid bytes) until the table fits.
        for _, rid in sorted((i, r.encode()) for r, (i, _) in self.rids.items())[
            : max(0, len(self.rids) - self.capacity)
        ]:
            del self.rids[rid.decode()]
        return results, changes

    def apply(self, index: int, command: dict, changes: list[KvChange]) -> dict:
        op = command["op"]
        if op in ("put", "delete"):
            key = command["key"]
            current = self.kv[key][1] if key in self.kv else 0
            if "if_version" in command and command["if_version"] != current:
                return {"ok": False, "error": "conflict", "key": key, "current_version": current}
            if op == "put":
                return {
                    "ok": True,
                    "key": key,
                    "version": self.put(index, key, command["value"], changes),
                    "index": index,
                }
            return {"ok": True, "key": key, "deleted": self.delete(index, key, changes), "index": index}
        if op == "txn":
            succeeded = all(self.holds(c) for c in command["if"])
            results = [self.txop(index, t, changes) for t in command["then" if succeeded else "else"]]
            return {"ok": True, "succeeded": succeeded, "results": results, "index": index}
        if op == "register_node":
            self.nodes[command["node_id"]] = {"api": command["api"], "raft": command["raft"], "index": index}
        elif op == "unregister_node":
            self.nodes.pop(command["node_id"], None)
        return {"ok": True, "index": index}

    def holds(self, cond: dict) -> bool:
        record = self.kv.get(cond["key"])
        if "version" in cond:
            return (record[1] if record else 0) == cond["version"]
        if "value" in cond:
            return record is not None and record[0] == cond["value"]
        return (record is not None) == cond["exists"]

    def txop(self, index: int, txop: dict, changes: list[KvChange]) -> dict:
        key = txop["key"]
        if txop["op"] == "put":
            return {"op": "put", "key": key, "version": self.put(index, key, txop["value"], changes)}
        if txop["op"] == "delete":
            return {"op": "delete", "key": key, "deleted": self.delete(index, key, changes)}
        record = self.kv.get(key)
        return {
            "op": "get",
            "key": key,
            "value": record[0] if record else None,
            "version": record[1] if record else 0,
        }

    def put(self, index: int, key: str, value: bytes, changes: list[KvChange]) -> int:
        old = self.kv.get(key)
        self.kv[key] = [value, old[1] + 1 if old else 1, old[2] if old else index, index]
        changes.append(KvChange(key, *self.kv[key], index))
        return self.kv[key][1]

    def delete(self, index: int, key: str, changes: list[KvChange]) -> bool:
        if key not in self.kv:
            return False
        del self.kv[key]
        changes.append(KvChange(key, None, 0, 0, 0, index))
        return True


def without_message(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "message"}


class ProcessorStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.processor = CommandProcessor(StateStore(), dedup_capacity=CAPACITY)
        self.replica = CommandProcessor(StateStore(), dedup_capacity=CAPACITY)
        self.model = Model(CAPACITY)
        self.index = 0
        self.log: list[tuple[int, bytes]] = []
        self.sent: list[dict] = []  # commands with a rid, for retries

    def _entry(self, entry: list[tuple[dict, bool]], gap: int = 1) -> None:
        self.index += gap  # Raft indexes of entries the processor never sees are skipped
        payload = encode_entry([c for c, _ in entry])
        note(f"entry {self.index}: {[c for c, _ in entry]!r}")
        outcome = self.processor.apply_entry(self.index, payload)
        expected_results, expected_changes = self.model.apply_entry(self.index, entry)
        assert [without_message(r) for r in outcome.results] == [without_message(r) for r in expected_results]
        assert all(r["ok"] or r["message"] for r in outcome.results)
        assert outcome.changes == expected_changes
        self.replica.apply_entry(self.index, payload)
        self.log.append((self.index, payload))
        self.sent.extend(c for c, ok in entry if ok and "rid" in c)

    @rule(entry=st.lists(commands, min_size=1, max_size=6), gap=st.integers(1, 3))
    def apply_entry(self, entry, gap) -> None:
        self._entry(entry, gap)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def retry(self, data) -> None:
        """Resend earlier commands with their rids (a client retrying after a lost reply),
        mixed with new commands."""
        retries = data.draw(st.lists(st.sampled_from(self.sent), min_size=1, max_size=3), label="retries")
        fresh = data.draw(st.lists(commands, max_size=3), label="fresh")
        self._entry([(c, True) for c in retries] + fresh)

    @invariant()
    def kv_nodes_and_dedup_match_the_model(self) -> None:
        records = self.processor.scan("", None)
        assert {r.key: [r.value, r.version, r.create_index, r.mod_index] for r in records} == self.model.kv
        assert self.processor.nodes() == dict(sorted(self.model.nodes.items()))
        stored_rids = {k[4:].decode() for k, _ in self.processor.store.scan_prefix(b"rid/")}
        assert stored_rids == set(self.model.rids)
        assert len(self.processor.store.scan_prefix(b"ridx/")) == len(self.model.rids) <= CAPACITY

    @invariant()
    def digest_is_consistent_and_deterministic(self) -> None:
        store = self.processor.store
        assert store.digest() == store.recompute_digest()
        assert self.replica.store.digest() == store.digest()
        assert self.replica.store.scan() == store.scan()

    def teardown(self) -> None:
        # A third processor replaying the whole log in one go reaches the same state.
        fresh = CommandProcessor(StateStore(), dedup_capacity=CAPACITY)
        for index, payload in self.log:
            fresh.apply_entry(index, payload)
        assert fresh.store.digest() == self.processor.store.digest()


def test_processor_matches_model() -> None:
    """Runs the state machine; its invariants assert after every step and at teardown."""
    run_state_machine_as_test(
        ProcessorStateMachine,
        settings=Settings(max_examples=60, stateful_step_count=30, deadline=None),
    )
