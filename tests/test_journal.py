"""The Raft journal (synapse/cluster/journal.py): PySyncObj's interface, kept on disk.

A model (a plain list) is checked against the journal through every operation PySyncObj
performs, with reopenings in between; then the failure cases: torn and corrupt records,
crashes in the middle of compaction and truncation, a SIGKILLed writer, and the move from
PySyncObj's own journal file.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from synapse.cluster.journal import EntriesView, JournalError, SegmentedJournal, import_pysyncobj_journal


def small(directory: Path, **kw) -> SegmentedJournal:
    j = SegmentedJournal(directory, **kw)
    j.SEGMENT_BYTES = 256  # a few records per segment, so every path crosses segments
    j.CACHE_BYTES = 64
    return j


def entries(j: SegmentedJournal) -> list[tuple[bytes, int, int]]:
    return [j[i] for i in range(len(j))]


def cmd(i: int) -> bytes:
    return b"c%d-" % i + bytes([i % 251]) * (i % 37)


class JournalModel(RuleBasedStateMachine):
    """Everything PySyncObj does to a journal, against a list, reopening at random."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="synapse-journal-"))
        self.j = small(self.tmp)
        self.model: list[tuple[bytes, int, int]] = []
        self.next = 1
        self.term = 1

    def teardown(self) -> None:
        self.j._destroy()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(n=st.integers(1, 12), new_term=st.booleans())
    def append(self, n: int, new_term: bool) -> None:
        if new_term:
            self.term += 1
        for _ in range(n):
            e = (cmd(self.next), self.next, self.term)
            self.j.add(*e)
            self.model.append(e)
            self.next += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate_tail(self, data) -> None:
        k = data.draw(st.integers(0, len(self.model)))
        self.j.deleteEntriesFrom(k)
        del self.model[k:]
        self.next = self.model[-1][1] + 1 if self.model else self.next

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def compact(self, data) -> None:
        k = data.draw(st.integers(0, len(self.model)))
        self.j.deleteEntriesTo(k)
        del self.model[:k]

    @rule(idx=st.integers(1, 10_000))
    def install_dump(self, idx: int) -> None:
        # What PySyncObj does after receiving a snapshot: clear, then the dump's two entries.
        self.j.clear()
        self.model = [(b"prev", idx, self.term), (b"last", idx + 1, self.term)]
        for e in self.model:
            self.j.add(*e)
        self.next = idx + 2

    @rule()
    def reopen(self) -> None:
        self.j._destroy()
        self.j = small(self.tmp)

    @invariant()
    def same_entries(self) -> None:
        assert len(self.j) == len(self.model)
        assert entries(self.j) == self.model
        if self.model:
            assert self.j[-1] == self.model[-1]
            view = self.j[1:]
            assert isinstance(view, EntriesView) and len(view) == len(self.model) - 1
            assert list(view) == self.model[1:] and view[1:] == self.model[2:]


TestJournalModel = JournalModel.TestCase
TestJournalModel.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_entries_persist_with_term_vote_and_commit_index(tmp_path: Path) -> None:
    j = small(tmp_path)
    for i in range(1, 40):
        j.add(cmd(i), i, 3)
    j.setCurrentTerm(3, "127.0.0.1:7001")
    j.setRaftCommitIndex(39)
    j._destroy()
    j = small(tmp_path)
    assert entries(j) == [(cmd(i), i, 3) for i in range(1, 40)]
    assert (j.getCurrentTerm(), j.getVotedForNodeId(), j.getRaftCommitIndex()) == (3, "127.0.0.1:7001", 39)
    assert len(list(tmp_path.glob("*.log"))) > 3  # crossed segments


def test_compaction_unlinks_whole_segments_and_never_rewrites(tmp_path: Path) -> None:
    j = small(tmp_path)
    for i in range(1, 101):
        j.add(cmd(i), i, 1)
    segments = sorted(tmp_path.glob("*.log"))
    kept = segments[-1].read_bytes()
    j.deleteEntriesTo(90)
    assert j[0] == (cmd(91), 91, 1)
    left = sorted(tmp_path.glob("*.log"))
    assert len(left) < len(segments) and left[-1].read_bytes() == kept  # nothing rewritten
    j._destroy()
    assert entries(small(tmp_path)) == [(cmd(i), i, 1) for i in range(91, 101)]


def test_a_crash_after_head_moved_but_before_unlinking_loses_nothing(tmp_path: Path) -> None:
    j = small(tmp_path)
    for i in range(1, 101):
        j.add(cmd(i), i, 1)
    j._destroy()
    (tmp_path / "HEAD").write_text('{"start": 60}')  # the HEAD write done, the unlinks not
    j = small(tmp_path)
    assert entries(j) == [(cmd(i), i, 1) for i in range(60, 101)]
    assert min(int(p.stem) for p in tmp_path.glob("*.log")) <= 60


def test_a_crash_midway_through_truncation_leaves_a_prefix(tmp_path: Path) -> None:
    j = small(tmp_path)
    for i in range(1, 101):
        j.add(cmd(i), i, 1)
    j._destroy()
    # The last segments unlinked, then the crash: a middle segment is missing.
    segments = sorted(tmp_path.glob("*.log"))
    segments[len(segments) // 2].unlink()
    j = small(tmp_path)
    got = entries(j)
    assert got == [(cmd(i), i, 1) for i in range(1, len(got) + 1)] and 0 < len(got) < 100
    assert all(int(p.stem) <= len(got) for p in tmp_path.glob("*.log"))  # the rest removed


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_record_ends_the_log_before_it(tmp_path: Path, damage: str) -> None:
    j = SegmentedJournal(tmp_path)
    for i in range(1, 11):
        j.add(cmd(i) * 10, i, 1)
    j._destroy()
    (segment,) = tmp_path.glob("*.log")
    data = bytearray(segment.read_bytes())
    eighth = 8 + sum(24 + len(cmd(i) * 10) for i in range(1, 8))  # where record 8 starts
    if damage == "torn":
        data = data[: eighth + 30]
    else:
        data[eighth + 26] ^= 0x40
    segment.write_bytes(bytes(data))
    j = SegmentedJournal(tmp_path)
    assert entries(j) == [(cmd(i) * 10, i, 1) for i in range(1, 8)]
    assert segment.stat().st_size == eighth  # cut off, so appends continue cleanly
    j.add(b"next", 8, 2)
    j._destroy()
    assert SegmentedJournal(tmp_path)[-1] == (b"next", 8, 2)


def test_appends_must_stay_contiguous(tmp_path: Path) -> None:
    j = SegmentedJournal(tmp_path)
    j.add(b"a", 5, 1)
    with pytest.raises(JournalError, match="contiguous"):
        j.add(b"b", 7, 1)
    assert entries(j) == [(b"a", 5, 1)]


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000001.log").write_bytes(b"NOTOURS!" + b"\0" * 40)
    with pytest.raises(JournalError, match="HEAD is missing"):
        SegmentedJournal(tmp_path)
    (tmp_path / "HEAD").write_text('{"start": 1}')
    with pytest.raises(JournalError, match="bad magic"):
        SegmentedJournal(tmp_path)


def test_every_acknowledged_append_survives_sigkill(tmp_path: Path) -> None:
    """A writer prints each index once add() returned; SIGKILL at a random moment; every
    printed index must be there on reopening."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from synapse.cluster.journal import SegmentedJournal
        j = SegmentedJournal(Path({str(tmp_path)!r}))
        j.SEGMENT_BYTES = 4096
        i = 0
        while True:
            i += 1
            j.add(b"x" * (i % 300), i, 1)
            if i % 500 == 0:
                j.deleteEntriesTo(len(j) - 50)
            sys.stdout.write(f"{{i}}\\n"); sys.stdout.flush()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = 0
    for line in proc.stdout:
        acked = int(line)
        if acked >= 3000:
            break
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read().split()
    proc.wait()
    acked = int(rest[-1]) if rest else acked
    j = SegmentedJournal(tmp_path)
    assert j[-1][1] >= acked
    got = entries(j)
    assert [e[1] for e in got] == list(range(got[0][1], got[0][1] + len(got)))
    assert all(e[0] == b"x" * (e[1] % 300) for e in got)


def test_moves_a_pysyncobj_journal(tmp_path: Path) -> None:
    from pysyncobj.journal import FileJournal

    old = tmp_path / "raft.journal"
    legacy = FileJournal(str(old))
    for i in range(1, 21):
        legacy.add(cmd(i), i, 2)
    legacy.setCurrentTerm(2, "127.0.0.1:7002")
    legacy.setRaftCommitIndex(18)
    legacy.onOneSecondTimer()
    legacy._destroy()
    j = SegmentedJournal(tmp_path / "raft-log")
    assert import_pysyncobj_journal(old, j) == 20
    assert not old.exists()
    j._destroy()
    j = SegmentedJournal(tmp_path / "raft-log")
    assert entries(j) == [(cmd(i), i, 2) for i in range(1, 21)]
    assert (j.getCurrentTerm(), j.getVotedForNodeId(), j.getRaftCommitIndex()) == (2, "127.0.0.1:7002", 18)


def test_record_layout_is_documented(tmp_path: Path) -> None:
    j = SegmentedJournal(tmp_path)
    j.add(b"hello", 1, 7)
    j._destroy()
    data = (tmp_path / "00000000000000000001.log").read_bytes()
    assert data[:8] == b"SYNLOG01"
    length, _crc, index, term = struct.unpack_from("<IIQQ", data, 8)
    assert (length, index, term, data[32:]) == (5, 1, 7, b"hello")
    assert os.path.exists(tmp_path / "HEAD")
