"""``ReferenceStore``: the state store of rust/DESIGN.md in plain Python.

This is the test oracle and benchmark baseline for ``synapse._core.StateStore``, with the same
method names and semantics; nothing falls back to it at run time. Contents live in a dict and
are sorted on demand; the LtHash lattice and the bucket tree are maintained on every mutation,
exactly as the core maintains them, so ``digest()`` is checked against ``recompute_digest()``
rather than derived from it.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from . import codec
from .codec import ReferenceDiff, SnapshotInfo
from .errors import DigestMismatchError
from .hashing import (
    BUCKETS,
    LtHash16,
    bucket_of,
    element_expansion,
    element_parts,
    require_bytes,
)
from .tree import BucketTree

__all__ = ["ReferenceStore"]


def _pairs(name: str, items: Iterable[object], *, deletes: bool) -> list[tuple[bytes, bytes | None]]:
    if isinstance(items, (bytes, bytearray, str)):
        raise TypeError(f"{name} must be a sequence of (key, value) pairs, not {type(items).__name__}")
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of (key, value) pairs, not {type(items).__name__}"
        ) from None
    out = []
    for position, item in enumerate(items):
        # Tuples only, as typed: the core rejects a list here, and the oracle must not be laxer.
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"{name}[{position}] must be a (key, value) tuple")
        key, value = item
        require_bytes(f"{name}[{position}] key", key)
        if not (deletes and value is None):
            require_bytes(f"{name}[{position}] value", value)
        out.append((key, value))
    return out


def _byte_strings(name: str, items: Iterable[object]) -> list[bytes]:
    if isinstance(items, (bytes, bytearray, str)):
        raise TypeError(f"{name} must be a sequence of bytes, not {type(items).__name__}")
    return [require_bytes(f"{name}[{i}]", item) for i, item in enumerate(items)]


def _buckets(buckets: Iterable[object]) -> list[int]:
    out = []
    for position, bucket in enumerate(buckets):
        if not isinstance(bucket, int) or isinstance(bucket, bool):
            raise TypeError(f"buckets[{position}] must be an int, not {type(bucket).__name__}")
        if bucket < 0:
            raise OverflowError(f"buckets[{position}]={bucket} is negative")
        if bucket >= BUCKETS:
            raise ValueError(f"buckets[{position}]={bucket} is outside 0..{BUCKETS - 1}")
        out.append(bucket)
    return out


def _limit(limit: object) -> int | None:
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return limit


def _prefix_end(prefix: bytes) -> bytes | None:
    """The least key greater than every key that starts with ``prefix`` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class ReferenceStore:
    """Ordered map of byte keys to byte values with an incrementally maintained state digest."""

    __slots__ = ("_data", "_lattice", "_tree", "_bucket_keys")

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._lattice = LtHash16()
        self._tree = BucketTree()
        self._bucket_keys: dict[int, set[bytes]] = {}

    # --- mutation -----------------------------------------------------------------------------

    def _add_element(self, key: bytes, value: bytes) -> None:
        expansion, element_hash = element_parts(key, value)
        self._lattice.add(expansion)
        self._tree.add(bucket_of(key), element_hash)

    def _remove_element(self, key: bytes, value: bytes) -> None:
        expansion, element_hash = element_parts(key, value)
        self._lattice.sub(expansion)
        self._tree.sub(bucket_of(key), element_hash)

    def _put(self, key: bytes, value: bytes) -> None:
        old = self._data.get(key)
        if old is not None:
            if old == value:
                return  # remove(old) + add(new) would cancel exactly
            self._remove_element(key, old)
        else:
            self._bucket_keys.setdefault(bucket_of(key), set()).add(key)
        self._data[key] = value
        self._add_element(key, value)

    def _delete(self, key: bytes) -> None:
        old = self._data.pop(key, None)
        if old is None:
            return
        self._remove_element(key, old)
        bucket = bucket_of(key)
        keys = self._bucket_keys[bucket]
        keys.discard(key)
        if not keys:
            del self._bucket_keys[bucket]

    def apply(self, ops: Sequence[tuple[bytes, bytes | None]]) -> int:
        """Apply a batch in order; a ``None`` value deletes. Returns the number of ops.

        Every op is type-checked before the first mutation, so a bad batch raises TypeError
        and changes nothing."""
        batch = _pairs("ops", ops, deletes=True)
        for key, value in batch:
            if value is None:
                self._delete(key)
            else:
                self._put(key, value)
        return len(batch)

    # --- reads --------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(require_bytes("key", key))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self._data.get(key) for key in _byte_strings("keys", keys)]

    def _sorted_keys(self) -> list[bytes]:
        return sorted(self._data)

    def scan(
        self, start: bytes = b"", end: bytes | None = None, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Entries with start <= key < end (end None: unbounded), in key order."""
        require_bytes("start", start)
        if end is not None:
            require_bytes("end", end)
        limit = _limit(limit)
        keys = self._sorted_keys()
        out = []
        for key in keys[bisect_left(keys, start) :]:
            if (end is not None and key >= end) or (limit is not None and len(out) >= limit):
                break
            out.append((key, self._data[key]))
        return out

    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        require_bytes("prefix", prefix)
        return self.scan(prefix, _prefix_end(prefix), limit)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return require_bytes("key", key) in self._data

    def __repr__(self) -> str:
        return f"<ReferenceStore entries={len(self._data)} digest={self.hexdigest()[:16]}…>"

    # --- digests ------------------------------------------------------------------------------

    def digest(self) -> bytes:
        return self._lattice.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()

    def recompute_digest(self) -> bytes:
        return codec.lattice_of(self._data.items()).digest()

    def lattice_lanes(self) -> list[int]:
        """The 1024 lattice lanes, for tests that localise a digest mismatch."""
        return self._lattice.lanes()

    def memory_usage(self) -> int:
        """Python's own accounting of the objects this store holds: a baseline, not the core's
        estimate."""
        total = sys.getsizeof(self._data)
        for key, value in self._data.items():
            total += sys.getsizeof(key) + sys.getsizeof(value)
        return total

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._data),
            "key_bytes": sum(len(key) for key in self._data),
            "value_bytes": sum(len(value) for value in self._data.values()),
            "memory_usage": self.memory_usage(),
        }

    def clone(self) -> ReferenceStore:
        other = ReferenceStore.__new__(ReferenceStore)
        other._data = dict(self._data)
        other._lattice = self._lattice.copy()
        other._tree = self._tree.copy()
        other._bucket_keys = {bucket: set(keys) for bucket, keys in self._bucket_keys.items()}
        return other

    # --- bucket tree --------------------------------------------------------------------------

    @staticmethod
    def bucket_of(key: bytes) -> int:
        return bucket_of(key)

    def node_digests(self, level: int) -> bytes:
        return self._tree.node_digests(level)

    def children_digests(self, level: int, parents: Sequence[int]) -> bytes:
        return self._tree.children_digests(level, parents)

    def compare_children(self, level: int, parents: Sequence[int], remote: bytes) -> list[int]:
        return self._tree.compare_children(level, parents, remote)

    def bucket_entries(self, buckets: Sequence[int]) -> list[tuple[bytes, bytes]]:
        """Every entry in the given buckets, in key order."""
        keys: set[bytes] = set()
        for bucket in _buckets(buckets):
            keys |= self._bucket_keys.get(bucket, set())
        return [(key, self._data[key]) for key in sorted(keys)]

    def _digest_after(self, diff: ReferenceDiff) -> bytes:
        """The digest this store would have with ``diff`` applied, without applying it."""
        lattice = self._lattice.copy()
        for key, value in diff.added:
            lattice.add(element_expansion(key, value))
        for key, value in diff.changed:
            lattice.sub(element_expansion(key, self._data[key]))
            lattice.add(element_expansion(key, value))
        for key in diff.removed:
            lattice.sub(element_expansion(key, self._data[key]))
        return lattice.digest()

    def diff_buckets(
        self, buckets: Sequence[int], remote_entries: Sequence[tuple[bytes, bytes]]
    ) -> ReferenceDiff:
        """The diff taking this store to the peer's state, given the peer's entries of exactly
        these buckets. ``to_digest`` is computed, so it is only the peer's digest if the two
        states agree outside these buckets."""
        wanted = set(_buckets(buckets))
        remote = _pairs("remote_entries", remote_entries, deletes=False)
        seen: set[bytes] = set()
        for key, _ in remote:
            if key in seen:
                raise ValueError(f"remote_entries holds key {key!r} twice")
            seen.add(key)
            if bucket_of(key) not in wanted:
                raise ValueError(
                    f"remote_entries key {key!r} is in bucket {bucket_of(key)}, not one of the "
                    "requested buckets"
                )
        local = self.bucket_entries(sorted(wanted))
        remote.sort(key=lambda entry: entry[0])
        diff = codec.diff_entries(local, remote, self.digest(), self.digest())
        diff.to_digest = self._digest_after(diff)
        return diff

    def differing_buckets(self, other: ReferenceStore) -> list[int]:
        if not isinstance(other, ReferenceStore):
            raise TypeError(f"other must be a ReferenceStore, not {type(other).__name__}")
        return self._tree.differing_buckets(other._tree)

    def diff(self, other: ReferenceStore) -> ReferenceDiff:
        """The diff taking this store to ``other``, found through the bucket tree."""
        buckets = self.differing_buckets(other)
        return self.diff_buckets(buckets, other.bucket_entries(buckets))

    def apply_diff(self, diff: ReferenceDiff) -> None:
        """Raises DigestMismatchError, changing nothing, unless ``digest() == diff.from_digest``
        and the result's digest is ``diff.to_digest``."""
        if not isinstance(diff, ReferenceDiff):
            raise TypeError(f"diff must be a ReferenceDiff, not {type(diff).__name__}")
        current = self.digest()
        if current != diff.from_digest:
            raise DigestMismatchError(
                f"diff applies to state {diff.from_digest.hex()}, this store is {current.hex()}"
            )
        # With matching digests these hold for any honestly made diff; checking them keeps a
        # forged diff from reaching the digest arithmetic with keys that are not there.
        for key, _ in diff.added:
            if key in self._data:
                raise DigestMismatchError(f"diff adds key {key!r}, which this store already holds")
        for key in [k for k, _ in diff.changed] + diff.removed:
            if key not in self._data:
                raise DigestMismatchError(f"diff changes or removes key {key!r}, which this store lacks")
        reached = self._digest_after(diff)
        if reached != diff.to_digest:
            raise DigestMismatchError(
                f"diff promises state {diff.to_digest.hex()} but reaches {reached.hex()}"
            )
        for key, value in diff.added + diff.changed:
            self._put(key, value)
        for key in diff.removed:
            self._delete(key)

    # --- snapshots ----------------------------------------------------------------------------

    def write_snapshot(self, path: object, log_index: int) -> SnapshotInfo:
        """Stream the state to ``path`` (via ``path + '.tmp'``, fsynced, renamed)."""
        return codec.write_snapshot_file(path, self.scan(), log_index, self.digest())

    @staticmethod
    def load_snapshot(path: object) -> tuple[ReferenceStore, SnapshotInfo]:
        entries, info = codec.read_snapshot_file(path)
        store = ReferenceStore()
        for key, value in entries:
            store._put(key, value)
        return store, info

    def diff_snapshot(self, path: object) -> ReferenceDiff:
        """The diff taking this store to the snapshot's state (the snapshot fully verified)."""
        entries, info = codec.read_snapshot_file(path)
        return codec.diff_entries(self.scan(), entries, self.digest(), info.state_digest)
