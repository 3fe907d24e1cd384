"""The Rust core (``synapse._core``) against the pure-Python reference, side by side.

Every output that rust/DESIGN.md fixes bit for bit is compared: state digests, tree digests,
snapshot and diff bytes, chain digests; and each implementation must read what the other
writes.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synapse.reference as ref

core = pytest.importorskip("synapse._core")

SETTINGS = settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FEW = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

keys = st.one_of(
    st.sampled_from([b"", b"a", b"ab", b"a\x00", b"b", b"\xff", b"\xff\xff", b"key-1", b"key-2"]),
    st.binary(max_size=30),  # both sides of the core's 22-byte inline-key boundary
)
values = st.binary(max_size=40)
ops = st.lists(st.tuples(keys, st.one_of(st.none(), values)), max_size=25)
batches = st.lists(ops, max_size=5)
contents = st.dictionaries(keys, values, max_size=30)
u64s = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1]))


def both(state: dict[bytes, bytes]):
    rust, oracle = core.StateStore(), ref.ReferenceStore()
    items = list(state.items())
    rust.apply(items)
    oracle.apply(items)
    return rust, oracle


def diff_fields(diff) -> tuple:
    return (diff.from_digest, diff.to_digest, diff.added, diff.changed, diff.removed, len(diff))


def as_reference(diff) -> ref.ReferenceDiff:
    return ref.ReferenceDiff(diff.from_digest, diff.to_digest, diff.added, diff.changed, diff.removed)


def info_fields(info) -> tuple:
    return (info.path, info.format, info.entry_count, info.log_index, info.state_digest, info.file_size)


def assert_same_state(rust, oracle, levels=(0, 1, 2, 3)) -> None:
    assert rust.digest() == oracle.digest(), "digest"
    assert rust.recompute_digest() == rust.digest(), "core incremental != recompute"
    assert rust.hexdigest() == oracle.hexdigest()
    assert len(rust) == len(oracle)
    assert rust.scan() == oracle.scan()
    for level in levels:
        assert rust.node_digests(level) == oracle.node_digests(level), f"level {level}"


# --- hashing ------------------------------------------------------------------------------------


def test_constants_match():
    assert (core.BUCKETS, core.FANOUT, core.TREE_DEPTH, core.DIGEST_SIZE, core.SNAPSHOT_FORMAT) == (
        ref.BUCKETS, ref.FANOUT, ref.TREE_DEPTH, ref.DIGEST_SIZE, ref.SNAPSHOT_FORMAT)


def test_empty_state_matches():
    assert_same_state(core.StateStore(), ref.ReferenceStore(), levels=range(5))
    assert core.StateStore().digest() == ref.empty_state_digest()


@given(keys, values)
@SETTINGS
def test_element_hash_and_bucket_match(key, value):
    assert core.element_hash(key, value) == ref.element_hash(key, value)
    assert core.StateStore.bucket_of(key) == ref.bucket_of(key)


@given(batches)
@SETTINGS
def test_digests_match_after_random_histories(history):
    rust, oracle = core.StateStore(), ref.ReferenceStore()
    for batch in history:
        assert rust.apply(batch) == oracle.apply(batch) == len(batch)
        assert rust.digest() == oracle.digest()
    assert_same_state(rust, oracle)
    assert oracle.recompute_digest() == oracle.digest()


@given(contents)
@settings(max_examples=10, deadline=None)
def test_bucket_level_matches(state):
    rust, oracle = both(state)
    assert rust.node_digests(4) == oracle.node_digests(4)


@given(contents, contents)
@SETTINGS
def test_equal_digests_iff_equal_contents(a, b):
    ra, _ = both(a)
    rb, _ = both(b)
    assert (ra.digest() == rb.digest()) == (a == b)


def test_large_values_and_keys_match():
    state = {b"k" * 1000: b"v" * 300_000, b"": bytes(range(256)) * 100, b"x" * 23: b""}
    rust, oracle = both(state)
    assert_same_state(rust, oracle)


# --- reads --------------------------------------------------------------------------------------


@given(contents, keys, st.one_of(st.none(), keys), st.one_of(st.none(), st.integers(0, 10)))
@SETTINGS
def test_scan_and_reads_match(state, start, end, limit):
    rust, oracle = both(state)
    assert rust.scan(start, end, limit) == oracle.scan(start, end, limit)
    assert rust.scan(start) == oracle.scan(start)
    assert rust.scan_prefix(start, limit) == oracle.scan_prefix(start, limit)
    probe = [start, end or b"", *state][:12]
    assert rust.get_many(probe) == oracle.get_many(probe)
    for key in probe:
        assert rust.get(key) == oracle.get(key)
        assert (key in rust) == (key in oracle)


@pytest.mark.parametrize("prefix", [b"", b"\xff", b"\xff\xff", b"a\xff", b"a"])
def test_scan_prefix_edges_match(prefix):
    state = {k: b"v" for k in [b"", b"a", b"a\xff", b"a\xff\x00", b"b", b"\xff", b"\xff\xff", b"\xff\xff\x01"]}
    rust, oracle = both(state)
    assert rust.scan_prefix(prefix) == oracle.scan_prefix(prefix)


def test_stats_match():
    rust, oracle = both({b"ab": b"123", b"c": b"", b"x" * 40: b"y" * 7})
    rs, os_ = rust.stats(), oracle.stats()
    for field in ("entries", "key_bytes", "value_bytes"):
        assert rs[field] == os_[field], field
    assert rs["memory_usage"] == rust.memory_usage() > 0


@pytest.mark.parametrize(
    "bad",
    [
        [(b"ok", b"v"), ("str-key", b"v")],
        [(b"ok", b"v"), (b"k", 5)],
        [(b"ok", b"v"), (b"k",)],
        [(b"ok", b"v"), (None, b"v")],
        [(b"ok", b"v"), (b"k", b"v", b"extra")],
        [(b"ok", b"v"), 7],
    ],
)
def test_bad_batch_changes_nothing_in_either(bad):
    rust, oracle = both({b"a": b"1", b"ok": b"old"})
    for store in (rust, oracle):
        before = (store.digest(), store.scan(), store.node_digests(3))
        with pytest.raises(TypeError):
            store.apply(bad)
        assert (store.digest(), store.scan(), store.node_digests(3)) == before
    assert rust.recompute_digest() == oracle.digest()


def test_clone_is_independent():
    rust, oracle = both({b"a": b"1"})
    rust_copy, oracle_copy = rust.clone(), oracle.clone()
    for store in (rust_copy, oracle_copy):
        store.apply([(b"b", b"2"), (b"a", None)])
    assert_same_state(rust, oracle)
    assert_same_state(rust_copy, oracle_copy)
    assert rust.scan() == [(b"a", b"1")]


# --- the bucket tree and the two-party protocol --------------------------------------------------


def run_protocol(local, remote):
    """Locate and fetch the differences, passing only bytes and lists between the parties."""
    if local.node_digests(0) == remote.node_digests(0):
        return [], local.diff_buckets([], [])
    frontier = [0]
    for level in range(4):
        wire = bytes(remote.children_digests(level, list(frontier)))
        frontier = list(local.compare_children(level, list(frontier), wire))
    wire_entries = [(bytes(k), bytes(v)) for k, v in remote.bucket_entries(frontier)]
    return frontier, local.diff_buckets(frontier, wire_entries)


def brute_diff(a: dict, b: dict):
    added = sorted((k, v) for k, v in b.items() if k not in a)
    changed = sorted((k, v) for k, v in b.items() if k in a and a[k] != v)
    removed = sorted(k for k in a if k not in b)
    return added, changed, removed


@pytest.mark.parametrize("pairing", ["core-core", "core-ref", "ref-core"])
@given(a=contents, b=contents)
@FEW
def test_two_party_protocol_finds_exactly_the_differing_keys(pairing, a, b):
    rust_a, ref_a = both(a)
    rust_b, ref_b = both(b)
    local, remote = {
        "core-core": (rust_a, rust_b),
        "core-ref": (rust_a, ref_b),
        "ref-core": (ref_a, rust_b),
    }[pairing]
    buckets, diff = run_protocol(local, remote)
    added, changed, removed = brute_diff(a, b)
    assert (diff.added, diff.changed, diff.removed) == (added, changed, removed)
    differing = [k for k, _ in added] + [k for k, _ in changed] + removed
    assert buckets == sorted({ref.bucket_of(k) for k in differing})
    assert diff.from_digest == local.digest() and diff.to_digest == remote.digest()
    local.apply_diff(diff)
    assert local.digest() == remote.digest() and local.scan() == remote.scan()
    assert local.recompute_digest() == remote.digest()


@given(contents, contents)
@FEW
def test_tree_calls_match(a, b):
    rust_a, ref_a = both(a)
    rust_b, ref_b = both(b)
    assert rust_a.differing_buckets(rust_b) == ref_a.differing_buckets(ref_b)
    parents_by_level = {0: [0], 1: [0, 5, 15], 2: [255, 0, 17], 3: [4095, 1, 2048]}
    for level, parents in parents_by_level.items():
        theirs = ref_b.children_digests(level, parents)
        assert rust_b.children_digests(level, parents) == theirs
        assert rust_a.compare_children(level, parents, theirs) == ref_a.compare_children(
            level, parents, theirs)
    buckets = sorted({ref.bucket_of(k) for k in [*a, *b]})[:10]
    assert rust_a.bucket_entries(buckets) == ref_a.bucket_entries(buckets)
    remote = ref_b.bucket_entries(buckets)
    assert diff_fields(rust_a.diff_buckets(buckets, remote)) == diff_fields(
        ref_a.diff_buckets(buckets, remote))


def test_tree_calls_reject_bad_levels_and_indexes():
    rust, oracle = both({b"a": b"1"})
    for store in (rust, oracle):
        with pytest.raises(ValueError):
            store.node_digests(5)
        with pytest.raises(ValueError):
            store.children_digests(4, [0])
        with pytest.raises(ValueError):
            store.children_digests(1, [16])
        with pytest.raises(ValueError):
            store.compare_children(0, [0], bytes(31))
        with pytest.raises(ValueError):
            store.bucket_entries([65536])


# --- diffs --------------------------------------------------------------------------------------


@given(contents, contents)
@SETTINGS
def test_diff_then_apply_matches_and_reaches_target(a, b):
    rust_a, ref_a = both(a)
    rust_b, ref_b = both(b)
    rust_diff, ref_diff = rust_a.diff(rust_b), ref_a.diff(ref_b)
    assert diff_fields(rust_diff) == diff_fields(ref_diff)
    assert rust_diff.encode() == ref_diff.encode()
    rust_a.apply_diff(rust_diff)
    ref_a.apply_diff(ref_diff)
    assert_same_state(rust_a, ref_a)
    assert rust_a.digest() == rust_b.digest() and rust_a.scan() == rust_b.scan()


@given(contents, contents)
@SETTINGS
def test_diff_encodings_are_identical_and_cross_decode(a, b):
    rust_a, ref_a = both(a)
    rust_b, ref_b = both(b)
    encoded = ref_a.diff(ref_b).encode()
    assert rust_a.diff(rust_b).encode() == encoded
    from_rust = core.StateDiff.decode(encoded)
    assert diff_fields(from_rust) == diff_fields(ref.ReferenceDiff.decode(encoded))
    assert from_rust.encode() == encoded
    # A diff decoded by the core from reference bytes applies in the core, and vice versa.
    rust_a.apply_diff(from_rust)
    ref_a.apply_diff(ref.ReferenceDiff.decode(encoded))
    assert rust_a.digest() == ref_a.digest() == ref_b.digest()


def test_multi_chunk_diff_is_identical():
    a = {b"k%03d" % i: b"a" * 9000 for i in range(80)}
    b = {b"k%03d" % i: b"b" * 9000 for i in range(0, 120, 2)}
    rust_a, ref_a = both(a)
    rust_b, ref_b = both(b)
    encoded = ref_a.diff(ref_b).encode()
    assert len(encoded) > 2 * 262_144
    assert rust_a.diff(rust_b).encode() == encoded
    assert core.StateDiff.decode(encoded).encode() == encoded


def test_diff_write_and_read_match(tmp_path):
    rust_a, ref_a = both({b"a": b"1", b"b": b"2"})
    rust_b, ref_b = both({b"b": b"3", b"c": b"4"})
    rust_path, ref_path = tmp_path / "rust.diff", tmp_path / "ref.diff"
    written = rust_a.diff(rust_b).write(str(rust_path))
    assert written == ref_a.diff(ref_b).write(ref_path) == rust_path.stat().st_size
    assert rust_path.read_bytes() == ref_path.read_bytes()
    assert diff_fields(core.StateDiff.read(str(ref_path))) == diff_fields(
        ref.ReferenceDiff.read(rust_path))


def test_apply_diff_refusals_match():
    rust_a, ref_a = both({b"a": b"1"})
    rust_b, _ = both({b"a": b"2", b"b": b"3"})
    wrong, _ = both({b"x": b"y"})
    diff = rust_a.diff(rust_b)
    before = (wrong.digest(), wrong.scan())
    with pytest.raises(core.DigestMismatchError):
        wrong.apply_diff(diff)
    assert (wrong.digest(), wrong.scan()) == before
    # A diff whose to_digest is a lie: decoded by the core from reference-made bytes.
    lying = as_reference(diff)
    lying.to_digest = bytes(32)
    lying_core = core.StateDiff.decode(lying.encode())
    before = (rust_a.digest(), rust_a.scan(), rust_a.node_digests(4))
    with pytest.raises(core.DigestMismatchError):
        rust_a.apply_diff(lying_core)
    assert (rust_a.digest(), rust_a.scan(), rust_a.node_digests(4)) == before
    with pytest.raises(ref.DigestMismatchError):
        ref_a.apply_diff(lying)
    assert issubclass(core.DigestMismatchError, ValueError)
    assert issubclass(core.DigestMismatchError, core.CoreError)


# --- snapshots ----------------------------------------------------------------------------------


@given(contents, u64s)
@SETTINGS
def test_snapshot_files_are_byte_identical_and_cross_load(tmp_path, state, log_index):
    rust, oracle = both(state)
    rust_path, ref_path = str(tmp_path / "rust.snap"), str(tmp_path / "ref.snap")
    rust_info = rust.write_snapshot(rust_path, log_index)
    ref_info = oracle.write_snapshot(ref_path, log_index)
    with open(rust_path, "rb") as f1, open(ref_path, "rb") as f2:
        assert f1.read() == f2.read()
    assert info_fields(rust_info)[1:] == info_fields(ref_info)[1:]
    assert os.fspath(rust_info.path) == rust_path  # its type: test_snapshot_info_path_is_str
    loaded_rust, info_a = core.StateStore.load_snapshot(ref_path)
    loaded_ref, info_b = ref.ReferenceStore.load_snapshot(rust_path)
    assert_same_state(loaded_rust, loaded_ref)
    assert loaded_rust.scan() == sorted(state.items())
    assert info_fields(info_a)[1:] == info_fields(info_b)[1:] == info_fields(ref_info)[1:]
    assert info_fields(core.read_snapshot_info(ref_path))[1:] == info_fields(
        ref.read_snapshot_info(ref_path))[1:]


def test_multi_chunk_snapshot_is_byte_identical(tmp_path):
    state = {b"key-%04d" % i: bytes([i % 251]) * 10_000 for i in range(60)}
    state[b"huge"] = b"h" * 600_000  # a single record larger than the chunk target
    rust, oracle = both(state)
    rust.write_snapshot(tmp_path / "rust.snap", 9)
    oracle.write_snapshot(tmp_path / "ref.snap", 9)
    data = (tmp_path / "ref.snap").read_bytes()
    assert (tmp_path / "rust.snap").read_bytes() == data
    pos, chunks = 80, 0
    while struct.unpack_from("<I", data, pos)[0]:
        pos += 8 + struct.unpack_from("<I", data, pos + 4)[0] + 16
        chunks += 1
    assert chunks >= 3
    loaded, _ = core.StateStore.load_snapshot(tmp_path / "ref.snap")
    assert loaded.digest() == oracle.digest()


def test_snapshot_paths_may_be_pathlike(tmp_path):
    rust, oracle = both({b"a": b"1"})
    info = rust.write_snapshot(tmp_path / "p.snap", 1)
    assert os.fspath(info.path) == str(tmp_path / "p.snap")
    assert not (tmp_path / "p.snap.tmp").exists()
    assert core.StateStore.load_snapshot(tmp_path / "p.snap")[0].digest() == oracle.digest()


@pytest.mark.parametrize("as_path", [False, True])
def test_snapshot_info_path_is_str(tmp_path, as_path):
    # synapse/_core.pyi types SnapshotInfo.path as str, whatever kind of path was passed in.
    rust, _ = both({b"a": b"1"})
    path = tmp_path / "p.snap" if as_path else str(tmp_path / "p.snap")
    infos = {
        "write_snapshot": rust.write_snapshot(path, 1),
        "load_snapshot": core.StateStore.load_snapshot(path)[1],
        "read_snapshot_info": core.read_snapshot_info(path),
    }
    for name, info in infos.items():
        assert type(info.path) is str, f"{name}: path is {type(info.path).__name__}"
        assert info.path == str(path)


@given(contents, contents)
@FEW
def test_diff_snapshot_and_diff_snapshots_match(tmp_path, a, b):
    rust_a, ref_a = both(a)
    rust_b, _ = both(b)
    old, new = str(tmp_path / "old.snap"), str(tmp_path / "new.snap")
    rust_a.write_snapshot(old, 1)
    rust_b.write_snapshot(new, 2)
    expected = diff_fields(ref_a.diff_snapshot(new))
    assert diff_fields(rust_a.diff_snapshot(new)) == expected
    assert diff_fields(core.diff_snapshots(old, new)) == expected
    assert diff_fields(ref.diff_snapshots(old, new)) == expected
    assert expected[:2] == (rust_a.digest(), rust_b.digest())


# --- the audit chain ----------------------------------------------------------------------------


@given(st.binary(min_size=32, max_size=32), u64s, st.binary(max_size=200))
@SETTINGS
def test_chain_matches(prev, index, entry):
    assert core.chain(prev, index, entry) == ref.chain(prev, index, entry)


@given(st.binary(min_size=32, max_size=32), st.lists(st.tuples(u64s, st.binary(max_size=60)), max_size=20))
@SETTINGS
def test_chain_many_matches(prev, entries):
    out = core.chain_many(prev, entries)
    assert out == ref.chain_many(prev, entries)
    link = prev
    for digest, (index, entry) in zip(out, entries):
        assert digest == core.chain(link, index, entry)
        link = digest


def test_chain_argument_errors_match():
    for impl in (core, ref):
        with pytest.raises(ValueError):
            impl.chain(bytes(31), 0, b"")
        with pytest.raises(OverflowError):
            impl.chain(bytes(32), -1, b"")
        with pytest.raises(OverflowError):
            impl.chain(bytes(32), 2**64, b"")
        with pytest.raises(TypeError):
            impl.chain(bytes(32), 0, "text")


# --- argument errors ----------------------------------------------------------------------------


def test_scan_with_start_after_end_is_empty():
    # "Entries with start <= key < end": no key qualifies, which is an empty answer, not an error.
    rust, oracle = both({b"a": b"1", b"b": b"2", b"c": b"3"})
    for start, end in ((b"c", b"a"), (b"b", b"b"), (b"\xff", b"")):
        assert rust.scan(start, end) == oracle.scan(start, end) == []


BAD_CALLS = {
    "key is str": (TypeError, lambda impl, s: s.get("a")),
    "contains str": (TypeError, lambda impl, s: "a" in s),
    "op is a list": (TypeError, lambda impl, s: s.apply([[b"x", b"1"]])),
    "value is bytearray": (TypeError, lambda impl, s: s.apply([(b"x", bytearray(b"1"))])),
    "ops is None": (TypeError, lambda impl, s: s.apply(None)),
    "negative limit": (ValueError, lambda impl, s: s.scan(b"", None, -1)),
    "level too deep": (ValueError, lambda impl, s: s.node_digests(5)),
    "negative level": (OverflowError, lambda impl, s: s.node_digests(-1)),
    "negative bucket": (OverflowError, lambda impl, s: s.bucket_entries([-1])),
    "bucket too large": (ValueError, lambda impl, s: s.bucket_entries([65536])),
    "remote digests short": (ValueError, lambda impl, s: s.compare_children(0, [0], bytes(32 * 15))),
    "remote key twice": (
        ValueError, lambda impl, s: s.diff_buckets([ref.bucket_of(b"a")], [(b"a", b"1"), (b"a", b"2")])),
    "remote key outside buckets": (
        ValueError, lambda impl, s: s.diff_buckets([ref.bucket_of(b"a")], [(b"zzz", b"1")])),
    "apply_diff None": (TypeError, lambda impl, s: s.apply_diff(None)),
    "diff None": (TypeError, lambda impl, s: s.diff(None)),
    "negative log index": (OverflowError, lambda impl, s: s.write_snapshot("/nonexistent/x", -1)),
    "missing snapshot": (FileNotFoundError, lambda impl, s: impl.StateStore.load_snapshot("/nonexistent/x")),
    "chain_many bad entry": (TypeError, lambda impl, s: impl.chain_many(bytes(32), [(0, b"a"), (1, "b")])),
    "decode str": (TypeError, lambda impl, s: impl.StateDiff.decode("text")),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_argument_errors_match(case):
    expected, call = BAD_CALLS[case]
    for impl in (core, ref):
        store = impl.StateStore()
        store.apply([(b"a", b"1")])
        before = store.digest()
        with pytest.raises(expected):
            call(impl, store)
        assert store.digest() == before and store.scan() == [(b"a", b"1")]


@pytest.mark.parametrize("impl", [core, ref], ids=["core", "reference"])
def test_exception_hierarchy_is_the_typed_one(impl):
    for name in ("SnapshotError", "DigestMismatchError"):
        assert issubclass(getattr(impl, name), impl.CoreError)
        assert issubclass(getattr(impl, name), ValueError)
    for name in ("CorruptSnapshotError", "TruncatedSnapshotError", "UnsupportedFormatError"):
        assert issubclass(getattr(impl, name), impl.SnapshotError)
    assert not issubclass(impl.DigestMismatchError, impl.SnapshotError)
    assert issubclass(impl.CoreError, Exception)


@pytest.mark.parametrize("delta", [-2, -1, 0, 1])
def test_chunk_boundary_is_identical(tmp_path, delta):
    # A snapshot record is 4 + len(key) + 4 + len(value) bytes, a diff "added" record one more:
    # sizes around the 262,144-byte target decide whether the next record opens a new chunk.
    target = 262_144
    state = {b"a": b"x" * (target - 9 + delta), b"b": b"y", b"c": b"z" * (target // 2)}
    rust, oracle = both(state)
    rust.write_snapshot(tmp_path / "rust.snap", 0)
    oracle.write_snapshot(tmp_path / "ref.snap", 0)
    assert (tmp_path / "rust.snap").read_bytes() == (tmp_path / "ref.snap").read_bytes()
    diff_state = {b"a": b"x" * (target - 10 + delta), b"b": b"y", b"c": b"z" * (target // 2)}
    rust_d, ref_d = both(diff_state)
    encoded = ref.ReferenceStore().diff(ref_d).encode()
    assert core.StateStore().diff(rust_d).encode() == encoded


def test_large_batches_with_repeated_keys_match():
    # Big batches are where the core splits work across threads; the batch must still behave
    # as if applied op by op, in order.
    import random

    rng = random.Random(7)
    pool = [b"k%d" % i for i in range(400)] + [b"long-key-" + b"x" * 30 + b"%d" % i for i in range(100)]
    rust, oracle = core.StateStore(), ref.ReferenceStore()
    for _ in range(3):
        batch = [
            (rng.choice(pool), None if rng.random() < 0.2 else rng.randbytes(rng.randrange(0, 20)))
            for _ in range(2500)
        ]
        assert rust.apply(batch) == oracle.apply(batch) == 2500
        assert rust.digest() == oracle.digest()
    assert_same_state(rust, oracle, levels=range(5))
