"""Snapshot and diff formats (version 1) of rust/DESIGN.md, in plain Python.

Part of the test oracle for ``synapse._core``: encoders here must produce byte-identical files,
and decoders must reject everything the core rejects. It is never a runtime fallback.

Both formats share one framing: a fixed header whose last 16 bytes check the rest, then
chunks ``u32 count ‖ u32 payload_len ‖ payload ‖ check`` where the check covers the chunk's
sequence number, and finally an empty end chunk followed by EOF. A writer closes a chunk as
soon as its payload reaches ``CHUNK_TARGET`` bytes, which makes the bytes a function of the
contents alone.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .errors import CorruptSnapshotError, TruncatedSnapshotError, UnsupportedFormatError
from .hashing import DIGEST_SIZE, LtHash16, b3, element_expansion, require_bytes, u32, u64

__all__ = [
    "SNAPSHOT_FORMAT",
    "CHUNK_TARGET",
    "CHECK_SIZE",
    "SNAPSHOT_HEADER_SIZE",
    "DIFF_HEADER_SIZE",
    "OP_ADDED",
    "OP_CHANGED",
    "OP_REMOVED",
    "SnapshotInfo",
    "ReferenceDiff",
    "lattice_of",
    "encode_snapshot",
    "snapshot_pieces",
    "decode_snapshot",
    "write_snapshot_file",
    "read_snapshot_file",
    "read_snapshot_info",
    "diff_entries",
    "diff_snapshots",
    "encode_diff",
    "decode_diff",
]

SNAPSHOT_FORMAT = 1
CHUNK_TARGET = 262_144
CHECK_SIZE = 16

SNAPSHOT_MAGIC = b"SYNSNAP\0"
SNAPSHOT_HEADER_TAG = b"SYNSNAPH"
SNAPSHOT_CHUNK_TAG = b"SYNSNAPC"
SNAPSHOT_HEADER_SIZE = 80

DIFF_MAGIC = b"SYNDIFF\0"
DIFF_HEADER_TAG = b"SYNDIFFH"
DIFF_CHUNK_TAG = b"SYNDIFFC"
DIFF_HEADER_SIZE = 104

OP_ADDED = 1
OP_CHANGED = 2
OP_REMOVED = 3
_OP_NAMES = {OP_ADDED: "added", OP_CHANGED: "changed", OP_REMOVED: "removed"}

_CHUNK_HEAD = struct.Struct("<II")
_MAGIC_SIZE = 8
_FORMAT_END = 12  # magic and format: enough to decide whether this reader applies at all
# A corrupt length must not make the reader allocate more than the source holds, so reads
# grow in bounded steps and stop at EOF.
_READ_STEP = 1 << 20


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    format: int
    entry_count: int
    log_index: int
    state_digest: bytes
    file_size: int


def _check(tag: bytes, data: bytes) -> bytes:
    return b3(tag + data)[:CHECK_SIZE]


def lattice_of(entries: Iterable[tuple[bytes, bytes]]) -> LtHash16:
    lattice = LtHash16()
    for key, value in entries:
        lattice.add(element_expansion(key, value))
    return lattice


# ---------------------------------------------------------------------------------------------
# Writing


class _ChunkWriter:
    def __init__(self, tag: bytes) -> None:
        self._tag = tag
        self._seq = 0
        self._count = 0
        self._payload = bytearray()

    def _chunk(self) -> bytes:
        payload = bytes(self._payload)
        head = u32(self._count, "chunk count") + u32(len(payload), "chunk payload length")
        check = _check(self._tag, u64(self._seq) + head + payload)
        self._seq += 1
        self._count = 0
        self._payload.clear()
        return head + payload + check

    def append(self, record: bytes) -> bytes | None:
        """Add a record; returns the closed chunk once the payload has reached the target."""
        self._payload += record
        self._count += 1
        if len(self._payload) >= CHUNK_TARGET:
            return self._chunk()
        return None

    def finish(self) -> Iterator[bytes]:
        if self._count:
            yield self._chunk()
        yield self._chunk()  # the end chunk: count 0, payload_len 0


def _checked_header(tag: bytes, body: bytes) -> bytes:
    return body + _check(tag, body)


def _snapshot_record(key: bytes, value: bytes) -> bytes:
    return u32(len(key), "key length") + key + u32(len(value), "value length") + value


def snapshot_pieces(
    entries: Sequence[tuple[bytes, bytes]], log_index: int, state_digest: bytes
) -> Iterator[bytes]:
    """The snapshot file as a sequence of byte strings (header, then each chunk)."""
    if len(state_digest) != DIGEST_SIZE:
        raise ValueError(f"state_digest must be {DIGEST_SIZE} bytes")
    yield _checked_header(
        SNAPSHOT_HEADER_TAG,
        SNAPSHOT_MAGIC
        + u32(SNAPSHOT_FORMAT)
        + u32(0)
        + u64(len(entries), "entry_count")
        + u64(log_index, "log_index")
        + state_digest,
    )
    writer = _ChunkWriter(SNAPSHOT_CHUNK_TAG)
    previous: bytes | None = None
    for key, value in entries:
        require_bytes("key", key)
        require_bytes("value", value)
        # Readers reject anything but strictly increasing keys, so never write it.
        if previous is not None and key <= previous:
            raise ValueError(f"snapshot entries must be in strictly increasing key order at {key!r}")
        previous = key
        chunk = writer.append(_snapshot_record(key, value))
        if chunk is not None:
            yield chunk
    yield from writer.finish()


def encode_snapshot(
    entries: Sequence[tuple[bytes, bytes]], log_index: int, state_digest: bytes | None = None
) -> bytes:
    """The snapshot file's bytes; the digest is computed from ``entries`` unless given."""
    entries = list(entries)
    if state_digest is None:
        state_digest = lattice_of(entries).digest()
    return b"".join(snapshot_pieces(entries, log_index, state_digest))


def _fspath(path: object) -> str:
    result = os.fspath(path)  # type: ignore[arg-type]
    if not isinstance(result, str):
        raise TypeError(f"path must be str or PathLike[str], not {type(result).__name__}")
    return result


def _write_atomically(path: object, pieces: Iterable[bytes]) -> tuple[str, int]:
    """Write to ``path + ".tmp"``, fsync, rename over ``path``: a crash leaves either the old
    file or the complete new one, never a torn one."""
    final = _fspath(path)
    tmp = final + ".tmp"
    size = 0
    try:
        with open(tmp, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
                size += len(piece)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename is durable only once the directory entry is.
    directory = os.path.dirname(os.path.abspath(final))
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return final, size
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return final, size


def write_snapshot_file(
    path: object, entries: Sequence[tuple[bytes, bytes]], log_index: int, state_digest: bytes
) -> SnapshotInfo:
    entries = list(entries)
    # The pieces are produced lazily, so check the arguments before a .tmp file exists.
    u64(log_index, "log_index")
    final, size = _write_atomically(path, snapshot_pieces(entries, log_index, state_digest))
    return SnapshotInfo(final, SNAPSHOT_FORMAT, len(entries), log_index, state_digest, size)


# ---------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Sequential reads from a stream that know their offset and name the source in errors."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self._stream = stream
        self.name = name
        self.offset = 0

    def read_upto(self, n: int) -> bytes:
        parts = []
        remaining = n
        while remaining:
            part = self._stream.read(min(remaining, _READ_STEP))
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        start = self.offset
        data = self.read_upto(n)
        if len(data) != n:
            raise TruncatedSnapshotError(
                f"{self.name}: truncated at offset {start}: {what} needs {n} bytes, "
                f"only {len(data)} remain"
            )
        return data

    def at_eof(self) -> bool:
        return not self._stream.read(1)


class _Cursor:
    """Parses one chunk payload, whose length the chunk check has already vouched for; running
    past its end therefore means a corrupt chunk, not a truncated file."""

    def __init__(self, payload: bytes, base: int, name: str, seq: int) -> None:
        self._payload = payload
        self._base = base
        self._name = name
        self._seq = seq
        self.pos = 0

    def corrupt(self, what: str) -> CorruptSnapshotError:
        return CorruptSnapshotError(
            f"{self._name}: chunk {self._seq}, offset {self._base + self.pos}: {what}"
        )

    def take(self, n: int, what: str) -> bytes:
        if n > len(self._payload) - self.pos:
            raise self.corrupt(
                f"{what} of {n} bytes overruns the chunk payload "
                f"({len(self._payload) - self.pos} bytes left)"
            )
        data = self._payload[self.pos : self.pos + n]
        self.pos += n
        return data

    def take_u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def take_u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def done(self) -> bool:
        return self.pos == len(self._payload)


def _read_header(
    reader: _Reader, magic: bytes, header_size: int, tag: bytes, kind: str
) -> bytes:
    """Returns the header; magic and format are judged before the check because a reader must
    decide whether it understands the layout at all before it can know where the check is."""
    data = reader.read_upto(header_size)
    seen = data[:_MAGIC_SIZE]
    if seen != magic[: len(seen)]:
        raise UnsupportedFormatError(
            f"{reader.name}: offset 0: magic {seen!r} is not a {kind} magic {magic!r}"
        )
    if len(data) < _FORMAT_END:
        raise TruncatedSnapshotError(
            f"{reader.name}: truncated at offset {len(data)}: the {kind} header needs "
            f"{header_size} bytes, only {len(data)} present"
        )
    (version,) = struct.unpack_from("<I", data, _MAGIC_SIZE)
    if version != SNAPSHOT_FORMAT:
        raise UnsupportedFormatError(
            f"{reader.name}: offset {_MAGIC_SIZE}: {kind} format {version} is not supported "
            f"(this reader reads format {SNAPSHOT_FORMAT})"
        )
    if len(data) < header_size:
        raise TruncatedSnapshotError(
            f"{reader.name}: truncated at offset {len(data)}: the {kind} header needs "
            f"{header_size} bytes, only {len(data)} present"
        )
    body, check = data[: header_size - CHECK_SIZE], data[header_size - CHECK_SIZE :]
    if _check(tag, body) != check:
        raise CorruptSnapshotError(
            f"{reader.name}: offset {header_size - CHECK_SIZE}: {kind} header check mismatch"
        )
    (flags,) = struct.unpack_from("<I", data, _FORMAT_END)
    if flags != 0:
        raise UnsupportedFormatError(
            f"{reader.name}: offset {_FORMAT_END}: {kind} flags {flags:#x} are not supported "
            "(format 1 defines none)"
        )
    return data


def _read_chunks(reader: _Reader, tag: bytes, kind: str) -> Iterator[tuple[int, int, int, bytes]]:
    """Yields (seq, payload offset, count, payload) of each verified data chunk; returns after
    the end chunk once EOF is confirmed."""
    seq = 0
    while True:
        start = reader.offset
        head = reader.read_exact(_CHUNK_HEAD.size, f"{kind} chunk {seq} header")
        count, payload_len = _CHUNK_HEAD.unpack(head)
        payload = reader.read_exact(payload_len, f"{kind} chunk {seq} payload")
        check = reader.read_exact(CHECK_SIZE, f"{kind} chunk {seq} check")
        if _check(tag, u64(seq) + head + payload) != check:
            raise CorruptSnapshotError(
                f"{reader.name}: offset {start}: {kind} chunk {seq} check mismatch"
            )
        if count == 0:
            if payload_len != 0:
                raise CorruptSnapshotError(
                    f"{reader.name}: offset {start}: {kind} chunk {seq} has no entries "
                    f"but a {payload_len}-byte payload"
                )
            if not reader.at_eof():
                raise CorruptSnapshotError(
                    f"{reader.name}: offset {reader.offset}: data after the {kind} end chunk"
                )
            return
        yield seq, start + _CHUNK_HEAD.size, count, payload
        seq += 1


def _read_snapshot(reader: _Reader, file_size: Callable[[], int]) -> tuple[list, SnapshotInfo]:
    header = _read_header(reader, SNAPSHOT_MAGIC, SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_TAG, "snapshot")
    entry_count, log_index = struct.unpack_from("<QQ", header, 16)
    state_digest = header[32:64]
    entries: list[tuple[bytes, bytes]] = []
    lattice = LtHash16()
    previous: bytes | None = None
    for seq, base, count, payload in _read_chunks(reader, SNAPSHOT_CHUNK_TAG, "snapshot"):
        if count > entry_count - len(entries):
            raise CorruptSnapshotError(
                f"{reader.name}: offset {base - _CHUNK_HEAD.size}: chunk {seq} brings the entry "
                f"count to {len(entries) + count}, more than the header's {entry_count}"
            )
        cursor = _Cursor(payload, base, reader.name, seq)
        for _ in range(count):
            key = cursor.take(cursor.take_u32("key length"), "key")
            value = cursor.take(cursor.take_u32("value length"), "value")
            if previous is not None and key <= previous:
                raise cursor.corrupt(f"key {key!r} does not sort after {previous!r}")
            previous = key
            entries.append((key, value))
            lattice.add(element_expansion(key, value))
        if not cursor.done():
            raise cursor.corrupt(f"{len(payload) - cursor.pos} bytes left after {count} entries")
    if len(entries) != entry_count:
        raise CorruptSnapshotError(
            f"{reader.name}: offset {reader.offset}: {len(entries)} entries, "
            f"header says {entry_count}"
        )
    if lattice.digest() != state_digest:
        raise CorruptSnapshotError(
            f"{reader.name}: offset 32: state digest {state_digest.hex()} does not match the "
            f"entries (recomputed {lattice.digest().hex()})"
        )
    info = SnapshotInfo(reader.name, SNAPSHOT_FORMAT, entry_count, log_index, state_digest, file_size())
    return entries, info


def decode_snapshot(data: bytes, name: str = "<buffer>") -> tuple[list[tuple[bytes, bytes]], SnapshotInfo]:
    """Fully verified entries (in key order) and header of a snapshot held in memory."""
    require_bytes("data", data)
    return _read_snapshot(_Reader(io.BytesIO(data), name), lambda: len(data))


def read_snapshot_file(path: object) -> tuple[list[tuple[bytes, bytes]], SnapshotInfo]:
    name = _fspath(path)
    with open(name, "rb") as handle:
        return _read_snapshot(_Reader(handle, name), lambda: os.fstat(handle.fileno()).st_size)


def read_snapshot_info(path: object) -> SnapshotInfo:
    """The verified header alone; the chunks are not read."""
    name = _fspath(path)
    with open(name, "rb") as handle:
        reader = _Reader(handle, name)
        header = _read_header(
            reader, SNAPSHOT_MAGIC, SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_TAG, "snapshot"
        )
        entry_count, log_index = struct.unpack_from("<QQ", header, 16)
        size = os.fstat(handle.fileno()).st_size
    return SnapshotInfo(name, SNAPSHOT_FORMAT, entry_count, log_index, header[32:64], size)


# ---------------------------------------------------------------------------------------------
# Diffs


def _sorted_strictly(name: str, keys: list[bytes]) -> None:
    for before, after in zip(keys, keys[1:]):
        if not before < after:
            raise ValueError(f"{name} keys must be strictly increasing: {before!r} then {after!r}")


class ReferenceDiff:
    """Changes that take a state with ``from_digest`` to the state with ``to_digest``.

    ``added`` holds keys absent before (with their new values), ``changed`` keys present before
    (with their new values), ``removed`` keys present before; each list is sorted by key and no
    key appears in two lists.
    """

    __slots__ = ("from_digest", "to_digest", "added", "changed", "removed")

    def __init__(
        self,
        from_digest: bytes,
        to_digest: bytes,
        added: Iterable[tuple[bytes, bytes]] = (),
        changed: Iterable[tuple[bytes, bytes]] = (),
        removed: Iterable[bytes] = (),
    ) -> None:
        for name, digest in (("from_digest", from_digest), ("to_digest", to_digest)):
            require_bytes(name, digest)
            if len(digest) != DIGEST_SIZE:
                raise ValueError(f"{name} must be {DIGEST_SIZE} bytes, got {len(digest)}")
        self.from_digest = from_digest
        self.to_digest = to_digest
        self.added = [(require_bytes("key", k), require_bytes("value", v)) for k, v in added]
        self.changed = [(require_bytes("key", k), require_bytes("value", v)) for k, v in changed]
        self.removed = [require_bytes("key", k) for k in removed]
        _sorted_strictly("added", [k for k, _ in self.added])
        _sorted_strictly("changed", [k for k, _ in self.changed])
        _sorted_strictly("removed", self.removed)
        _sorted_strictly("diff", [key for key, _, _ in self.records()])

    def records(self) -> list[tuple[bytes, int, bytes | None]]:
        """(key, op, value or None) in the file's order: by key across all three lists."""
        records = [(k, OP_ADDED, v) for k, v in self.added]
        records += [(k, OP_CHANGED, v) for k, v in self.changed]
        records += [(k, OP_REMOVED, None) for k in self.removed]
        records.sort(key=lambda record: record[0])
        return records

    def __len__(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReferenceDiff):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ReferenceDiff(from={self.from_digest.hex()[:16]}…, to={self.to_digest.hex()[:16]}…, "
            f"added={len(self.added)}, changed={len(self.changed)}, removed={len(self.removed)})"
        )

    def pieces(self) -> Iterator[bytes]:
        records = self.records()
        yield _checked_header(
            DIFF_HEADER_TAG,
            DIFF_MAGIC
            + u32(SNAPSHOT_FORMAT)
            + u32(0)
            + u64(len(records), "record count")
            + self.from_digest
            + self.to_digest,
        )
        writer = _ChunkWriter(DIFF_CHUNK_TAG)
        for key, op, value in records:
            record = bytes([op]) + u32(len(key), "key length") + key
            if value is not None:
                record += u32(len(value), "value length") + value
            chunk = writer.append(record)
            if chunk is not None:
                yield chunk
        yield from writer.finish()

    def encode(self) -> bytes:
        return b"".join(self.pieces())

    @staticmethod
    def decode(data: bytes) -> ReferenceDiff:
        return decode_diff(data)

    def write(self, path: object) -> int:
        return _write_atomically(path, self.pieces())[1]

    @staticmethod
    def read(path: object) -> ReferenceDiff:
        name = _fspath(path)
        with open(name, "rb") as handle:
            return _read_diff(_Reader(handle, name))


def encode_diff(diff: ReferenceDiff) -> bytes:
    return diff.encode()


def _read_diff(reader: _Reader) -> ReferenceDiff:
    header = _read_header(reader, DIFF_MAGIC, DIFF_HEADER_SIZE, DIFF_HEADER_TAG, "diff")
    (record_count,) = struct.unpack_from("<Q", header, 16)
    from_digest, to_digest = header[24:56], header[56:88]
    added: list[tuple[bytes, bytes]] = []
    changed: list[tuple[bytes, bytes]] = []
    removed: list[bytes] = []
    seen = 0
    previous: bytes | None = None
    for seq, base, count, payload in _read_chunks(reader, DIFF_CHUNK_TAG, "diff"):
        if count > record_count - seen:
            raise CorruptSnapshotError(
                f"{reader.name}: offset {base - _CHUNK_HEAD.size}: diff chunk {seq} brings the "
                f"record count to {seen + count}, more than the header's {record_count}"
            )
        cursor = _Cursor(payload, base, reader.name, seq)
        for _ in range(count):
            op_at = cursor.pos
            op = cursor.take_u8("record op")
            if op not in _OP_NAMES:
                cursor.pos = op_at
                raise cursor.corrupt(f"unknown diff record op {op}")
            key = cursor.take(cursor.take_u32("key length"), "key")
            if previous is not None and key <= previous:
                raise cursor.corrupt(f"key {key!r} does not sort after {previous!r}")
            previous = key
            if op == OP_REMOVED:
                removed.append(key)
            else:
                value = cursor.take(cursor.take_u32("value length"), "value")
                (added if op == OP_ADDED else changed).append((key, value))
        seen += count
        if not cursor.done():
            raise cursor.corrupt(f"{len(payload) - cursor.pos} bytes left after {count} records")
    if seen != record_count:
        raise CorruptSnapshotError(
            f"{reader.name}: offset {reader.offset}: {seen} records, header says {record_count}"
        )
    return ReferenceDiff(from_digest, to_digest, added, changed, removed)


def decode_diff(data: bytes, name: str = "<buffer>") -> ReferenceDiff:
    require_bytes("data", data)
    return _read_diff(_Reader(io.BytesIO(data), name))


def diff_entries(
    old: Sequence[tuple[bytes, bytes]],
    new: Sequence[tuple[bytes, bytes]],
    from_digest: bytes,
    to_digest: bytes,
) -> ReferenceDiff:
    """The diff taking ``old`` to ``new``; both must be sorted by key (a merge join)."""
    added, changed, removed = [], [], []
    i = j = 0
    while i < len(old) or j < len(new):
        if j == len(new) or (i < len(old) and old[i][0] < new[j][0]):
            removed.append(old[i][0])
            i += 1
        elif i == len(old) or new[j][0] < old[i][0]:
            added.append(new[j])
            j += 1
        else:
            if old[i][1] != new[j][1]:
                changed.append(new[j])
            i += 1
            j += 1
    return ReferenceDiff(from_digest, to_digest, added, changed, removed)


def diff_snapshots(old: object, new: object) -> ReferenceDiff:
    """The diff taking the state of snapshot ``old`` to that of ``new`` (both fully verified)."""
    old_entries, old_info = read_snapshot_file(old)
    new_entries, new_info = read_snapshot_file(new)
    return diff_entries(old_entries, new_entries, old_info.state_digest, new_info.state_digest)
