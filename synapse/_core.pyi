"""Typed surface of the Rust state core (``rust/python``), built by maturin as ``synapse._core``.

Formats and algorithms are specified in ``rust/DESIGN.md``. Every method that takes a batch
crosses the Python/Rust boundary once; long work runs with the GIL released.
"""

from os import PathLike
from typing import Any, Sequence

BUCKETS: int  # 65536 buckets at the tree's last level
FANOUT: int  # 16 children per tree node
TREE_DEPTH: int  # 4: levels 0 (root) .. 4 (buckets)
DIGEST_SIZE: int  # 32
SNAPSHOT_FORMAT: int  # 1

class CoreError(ValueError):
    """Base class of every error raised by the core."""

class SnapshotError(CoreError):
    """A snapshot or diff file (or buffer) is unusable; the message names the file and offset."""

class CorruptSnapshotError(SnapshotError):
    """A checksum, length, key order, entry count or final digest does not match."""

class TruncatedSnapshotError(SnapshotError):
    """The data ends before the end chunk."""

class UnsupportedFormatError(SnapshotError):
    """Wrong magic bytes or a format version this build does not read."""

class DigestMismatchError(CoreError):
    """A diff does not apply to this state, or does not reach the digest it promises."""

class SnapshotInfo:
    path: str
    format: int
    entry_count: int
    log_index: int
    state_digest: bytes
    file_size: int

class StateDiff:
    """Changes that take a state with ``from_digest`` to the state with ``to_digest``."""

    from_digest: bytes
    to_digest: bytes
    added: list[tuple[bytes, bytes]]  # keys absent before, with their new values
    changed: list[tuple[bytes, bytes]]  # keys present before, with their new values
    removed: list[bytes]
    def __len__(self) -> int: ...  # number of records
    def encode(self) -> bytes: ...  # the diff format of rust/DESIGN.md
    @staticmethod
    def decode(data: bytes) -> StateDiff: ...  # raises SnapshotError subclasses
    def write(self, path: str | PathLike[str]) -> int: ...  # returns bytes written
    @staticmethod
    def read(path: str | PathLike[str]) -> StateDiff: ...

class StateStore:
    """Ordered map of byte keys to byte values with an incrementally maintained state digest."""

    def __init__(self) -> None: ...
    def apply(self, ops: Sequence[tuple[bytes, bytes | None]]) -> int:
        """Apply a batch in order; a ``None`` value deletes. Returns the number of ops.

        The batch is validated (types) before anything changes; a bad batch raises TypeError
        and changes nothing."""
    def apply_kv_entry(
        self, index: int, payload: bytes, dedup_capacity: int
    ) -> tuple[list[dict[str, Any]], list[tuple[str, bytes | None, int, int, int, int]], bytes] | None:
        """Apply a log entry of plain puts and deletes whole (commands, dedup bound, audit
        chain link) as ``CommandProcessor.apply_entry`` would, and return ``(results, changes,
        chain)``; or return None having changed nothing (the Python processor applies it)."""
    def get(self, key: bytes) -> bytes | None: ...
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def scan(
        self, start: bytes = b"", end: bytes | None = None, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Entries with start <= key < end (end None: unbounded), in key order."""
    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: bytes) -> bool: ...
    def digest(self) -> bytes: ...  # 32 bytes, O(1)
    def hexdigest(self) -> str: ...
    def recompute_digest(self) -> bytes: ...  # from scratch over the contents (all cores)
    def memory_usage(self) -> int: ...  # estimated heap bytes held by the store
    def stats(self) -> dict[str, int]: ...  # entries, key_bytes, value_bytes, memory_usage
    def clone(self) -> StateStore: ...  # a deep copy
    def freeze(self) -> FrozenState:
        """An immutable view of the state now: O(buckets) to take; later writes to this store
        copy only the buckets they touch. Read it from any thread, without the store's lock."""
    @staticmethod
    def thaw(frozen: FrozenState) -> StateStore: ...  # a store with the view's state
    # --- bucket tree (levels 0..TREE_DEPTH) ---
    @staticmethod
    def bucket_of(key: bytes) -> int: ...
    def node_digests(self, level: int) -> bytes: ...  # all digests of a level, 32 bytes each
    def children_digests(self, level: int, parents: Sequence[int]) -> bytes:
        """For each parent at ``level``, its FANOUT children's digests (level+1), concatenated."""
    def compare_children(self, level: int, parents: Sequence[int], remote: bytes) -> list[int]:
        """Indexes at level+1 of the children whose digests differ from ``remote``
        (as returned by the peer's ``children_digests(level, parents)``), ascending."""
    def bucket_entries(self, buckets: Sequence[int]) -> list[tuple[bytes, bytes]]:
        """Every entry in the given buckets, in key order."""
    def bucket_element_hashes(self, buckets: Sequence[int]) -> list[tuple[bytes, bytes]]:
        """Every key in the given buckets with its 32-byte element hash, in key order."""
    def diff_buckets(
        self, buckets: Sequence[int], remote_entries: Sequence[tuple[bytes, bytes]]
    ) -> StateDiff:
        """The diff that takes this store to the peer's state, given the peer's entries of
        exactly these buckets (``peer.bucket_entries(buckets)``). ``to_digest`` is computed."""
    def differing_buckets(self, other: StateStore) -> list[int]: ...
    def diff(self, other: StateStore) -> StateDiff: ...  # takes self to other, via the tree
    def apply_diff(self, diff: StateDiff) -> None:
        """Raises DigestMismatchError (changing nothing) unless digest() == diff.from_digest
        and the result's digest == diff.to_digest."""
    # --- snapshots ---
    def write_snapshot(self, path: str | PathLike[str], log_index: int, prefix: bytes = b"") -> SnapshotInfo:
        """Stream the state to ``path`` (written to ``path + '.tmp'``, fsynced, renamed).

        ``prefix`` is written before the snapshot (a container's own metadata); load such a
        file with ``load_snapshot(path, offset=len(prefix))``."""
    @staticmethod
    def load_snapshot(path: str | PathLike[str], offset: int = 0) -> tuple[StateStore, SnapshotInfo]:
        """Load and fully verify a snapshot starting ``offset`` bytes into the file."""
    def diff_snapshot(self, path: str | PathLike[str]) -> StateDiff:
        """The diff that takes this store to the snapshot's state (snapshot fully verified)."""

class FrozenState:
    """A state frozen by ``StateStore.freeze()``. Same read methods as ``StateStore``
    (``get``, ``get_many``, ``len``, ``digest``, ``hexdigest``, ``recompute_digest``,
    ``node_digests``, ``children_digests``, ``compare_children``, ``bucket_entries``,
    ``diff_buckets``, ``write_snapshot``, ``diff_snapshot``), but no scans: it has no key index."""

    def get(self, key: bytes) -> bytes | None: ...
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: bytes) -> bool: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...
    def recompute_digest(self) -> bytes: ...
    def node_digests(self, level: int) -> bytes: ...
    def children_digests(self, level: int, parents: Sequence[int]) -> bytes: ...
    def compare_children(self, level: int, parents: Sequence[int], remote: bytes) -> list[int]: ...
    def bucket_entries(self, buckets: Sequence[int]) -> list[tuple[bytes, bytes]]: ...
    def bucket_element_hashes(self, buckets: Sequence[int]) -> list[tuple[bytes, bytes]]: ...
    def diff_buckets(self, buckets: Sequence[int], remote_entries: Sequence[tuple[bytes, bytes]]) -> StateDiff: ...
    def diff(self, other: FrozenState) -> StateDiff: ...
    def write_snapshot(self, path: str | PathLike[str], log_index: int, prefix: bytes = b"") -> SnapshotInfo: ...
    def diff_snapshot(self, path: str | PathLike[str]) -> StateDiff: ...

def read_snapshot_info(path: str | PathLike[str]) -> SnapshotInfo: ...  # header only
def diff_snapshots(old: str | PathLike[str], new: str | PathLike[str]) -> StateDiff: ...
def chain(prev: bytes, index: int, entry: bytes) -> bytes: ...
def chain_many(prev: bytes, entries: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """The chain digest after each entry, in order (one boundary crossing for a batch)."""
def element_hash(key: bytes, value: bytes) -> bytes: ...
def wake_pipe(fd: int) -> bool:
    """Writes one byte to the non-blocking pipe ``fd`` holding the GIL; False if it is full."""

class HttpFront:
    """The node's HTTP front (rust/front): PUT/GET /v1/kv/{key} in their plain forms are
    handed over in batches; everything else is proxied to the app on the Unix socket
    ``backend``. With ``tls_cert``/``tls_key`` it serves HTTPS only; with ``tls_client_ca``
    too, every client must present a certificate that CA signed."""

    def __init__(self, listen: str, backend: str, max_body: int, threads: int = 1, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_client_ca: str | None = None) -> None: ...
    def port(self) -> int: ...
    def notify_fd(self) -> int: ...
    def take(self) -> list[tuple[int, bool, str, str | None, str | None, str | None, bytes]]:
        """(id, put?, key, consistency, X-Request-Id, Authorization, body) of every waiting
        request; the credential is not judged by the front."""
    def respond(self, replies: Sequence[tuple[int, int, bytes]]) -> None: ...
    def close(self) -> None: ...

class FernetKey:
    """A Fernet key (rust/wire): the tokens PySyncObj seals Raft messages with, made and opened
    in one call each."""

    def __init__(self, key: bytes) -> None: ...  # 32 bytes: signing half, encryption half
    def seal(self, message: bytes, timestamp: int, iv: bytes) -> bytes: ...  # iv: 16 random bytes
    def open(self, token: bytes) -> tuple[int, bytes]:
        """(timestamp, message); ValueError for a token this key did not seal, or not a token."""
