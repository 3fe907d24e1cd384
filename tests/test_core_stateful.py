"""Stateful test: the Rust ``StateStore`` and the reference ``ReferenceStore`` driven in lockstep.

In the style of zarr-python's ``zarr.testing.stateful``: a hypothesis ``RuleBasedStateMachine``
holds the store under test, the oracle and a plain dict model; every rule applies the same
change to all three, and the invariants after every step require identical digests, tree
digests, lengths and scans, and an incrementally maintained digest equal to the recomputed one.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, note
from hypothesis.stateful import (
    RuleBasedStateMachine,
    Settings,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import synapse.reference as ref

core = pytest.importorskip("synapse._core")

keys = st.one_of(
    st.sampled_from([b"", b"a", b"ab", b"b", b"\xff", b"key-1", b"key-2", b"k" * 23]),
    st.binary(max_size=28),
)
values = st.binary(max_size=32)
ops = st.tuples(keys, st.one_of(st.none(), values))


class StateStoreStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = core.StateStore()
        self.oracle = ref.ReferenceStore()
        self.model: dict[bytes, bytes] = {}
        self.tmpdir = tempfile.mkdtemp(prefix="synapse-stateful-")
        self.snapshots = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _apply(self, batch: list[tuple[bytes, bytes | None]]) -> None:
        note(f"apply {batch!r}")
        assert self.store.apply(batch) == self.oracle.apply(batch) == len(batch)
        for key, value in batch:
            if value is None:
                self.model.pop(key, None)
            else:
                self.model[key] = value

    def _existing_key(self, data) -> bytes:
        return data.draw(st.sampled_from(sorted(self.model)), label="existing key")

    @initialize(state=st.dictionaries(keys, values, max_size=10))
    def start(self, state: dict[bytes, bytes]) -> None:
        self._apply(list(state.items()))

    # --- writes -----------------------------------------------------------------------------

    @rule(key=keys, value=values)
    def put(self, key: bytes, value: bytes) -> None:
        self._apply([(key, value)])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_existing(self, data) -> None:
        self._apply([(self._existing_key(data), None)])

    @rule(key=keys)
    def delete_any(self, key: bytes) -> None:
        self._apply([(key, None)])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), value=values)
    def overwrite(self, data, value: bytes) -> None:
        self._apply([(self._existing_key(data), value)])

    @rule(data=st.data(), batch=st.lists(ops, max_size=12))
    def batch_with_duplicate_keys(self, data, batch) -> None:
        if batch:
            # Repeat some keys later in the batch so the order of application matters.
            repeats = data.draw(
                st.lists(st.tuples(st.sampled_from([k for k, _ in batch]), st.one_of(st.none(), values)), max_size=6),
                label="repeats",
            )
            batch = batch + repeats
        self._apply(batch)

    @rule(bad=st.sampled_from([("str-key", b"v"), (b"k", 7), (b"k",), None, (b"k", b"v", b"w")]))
    def bad_batch_changes_nothing(self, bad) -> None:
        batch = [(b"would-be-written", b"x"), bad]
        for store in (self.store, self.oracle):
            before = store.digest()
            try:
                store.apply(batch)
            except TypeError:
                pass
            else:
                raise AssertionError(f"{type(store).__name__} accepted {batch!r}")
            assert store.digest() == before

    # --- whole-store operations ---------------------------------------------------------------

    @rule(probe=keys)
    def clone(self, probe: bytes) -> None:
        clones = self.store.clone(), self.oracle.clone()
        digest = self.store.digest()
        # Writing to the originals must not reach the clones.
        self.store.apply([(probe, b"only-in-original")])
        self.oracle.apply([(probe, b"only-in-original")])
        assert clones[0].digest() == clones[1].digest() == digest
        self.store, self.oracle = clones

    @rule(log_index=st.integers(0, 2**64 - 1))
    def snapshot_roundtrip(self, log_index: int) -> None:
        self.snapshots += 1
        core_path = os.path.join(self.tmpdir, f"core-{self.snapshots}.snap")
        ref_path = os.path.join(self.tmpdir, f"ref-{self.snapshots}.snap")
        core_info = self.store.write_snapshot(core_path, log_index)
        ref_info = self.oracle.write_snapshot(ref_path, log_index)
        with open(core_path, "rb") as a, open(ref_path, "rb") as b:
            assert a.read() == b.read(), "snapshot bytes differ"
        assert (core_info.entry_count, core_info.log_index, core_info.state_digest, core_info.file_size) == (
            ref_info.entry_count, ref_info.log_index, ref_info.state_digest, ref_info.file_size)
        # Continue from the stores each side loaded from the other side's file.
        self.store, loaded_info = core.StateStore.load_snapshot(ref_path)
        self.oracle, _ = ref.ReferenceStore.load_snapshot(core_path)
        assert loaded_info.log_index == log_index and loaded_info.entry_count == len(self.model)

    @rule(data=st.data(), changes=st.lists(ops, max_size=10), via_bytes=st.booleans())
    def diff_with_second_store_then_apply(self, data, changes, via_bytes: bool) -> None:
        fresh = data.draw(st.booleans(), label="unrelated second store")
        other_core = core.StateStore() if fresh else self.store.clone()
        other_ref = ref.ReferenceStore() if fresh else self.oracle.clone()
        other_core.apply(changes)
        other_ref.apply(changes)
        core_diff, ref_diff = self.store.diff(other_core), self.oracle.diff(other_ref)
        encoded = ref_diff.encode()
        assert core_diff.encode() == encoded, "diff bytes differ"
        assert (core_diff.added, core_diff.changed, core_diff.removed) == (
            ref_diff.added, ref_diff.changed, ref_diff.removed)
        assert core_diff.to_digest == other_core.digest() == other_ref.digest()
        note(f"diff {len(ref_diff)} records, fresh={fresh}, via_bytes={via_bytes}")
        if via_bytes:
            core_diff, ref_diff = core.StateDiff.decode(encoded), ref.ReferenceDiff.decode(encoded)
        self.store.apply_diff(core_diff)
        self.oracle.apply_diff(ref_diff)
        self.model = dict(other_ref.scan())
        assert self.store.digest() == other_core.digest()

    @rule(other=st.dictionaries(keys, values, min_size=1, max_size=4))
    def diff_for_another_state_is_refused(self, other) -> None:
        source_core, source_ref = core.StateStore(), ref.ReferenceStore()
        source_core.apply(list(other.items()))
        source_ref.apply(list(other.items()))
        if source_ref.digest() == self.oracle.digest():
            return
        target_core = source_core.clone()
        target_core.apply([(b"diff-target", b"x")])
        target_ref = source_ref.clone()
        target_ref.apply([(b"diff-target", b"x")])
        for store, diff, error in (
            (self.store, source_core.diff(target_core), core.DigestMismatchError),
            (self.oracle, source_ref.diff(target_ref), ref.DigestMismatchError),
        ):
            before = store.digest()
            try:
                store.apply_diff(diff)
            except error:
                pass
            else:
                raise AssertionError(f"{type(store).__name__} applied a diff for another state")
            assert store.digest() == before

    @rule()
    def bucket_level_matches(self) -> None:
        assert self.store.node_digests(4) == self.oracle.node_digests(4)

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def digests_match(self) -> None:
        digest = self.oracle.digest()
        assert self.store.digest() == digest
        assert self.store.recompute_digest() == digest
        assert self.oracle.recompute_digest() == digest

    @invariant()
    def contents_match(self) -> None:
        assert len(self.store) == len(self.oracle) == len(self.model)
        expected = sorted(self.model.items())
        assert self.store.scan() == self.oracle.scan() == expected

    @invariant()
    def tree_matches(self) -> None:
        for level in (0, 1, 2, 3):
            assert self.store.node_digests(level) == self.oracle.node_digests(level), level


def test_state_store_matches_reference() -> None:
    run_state_machine_as_test(
        StateStoreStateMachine,
        settings=Settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
