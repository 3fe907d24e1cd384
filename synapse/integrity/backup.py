"""Backups: a snapshot file of the whole replicated state at one applied index, what it holds,
and a new cluster's data directory made from it (etcd's `snapshot save / status / restore`).

- The file is the Rust core's snapshot format (checksummed throughout, the state digest in
  its header): `save` writes a frozen view taken between two entries after a read barrier, so
  it holds every write acknowledged before the request.
- `inspect` loads it (every checksum verified) and says its log index, digest and what kinds
  of records it holds.
- `restore` writes `<data dir>/raft.dump` — the dump a node starts from — holding the state
  at the snapshot's index and a Raft configuration of the *new* cluster's voters. Every voter
  of the new cluster is restored from the same file with the same voter list, so their logs
  agree on the entry they start after; PySyncObj's last and previous entries there are its
  own no-ops (already applied: never run). Principals, roles and tokens are in the state,
  so the old cluster's tokens work on the new one; nothing else of the old cluster's nodes
  (their logs, audit trails, checkpoints' snapshots) is carried.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from synapse import _core
from synapse.cluster.dump import write_dump
from synapse.state import keys, memory

# PySyncObj's no-op command (its _COMMAND_TYPE.NO_OP, one byte): the entries a restored log
# starts after. The term is the first one; the new cluster's first election moves past it.
_NOOP = b"\x01"
_TERM = 1

# The steps `restore` reports: each is one call into the core (load and verify the snapshot;
# write the dump), which reports nothing finer.
RESTORE_STEPS = 2

# What `inspect` counts, by key prefix (synapse/state/keys.py).
_KINDS = {
    "kv": keys.KV, "memories": memory.MEM, "tasks": keys.TASK, "workers": keys.WORKER, "nodes": keys.NODE,
    "principals": keys.SEC_PRINCIPAL, "roles": keys.SEC_ROLE, "tokens": keys.SEC_TOKEN,
}


class BackupError(ValueError):
    """The file is no snapshot, is damaged, or the restore's target cannot be used."""


def save(frozen: _core.FrozenState, index: int, path: Path) -> _core.SnapshotInfo:
    """Writes the frozen state at ``index`` to ``path`` (atomically: a temp file, fsync, rename)."""
    return frozen.write_snapshot(str(path), index)


def load(path: Path) -> tuple[_core.StateStore, _core.SnapshotInfo]:
    try:
        return _core.StateStore.load_snapshot(str(path))
    except FileNotFoundError:
        raise BackupError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"{path}: not a readable Synapse snapshot ({e}); make one with `synapse snapshot "
                          "save FILE`") from None


def inspect(path: Path) -> dict:
    """The snapshot's index, digest, size and record counts (loading it checks every checksum)."""
    store, info = load(path)
    counts = {kind: len(store.scan_prefix(prefix)) for kind, prefix in _KINDS.items()}
    return {"file": str(path), "index": info.log_index, "state_hash": info.state_digest.hex(),
            "records": info.entry_count, "bytes": info.file_size, "counts": counts}


def restore(path: Path, data_dir: Path, voters: list[str],
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Makes ``data_dir`` a voter's data directory holding the snapshot's state, in a new
    cluster of ``voters`` (Raft addresses, this one's included). ``progress(steps done,
    RESTORE_STEPS)`` after each step: the snapshot loaded and verified, the dump written."""
    report = progress or (lambda done, total: None)
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"data dir {data_dir} is not empty; restore into a new directory (a node's data is "
                          "never overwritten)")
    if len(set(voters)) != len(voters) or not voters:
        raise BackupError(f"voters {voters}: expected this node's Raft address and its peers', each once")
    report(0, RESTORE_STEPS)
    store, info = load(path)
    report(1, RESTORE_STEPS)
    index = info.log_index
    if index < 2:
        raise BackupError(f"{path}: the snapshot is at log index {index}; a snapshot of a running cluster is "
                          "at 2 or more")
    data_dir.mkdir(parents=True, exist_ok=True)
    dump = data_dir / "raft.dump"
    written = write_dump(dump, store, ((_NOOP, index, _TERM), (_NOOP, index - 1, _TERM), sorted(voters)))
    report(2, RESTORE_STEPS)
    return {"data_dir": str(data_dir), "index": index, "state_hash": written.state_digest.hex(),
            "voters": sorted(voters)}
