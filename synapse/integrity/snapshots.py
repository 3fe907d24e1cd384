"""This node's retained snapshots of checkpoint states, for rollback (DESIGN.md, "Rollback").

At every checkpoint the tick thread hands over a frozen view of the state at that index
(O(buckets)); a thread writes it as a Rust snapshot, ``checkpoints/<index>.snap`` (checksummed,
fsynced, renamed into place), and the newest ``retain`` files are kept. A rollback loads one
and checks its digest against the checkpoint's agreed digest before using it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from synapse import _core
from synapse.cluster.threads import run_in_background_priority

log = logging.getLogger("synapse.integrity")

_SUFFIX = ".snap"


class NotRetained(LookupError):
    pass


class CheckpointSnapshots:
    def __init__(self, directory: Path, retain: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.retain = retain
        self._lock = threading.Lock()
        self._writing: dict[int, threading.Thread] = {}
        for stale in self.directory.glob("*.tmp"):  # a write cut short by a kill
            stale.unlink()

    def path(self, index: int) -> Path:
        return self.directory / f"{index:020d}{_SUFFIX}"

    def take(self, index: int, frozen: _core.FrozenState) -> None:
        """Writes the checkpoint's state in the background (called on the tick thread)."""
        if self.retain <= 0:
            return
        thread = threading.Thread(target=self._write, args=(index, frozen), name=f"checkpoint-{index}", daemon=True)
        with self._lock:
            self._writing[index] = thread
        thread.start()

    def _write(self, index: int, frozen: _core.FrozenState) -> None:
        run_in_background_priority()
        try:
            frozen.write_snapshot(self.path(index), index)
        except Exception:
            log.exception("writing the snapshot of checkpoint %d failed; it cannot be rolled back to here", index)
        finally:
            with self._lock:
                self._writing.pop(index, None)
            self._prune()

    def _prune(self) -> None:
        with self._lock:
            busy = set(self._writing)
        kept = sorted(self.retained(), reverse=True)
        for index in kept[self.retain :]:
            if index not in busy:
                self.path(index).unlink(missing_ok=True)

    def retained(self) -> list[int]:
        """Indexes with a complete snapshot file here, ascending."""
        return sorted(int(p.stem) for p in self.directory.glob("*" + _SUFFIX))

    def available(self, index: int) -> bool:
        with self._lock:
            if index in self._writing:
                return True
        return self.path(index).exists()

    def load(self, index: int, digest: bytes, timeout: float = 120.0) -> _core.StateStore:
        """The state at checkpoint ``index``, proven by its digest. NotRetained if this node
        has no snapshot of it; ValueError if the file does not hold the agreed state."""
        with self._lock:
            writing = self._writing.get(index)
        if writing is not None:
            writing.join(timeout)  # taken moments ago (a node replaying its log): finish it
        path = self.path(index)
        if not path.exists():
            raise NotRetained(f"checkpoint {index} is not retained on this node (retained: {self.retained()})")
        store, info = _core.StateStore.load_snapshot(path)
        if store.digest() != digest:
            raise ValueError(
                f"{path} holds state {store.hexdigest()[:16]}, not the agreed {digest.hex()[:16]} of checkpoint {index}"
            )
        return store

    def wait(self, timeout: float | None = None) -> None:
        with self._lock:
            threads = list(self._writing.values())
        for t in threads:
            t.join(timeout)
