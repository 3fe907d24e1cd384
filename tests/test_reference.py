"""The pure-Python reference (``synapse.reference``) on its own, checked against rust/DESIGN.md.

Where possible the expected values are rebuilt here from the spec's formulas with struct and
blake3 directly, rather than by calling back into the reference, so a misreading of the spec in
``synapse/reference`` shows up as a failure instead of agreeing with itself.
"""

from __future__ import annotations

import os
import struct

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synapse.reference as ref
from synapse.reference import (
    CorruptSnapshotError,
    DigestMismatchError,
    ReferenceDiff,
    ReferenceStore,
    SnapshotError,
    TruncatedSnapshotError,
    UnsupportedFormatError,
)
from synapse.reference.codec import CHUNK_TARGET

MASK16 = 0xFFFF
MASK64 = (1 << 64) - 1
ZERO32 = bytes(32)

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

keys = st.one_of(
    st.sampled_from([b"", b"a", b"ab", b"a\x00", b"b", b"\xff", b"\xff\xff", b"key-1", b"key-2"]),
    st.binary(max_size=8),
)
values = st.binary(max_size=24)
ops = st.lists(st.tuples(keys, st.one_of(st.none(), values)), max_size=25)
batches = st.lists(ops, max_size=5)
contents = st.dictionaries(keys, values, max_size=30)


# --- the spec's formulas, written out independently -------------------------------------------


def b3(data: bytes) -> bytes:
    return blake3(data).digest()


def spec_elem(key: bytes, value: bytes) -> bytes:
    return b"SYNELEM1" + struct.pack("<I", len(key)) + key + value


def spec_digest(state: dict[bytes, bytes]) -> bytes:
    lanes = [0] * 1024
    for key, value in state.items():
        element = b3(spec_elem(key, value))
        expansion = struct.unpack("<1024H", blake3(b"SYNLANE1" + element).digest(length=2048))
        lanes = [(a + b) & MASK16 for a, b in zip(lanes, expansion)]
    return b3(b"SYNSTAT1" + struct.pack("<1024H", *lanes))


def spec_bucket(key: bytes) -> int:
    return struct.unpack("<I", b3(b"SYNKEY01" + key)[:4])[0] % 65536


def spec_level(state: dict[bytes, bytes], level: int) -> bytes:
    """All node digests of ``level``: sums over the entries under each node."""
    nodes: dict[int, list[int]] = {}
    for key, value in state.items():
        index = spec_bucket(key) >> (4 * (4 - level))
        lanes = struct.unpack("<4Q", b3(spec_elem(key, value)))
        acc = nodes.setdefault(index, [0, 0, 0, 0])
        for i in range(4):
            acc[i] = (acc[i] + lanes[i]) & MASK64
    out = bytearray(32 * 16**level)
    for index, lanes in nodes.items():
        out[32 * index : 32 * index + 32] = struct.pack("<4Q", *lanes)
    return bytes(out)


def spec_snapshot(state: dict[bytes, bytes], log_index: int) -> bytes:
    """A snapshot built field by field from the layout table (small states: one data chunk)."""
    items = sorted(state.items())
    payload = b"".join(
        struct.pack("<I", len(k)) + k + struct.pack("<I", len(v)) + v for k, v in items
    )
    assert len(payload) < CHUNK_TARGET
    head = b"SYNSNAP\0" + struct.pack("<IIQQ", 1, 0, len(items), log_index) + spec_digest(state)
    out = head + b3(b"SYNSNAPH" + head)[:16]
    seq = 0
    if items:
        chunk = struct.pack("<II", len(items), len(payload)) + payload
        out += chunk + b3(b"SYNSNAPC" + struct.pack("<Q", seq) + chunk)[:16]
        seq += 1
    end = struct.pack("<II", 0, 0)
    return out + end + b3(b"SYNSNAPC" + struct.pack("<Q", seq) + end)[:16]


def model_after(batches_: list[list[tuple[bytes, bytes | None]]]) -> dict[bytes, bytes]:
    model: dict[bytes, bytes] = {}
    for batch in batches_:
        for key, value in batch:
            if value is None:
                model.pop(key, None)
            else:
                model[key] = value
    return model


def store_of(state: dict[bytes, bytes]) -> ReferenceStore:
    store = ReferenceStore()
    store.apply(list(state.items()))
    return store


def chunk_layout(data: bytes, header_size: int) -> list[tuple[int, int]]:
    """(count, payload_len) of every chunk, walking the framing without checking anything."""
    pos, out = header_size, []
    while True:
        count, length = struct.unpack_from("<II", data, pos)
        out.append((count, length))
        pos += 8 + length + 16
        if count == 0:
            assert pos == len(data)
            return out


# --- hashing ------------------------------------------------------------------------------------


def test_empty_state_digest_is_hash_of_zero_lattice():
    expected = b3(b"SYNSTAT1" + bytes(2048))
    assert ReferenceStore().digest() == expected
    assert ReferenceStore().recompute_digest() == expected
    assert ref.empty_state_digest() == expected
    assert ReferenceStore().hexdigest() == expected.hex()


@given(keys, values)
@SETTINGS
def test_element_hash_is_b3_of_elem_and_seeds_the_expansion(key, value):
    elem = spec_elem(key, value)
    assert ref.element_hash(key, value) == b3(elem)
    assert ref.element_expansion(key, value) == blake3(b"SYNLANE1" + b3(elem)).digest(length=2048)


def test_length_prefix_separates_key_from_value():
    assert ref.element_hash(b"ab", b"c") != ref.element_hash(b"a", b"bc")
    assert ReferenceStore().apply([(b"ab", b"c")]) == 1
    a, b = store_of({b"ab": b"c"}), store_of({b"a": b"bc"})
    assert a.digest() != b.digest()


@given(keys)
@SETTINGS
def test_bucket_of_is_low_u32_of_key_hash(key):
    assert ReferenceStore.bucket_of(key) == spec_bucket(key)
    assert ref.bucket_of(key) == spec_bucket(key)
    assert 0 <= spec_bucket(key) < 65536


@given(batches)
@SETTINGS
def test_incremental_digest_equals_recompute_for_random_histories(history):
    store = ReferenceStore()
    for batch in history:
        assert store.apply(batch) == len(batch)
        assert store.digest() == store.recompute_digest()
    model = model_after(history)
    assert store.digest() == spec_digest(model)
    assert store.scan() == sorted(model.items())
    assert len(store) == len(model)


@given(contents, contents)
@SETTINGS
def test_equal_contents_iff_equal_digests(a, b):
    assert (store_of(a).digest() == store_of(b).digest()) == (a == b)


@given(contents, st.randoms(use_true_random=False))
@SETTINGS
def test_digest_is_independent_of_history(state, rnd):
    items = list(state.items())
    rnd.shuffle(items)
    store = ReferenceStore()
    # Detours through other values and deletions must cancel out exactly.
    store.apply([(k, v + b"detour") for k, v in items])
    store.apply([(k, None) for k, _ in items[: len(items) // 2]])
    store.apply(items)
    assert store.digest() == store_of(state).digest() == spec_digest(state)


def test_overwrite_with_same_value_is_a_no_op():
    store = store_of({b"k": b"v"})
    before = store.digest()
    store.apply([(b"k", b"v"), (b"missing", None)])
    assert store.digest() == before == store.recompute_digest()


# --- the bucket tree ----------------------------------------------------------------------------


def lanes_sum(blob: bytes) -> bytes:
    acc = [0, 0, 0, 0]
    for offset in range(0, len(blob), 32):
        lanes = struct.unpack_from("<4Q", blob, offset)
        acc = [(a + b) & MASK64 for a, b in zip(acc, lanes)]
    return struct.pack("<4Q", *acc)


@given(contents)
@settings(max_examples=15, deadline=None)
def test_tree_levels_match_spec_and_sum_up(state):
    store = store_of(state)
    levels = [store.node_digests(level) for level in range(5)]
    for level in range(5):
        assert len(levels[level]) == 32 * 16**level
        assert levels[level] == spec_level(state, level)
    for level in range(4):
        for parent in range(16**level):
            children = levels[level + 1][32 * 16 * parent : 32 * 16 * (parent + 1)]
            assert levels[level][32 * parent : 32 * parent + 32] == lanes_sum(children)
    assert levels[0] == lanes_sum(levels[4])
    if not state:
        assert levels[0] == ZERO32


@given(batches)
@settings(max_examples=25, deadline=None)
def test_incremental_tree_equals_tree_of_contents(history):
    store = ReferenceStore()
    for batch in history:
        store.apply(batch)
    fresh = store_of(model_after(history))
    for level in range(5):
        assert store.node_digests(level) == fresh.node_digests(level)


def test_children_digests_are_slices_of_the_next_level():
    store = store_of({bytes([i]) * 3: bytes([i]) for i in range(200)})
    for level in range(4):
        below = store.node_digests(level + 1)
        parents = [0, 16**level - 1] if level else [0]
        got = store.children_digests(level, parents)
        assert got == b"".join(below[32 * 16 * p : 32 * 16 * (p + 1)] for p in parents)
    with pytest.raises(ValueError):
        store.children_digests(4, [0])
    with pytest.raises(ValueError):
        store.children_digests(1, [16])
    with pytest.raises(ValueError):
        store.node_digests(5)
    with pytest.raises(ValueError):
        store.compare_children(0, [0], b"\x00" * 31)


def run_protocol(local, remote):
    """Find and fetch the differences, exchanging only bytes and lists with ``remote``."""
    if local.node_digests(0) == remote.node_digests(0):
        return [], local.diff_buckets([], [])
    frontier = [0]
    for level in range(4):
        frontier = local.compare_children(level, frontier, remote.children_digests(level, frontier))
    return frontier, local.diff_buckets(frontier, remote.bucket_entries(frontier))


def brute_diff(a: dict, b: dict):
    added = sorted((k, v) for k, v in b.items() if k not in a)
    changed = sorted((k, v) for k, v in b.items() if k in a and a[k] != v)
    removed = sorted(k for k in a if k not in b)
    return added, changed, removed


@given(contents, contents)
@SETTINGS
def test_two_party_protocol_finds_exactly_the_differences(a, b):
    local, remote = store_of(a), store_of(b)
    buckets, diff = run_protocol(local, remote)
    added, changed, removed = brute_diff(a, b)
    assert (diff.added, diff.changed, diff.removed) == (added, changed, removed)
    differing_keys = [k for k, _ in added] + [k for k, _ in changed] + removed
    assert buckets == sorted({spec_bucket(k) for k in differing_keys})
    assert buckets == local.differing_buckets(remote)
    assert diff.from_digest == local.digest() and diff.to_digest == remote.digest()
    local.apply_diff(diff)
    assert local.scan() == remote.scan() and local.digest() == remote.digest()


def test_bucket_entries_are_in_key_order_across_buckets():
    state = {bytes([i, j]): bytes([i ^ j]) for i in range(20) for j in range(20)}
    store = store_of(state)
    buckets = sorted({spec_bucket(k) for k in state})[::3]
    expected = sorted((k, v) for k, v in state.items() if spec_bucket(k) in set(buckets))
    assert store.bucket_entries(list(reversed(buckets))) == expected
    with pytest.raises(ValueError):
        store.bucket_entries([65536])


def test_diff_buckets_rejects_entries_outside_the_buckets():
    store = store_of({b"a": b"1"})
    bucket = spec_bucket(b"a")
    other = next(k for k in (bytes([i]) for i in range(256)) if spec_bucket(k) != bucket)
    with pytest.raises(ValueError):
        store.diff_buckets([bucket], [(other, b"x")])
    with pytest.raises(ValueError):
        store.diff_buckets([bucket], [(b"a", b"x"), (b"a", b"y")])


# --- the audit chain ----------------------------------------------------------------------------


def test_chain_matches_formula_and_genesis():
    assert ref.chain(ZERO32, 0, b"") == b3(b"SYNCHAIN" + ZERO32 + bytes(8))
    assert ref.chain(ZERO32, 7, b"entry") == b3(
        b"SYNCHAIN" + ZERO32 + struct.pack("<Q", 7) + b"entry"
    )
    top = 2**64 - 1
    assert ref.chain(ZERO32, top, b"x") == b3(b"SYNCHAIN" + ZERO32 + b"\xff" * 8 + b"x")


@given(st.binary(min_size=32, max_size=32), st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=40)), max_size=12))
@SETTINGS
def test_chain_many_is_the_fold_of_chain(prev, entries):
    out = ref.chain_many(prev, entries)
    assert len(out) == len(entries)
    for digest, (index, entry) in zip(out, entries):
        assert digest == ref.chain(prev, index, entry)
        prev = digest


def test_chain_links_depend_on_every_input():
    base = ref.chain(ZERO32, 1, b"e")
    assert ref.chain(ZERO32, 2, b"e") != base
    assert ref.chain(ZERO32, 1, b"f") != base
    assert ref.chain(b"\x01" + ZERO32[1:], 1, b"e") != base
    # The index is fixed-width, so it cannot trade bytes with the entry.
    assert ref.chain(ZERO32, 0x0100, b"") != ref.chain(ZERO32, 0x01, b"\x00")
    assert ref.chain_many(ZERO32, []) == []


def test_chain_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ref.chain(bytes(31), 0, b"")
    with pytest.raises(OverflowError):
        ref.chain(ZERO32, -1, b"")
    with pytest.raises(OverflowError):
        ref.chain(ZERO32, 2**64, b"")
    with pytest.raises(TypeError):
        ref.chain(ZERO32, 0, "text")
    with pytest.raises(TypeError):
        ref.chain_many(ZERO32, [(0, b"a"), (1, "b")])


# --- batches and reads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        [(b"ok", b"v"), ("str-key", b"v")],
        [(b"ok", b"v"), (b"k", 5)],
        [(b"ok", b"v"), (b"k",)],
        [(b"ok", b"v"), b"kv"],
        [(b"ok", b"v"), (None, b"v")],
        [(b"ok", b"v"), (b"k", b"v", b"extra")],
    ],
)
def test_bad_batch_raises_type_error_and_changes_nothing(bad):
    store = store_of({b"a": b"1", b"ok": b"old"})
    before = (store.digest(), store.scan(), store.node_digests(2))
    with pytest.raises(TypeError):
        store.apply(bad)
    assert (store.digest(), store.scan(), store.node_digests(2)) == before


def test_batch_applies_in_order_with_duplicate_keys():
    store = ReferenceStore()
    assert store.apply([(b"k", b"1"), (b"k", b"2"), (b"j", b"x"), (b"j", None), (b"k", b"3")]) == 5
    assert store.scan() == [(b"k", b"3")]
    assert store.get(b"k") == b"3" and store.get(b"j") is None
    assert store.get_many([b"j", b"k", b"k"]) == [None, b"3", b"3"]
    assert b"k" in store and b"j" not in store
    assert store.digest() == spec_digest({b"k": b"3"})


def test_empty_key_and_empty_value_are_entries():
    store = store_of({b"": b"", b"a": b""})
    assert len(store) == 2 and b"" in store and store.get(b"") == b""
    assert store.digest() == spec_digest({b"": b"", b"a": b""}) != ReferenceStore().digest()


@given(contents, keys, st.one_of(st.none(), keys), st.one_of(st.none(), st.integers(0, 10)))
@SETTINGS
def test_scan_matches_brute_force(state, start, end, limit):
    store = store_of(state)
    expected = [(k, v) for k, v in sorted(state.items()) if k >= start and (end is None or k < end)]
    if limit is not None:
        expected = expected[:limit]
    assert store.scan(start, end, limit) == expected


@given(contents, st.one_of(keys, st.sampled_from([b"\xff", b"a\xff", b""])), st.one_of(st.none(), st.integers(0, 5)))
@SETTINGS
def test_scan_prefix_matches_brute_force(state, prefix, limit):
    store = store_of(state)
    expected = [(k, v) for k, v in sorted(state.items()) if k.startswith(prefix)]
    if limit is not None:
        expected = expected[:limit]
    assert store.scan_prefix(prefix, limit) == expected


def test_clone_is_independent():
    store = store_of({b"a": b"1"})
    copy = store.clone()
    copy.apply([(b"b", b"2"), (b"a", None)])
    assert store.scan() == [(b"a", b"1")] and copy.scan() == [(b"b", b"2")]
    assert store.digest() == spec_digest({b"a": b"1"})
    assert store.node_digests(4) == spec_level({b"a": b"1"}, 4)


def test_stats_count_entries_and_bytes():
    stats = store_of({b"ab": b"123", b"c": b""}).stats()
    assert (stats["entries"], stats["key_bytes"], stats["value_bytes"]) == (2, 3, 3)
    assert stats["memory_usage"] > 0


# --- snapshots ----------------------------------------------------------------------------------


@given(contents, st.integers(0, 2**64 - 1))
@SETTINGS
def test_snapshot_bytes_follow_the_layout_and_round_trip(tmp_path, state, log_index):
    store = store_of(state)
    path = tmp_path / "state.snap"
    info = store.write_snapshot(path, log_index)
    data = path.read_bytes()
    assert data == spec_snapshot(state, log_index)
    assert data == ref.encode_snapshot(sorted(state.items()), log_index)
    assert not os.path.exists(str(path) + ".tmp")
    assert (info.path, info.format, info.entry_count, info.log_index) == (
        str(path), 1, len(state), log_index)
    assert (info.state_digest, info.file_size) == (store.digest(), len(data))
    loaded, loaded_info = ReferenceStore.load_snapshot(path)
    assert loaded.scan() == store.scan()
    assert loaded.digest() == store.digest() == loaded.recompute_digest()
    assert loaded.node_digests(3) == store.node_digests(3)
    assert loaded_info == info
    assert ref.read_snapshot_info(path) == info
    entries, buffer_info = ref.decode_snapshot(data)
    assert entries == sorted(state.items()) and buffer_info.state_digest == store.digest()


def test_empty_snapshot_is_header_plus_end_chunk(tmp_path):
    info = ReferenceStore().write_snapshot(tmp_path / "e", 0)
    data = (tmp_path / "e").read_bytes()
    assert len(data) == info.file_size == 80 + 8 + 16
    assert data == spec_snapshot({}, 0)
    loaded, info = ReferenceStore.load_snapshot(tmp_path / "e")
    assert len(loaded) == 0 and info.entry_count == 0


def test_snapshot_chunking_rule(tmp_path):
    # Records of 4 + 8 + 4 + 10,000 bytes: the payload first reaches 262,144 after 27 records
    # (26 make 260,416), so chunks hold 27, 27 and the remaining 6.
    state = {b"key-%04d" % i: bytes([i % 251]) * 10_000 for i in range(60)}
    store = store_of(state)
    store.write_snapshot(tmp_path / "big", 3)
    data = (tmp_path / "big").read_bytes()
    record = 4 + 8 + 4 + 10_000
    assert chunk_layout(data, 80) == [(27, 27 * record), (27, 27 * record), (6, 6 * record), (0, 0)]
    loaded, _ = ReferenceStore.load_snapshot(tmp_path / "big")
    assert loaded.scan() == store.scan() and loaded.digest() == store.digest()


def test_chunk_closes_exactly_at_the_target(tmp_path):
    # One record of exactly CHUNK_TARGET bytes closes its chunk at once; the next opens a new one.
    big = CHUNK_TARGET - 4 - 1 - 4
    state = {b"a": b"x" * big, b"b": b"y"}
    data = ref.encode_snapshot(sorted(state.items()), 0)
    assert chunk_layout(data, 80) == [(1, CHUNK_TARGET), (1, 10), (0, 0)]
    # One byte short: both records share a chunk.
    state = {b"a": b"x" * (big - 1), b"b": b"y"}
    data = ref.encode_snapshot(sorted(state.items()), 0)
    assert chunk_layout(data, 80) == [(2, CHUNK_TARGET - 1 + 10), (0, 0)]


def test_reordered_chunks_fail_their_checks():
    state = {b"key-%04d" % i: bytes(10_000) for i in range(60)}
    data = ref.encode_snapshot(sorted(state.items()), 0)
    size = 8 + 27 * 10_016 + 16
    first, second = data[80 : 80 + size], data[80 + size : 80 + 2 * size]
    swapped = data[:80] + second + first + data[80 + 2 * size :]
    with pytest.raises(CorruptSnapshotError, match="chunk 0 check"):
        ref.decode_snapshot(swapped)


def craft_header(magic: bytes, tag: bytes, fields: bytes, fmt: int = 1, flags: int = 0) -> bytes:
    body = magic + struct.pack("<II", fmt, flags) + fields
    return body + b3(tag + body)[:16]


def test_unsupported_format_and_flags(tmp_path):
    data = spec_snapshot({b"a": b"1"}, 5)
    fields = data[16:64]
    for fmt in (0, 2, 0xFFFFFFFF):
        with pytest.raises(UnsupportedFormatError, match="format"):
            ref.decode_snapshot(craft_header(b"SYNSNAP\0", b"SYNSNAPH", fields, fmt) + data[80:])
    with pytest.raises(UnsupportedFormatError, match="flags"):
        ref.decode_snapshot(craft_header(b"SYNSNAP\0", b"SYNSNAPH", fields, flags=1) + data[80:])
    with pytest.raises(UnsupportedFormatError, match="magic"):
        ref.decode_snapshot(b"SYNDIFF\0" + data[8:])
    path = tmp_path / "v2"
    path.write_bytes(craft_header(b"SYNSNAP\0", b"SYNSNAPH", fields, 2) + data[80:])
    with pytest.raises(UnsupportedFormatError, match=str(path)):
        ReferenceStore.load_snapshot(path)
    with pytest.raises(UnsupportedFormatError):
        ref.read_snapshot_info(path)


def test_snapshot_with_valid_checks_but_bad_contents_is_rejected():
    # Re-sign a header claiming a different digest or count: the checks pass, the contents don't.
    data = spec_snapshot({b"a": b"1", b"b": b"2"}, 5)
    wrong_digest = craft_header(b"SYNSNAP\0", b"SYNSNAPH", data[16:32] + bytes(32))
    with pytest.raises(CorruptSnapshotError, match="digest"):
        ref.decode_snapshot(wrong_digest + data[80:])
    wrong_count = craft_header(b"SYNSNAP\0", b"SYNSNAPH", struct.pack("<QQ", 3, 5) + data[32:64])
    with pytest.raises(CorruptSnapshotError, match="entries"):
        ref.decode_snapshot(wrong_count + data[80:])
    too_few = craft_header(b"SYNSNAP\0", b"SYNSNAPH", struct.pack("<QQ", 1, 5) + data[32:64])
    with pytest.raises(CorruptSnapshotError, match="more than the header"):
        ref.decode_snapshot(too_few + data[80:])


def signed_chunk(tag: bytes, seq: int, count: int, payload: bytes) -> bytes:
    chunk = struct.pack("<II", count, len(payload)) + payload
    return chunk + b3(tag + struct.pack("<Q", seq) + chunk)[:16]


def test_signed_chunks_with_bad_structure_are_rejected():
    rec = lambda k, v: struct.pack("<I", len(k)) + k + struct.pack("<I", len(v)) + v  # noqa: E731
    state = {b"a": b"1", b"b": b"2"}
    header = spec_snapshot(state, 0)[:80]
    end = lambda seq: signed_chunk(b"SYNSNAPC", seq, 0, b"")  # noqa: E731
    cases = {
        "sort after": signed_chunk(b"SYNSNAPC", 0, 2, rec(b"b", b"2") + rec(b"a", b"1")) + end(1),
        "overruns": signed_chunk(b"SYNSNAPC", 0, 2, rec(b"a", b"1") + rec(b"b", b"2")[:-1]) + end(1),
        "left after": signed_chunk(b"SYNSNAPC", 0, 1, rec(b"a", b"1") + rec(b"b", b"2")) + end(1),
        "no entries but": signed_chunk(b"SYNSNAPC", 0, 0, rec(b"a", b"1")),
        "after the snapshot end": signed_chunk(b"SYNSNAPC", 0, 2, rec(b"a", b"1") + rec(b"b", b"2"))
        + end(1) + end(2),
    }
    for message, body in cases.items():
        with pytest.raises(CorruptSnapshotError, match=message):
            ref.decode_snapshot(header + body)
    # Splitting the same records differently is still a valid snapshot: readers do not insist on
    # the writer's chunking.
    split = signed_chunk(b"SYNSNAPC", 0, 1, rec(b"a", b"1")) + signed_chunk(
        b"SYNSNAPC", 1, 1, rec(b"b", b"2")) + end(2)
    assert ref.decode_snapshot(header + split)[0] == sorted(state.items())


def test_truncation_and_trailing_data_are_named():
    data = spec_snapshot({b"a": b"1"}, 0)
    with pytest.raises(TruncatedSnapshotError, match="<buffer>: truncated at offset"):
        ref.decode_snapshot(data[:-1])
    with pytest.raises(TruncatedSnapshotError):
        ref.decode_snapshot(b"")
    with pytest.raises(CorruptSnapshotError, match="after the snapshot end chunk"):
        ref.decode_snapshot(data + b"\x00")
    assert issubclass(CorruptSnapshotError, SnapshotError) and issubclass(SnapshotError, ValueError)
    assert issubclass(DigestMismatchError, ValueError)


# --- diffs --------------------------------------------------------------------------------------


@given(contents, contents)
@SETTINGS
def test_diff_then_apply_reaches_the_target(a, b):
    source, target = store_of(a), store_of(b)
    diff = source.diff(target)
    assert (diff.added, diff.changed, diff.removed) == brute_diff(a, b)
    assert len(diff) == len(diff.added) + len(diff.changed) + len(diff.removed)
    assert diff.from_digest == source.digest() and diff.to_digest == target.digest()
    source.apply_diff(diff)
    assert source.scan() == target.scan()
    assert source.digest() == target.digest() == source.recompute_digest()
    for level in (1, 3):
        assert source.node_digests(level) == target.node_digests(level)


@given(contents, contents)
@SETTINGS
def test_diff_encode_decode_round_trip(tmp_path, a, b):
    diff = store_of(a).diff(store_of(b))
    data = diff.encode()
    assert ReferenceDiff.decode(data) == diff
    header = data[:104]
    assert header[:8] == b"SYNDIFF\0" and struct.unpack_from("<IIQ", header, 8) == (1, 0, len(diff))
    assert header[24:56] == diff.from_digest and header[56:88] == diff.to_digest
    assert header[88:] == b3(b"SYNDIFFH" + header[:88])[:16]
    path = tmp_path / "d.diff"
    assert diff.write(path) == len(data) and path.read_bytes() == data
    assert ReferenceDiff.read(path) == diff


def test_diff_record_layout():
    a = store_of({b"b": b"old", b"c": b"gone"})
    b = store_of({b"a": b"new", b"b": b"newer"})
    data = a.diff(b).encode()
    payload = (
        b"\x01" + struct.pack("<I", 1) + b"a" + struct.pack("<I", 3) + b"new"
        + b"\x02" + struct.pack("<I", 1) + b"b" + struct.pack("<I", 5) + b"newer"
        + b"\x03" + struct.pack("<I", 1) + b"c"
    )
    assert data[104:] == signed_chunk(b"SYNDIFFC", 0, 3, payload) + signed_chunk(b"SYNDIFFC", 1, 0, b"")


def test_diff_rejects_unknown_op_and_bad_count():
    header = craft_header(b"SYNDIFF\0", b"SYNDIFFH", struct.pack("<Q", 1) + ZERO32 + ZERO32)
    bad_op = b"\x04" + struct.pack("<I", 1) + b"a"
    with pytest.raises(CorruptSnapshotError, match="op 4"):
        ref.decode_diff(header + signed_chunk(b"SYNDIFFC", 0, 1, bad_op) + signed_chunk(b"SYNDIFFC", 1, 0, b""))
    with pytest.raises(CorruptSnapshotError, match="header says 1"):
        ref.decode_diff(header + signed_chunk(b"SYNDIFFC", 0, 0, b""))


@given(contents, contents)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_diff_snapshot_and_diff_snapshots_equal_diff(tmp_path, a, b):
    source, target = store_of(a), store_of(b)
    target.write_snapshot(tmp_path / "new", 2)
    source.write_snapshot(tmp_path / "old", 1)
    expected = source.diff(target)
    assert source.diff_snapshot(tmp_path / "new") == expected
    assert ref.diff_snapshots(tmp_path / "old", tmp_path / "new") == expected


def test_apply_diff_to_wrong_state_changes_nothing():
    a, b = store_of({b"a": b"1"}), store_of({b"a": b"2", b"b": b"3"})
    diff = a.diff(b)
    other = store_of({b"x": b"y"})
    before = (other.digest(), other.scan(), other.node_digests(4))
    with pytest.raises(DigestMismatchError):
        other.apply_diff(diff)
    assert (other.digest(), other.scan(), other.node_digests(4)) == before


def test_apply_diff_that_misses_its_promise_changes_nothing():
    a, b = store_of({b"a": b"1"}), store_of({b"a": b"2", b"b": b"3"})
    good = a.diff(b)
    lying = ReferenceDiff(good.from_digest, bytes(32), good.added, good.changed, good.removed)
    before = (a.digest(), a.scan(), a.node_digests(4))
    with pytest.raises(DigestMismatchError, match="promises"):
        a.apply_diff(lying)
    assert (a.digest(), a.scan(), a.node_digests(4)) == before
    # Round trip through bytes keeps the lie detectable.
    with pytest.raises(DigestMismatchError):
        a.apply_diff(ReferenceDiff.decode(lying.encode()))
    a.apply_diff(good)
    assert a.digest() == b.digest()
