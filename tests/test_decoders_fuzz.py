"""Every decoder that reads bytes a node did not make itself, fed what hypothesis makes: log
entries and Raft commands (from the network), the dump file and the catch-up container (from
the network, then the disk). Each either decodes or raises its own clear error (a
``ValueError`` with a message) — no other exception, no hang — and a refused catch-up
container changes nothing. Snapshots, snapshot diffs and the journal have their own
byte-by-byte corruption tests (test_snapshot_corruption.py, test_journal.py); the HTTP API's
inputs are schemathesis' (test_api_conformance.py, scripts/hostile-input)."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse import _core
from synapse.cluster import dump
from synapse.cluster.entries import EntryDecodeError, decode_command
from synapse.integrity import catchup
from synapse.state.commands import EntryError, decode_entry

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack documents of any shape, to get past the framing into the structure checks.
documents = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner,
                                                               max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2000) | documents.map(lambda d: msgpack.packb(d, use_bin_type=True)))
def test_log_entries_decode_or_say_why(payload):
    try:
        assert isinstance(decode_entry(payload), list)
    except EntryError as e:
        assert str(e).startswith("entry:")


@FUZZ
@given(st.binary(max_size=2000))
def test_raft_commands_decode_or_say_why(command):
    try:
        decode_command(command)
    except EntryDecodeError as e:
        assert str(e)


def _write(data: bytes) -> Path:
    f = tempfile.NamedTemporaryFile(delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


@FUZZ
@given(st.binary(max_size=3000), st.booleans())
def test_a_damaged_dump_is_refused_with_its_reason(tail, with_magic):
    path = _write((dump.MAGIC if with_magic else b"") + tail)
    try:
        dump.read_dump(path)
    except (dump.DumpError, _core.SnapshotError) as e:
        assert str(path) in str(e) or "snapshot" in str(e)
    finally:
        path.unlink()


@FUZZ
@given(documents)
def test_a_dump_with_a_valid_checksum_but_nonsense_metadata_is_refused(meta):
    body = msgpack.packb(meta, use_bin_type=True)
    path = _write(dump.MAGIC + struct.pack("<I", len(body)) + body + dump._check(body) + b"\0" * 32)
    try:
        dump.read_dump(path)
    except (dump.DumpError, _core.SnapshotError) as e:
        assert str(e)
    finally:
        path.unlink()


def _framed(body: bytes) -> bytes:
    return catchup.MAGIC + struct.pack("<Q", len(body)) + body + catchup._check(body)


@FUZZ
@given(st.binary(max_size=2000) | documents.map(lambda d: _framed(msgpack.packb(d, use_bin_type=True)))
       | st.builds(lambda meta, puts, deletes: _framed(msgpack.packb({"meta": meta, "puts": puts, "deletes": deletes},
                                                                      use_bin_type=True)),
                   documents, documents, documents))
def test_a_catch_up_container_is_applied_whole_or_refused_changing_nothing(data):
    store = _core.StateStore()
    store.apply([(b"kv/a", b"1"), (b"kv/b", b"2")])
    before = store.digest()
    path = _write(data)
    try:
        changed = catchup.apply_container(store, catchup.read_container(path))
        assert changed == 0 or store.digest() != before
    except catchup.CatchUpError as e:
        assert str(e) and store.digest() == before
    finally:
        path.unlink()


@FUZZ
@given(st.binary(min_size=32, max_size=32),
       st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=40)), max_size=8),
       st.lists(st.tuples(st.integers(min_value=0, max_value=_core.BUCKETS - 1), st.binary(max_size=8)), max_size=8))
def test_a_well_formed_container_that_does_not_reach_its_target_changes_nothing(target, puts, deletes):
    """Past every structure check, against the right base: the changes are tried, the digest
    is not the promised one, everything is undone."""
    store = _core.StateStore()
    store.apply([(b"kv/a", b"1"), (b"kv/b", b"2")])
    before = store.digest()
    meta = {"base": before, "target": target, "last": [b"t", 9, 1], "prev": [b"t", 8, 1], "cluster": [], "index": 9}
    path = _write(_framed(msgpack.packb({"meta": meta, "puts": [list(p) for p in puts],
                                         "deletes": [list(d) for d in deletes]}, use_bin_type=True)))
    try:
        catchup.apply_container(store, catchup.read_container(path))
        assert store.digest() == target  # only if the random target happened to be right
    except catchup.CatchUpError as e:
        assert "nothing was changed" in str(e) and store.digest() == before
    finally:
        path.unlink()


def test_a_delete_naming_a_bucket_that_does_not_exist_is_malformed():
    store = _core.StateStore()
    meta = {"base": store.digest(), "target": bytes(32), "last": [b"t", 9, 1], "prev": [b"t", 8, 1], "cluster": [],
            "index": 9}
    path = _write(_framed(msgpack.packb({"meta": meta, "puts": [], "deletes": [[_core.BUCKETS, b"abcd"]]},
                                        use_bin_type=True)))
    try:
        catchup.read_container(path)
        raise AssertionError("a bucket past the last was accepted")
    except catchup.CatchUpError as e:
        assert "bucket (0 to" in str(e)
    finally:
        path.unlink()
