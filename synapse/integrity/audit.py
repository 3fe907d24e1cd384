"""The audit trail and its offline verification (DESIGN.md, "Audit").

``AuditTrail``: every node appends, for each entry it applies, ``(index, chain head, state
digest)`` to ``audit.log`` in its data dir (76-byte records with a crc). A re-applied index
(a replay after a restart or a dump) replaces the records from that index on.

``verify(data_dir)``: no Raft, no network. Starts from the node's dump (or the empty state),
replays every retained log entry through the command processor, and checks each one against
the trail — a different chain head means the entry's bytes changed since they were applied;
a different digest, that the state after it differs from what the node had — and every
checkpoint the replayed state records as agreed against the replayed digest and chain. It
names the first entry that fails.

``tail(data_dir, n)``: the last entries of the log, decoded for people.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synapse import _core
from synapse.cluster.dump import DumpError, read_dump
from synapse.cluster.entries import EntryDecodeError, decode_command
from synapse.cluster.journal import JournalError, SegmentedJournal
from synapse.state.commands import EntryError, decode_entry
from synapse.state.processor import CommandProcessor

TRAIL = "audit.log"
_RECORD = struct.Struct("<Q32s32sI")  # index, chain, digest, crc32 of the rest
# Checkpoint states a replay keeps in memory for rollbacks further on (older: from files).
_FROZEN_KEPT = 16
# The trail is trimmed to the retained log once it passes this size.
_TRIM_AT = 64 << 20


class AuditTrail:
    """Appended on PySyncObj's tick thread only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        whole = size - size % _RECORD.size  # a torn last record (a kill mid-write) is dropped
        if whole != size:
            os.ftruncate(self._fd, whole)
        self._size = whole
        self._last = self._index_at(whole - _RECORD.size) if whole else 0

    def _index_at(self, offset: int) -> int:
        return struct.unpack("<Q", os.pread(self._fd, 8, offset))[0]

    def append(self, index: int, chain: bytes, digest: bytes) -> None:
        if index <= self._last:
            self._cut_from(index)
        body = struct.pack("<Q32s32s", index, chain, digest)
        os.pwrite(self._fd, body + struct.pack("<I", zlib.crc32(body)), self._size)
        self._size += _RECORD.size
        self._last = index

    def _cut_from(self, index: int) -> None:
        """Drops the records of ``index`` and later (indexes only grow along the file)."""
        lo, hi = 0, self._size // _RECORD.size
        while lo < hi:
            mid = (lo + hi) // 2
            if self._index_at(mid * _RECORD.size) < index:
                lo = mid + 1
            else:
                hi = mid
        self._size = lo * _RECORD.size
        os.ftruncate(self._fd, self._size)
        self._last = self._index_at(self._size - _RECORD.size) if self._size else 0

    def trim_below(self, index: int) -> None:
        """Keeps only records from ``index`` on, once the file is large (the log before
        ``index`` is gone, so nothing can be verified against them)."""
        if self._size < _TRIM_AT:
            return
        keep = [r for r in read_trail(self.path).items() if r[0] >= index]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            for i, (chain, digest) in keep:
                body = struct.pack("<Q32s32s", i, chain, digest)
                f.write(body + struct.pack("<I", zlib.crc32(body)))
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._open()

    def rewrite(self, records: list[tuple[int, bytes, bytes]]) -> None:
        """Replaces the records from the first of ``records`` on (a repair replayed them)."""
        for index, chain, digest in records:
            self.append(index, chain, digest)

    def close(self) -> None:
        os.close(self._fd)


def read_trail(path: Path) -> dict[int, tuple[bytes, bytes]]:
    """index -> (chain, digest); a record with a bad crc ends the trail (as a torn one)."""
    out: dict[int, tuple[bytes, bytes]] = {}
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return out
    for off in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
        index, chain, digest, crc = _RECORD.unpack_from(data, off)
        if zlib.crc32(data[off : off + _RECORD.size - 4]) != crc:
            break
        out[index] = (chain, digest)
    return out


@dataclass
class Verification:
    data_dir: str
    base_index: int = 0
    base_source: str = "empty state"
    first_index: int | None = None
    last_index: int | None = None
    entries_replayed: int = 0
    entries_checked_against_trail: int = 0
    checkpoints_verified: list[int] = field(default_factory=list)
    failure: dict[str, Any] | None = None
    # With ``strict=False``: entries after which the node's recorded state differed from the
    # replay (a damaged state, later repaired) — noted, not failed; the chain still must hold.
    state_mismatches: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def fail(self, index: int | None, reason: str) -> "Verification":
        self.failure = {"index": index, "reason": reason}
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **self.__dict__}


def verify(data_dir: Path, strict: bool = True, progress: Callable[[int, int], None] | None = None) -> Verification:
    """``strict`` (the default, and ``synapse audit verify``): a state that differs from the
    replay fails. Otherwise such entries are listed in ``state_mismatches`` and the replay goes
    on — for a node known to have been damaged on purpose and repaired (chaos runs).
    ``progress(entries gone through, entries in the retained log)`` before each entry and at
    the end (entries the dump already holds are gone through at once)."""
    data_dir = Path(data_dir)
    v = Verification(str(data_dir))
    try:
        journal = SegmentedJournal(data_dir / "raft-log", read_only=True)
    except JournalError as e:
        return v.fail(None, str(e))
    store, base = _core.StateStore(), 0
    dump_path = data_dir / "raft.dump"
    if dump_path.exists():
        try:
            dump = read_dump(dump_path)  # its snapshot's checksums and digest are checked here
        except (DumpError, _core.SnapshotError) as e:
            return v.fail(None, f"the dump {dump_path} is damaged: {e}")
        store, base = dump.store, dump.info.log_index
        v.base_source = f"{dump_path.name} at index {base}"
    v.base_index = base
    trail = read_trail(data_dir / TRAIL)
    processor = CommandProcessor(store)
    if len(journal) and journal[0][1] > base + 1:
        return v.fail(base + 1, f"the log starts at entry {journal[0][1]} but the dump ends at {base}: entries are missing")
    mine: dict[int, list[bytes]] = {}
    frozen_at: dict[int, _core.FrozenState] = {}
    total = len(journal)
    for pos in range(total):
        if progress is not None:
            progress(pos, total)
        command, index, _term = journal.entry_at(pos)
        if index <= base:
            continue
        v.first_index = v.first_index or index
        v.last_index = index
        try:
            raft_command = decode_command(command)
        except EntryDecodeError as e:
            return v.fail(index, f"entry {index} cannot be decoded: {e}")
        if raft_command.kind != "regular":
            continue  # PySyncObj's own entries never reach the state
        outcome = processor.apply_entry(index, raft_command.payload)
        rollback = next((e for e in outcome.events if e[0] == "rollback"), None)
        if rollback is not None:
            restored = _checkpoint_state(data_dir, rollback[1], rollback[2], frozen_at)
            if restored is None:
                return v.fail(index, f"entry {index} rolls back to checkpoint {rollback[1]}, whose state is neither "
                                     "in the replayed range nor retained in checkpoints/; cannot replay past it")
            before, processor = processor.store, CommandProcessor(restored)
            processor.finish_rollback(index, outcome.chain, rollback[1], [rollback[2], rollback[3]], before)
        digest = processor.store.digest()
        v.entries_replayed += 1
        recorded = trail.get(index)
        if recorded is not None:
            v.entries_checked_against_trail += 1
            if recorded[0] != outcome.chain:
                return v.fail(index, f"entry {index} is not the entry this node applied: its chain head is "
                                     f"{outcome.chain.hex()[:16]} on replay, {recorded[0].hex()[:16]} in {TRAIL} "
                                     "(the log was changed after the fact)")
            if recorded[1] != digest and not strict:
                v.state_mismatches.append(index)
            elif recorded[1] != digest:
                return v.fail(index, f"the state after entry {index} differs from what this node had: "
                                     f"{digest.hex()[:16]} on replay, {recorded[1].hex()[:16]} in {TRAIL} "
                                     "(the node's state was damaged, or apply is not deterministic)")
        for event in outcome.events:
            if event[0] == "checkpoint":
                mine[index] = [digest, outcome.chain]
            elif event[0] == "snapshot":  # a checkpoint a later rollback may go back to
                frozen_at[index] = processor.store.freeze()
                while len(frozen_at) > _FROZEN_KEPT:
                    del frozen_at[min(frozen_at)]
            elif event[0] == "report" and event[3] is not None and event[1] in mine:
                if mine[event[1]] != event[3]:
                    return v.fail(event[1], f"checkpoint {event[1]}: the replayed state {mine[event[1]][0].hex()[:16]} "
                                            f"is not the agreed {event[3][0].hex()[:16]}")
                if event[1] not in v.checkpoints_verified:
                    v.checkpoints_verified.append(event[1])
    if progress is not None:
        progress(total, total)
    if journal.damage:
        first = journal.damage[0]
        index = int(first.split()[1].rstrip(":")) if first.startswith("entry ") else None
        return v.fail(index, f"the log is damaged: {first}")
    return v


def _checkpoint_state(data_dir: Path, index: int, digest: bytes, frozen_at: dict) -> _core.StateStore | None:
    """The state at checkpoint ``index`` for replaying a rollback: from this replay, or the
    node's retained snapshot; only if it has the agreed digest."""
    if index in frozen_at and frozen_at[index].digest() == digest:
        return _core.StateStore.thaw(frozen_at[index])
    path = data_dir / "checkpoints" / f"{index:020d}.snap"
    if path.exists():
        try:
            store, _ = _core.StateStore.load_snapshot(path)
        except _core.SnapshotError:
            return None
        if store.digest() == digest:
            return store
    return None


def tail(data_dir: Path, count: int) -> list[dict[str, Any]]:
    """The last ``count`` log entries, decoded for people."""
    journal = SegmentedJournal(Path(data_dir) / "raft-log", read_only=True)
    trail = read_trail(Path(data_dir) / TRAIL)
    out = []
    for pos in range(max(0, len(journal) - count), len(journal)):
        command, index, term = journal.entry_at(pos)
        item: dict[str, Any] = {"index": index, "term": term}
        recorded = trail.get(index)
        if recorded:
            item["chain"], item["state_hash"] = recorded[0].hex(), recorded[1].hex()
        try:
            raft_command = decode_command(command)
        except EntryDecodeError as e:
            item.update(kind="undecodable", error=str(e))
            out.append(item)
            continue
        item["kind"] = raft_command.kind
        if raft_command.kind == "regular":
            try:
                item["commands"] = [_describe(c) for c in decode_entry(raft_command.payload)]
            except EntryError as e:
                item["error"] = str(e)
        elif raft_command.detail is not None:
            item["detail"] = raft_command.detail
        out.append(item)
    return out


def _describe(command: Any) -> dict[str, Any]:
    """A command as a person reads it: values as JSON text (shortened), digests as hex."""
    if not isinstance(command, dict):
        return {"malformed": repr(command)[:80]}
    out: dict[str, Any] = {}
    for name, value in command.items():
        if isinstance(value, bytes):
            value = _short(value.decode("utf-8", "replace")) if name == "value" else value.hex()[:16]
        elif isinstance(value, list) and name in ("then", "else", "if"):
            value = [_describe(v) for v in value]
        out[name] = value
    return out


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_tail(items: list[dict[str, Any]]) -> str:
    lines = []
    for item in items:
        head = f"{item['index']:>8}  term {item['term']:<4} {item['kind']:<10}"
        if "commands" in item:
            parts = []
            for c in item["commands"]:
                op = c.get("op", "?")
                key = c.get("key") or c.get("node_id") or (f"checkpoint {c['checkpoint']}" if "checkpoint" in c else "")
                extra = f" = {c['value']}" if "value" in c else ""
                parts.append(f"{op} {key}{extra}".strip())
            lines.append(head + "; ".join(parts))
        else:
            lines.append(head + json.dumps(item.get("detail") or item.get("error") or "", default=str))
    return "\n".join(lines)
