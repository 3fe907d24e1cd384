"""The Raft dump file: PySyncObj's snapshot hook, in our formats (never pickle).

PySyncObj calls ``serializer(tmp_path, raft_tuple)`` on its tick thread when the log is due for
compaction, renames ``tmp_path`` over its ``fullDumpFile``, and later calls
``deserializer(path)`` on restart or after receiving the file from the leader (a lagging
follower gets this file as raw chunks). So the one file must hold both our state and
PySyncObj's tuple ``(last_applied_entry, previous_entry, cluster)``, entries being
``(command_bytes, index, term)`` (DESIGN.md: the tuple must come back exactly, as tuples — a list wedged the node).

Layout::

    b"SYNDUMP1" ‖ u32 meta_len ‖ meta (msgpack) ‖ B3(b"SYNDUMPM" ‖ meta)[0:16] ‖ snapshot

where ``meta`` = ``{"last": [cmd, idx, term], "prev": [cmd, idx, term], "cluster": [addr…]}``
and ``snapshot`` is the Rust core's snapshot format (its own checksums and digest).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack

from synapse import _core
from synapse.cluster.fsutil import fsync_dir
from synapse.cluster.threads import run_in_background_priority

# What a catch-up planner answers when it is not ready yet (raft.py's BackgroundSerializer
# asks again at its next round); otherwise a container of the changes, or None for this file.
PLAN_PENDING = object()

log = logging.getLogger("synapse.cluster")

MAGIC = b"SYNDUMP1"
_META_TAG = b"SYNDUMPM"
_CHECK = 16
# The tuple is small; a larger declared length means a corrupt or foreign file.
_MAX_META = 1 << 20


class DumpError(ValueError):
    """The dump file is not one of ours, or it is damaged."""


RaftEntry = tuple[bytes, int, int]


@dataclass(frozen=True)
class Dump:
    store: _core.StateStore
    info: _core.SnapshotInfo
    last: RaftEntry
    prev: RaftEntry
    cluster: list[str]


def _check(meta: bytes) -> bytes:
    return blake3.blake3(_META_TAG + meta).digest()[:_CHECK]


def _entry(raw: object, what: str, path: Path) -> RaftEntry:
    if (
        not isinstance(raw, list)
        or len(raw) != 3
        or not isinstance(raw[0], bytes)
        or not all(isinstance(x, int) for x in raw[1:])
    ):
        raise DumpError(f"{path}: the {what} Raft entry in the dump is malformed")
    return (raw[0], raw[1], raw[2])


def write_dump(
    path: str | Path, store: _core.StateStore | _core.FrozenState, raft_tuple: tuple
) -> _core.SnapshotInfo:
    """Writes the dump atomically (the core writes ``path.tmp``, fsyncs and renames)."""
    last, prev, cluster = raft_tuple
    meta = msgpack.packb(
        {
            "last": [bytes(last[0]), int(last[1]), int(last[2])],
            "prev": [bytes(prev[0]), int(prev[1]), int(prev[2])],
            # Nodes are TCPNode objects; their id is the address PySyncObj accepts back.
            "cluster": sorted(str(getattr(n, "id", n)) for n in cluster),
        },
        use_bin_type=True,
    )
    prefix = MAGIC + struct.pack("<I", len(meta)) + meta + _check(meta)
    return store.write_snapshot(str(path), int(last[1]), prefix)


def _read_meta(path: Path) -> tuple[RaftEntry, RaftEntry, list[str], int]:
    """(last, prev, cluster, offset of the snapshot) from the dump's header."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise DumpError(f"{path}: not a Synapse Raft dump (bad magic bytes)")
        (meta_len,) = struct.unpack("<I", head[len(MAGIC) :])
        if meta_len > _MAX_META:
            raise DumpError(f"{path}: declared metadata of {meta_len} bytes; the file is damaged")
        meta = f.read(meta_len)
        check = f.read(_CHECK)
    if len(meta) != meta_len or len(check) != _CHECK:
        raise DumpError(f"{path}: truncated in its metadata")
    if _check(meta) != check:
        raise DumpError(f"{path}: metadata checksum does not match; the file is damaged")
    try:
        fields = msgpack.unpackb(meta, raw=False)
    except Exception as e:  # msgpack raises several types for bad input
        raise DumpError(f"{path}: metadata is not valid msgpack: {e}") from e
    if not isinstance(fields, dict):
        raise DumpError(f"{path}: metadata is not a map")
    last = _entry(fields.get("last"), "last applied", path)
    prev = _entry(fields.get("prev"), "previous", path)
    cluster = fields.get("cluster")
    if not isinstance(cluster, list) or not all(isinstance(a, str) for a in cluster):
        raise DumpError(f"{path}: the cluster list in the dump is malformed")
    return last, prev, cluster, len(MAGIC) + 4 + meta_len + _CHECK


def dump_index(path: str | Path) -> int:
    """The log index a dump is at, from its header alone."""
    return _read_meta(Path(path))[0][1]


def read_dump(path: str | Path) -> Dump:
    path = Path(path)
    last, prev, cluster, offset = _read_meta(path)
    store, info = _core.StateStore.load_snapshot(str(path), offset)
    if info.log_index != last[1]:
        raise DumpError(
            f"{path}: the snapshot is at log index {info.log_index} but the Raft entry says {last[1]}"
        )
    return Dump(store=store, info=info, last=last, prev=prev, cluster=cluster)


class DumpJob:
    """Writes one dump from a frozen view on its own thread (the Rust writer releases the GIL),
    so the tick thread keeps heartbeating: written synchronously, a 1M-key dump stalled it for
    0.35-0.7 s. The file is written beside the dump and renamed over it at the end, under
    ``lock``; ``cancel()`` (taken under the same lock) guarantees it will not be, so a dump
    received from the leader meanwhile is never replaced by this older one."""

    def __init__(self, path: Path, frozen: _core.FrozenState, raft_tuple: tuple, lock: threading.Lock) -> None:
        self.path = Path(path)
        self.index = int(raft_tuple[0][1])
        self.error: BaseException | None = None
        self.info: _core.SnapshotInfo | None = None
        self._frozen = frozen
        self._raft_tuple = raft_tuple
        self._lock = lock
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"dump-{self.index}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        run_in_background_priority()
        staged = self.path.with_name(self.path.name + ".next")
        try:
            info = write_dump(staged, self._frozen, self._raft_tuple)
            self._frozen = None  # let the buckets it pinned go
            with self._lock:
                if self._cancelled:
                    staged.unlink(missing_ok=True)
                    return
                os.replace(staged, self.path)
                fsync_dir(self.path.parent)
            self.info = info
            log.info("wrote the Raft dump at index %d (%d entries, %d bytes)", self.index, info.entry_count, info.file_size)
        except BaseException as e:  # reported through the checker; the old dump stays
            self.error = e
            log.exception("writing the Raft dump at index %d failed; the previous dump stays", self.index)

    def cancel(self) -> None:
        """Call with ``lock`` held."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
