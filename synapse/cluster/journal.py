"""The Raft log on disk: a segmented, checksummed journal in place of PySyncObj's FileJournal.

PySyncObj's FileJournal (0.3.17) keeps every entry's bytes in a Python list *and* in a mmap'd
file that only grows (≈ 2 × the log in RSS: ~315 MB of a 677 MB leader at 1M keys, measured
by ``scripts/bench-node``), caps the file at 4 GiB (a u32 end offset), and compacts by
clearing the file and re-adding the kept entries — a process killed during that loop loses
entries it had acknowledged. This journal keeps the same interface (PySyncObj calls it the
same way) with:

- entries on disk only, plus three integer arrays (offset, length, term: 24 bytes an entry)
  and a small cache of the newest entries (the leader sends them and every node applies
  them right after appending, so steady state never reads the disk);
- segment files named by their first index, each record ``u32 len ‖ u32 crc32 ‖ u64 index ‖
  u64 term ‖ command``; loading stops at the first torn or corrupt record and cuts it off;
- compaction that never rewrites an entry: the first live index moves in ``HEAD`` (written
  to a temporary file, fsynced, renamed), then whole segments below it are unlinked;
- ``HEAD`` and ``meta`` (current term, vote, commit index) as small JSON files, replaced
  atomically; the term and vote are fsynced before PySyncObj sends anything that reflects
  them (Raft §5; PySyncObj stores them synchronously too).

Appends go to the page cache (a SIGKILL loses nothing); with ``fsync=True`` every append is
also fdatasync'ed before PySyncObj acknowledges it, so a power loss loses nothing either.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from synapse.cluster.fsutil import fsync_dir

log = logging.getLogger("synapse.cluster")

Entry = tuple[bytes, int, int]  # PySyncObj's (command, index, term)

_SEGMENT_MAGIC = b"SYNLOG01"
_RECORD = struct.Struct("<IIQQ")  # command length, crc32, index, term
_SEGMENT_SUFFIX = ".log"


class JournalError(RuntimeError):
    """The journal on disk cannot be used as it is."""


@dataclass
class _Segment:
    first: int  # index of its first record (also its file name)
    path: Path
    fd: int
    size: int


def _crc(index: int, term: int, command: bytes) -> int:
    return zlib.crc32(command, zlib.crc32(struct.pack("<QQ", index, term)))


def _replace_json(path: Path, value: dict, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


class EntriesView:
    """A lazy run of entries, for PySyncObj's open-ended slices (``log[i:]``): it takes the
    length, the first entry or iterates, and only slices what it sends. Reading the whole
    tail for every AppendEntries — what a list would cost — is what this avoids."""

    def __init__(self, journal: "SegmentedJournal", start: int, stop: int) -> None:
        self._journal = journal
        self._start = start  # positions in the journal, stop exclusive
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __bool__(self) -> bool:
        return self._stop > self._start

    def __iter__(self) -> Iterator[Entry]:
        for pos in range(self._start, self._stop):
            yield self._journal.entry_at(pos)

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise ValueError("the journal does not slice with a step")
            # A slice of a view goes into a message (pickled): a real list.
            return [self._journal.entry_at(self._start + i) for i in range(start, stop)]
        n = len(self)
        if item < 0:
            item += n
        if not 0 <= item < n:
            raise IndexError("journal view index out of range")
        return self._journal.entry_at(self._start + item)


class SegmentedJournal:
    """PySyncObj's journal interface (``add``, ``clear``, ``deleteEntriesFrom``,
    ``deleteEntriesTo``, indexing, ``len``, term/vote/commit-index metadata) over segment
    files in ``directory``. Called only from PySyncObj's tick thread."""

    SEGMENT_BYTES = 64 << 20
    CACHE_BYTES = 16 << 20

    def __init__(self, directory: Path, fsync: bool = False, read_only: bool = False) -> None:
        """``read_only``: inspect a log (offline audit) without changing a byte of it —
        nothing is cut or unlinked; where loading stopped early is listed in ``damage``."""
        self._dir = Path(directory)
        self._read_only = read_only
        self.damage: list[str] = []
        if not read_only:
            self._dir.mkdir(parents=True, exist_ok=True)
        elif not self._dir.is_dir():
            raise JournalError(f"{self._dir}: no Raft log here (is it a node's data dir?)")
        self._fsync = fsync
        self._head_path = self._dir / "HEAD"
        self._meta_path = self._dir / "meta"
        self._first: int | None = None  # index of the first live entry
        self._offsets = array("Q")  # per live entry: (segment-relative) record offset,
        self._lengths = array("Q")  # command length,
        self._terms = array("Q")  # and term
        self._segments: list[_Segment] = []
        self._segment_firsts: list[int] = []
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._meta = self._read_json(self._meta_path, {})
        self._meta_dirty = False
        self._load()

    # --- loading ---

    @staticmethod
    def _read_json(path: Path, default: dict) -> dict:
        try:
            with open(path) as f:
                value = json.load(f)
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as e:
            raise JournalError(f"{path}: unreadable ({e}); restore it from a backup or remove the data dir's raft-log") from e
        if not isinstance(value, dict):
            raise JournalError(f"{path}: not a JSON object; restore it from a backup or remove the data dir's raft-log")
        return value

    def _load(self) -> None:
        paths = sorted(self._dir.glob("*" + _SEGMENT_SUFFIX), key=lambda p: int(p.stem))
        head = self._read_json(self._head_path, {})
        if "start" not in head:
            if paths:  # HEAD is written before the first segment: it was lost or removed
                raise JournalError(
                    f"{self._head_path} is missing but {len(paths)} log segment(s) exist; "
                    f"restore it from a backup, or remove {self._dir} to rejoin empty"
                )
            head = {"start": None}
        start = head["start"]
        for path in paths:
            first = int(path.stem)
            fd = os.open(path, os.O_RDONLY if self._read_only else os.O_RDWR)
            segment = _Segment(first, path, fd, os.fstat(fd).st_size)
            if start is None or not self._load_segment(segment, start):
                # Below the start (compacted, unlink interrupted) or past a cut: not live.
                os.close(fd)
                if not self._read_only:
                    path.unlink()
                continue
            self._segments.append(segment)
            self._segment_firsts.append(first)

    def _load_segment(self, segment: _Segment, start: int) -> bool:
        """Reads a segment's records into the index; False if none of it is live."""
        with os.fdopen(os.dup(segment.fd), "rb") as f:
            data = f.read()
        if data[: len(_SEGMENT_MAGIC)] != _SEGMENT_MAGIC:
            if len(data) < len(_SEGMENT_MAGIC):  # created, never written: a crash at roll-over
                return False
            raise JournalError(f"{segment.path}: not a Synapse journal segment (bad magic bytes)")
        expected = self._first + len(self._terms) if self._first is not None else start
        if segment.first > expected:
            if self._first is not None:
                self.damage.append(f"entries {expected} to {segment.first - 1}: missing (a gap before {segment.path.name})")
            return False  # a gap: everything from here on lies past a cut-off tail
        offset = len(_SEGMENT_MAGIC)
        live = False
        while offset + _RECORD.size <= len(data):
            length, crc, index, term = _RECORD.unpack_from(data, offset)
            end = offset + _RECORD.size + length
            command = data[offset + _RECORD.size : end]
            if end > len(data) or _crc(index, term, command) != crc:
                what = "cut short" if end > len(data) else "checksum mismatch"
                self.damage.append(f"entry {index}: record {what} in {segment.path.name} at byte {offset}")
                log.warning("%s: torn or corrupt record at byte %d (index %d); the log ends before it",
                            segment.path, offset, index)
                break
            if index >= expected:
                if index != expected:
                    self.damage.append(f"entry {index}: follows entry {expected - 1} in {segment.path.name}: a gap")
                    break  # not contiguous: a stale tail beyond a truncation
                if self._first is None:
                    self._first = index
                self._offsets.append(offset)
                self._lengths.append(length)
                self._terms.append(term)
                expected += 1
                live = True
            offset = end
        if offset < len(data) and not self._read_only:
            os.ftruncate(segment.fd, offset)
        segment.size = offset
        return live

    # --- PySyncObj's interface ---

    def __len__(self) -> int:
        return len(self._terms)

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise ValueError("the journal does not slice with a step")
            return EntriesView(self, start, max(start, stop))
        n = len(self)
        if item < 0:
            item += n
        if not 0 <= item < n:
            raise IndexError("journal index out of range")
        return self.entry_at(item)

    def entry_at(self, pos: int) -> Entry:
        index = self._first + pos
        command = self._cache.get(index)
        if command is None:
            segment = self._segments[bisect_right(self._segment_firsts, index) - 1]
            length = self._lengths[pos]
            command = os.pread(segment.fd, length, self._offsets[pos] + _RECORD.size)
            if len(command) != length:
                raise JournalError(f"{segment.path}: entry {index} is cut short on disk")
        return (command, index, self._terms[pos])

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)
        if self._first is None:
            self._start_at(idx)
        elif idx != self._first + len(self._terms):
            raise JournalError(f"entry {idx} appended after entry {self._first + len(self._terms) - 1}: the log must stay contiguous")
        segment = self._segments[-1] if self._segments else None
        if segment is None or segment.size >= self.SEGMENT_BYTES:
            segment = self._new_segment(idx)
        record = _RECORD.pack(len(command), _crc(idx, term, command), idx, term) + command
        written = os.pwrite(segment.fd, record, segment.size)
        if written != len(record):
            raise JournalError(f"{segment.path}: short write ({written} of {len(record)} bytes)")
        if self._fsync:
            os.fdatasync(segment.fd)
        self._offsets.append(segment.size)
        self._lengths.append(len(command))
        self._terms.append(term)
        segment.size += len(record)
        self._remember(idx, command)

    def clear(self) -> None:
        # HEAD first: from then on no segment is live, so a crash midway leaves an empty log
        # (what PySyncObj's own clear leaves), never a mix.
        _replace_json(self._head_path, {"start": None}, self._fsync)
        for segment in self._segments:
            os.close(segment.fd)
            segment.path.unlink(missing_ok=True)
        self._segments.clear()
        self._segment_firsts.clear()
        self._first = None
        self._reset_index()

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (PySyncObj's name)
        """Cuts the log from position ``entryFrom`` on (a follower's conflicting tail)."""
        if entryFrom >= len(self):
            return
        if entryFrom <= 0:
            self.clear()
            return
        index = self._first + entryFrom
        # Later segments go first, so a crash midway leaves a gap, which loading treats as
        # the end of the log: what remains is always a prefix.
        while self._segments and self._segments[-1].first > index:
            segment = self._segments.pop()
            self._segment_firsts.pop()
            os.close(segment.fd)
            segment.path.unlink()
        segment = self._segments[-1]  # the one holding `index`
        cut = self._offsets[entryFrom]
        os.ftruncate(segment.fd, cut)
        if self._fsync:
            os.fdatasync(segment.fd)
        segment.size = cut
        del self._offsets[entryFrom:], self._lengths[entryFrom:], self._terms[entryFrom:]
        for stale in [i for i in self._cache if i >= index]:
            self._cache_bytes -= len(self._cache.pop(stale))

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802 (PySyncObj's name)
        """Drops the first ``entryTo`` entries (compaction): moves HEAD, unlinks segments."""
        if entryTo <= 0:
            return
        if entryTo >= len(self):
            self.clear()
            return
        start = self._first + entryTo
        _replace_json(self._head_path, {"start": start}, self._fsync)
        self._first = start
        del self._offsets[:entryTo], self._lengths[:entryTo], self._terms[:entryTo]
        while len(self._segments) > 1 and self._segments[1].first <= start:
            segment = self._segments.pop(0)
            self._segment_firsts.pop(0)
            os.close(segment.fd)
            segment.path.unlink()
        for stale in [i for i in self._cache if i < start]:
            self._cache_bytes -= len(self._cache.pop(stale))

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802
        # The commit index is a hint (a node relearns it from the leader): saved each second.
        self._meta["commit_index"] = raftCommitIndex
        self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self._meta.get("commit_index", 1)

    def setCurrentTerm(self, term: int, votedForNodeId) -> None:  # noqa: N802
        # Raft: the term and vote must be on disk before any message reflecting them.
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        _replace_json(self._meta_path, self._meta, True)
        self._meta_dirty = False

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._meta.get("term", 0)

    def getVotedForNodeId(self):  # noqa: N802
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if self._meta_dirty:
            _replace_json(self._meta_path, self._meta, self._fsync)
            self._meta_dirty = False

    def flush(self) -> None:
        for segment in self._segments:
            os.fdatasync(segment.fd)

    def _destroy(self) -> None:
        if self._meta_dirty:
            _replace_json(self._meta_path, self._meta, self._fsync)
            self._meta_dirty = False
        for segment in self._segments:
            os.close(segment.fd)
        self._segments.clear()
        self._segment_firsts.clear()

    # --- internals ---

    def _start_at(self, idx: int) -> None:
        _replace_json(self._head_path, {"start": idx}, self._fsync)
        self._first = idx
        self._reset_index()

    def _reset_index(self) -> None:
        self._offsets = array("Q")
        self._lengths = array("Q")
        self._terms = array("Q")
        self._cache.clear()
        self._cache_bytes = 0

    def _new_segment(self, first: int) -> _Segment:
        path = self._dir / f"{first:020d}{_SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.pwrite(fd, _SEGMENT_MAGIC, 0)
        if self._fsync:
            os.fdatasync(fd)
            fsync_dir(self._dir)
        segment = _Segment(first, path, fd, len(_SEGMENT_MAGIC))
        self._segments.append(segment)
        self._segment_firsts.append(first)
        return segment

    def _remember(self, idx: int, command: bytes) -> None:
        self._cache[idx] = command
        self._cache_bytes += len(command)
        while self._cache_bytes > self.CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)

    # --- statistics, for status and metrics ---

    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)


def import_pysyncobj_journal(old: Path, journal: SegmentedJournal) -> int:
    """Moves a data dir written before this journal existed (PySyncObj's ``raft.journal`` and
    its ``.meta``) into ``journal``, then removes the old files. Returns the entries moved."""
    from pysyncobj.journal import FileJournal

    if len(journal) > 0:
        raise JournalError(
            f"{old} and {journal._dir} both exist: the data dir holds two Raft logs; "
            f"remove {old} if {journal._dir} is the current one"
        )
    legacy = FileJournal(str(old))
    try:
        for i in range(len(legacy)):
            journal.add(*legacy[i])
        journal.setCurrentTerm(legacy.getCurrentTerm(), legacy.getVotedForNodeId())
        journal.setRaftCommitIndex(legacy.getRaftCommitIndex())
        journal.onOneSecondTimer()
        journal.flush()
        moved = len(legacy)
    finally:
        legacy._destroy()
    for path in (old, Path(str(old) + ".meta")):
        path.unlink(missing_ok=True)
    return moved
