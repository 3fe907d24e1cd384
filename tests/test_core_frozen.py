"""Frozen views (``StateStore.freeze``): the state at one moment, readable from other threads
while the store goes on applying — what background dumps and peer repair read."""

from __future__ import annotations

import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from synapse import _core

keys = st.binary(min_size=1, max_size=12)
ops = st.lists(st.tuples(keys, st.one_of(st.none(), st.binary(max_size=20))), max_size=60)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(before=ops, after=ops)
def test_a_frozen_view_is_the_state_when_it_was_taken(before, after):
    store = _core.StateStore()
    store.apply(before)
    expected = dict(store.scan())
    digest = store.digest()
    frozen = store.freeze()
    store.apply(after)
    assert frozen.digest() == digest == frozen.recompute_digest()
    assert len(frozen) == len(expected)
    assert frozen.get_many(list(expected)) == list(expected.values())
    thawed = _core.StateStore.thaw(frozen)
    assert dict(thawed.scan()) == expected and thawed.digest() == digest
    # The diff from the frozen view to now is what `after` changed.
    d = frozen.diff(store.freeze())
    thawed.apply_diff(d)
    assert thawed.digest() == store.digest()


def test_a_snapshot_written_from_a_frozen_view_loads_to_its_state(tmp_path: Path):
    store = _core.StateStore()
    store.apply([(b"k%d" % i, b"v%d" % i) for i in range(5000)])
    frozen = store.freeze()
    store.apply([(b"k%d" % i, None) for i in range(0, 5000, 2)])
    info = frozen.write_snapshot(tmp_path / "s.snap", 42)
    loaded, info2 = _core.StateStore.load_snapshot(tmp_path / "s.snap")
    assert info.entry_count == 5000 and info2.log_index == 42
    assert loaded.digest() == frozen.digest() != store.digest()


def test_frozen_views_are_read_from_another_thread_while_the_store_applies():
    store = _core.StateStore()
    store.apply([(b"k%d" % i, b"0") for i in range(20_000)])
    frozen = store.freeze()
    digest = frozen.digest()
    results: list[bytes] = []

    def reader() -> None:
        for _ in range(5):
            results.append(frozen.recompute_digest())

    t = threading.Thread(target=reader)
    t.start()
    for round_ in range(1, 30):
        store.apply([(b"k%d" % i, b"%d" % round_) for i in range(0, 20_000, 7)])
    t.join()
    assert results == [digest] * 5
