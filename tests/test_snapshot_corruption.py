"""Every damaged snapshot or diff is refused, by the Rust core and by the reference alike.

For small files this is exhaustive: each byte flipped (xor 0xFF, and other masks), each proper
prefix, and appended garbage. A loader must raise its own SnapshotError subclass with a message
(naming the file for file loads), never return a state and never raise anything else.

The multi-chunk snapshot is several hundred kilobytes, so by default it is exhaustive over every
byte that carries structure (header, chunk framing, checks, record lengths and keys) and samples
the value bodies, whose bytes all play the same role; set SYNAPSE_EXHAUSTIVE_CORRUPTION=1 to flip
and cut at every offset (slow: minutes).
"""

from __future__ import annotations

import os
import struct

import pytest
from blake3 import blake3

import synapse.reference as ref

try:
    import synapse._core as core
except ModuleNotFoundError:
    core = None

IMPLS = [
    pytest.param(ref, id="reference"),
    pytest.param(
        core,
        id="core",
        marks=pytest.mark.skipif(core is None, reason="synapse._core is not built"),
    ),
]

SMALL_STATE = {
    b"": b"",
    b"a": b"1",
    b"key": b"value",
    b"\xff\xff\xff": b"x" * 20,
}
SMALL_MASKS = (0xFF, 0x01, 0x80, 0x5A)
LARGE_STATE = {b"big-%d" % i: bytes([i + 1]) * 150_000 for i in range(3)}
EXHAUSTIVE = os.environ.get("SYNAPSE_EXHAUSTIVE_CORRUPTION") == "1"

MAGIC_BYTES = range(0, 8)
VERSION_AND_FLAG_BYTES = range(8, 16)


def encode_snapshot(state: dict[bytes, bytes], log_index: int = 42) -> bytes:
    return ref.encode_snapshot(sorted(state.items()), log_index)


def b3(data: bytes) -> bytes:
    return blake3(data).digest()


def chunk_length_fields(data: bytes, header_size: int) -> set[int]:
    """Offsets of the bytes of every chunk's payload_len field."""
    offsets, pos = set(), header_size
    while True:
        count, length = struct.unpack_from("<II", data, pos)
        offsets.update(range(pos + 4, pos + 8))
        pos += 8 + length + 16
        if count == 0:
            return offsets


def snapshot_structure(data: bytes) -> set[int]:
    """Offsets of every byte except the insides of values."""
    offsets = set(range(80))
    pos = 80
    while True:
        count, length = struct.unpack_from("<II", data, pos)
        offsets.update(range(pos, pos + 8))
        cursor = pos + 8
        for _ in range(count):
            key_len = struct.unpack_from("<I", data, cursor)[0]
            offsets.update(range(cursor, cursor + 4 + key_len + 4))
            cursor += 4 + key_len
            value_len = struct.unpack_from("<I", data, cursor)[0]
            cursor += 4
            offsets.update({cursor, cursor + value_len - 1} if value_len else set())
            cursor += value_len
        assert cursor == pos + 8 + length
        offsets.update(range(cursor, cursor + 16))
        pos = cursor + 16
        if count == 0:
            assert pos == len(data)
            return offsets


def expected_classes(impl, offset: int, length_fields: set[int]):
    """The error a flipped byte must produce: damage to the magic is an unsupported format; to
    the format or flags fields either that or a failed header check (both readings of the spec
    are sound); to a chunk's payload_len either a failed check or, when the length now runs
    past the end of the data, a truncation (a reader cannot tell the two apart before it has
    the bytes the check covers); anywhere else a corruption."""
    if offset in MAGIC_BYTES:
        return (impl.UnsupportedFormatError,)
    if offset in VERSION_AND_FLAG_BYTES:
        return (impl.UnsupportedFormatError, impl.CorruptSnapshotError)
    if offset in length_fields:
        return (impl.CorruptSnapshotError, impl.TruncatedSnapshotError)
    return (impl.CorruptSnapshotError,)


def assert_refused(impl, load, classes, what: str, path: str | None = None) -> None:
    try:
        result = load()
    except impl.SnapshotError as exc:
        message = str(exc)
        assert message, f"{what}: {type(exc).__name__} with an empty message"
        assert isinstance(exc, classes), (
            f"{what}: {type(exc).__name__}({message!r}), expected one of "
            f"{[c.__name__ for c in classes]}"
        )
        if path is not None:
            assert path in message, f"{what}: message {message!r} does not name {path}"
        return
    raise AssertionError(f"{what}: accepted, returned {result!r}")


def load_snapshot(impl, path):
    return lambda: impl.StateStore.load_snapshot(path)


# --- snapshots ----------------------------------------------------------------------------------


def test_small_snapshot_is_written_identically_by_both():
    data = encode_snapshot(SMALL_STATE)
    assert len(data) < 300
    store = ref.StateStore()
    store.apply(list(SMALL_STATE.items()))
    assert ref.decode_snapshot(data)[1].state_digest == store.digest()


@pytest.mark.parametrize("impl", IMPLS)
def test_small_snapshot_every_flipped_byte_is_refused(impl, tmp_path):
    data = encode_snapshot(SMALL_STATE)
    path = str(tmp_path / "flip.snap")
    store = impl.StateStore()
    store.apply([(b"a", b"other")])
    length_fields = chunk_length_fields(data, 80)
    for offset in range(len(data)):
        for mask in SMALL_MASKS:
            damaged = bytearray(data)
            damaged[offset] ^= mask
            with open(path, "wb") as handle:
                handle.write(damaged)
            what = f"snapshot byte {offset} xor {mask:#x}"
            classes = expected_classes(impl, offset, length_fields)
            assert_refused(impl, load_snapshot(impl, path), classes, what, path)
            if mask == 0xFF:
                assert_refused(impl, lambda: store.diff_snapshot(path), classes, what, path)
                if offset < 80:
                    assert_refused(
                        impl, lambda: impl.read_snapshot_info(path), classes, what, path
                    )


@pytest.mark.parametrize("impl", IMPLS)
def test_small_snapshot_every_truncation_is_refused(impl, tmp_path):
    data = encode_snapshot(SMALL_STATE)
    path = str(tmp_path / "cut.snap")
    good = str(tmp_path / "good.snap")
    with open(good, "wb") as handle:
        handle.write(data)
    for length in range(len(data)):
        with open(path, "wb") as handle:
            handle.write(data[:length])
        what = f"snapshot cut to {length} of {len(data)} bytes"
        classes = (impl.TruncatedSnapshotError,)
        assert_refused(impl, load_snapshot(impl, path), classes, what, path)
        assert_refused(impl, lambda: impl.diff_snapshots(good, path), classes, what, path)
        if length < 80:
            assert_refused(impl, lambda: impl.read_snapshot_info(path), classes, what, path)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "garbage", [b"\x00", b"\xff", b"x" * 7, bytes(24), b"SYNSNAP\0"], ids=repr
)
def test_snapshot_with_trailing_garbage_is_refused(impl, tmp_path, garbage):
    path = str(tmp_path / "tail.snap")
    for state in (SMALL_STATE, {}):
        with open(path, "wb") as handle:
            handle.write(encode_snapshot(state) + garbage)
        assert_refused(
            impl, load_snapshot(impl, path), (impl.CorruptSnapshotError,), "trailing data", path
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_undamaged_files_still_load(impl, tmp_path):
    # The refusals above mean nothing if the loader refuses good files too.
    for name, state in (("small", SMALL_STATE), ("large", LARGE_STATE), ("empty", {})):
        path = tmp_path / name
        path.write_bytes(encode_snapshot(state))
        store, info = impl.StateStore.load_snapshot(str(path))
        assert store.scan() == sorted(state.items())
        assert info.entry_count == len(state) and info.log_index == 42


def large_offsets(data: bytes) -> list[int]:
    if EXHAUSTIVE:
        return list(range(len(data)))
    return sorted(snapshot_structure(data) | set(range(0, len(data), 4093)))


def test_large_snapshot_has_several_chunks():
    data = encode_snapshot(LARGE_STATE)
    count, length = struct.unpack_from("<II", data, 80)
    assert (count, length) == (2, 2 * (4 + 5 + 4 + 150_000))
    assert struct.unpack_from("<I", data, 80 + 8 + length + 16)[0] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_large_snapshot_flipped_bytes_are_refused(impl, tmp_path):
    data = encode_snapshot(LARGE_STATE)
    path = str(tmp_path / "flip.snap")
    length_fields = chunk_length_fields(data, 80)
    for offset in large_offsets(data):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        with open(path, "wb") as handle:
            handle.write(damaged)
        assert_refused(
            impl,
            load_snapshot(impl, path),
            expected_classes(impl, offset, length_fields),
            f"large snapshot byte {offset} xor 0xff",
            path,
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_large_snapshot_truncations_are_refused(impl, tmp_path):
    data = encode_snapshot(LARGE_STATE)
    path = str(tmp_path / "cut.snap")
    lengths = large_offsets(data)
    lengths += [n + d for n in snapshot_structure(data) for d in (-1, 1) if 0 <= n + d < len(data)]
    for length in sorted(set(lengths)):
        with open(path, "wb") as handle:
            handle.write(data[:length])
        assert_refused(
            impl,
            load_snapshot(impl, path),
            (impl.TruncatedSnapshotError,),
            f"large snapshot cut to {length}",
            path,
        )


def versioned(data: bytes, header_size: int, tag: bytes, version: int) -> bytes:
    body = data[:8] + struct.pack("<I", version) + data[12 : header_size - 16]
    return body + b3(tag + body)[:16] + data[header_size:]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_unsupported_snapshot_version(impl, tmp_path, version):
    path = str(tmp_path / "v.snap")
    with open(path, "wb") as handle:
        handle.write(versioned(encode_snapshot(SMALL_STATE), 80, b"SYNSNAPH", version))
    classes = (impl.UnsupportedFormatError,)
    assert_refused(impl, load_snapshot(impl, path), classes, f"format {version}", path)
    assert_refused(impl, lambda: impl.read_snapshot_info(path), classes, f"format {version}", path)


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_magic_is_unsupported(impl, tmp_path):
    path = str(tmp_path / "not-a-snapshot")
    store = impl.StateStore()
    store.apply([(b"k", b"v")])
    with open(path, "wb") as handle:
        handle.write(store.diff(impl.StateStore()).encode())  # a diff, not a snapshot
    classes = (impl.UnsupportedFormatError,)
    assert_refused(impl, load_snapshot(impl, path), classes, "diff given as snapshot", path)
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04" + bytes(200))
    assert_refused(impl, load_snapshot(impl, path), classes, "zip given as snapshot", path)


# --- diffs --------------------------------------------------------------------------------------


def small_diff() -> bytes:
    before = {b"a": b"1", b"b": b"2", b"c": b"3"}
    after = {b"a": b"1", b"b": b"two", b"d": b"4", b"": b"empty-key"}
    source, target = ref.StateStore(), ref.StateStore()
    source.apply(list(before.items()))
    target.apply(list(after.items()))
    return source.diff(target).encode()


def decode_diff(impl, data: bytes):
    return lambda: impl.StateDiff.decode(bytes(data))


@pytest.mark.parametrize("impl", IMPLS)
def test_diff_every_flipped_byte_is_refused(impl):
    data = small_diff()
    impl.StateDiff.decode(data)  # the undamaged diff decodes
    length_fields = chunk_length_fields(data, 104)
    for offset in range(len(data)):
        for mask in SMALL_MASKS:
            damaged = bytearray(data)
            damaged[offset] ^= mask
            assert_refused(
                impl,
                decode_diff(impl, damaged),
                expected_classes(impl, offset, length_fields),
                f"diff byte {offset} xor {mask:#x}",
            )


@pytest.mark.parametrize("impl", IMPLS)
def test_diff_every_truncation_and_trailing_garbage_is_refused(impl, tmp_path):
    data = small_diff()
    for length in range(len(data)):
        assert_refused(
            impl,
            decode_diff(impl, data[:length]),
            (impl.TruncatedSnapshotError,),
            f"diff cut to {length} of {len(data)}",
        )
    for garbage in (b"\x00", b"\xff" * 3, bytes(24)):
        assert_refused(
            impl, decode_diff(impl, data + garbage), (impl.CorruptSnapshotError,), "diff tail"
        )
    path = str(tmp_path / "cut.diff")
    with open(path, "wb") as handle:
        handle.write(data[:-5])
    assert_refused(
        impl, lambda: impl.StateDiff.read(path), (impl.TruncatedSnapshotError,), "diff file", path
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("version", [0, 2])
def test_unsupported_diff_version(impl, version):
    data = versioned(small_diff(), 104, b"SYNDIFFH", version)
    assert_refused(
        impl, decode_diff(impl, data), (impl.UnsupportedFormatError,), f"diff format {version}"
    )
    snapshot = encode_snapshot(SMALL_STATE)
    assert_refused(
        impl, decode_diff(impl, snapshot), (impl.UnsupportedFormatError,), "snapshot as diff"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["snapshot", "diff"])
def test_future_version_is_unsupported_whatever_its_header_holds(impl, tmp_path, kind):
    # A later format may lay its header out differently, so a format 1 reader cannot judge its
    # header check; the version field alone must make the file "unsupported", never "corrupt",
    # or an operator running an old binary would be told that good data is damaged.
    magic = b"SYNSNAP\0" if kind == "snapshot" else b"SYNDIFF\0"
    data = magic + struct.pack("<II", 2, 0) + bytes(range(200))
    if kind == "snapshot":
        path = str(tmp_path / "v2.snap")
        with open(path, "wb") as handle:
            handle.write(data)
        load = load_snapshot(impl, path)
    else:
        path, load = None, decode_diff(impl, data)
    assert_refused(impl, load, (impl.UnsupportedFormatError,), f"{kind} format 2", path)
