"""The PySyncObj bridge: the only module that imports PySyncObj.

A thin FSM in rqlite's sense: the one replicated method hands the entry's bytes to the pure
``CommandProcessor`` and reports the outcome; it never raises (an exception in a replicated
method re-applies the entry forever and stalls the cluster — DESIGN.md, "PySyncObj 0.3.17, measured"). Everything
PySyncObj calls back runs on its tick thread; listeners must hand work to asyncio with
``loop.call_soon_threadsafe`` and return at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import pysyncobj.syncobj
from pysyncobj import FAIL_REASON, SERIALIZER_STATE, SyncObj, SyncObjConf, replicated
from pysyncobj.serializer import Serializer
from pysyncobj.transport import TCPTransport

from synapse import _core
from synapse.cluster import merge, transmission, wire
from synapse.cluster.dump import PLAN_PENDING, DumpJob, read_dump
from synapse.cluster.journal import SegmentedJournal, import_pysyncobj_journal
from synapse.cluster.raft_tls import contexts
from synapse.cluster.raft_transport import transport_class
from synapse.cluster.tuning import RaftTuning
from synapse.state.processor import CommandProcessor, EntryOutcome

log = logging.getLogger("synapse.cluster")

# The keep-alive also says that this node takes part in read-index rounds (below): a node asks
# only peers that said so, so a node of an older version is never counted on for one.
# A tick-to-tick gap longer than each of these (seconds) is counted (Voter.tick_stalls): the
# tick runs every 50 ms or sooner (autoTickPeriod), the contact timeout is 2 s.
TICK_STALLS = (0.5, 1.0, 2.0)
_KEEPALIVE_TYPE = "synapse_keepalive"
_KEEPALIVE = {"type": _KEEPALIVE_TYPE, "read_index": 1}
# Read-index rounds (Voter._read_index_message): a follower asks the leader and gets its
# answer; the leader asks its peers to confirm its term, and they answer with theirs.
_ASK, _ANSWER = "synapse_read_index", "synapse_read_index_reply"
_CONFIRM, _CONFIRMED = "synapse_term_check", "synapse_term_ack"
_READ_INDEX_MESSAGES = frozenset((_ASK, _ANSWER, _CONFIRM, _CONFIRMED, _KEEPALIVE_TYPE))
# A read-index round unanswered this long falls back (its reads take a barrier entry): the
# leader died, or a link dropped with the request or its answer.
READ_INDEX_REPLY_TIMEOUT = 0.5

# PySyncObj builds its journal and its serializer with the module-level names
# ``createJournal`` and ``Serializer`` inside ``SyncObj.__init__``; they are swapped for the
# duration of one construction, under this lock, so it takes ours (several voters may start
# in one process).
# Every Raft message this process sends skips deflate (wire.py: same format, ~1 µs instead of
# ~50-75 µs per message).
wire.install()

_CONSTRUCTION_HOOK = threading.Lock()


def _cut_only_on_conflict(raft, node, message: dict) -> dict | None:
    """The fourth defect: on every checked AppendEntries, PySyncObj deletes the follower's
    log after ``prevLogIdx`` and appends the message's entries — also when those entries are
    all there already and the log goes on after them. A batch resent from a lower nextIndex
    (after a rejection, or cut short by the batch byte limit) then deletes entries the
    follower had acknowledged and applied ("truncating already-applied log entries", dozens
    per chaos run with membership changes): an acknowledged write held by a bare majority
    is one follower crash from being lost. Raft (§5.3) deletes only from the first entry
    whose term conflicts. So: entries already present are skipped; if a conflict (or the
    end of the local log) comes, PySyncObj appends from there; if none does, nothing is cut
    — the leader hears success up to the last entry it sent, and the commit index moves only
    that far. Returns the message to hand on, or None when it was fully handled here."""
    entries = message.get("entries") or []
    prev = message["prevLogIdx"]
    local = raft._SyncObj__getEntries(prev, len(entries) + 2)  # the entry at prev, then what follows
    if not local or local[0][2] != message["prevLogTerm"] or len(local) == 1:
        return message  # a rejection, or nothing after prev to protect: PySyncObj's way is right
    following = local[1:]
    same = 0
    while same < len(entries) and same < len(following) and tuple(following[same][1:3]) == tuple(entries[same][1:3]):
        same += 1
    if same < len(entries):
        if same == 0:
            return message
        last = entries[same - 1]
        return dict(message, prevLogIdx=last[1], prevLogTerm=last[2], entries=entries[same:])
    verified = entries[-1][1] if entries else prev
    rest = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries", "serialized")}
    rest["commit_index"] = min(message.get("commit_index", 0), verified)
    SyncObj._SyncObj__onMessageReceived(raft, node, rest)  # leader, term, election timer, commit index
    raft._SyncObj__sendNextNodeIdx(node, nextNodeIdx=verified + 1, success=True)
    return None


class BackgroundSerializer(Serializer):
    """PySyncObj's dump hook, with the dump written off the tick thread.

    ``serialize`` (tick thread, when compaction is due) asks ``start_dump`` for a ``DumpJob``:
    a frozen view of the state at the last applied entry, written by its own thread.
    ``checkSerializing`` reports SERIALIZING until it is done, then SUCCESS once (PySyncObj
    then drops the log up to it) or FAILED (the previous dump and the log stay). As in
    PySyncObj's own forked writer, no dump is sent to a follower while one is being written,
    and transfers restart from the new file afterwards. A dump received from the leader
    cancels ours under the job lock, so ours can never be renamed over the newer one."""

    def __init__(self, fileName, transmissionBatchSize, tryUseFork, serializer, deserializer, serializeChecker):  # noqa: N803 (PySyncObj's names)
        super().__init__(fileName, transmissionBatchSize, False, None, deserializer, None)
        self._path = Path(fileName)
        self._start_dump: Callable[[Path, tuple], DumpJob] = serializer
        self.job_lock = threading.Lock()
        self._job: DumpJob | None = None
        # Catch-up by diff (synapse/integrity/catchup.py): ``planner(follower raft address,
        # dump path) -> PLAN_PENDING | bytes | None`` offers a container instead of the dump.
        self.planner: Callable[[str, Path], object] | None = None
        self._containers: dict[object, list] = {}  # follower -> [container bytes, bytes sent]
        self._batch = transmissionBatchSize

    def serialize(self, data, id) -> None:  # noqa: A002 (PySyncObj's name)
        if self._job is not None:
            return
        self._job = self._start_dump(self._path, data[1:])

    def checkSerializing(self):  # noqa: N802
        job = self._job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not job.done():
            return SERIALIZER_STATE.SERIALIZING, job.index - 1
        self._job = None
        # PySyncObj drops the log up to the entry before the dump's last one (it keeps both).
        if job.error is None and not job.cancelled:
            for sending in self._Serializer__transmissions.values():
                if "file" in sending:
                    sending["file"].close()
            self._Serializer__transmissions = {}
            self._containers = {}
            return SERIALIZER_STATE.SUCCESS, job.index - 1
        return SERIALIZER_STATE.FAILED, job.index - 1

    def getTransmissionData(self, transmissionID):  # noqa: N802, N803
        if self._job is not None:
            return None
        sending = self._containers.get(transmissionID)
        new = sending is None and transmissionID not in self._Serializer__transmissions
        if new and self.planner is not None and self._path.exists():
            payload = self.planner(str(getattr(transmissionID, "id", transmissionID)), self._path)
            if payload is PLAN_PENDING:
                return None  # PySyncObj asks again on its next round
            if payload is not None:
                sending = self._containers[transmissionID] = [payload, 0]
        if sending is None:
            return super().getTransmissionData(transmissionID)
        data, sent = sending
        chunk = data[sent : sent + self._batch]
        sending[1] += len(chunk)
        if not chunk:  # PySyncObj ends a transfer with an empty chunk
            del self._containers[transmissionID]
        return chunk, sent == 0, not chunk

    def cancelTransmisstion(self, id):  # noqa: N802, A002 (PySyncObj's names and spelling)
        self._containers.pop(id, None)
        super().cancelTransmisstion(id)

    def setTransmissionData(self, data):  # noqa: N802
        with self.job_lock:
            if self._job is not None:
                self._job.cancel()
            if data is not None and data[1] and self._path.exists():
                # Kept until what arrives is loaded: a catch-up container that cannot be
                # applied is replaced by this again, so the data dir stays restartable.
                previous = self._path.with_name(self._path.name + ".prev")
                previous.unlink(missing_ok=True)
                os.link(self._path, previous)
            return super().setTransmissionData(data)

    def wait(self, timeout: float | None = None) -> None:
        job = self._job
        if job is not None:
            job.join(timeout)

FAILURES = {
    FAIL_REASON.QUEUE_FULL: "queue_full",
    FAIL_REASON.MISSING_LEADER: "no_leader",
    FAIL_REASON.DISCARDED: "discarded",
    FAIL_REASON.NOT_LEADER: "leader_changed",
    FAIL_REASON.LEADER_CHANGED: "leader_changed",
    FAIL_REASON.REQUEST_DENIED: "denied",
    FAIL_REASON.UNKNOWN_OUTCOME: "unknown_outcome",
}


class ApplyListener(Protocol):
    def entry_applied(self, index: int, outcome: EntryOutcome, digest: bytes) -> None: ...
    # cause: "rollback" (a rollback entry, to checkpoint ``checkpoint``), "dump" (a whole state
    # loaded: at start, or the leader's), "catchup" (a diff of the leader's state applied here).
    def state_replaced(self, index: int, store: _core.StateStore, cause: str, checkpoint: int | None = None) -> None: ...
    def state_repaired(self, index: int, records: list[tuple[int, bytes, bytes]]) -> None: ...
    def checkpoint_made(self, index: int, frozen: _core.FrozenState) -> None: ...
    def checkpoint_state(self, index: int, digest: bytes) -> _core.StateStore: ...
    def rollback_failed(self, index: int, target: int, error: Exception) -> None: ...
    def role_changed(self, leader: str | None, is_leader: bool) -> None: ...


@dataclass(eq=False)
class _ReadRound:
    """One read-index round out: asked in ``term``; on a follower, of ``leader``; on the
    leader, ``index`` once ``needed`` more of ``peers`` confirm the term."""
    term: int
    callback: Callable[[bool], None]
    sent_at: float
    leader: object = None
    index: int = 0
    peers: set = field(default_factory=set)
    needed: int = 0


class Voter(SyncObj):
    """PySyncObj's ``SyncObj`` with our guards against its defects and the one replicated
    method. Owned by a ``ReplicatedLog`` and never handed out: nothing outside this module
    calls PySyncObj, sees its method names or its error codes."""

    def __init__(self, owner: "ReplicatedLog", raft_addr: str, peers: list[str], conf: SyncObjConf,
                 tuning: RaftTuning, transport: type[TCPTransport]) -> None:
        # PySyncObj's tick thread starts inside SyncObj.__init__ and may load a dump, apply
        # entries and report its role before it returns: the owner must know its voter first.
        owner._raft = self
        self._owner = owner
        self._tuning = tuning
        self._last_keepalive = 0.0
        # A commit-index notice held back: (when it is due, PySyncObj's next-heartbeat time
        # then — any AppendEntries sent since moves it, and carried the commit index).
        self._commit_notice: tuple[float, float] | None = None
        self._last_role: tuple[str | None, bool] | None = None
        # Set on the tick thread: at the end of the last tick this node was a lone voter, led,
        # and had applied every entry of its log (lone_leader_current).
        self.lone_and_applied = False
        # When this node last heard anything from each peer (Raft messages and keepalives), by
        # Raft address, monotonic; set on the tick thread, read by status().
        self.heard: dict[str, float] = {}
        self.started = time.monotonic()
        # PySyncObj's id of apply_entry, known once SyncObj.__init__ has listed the methods;
        # until then (its tick thread already runs) the leader's step is PySyncObj's own.
        self._apply_entry_id: int | None = None
        # Entries this node, as leader, joined into another's log entry (merge.py).
        self.entries_merged = 0
        # Gaps between two ticks of this thread longer than each of TICK_STALLS (seconds): no
        # heartbeat, keep-alive or answer left this node meanwhile, so past the contact
        # timeout its peers counted it down (a long apply, a dump load, a starved machine).
        self.tick_stalls = dict.fromkeys(TICK_STALLS, 0)
        self.longest_tick_gap = 0.0
        self._last_tick: float | None = None
        self._init_reads()
        with _CONSTRUCTION_HOOK:
            create_journal, serializer = pysyncobj.syncobj.createJournal, pysyncobj.syncobj.Serializer
            pysyncobj.syncobj.createJournal = lambda _path: owner.journal
            pysyncobj.syncobj.Serializer = BackgroundSerializer
            try:
                super().__init__(raft_addr, peers, conf, transportClass=transport)
            finally:
                pysyncobj.syncobj.createJournal, pysyncobj.syncobj.Serializer = create_journal, serializer
        self._apply_entry_id = self._methodToID[self._getFuncName("apply_entry")]
        self.addOnTickCallback(self._on_tick)
        poll = self._poller.poll
        # The tick thread sleeps in poll up to autoTickPeriod (50 ms): wake it when a held-back
        # commit notice is due.
        self._poller.poll = lambda timeout: poll(self._poll_timeout(timeout))
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)  # batch mode off: a proposal wakes the tick
        if notifier is not None:
            # With the GIL held (rust/python/src/wake.rs): os.write let the woken tick thread
            # take it in the middle of the event loop's batch.
            notifier.notify = functools.partial(_core.wake_pipe, notifier._PipeNotifier__pipeW)

    # --- the replicated method: the same single method on every node ---

    @replicated
    def apply_entry(self, payload: bytes) -> list[dict]:
        # Inside a replicated method the entry's index is raftLastApplied + 1 on every node,
        # replays and snapshot installs included (DESIGN.md, "PySyncObj 0.3.17, measured").
        return self._owner._apply(self.raftLastApplied + 1, payload)

    def _SyncObj__onMessageReceived(self, node, message) -> None:  # noqa: N802 (PySyncObj's name)
        self.heard[str(node.id)] = time.monotonic()
        if isinstance(message, dict) and message.get("type") in _READ_INDEX_MESSAGES:
            self._read_index_message(node, message)
            if message["type"] != _KEEPALIVE_TYPE:
                return  # ours alone; PySyncObj ignores the keep-alive
        self._guarded_message(node, message)

    # --- linearizable reads by read index ---
    #
    # A linearizable read needs an index that every write acknowledged before the read began
    # is at or below; once this node has applied that far, its local state answers. A barrier
    # entry gives one at the price of a log entry (forwarded, journaled, replicated and applied
    # on every node). A read index is the leader's commit index, once the leader has committed
    # an entry of its term and it is known that no later term had been elected when the read
    # began — a later leader needs a majority's votes, and the voters that voted moved on to
    # its term. The leader asks its peers to confirm its term (a majority with itself); a
    # follower, with at most two other voters, asks the leader, and is the confirming voter
    # itself: its term is the same when it asks and when the answer comes back. DESIGN.md,
    # "Reads", has the argument.

    def _init_reads(self) -> None:
        # From the event loop: (seq, callback) to start (ReplicatedLog.request_read_index).
        # Tick thread only: the peers whose keep-alive said they take part, the rounds out,
        # and the reads waiting for this node to apply up to their index.
        self.read_requests: collections.deque = collections.deque()
        self.read_index_peers: set[str] = set()
        self._reads_out: dict[int, _ReadRound] = {}
        self._reads_waiting: list[tuple[int, Callable[[bool], None]]] = []
        # This node's rounds (asked, served, fell_back) and, as leader, followers' requests
        # (answered, refused), for status() and the metrics.
        self.read_index_counts = {"asked": 0, "served": 0, "fell_back": 0, "answered": 0, "refused": 0}

    def _read_index_message(self, node, message: dict) -> None:
        kind, seq = message["type"], message.get("seq")
        if kind == _KEEPALIVE_TYPE:
            if message.get("read_index") == 1:
                self.read_index_peers.add(str(node.id))
            else:
                self.read_index_peers.discard(str(node.id))
            return
        if type(seq) is not int:
            return  # not one of ours: every node sends an int
        transport = self._SyncObj__transport
        if kind == _ASK:  # as leader, from a follower
            index = None
            if (self._isLeader() and message.get("term") == self.raftCurrentTerm and len(self.otherNodes) <= 2
                    and node in self.otherNodes):
                index = self._committed_in_term()
            self.read_index_counts["answered" if index is not None else "refused"] += 1
            transport.send(node, {"type": _ANSWER, "seq": seq, "term": self.raftCurrentTerm, "index": index})
        elif kind == _CONFIRM:  # as follower, from the leader: this node's term, which it compares
            transport.send(node, {"type": _CONFIRMED, "seq": seq, "term": self.raftCurrentTerm})
        else:
            out = self._reads_out.get(seq)
            if out is None or (kind == _ANSWER) != (out.leader is not None):
                return  # expired, or never asked
            if kind == _ANSWER:
                if node != out.leader:
                    return
                del self._reads_out[seq]
                index = message.get("index")
                if (type(index) is int and message.get("term") == out.term == self.raftCurrentTerm
                        and not self._isLeader()):
                    self._wait_for(index, out.callback)
                else:
                    self._fall_back(out.callback)
                return
            if node not in out.peers:
                return
            out.peers.discard(node)
            if message.get("term") == out.term == self.raftCurrentTerm and self._isLeader():
                out.needed -= 1
            if out.needed <= 0:
                del self._reads_out[seq]
                self._wait_for(out.index, out.callback)
            elif len(out.peers) < out.needed:  # too few left to confirm it
                del self._reads_out[seq]
                self._fall_back(out.callback)

    def read_round_possible(self) -> bool:
        """Whether a read-index round can be started here: as leader, enough peers that take
        part to make a majority with it (its peers' confirmations, ``needed`` below); as
        follower, a known leader that takes part, among at most two other voters. Any thread
        may ask (the answer may then be a tick old); the tick thread asks again before each
        round."""
        others, peers = self.otherNodes, self.read_index_peers
        if self._isLeader():
            return bool(others) and sum(str(n.id) in peers for n in others) >= (len(others) + 1) // 2
        leader = self._getLeader()
        return leader is not None and len(others) <= 2 and leader in others and str(leader.id) in peers

    def _committed_in_term(self) -> int | None:
        """As leader: the commit index, if the entry there is of the current term (before the
        new leader's first entry commits, its commit index may lag what was committed)."""
        commit = self.raftCommitIndex
        entries = self._SyncObj__getEntries(commit, 1)
        return commit if entries and entries[0][2] == self.raftCurrentTerm else None

    def _send_read_requests(self, now: float) -> None:
        """Starts a round for each read-index request the event loop queued — on a follower
        asks the leader, on the leader asks its peers to confirm its term — and refuses those
        it cannot start (the caller takes a barrier entry instead); expires rounds unanswered
        for READ_INDEX_REPLY_TIMEOUT."""
        transport = self._SyncObj__transport
        while self.read_requests:
            seq, callback = self.read_requests.popleft()
            index = self._committed_in_term() if self._isLeader() else None
            if not self.read_round_possible() or (self._isLeader() and index is None):
                self._fall_back(callback)
                continue
            term = self.raftCurrentTerm
            if self._isLeader():
                others = self.otherNodes
                peers = {n for n in others if str(n.id) in self.read_index_peers}
                self._reads_out[seq] = _ReadRound(term, callback, now, index=index, peers=peers,
                                                  needed=(len(others) + 1) // 2)
                for peer in peers:
                    transport.send(peer, {"type": _CONFIRM, "seq": seq, "term": term})
            else:
                leader = self._getLeader()
                self._reads_out[seq] = _ReadRound(term, callback, now, leader=leader)
                transport.send(leader, {"type": _ASK, "seq": seq, "term": term})
            self.read_index_counts["asked"] += 1
        for seq in [seq for seq, out in self._reads_out.items() if now - out.sent_at > READ_INDEX_REPLY_TIMEOUT]:
            self._fall_back(self._reads_out.pop(seq).callback)

    def _fall_back(self, callback: Callable[[bool], None]) -> None:
        self.read_index_counts["fell_back"] += 1
        callback(False)

    def _wait_for(self, index: int, callback: Callable[[bool], None]) -> None:
        self._reads_waiting.append((index, callback))
        self._serve_reads()

    def _serve_reads(self) -> None:
        """Calls back every read whose index this node has applied."""
        if not self._reads_waiting:
            return
        applied, waiting = self.raftLastApplied, []
        for index, callback in self._reads_waiting:
            if index <= applied:
                self.read_index_counts["served"] += 1
                callback(True)
            else:
                waiting.append((index, callback))
        self._reads_waiting = waiting

    def _guarded_message(self, node, message) -> None:
        """Fixes five PySyncObj 0.3.17 defects before its handler sees the message.

        First, a catch-up livelock.

        The leader pipelines every AppendEntries batch a lagging follower needs. A follower
        whose log diverges (an old leader that appended entries while cut off) answers the
        first batch "conflict: go back to N" and each later one "I lack that: resume at my
        log end + 1" — both as ``reset`` replies — and PySyncObj sets nextIndex to whichever
        arrives last, jumping past the conflict forever (tests/test_partition.py reproduced
        it every time once the leader was > 64 KiB ahead). A rejection must never move
        nextIndex forward; a lower nextIndex only resends entries the follower checks anyway.
        PySyncObj binds this handler by its mangled name at start-up, so the override is
        what the transport calls."""
        if isinstance(message, dict) and message.get("type") == "next_node_idx" and message.get("reset") and self._isLeader():
            current = self._SyncObj__raftNextIndex.get(node)
            if current is not None and message["next_node_idx"] > current:
                message = dict(message, next_node_idx=current)
        if isinstance(message, dict) and message.get("type") == "append_entries" and "transmission" in message:
            # Fifth: a large entry's chunks, its end found by content rather than by the
            # leader's label, which can come a chunk early (transmission.py). The chunk that
            # completes it goes on as an ordinary batch, checked by the next guard.
            message = transmission.receive_chunk(self, message)
            if message is None:
                return
        if (isinstance(message, dict) and message.get("type") == "append_entries" and "prevLogIdx" in message
                and "transmission" not in message and message.get("term", -1) >= self.raftCurrentTerm):
            message = _cut_only_on_conflict(self, node, message)
            if message is None:
                return
        if isinstance(message, dict) and message.get("type") == "append_entries" and "prevLogIdx" not in message:
            # Second defect: PySyncObj moves a follower's commit index to min(leader's commit,
            # own log end) on *every* append_entries — also on the snapshot-transfer messages,
            # which carry no log-consistency check. A lagging follower whose log has a divergent
            # tail (entries it appended as a cut-off leader) then applies that tail as if it were
            # committed, and later logs "truncating already-applied log entries": its state has
            # diverged. Found by a chaos run (a follower behind the leader's compacted log while
            # the leader planned a catch-up). The commit index may only move with a checked
            # batch, so these messages do not move it.
            message = dict(message, commit_index=min(message.get("commit_index", 0), self.raftCommitIndex))
        if isinstance(message, dict) and message.get("type") == "apply_command_response" and "slot" in message:
            # The leader merged this node's entry with others (merge.py): the waiting callback
            # is to get only its own commands' results.
            waiting = self._SyncObj__commandsWaitingReply
            callback = waiting.get(message.get("request_id"))
            slot = merge.slot_of(message["slot"])
            if callback is not None and slot is not None:
                waiting[message["request_id"]] = merge.sliced(callback, slot)
        if isinstance(message, dict) and message.get("type") == "request_vote" and node not in self.otherNodes:
            # Third: a voter removed from the cluster (`synapse cluster remove`) but still
            # running hears no leader, calls elections with ever higher terms, and — with no
            # pre-vote in PySyncObj — makes the real leader step down over and over (Raft §6's
            # disruptive server). Found by a chaos run that removed a voter under load. Only
            # the current members' vote requests count.
            return
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _checkCommandsToApply(self) -> None:  # noqa: N802 (PySyncObj's name)
        """On the leader: PySyncObj's own step (append each queued command as a log entry,
        answer each follower that forwarded one with its index), except that consecutive
        entries of ours leave as one (merge.py) and the followers get one AppendEntries for
        all that was appended, not one per entry. Elsewhere PySyncObj's own step, unchanged
        (a follower forwards, a node without a leader fails the commands)."""
        if not self._isLeader() or self._apply_entry_id is None:
            SyncObj._checkCommandsToApply(self)
            return
        commands, waiting = self._SyncObj__commandsQueue, []
        while True:
            try:
                waiting.append(commands.get_nowait())
            except queue.Empty:
                break
        if not waiting:
            return
        for outgoing in merge.plan(waiting, self._apply_entry_id):
            self._append_as_leader(outgoing)
            self.entries_merged += len(outgoing.members) - 1
        if not self._SyncObj__conf.appendEntriesUseBatch:
            self._SyncObj__sendAppendEntries()

    def _append_as_leader(self, outgoing: merge.Outgoing) -> None:
        # PySyncObj's leader branch of _checkCommandsToApply for one entry, with slots.
        idx, term = self._SyncObj__getCurrentLogIndex() + 1, self.raftCurrentTerm
        change = (self._SyncObj__parseChangeClusterRequest(outgoing.command)
                  if self._SyncObj__conf.dynamicMembershipChange else None)
        transport = self._SyncObj__transport
        if change is not None and not self._SyncObj__changeCluster(change):
            for callback, _ in outgoing.members:
                if isinstance(callback, tuple):
                    transport.send(callback[0], {"type": "apply_command_response", "request_id": callback[1],
                                                 "error": FAIL_REASON.REQUEST_DENIED})
                elif callback is not None:
                    callback(None, FAIL_REASON.REQUEST_DENIED)
            return
        self._SyncObj__raftLog.add(outgoing.command, idx, term)
        for callback, slot in outgoing.members:
            if isinstance(callback, tuple):  # a follower's (node, request id): it waits for the index
                response = {"type": "apply_command_response", "request_id": callback[1], "log_idx": idx, "log_term": term}
                if slot is not None:
                    response["slot"] = list(slot)
                transport.send(callback[0], response)
            elif callback is not None:
                self._SyncObj__commandsWaitingCommit[idx].append(
                    (term, callback if slot is None else merge.sliced(callback, slot)))

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802 (PySyncObj's name)
        # PySyncObj, with batch mode off, sends every follower an AppendEntries as soon as the
        # leader applies anything, only to carry the new commit index — then the next entry's
        # AppendEntries follows a moment later. Under load that doubled the messages per entry
        # (each one decrypted, unpickled and answered by every follower, the answer handled by
        # the leader). The notice is held back for commit_notice_delay; an AppendEntries sent
        # meanwhile (the next entry, a heartbeat) carries the commit index instead. Followers
        # then apply up to that much later; nothing waits on that but their own reads.
        if not SyncObj._SyncObj__applyLogEntries(self):
            return False
        if self._tuning.commit_notice_delay <= 0 or not self._isLeader():
            return True
        if self._commit_notice is None:
            self._commit_notice = (time.monotonic() + self._tuning.commit_notice_delay,
                                   self._SyncObj__newAppendEntriesTime)
        return False

    def _send_commit_notice(self, now: float) -> None:
        due, heartbeat_time = self._commit_notice
        if self._SyncObj__newAppendEntriesTime != heartbeat_time or not self._isLeader():
            self._commit_notice = None  # an AppendEntries went out since, or no longer leader
        elif now >= due:
            self._commit_notice = None
            self._SyncObj__sendAppendEntries()

    def _poll_timeout(self, timeout: float) -> float:
        if self._lone_leader_behind():
            return 0.0
        notice = self._commit_notice
        return timeout if notice is None else max(0.0, min(timeout, notice[0] - time.monotonic()))

    def _lone_leader_behind(self) -> bool:
        """A tick commits what earlier ticks appended, then appends what was proposed since (a
        proposal wakes the poll: batch mode off). A lone voter (local mode) has no follower's
        answer to wake it for the commit: it slept up to autoTickPeriod (50 ms), and a
        sequential writer waited ~45 ms per write. While it leads and holds uncommitted
        entries its next tick is due at once (0.8 ms per write)."""
        return (not self.otherNodes and self._isLeader()
                and self._SyncObj__getCurrentLogIndex() > self.raftCommitIndex)

    def _on_tick(self) -> None:
        now = time.monotonic()
        if self._last_tick is not None and now - self._last_tick > TICK_STALLS[0]:
            self._note_stall(now - self._last_tick)
        self._last_tick = now
        # After this tick's apply: whatever it appended waits for the next tick's commit.
        self.lone_and_applied = (not self.otherNodes and self._isLeader()
                                 and self.raftLastApplied >= self._SyncObj__getCurrentLogIndex())
        if self._commit_notice is not None:
            self._send_commit_notice(time.monotonic())
        if self.read_requests or self._reads_out:
            self._send_read_requests(time.monotonic())
        self._serve_reads()
        if self._owner.journal.disk_bytes() > self._tuning.compaction_max_log_bytes:
            self._SyncObj__forceLogCompaction = True  # PySyncObj's own flag; cleared when it starts
        now = time.monotonic()
        if now - self._last_keepalive >= self._tuning.keepalive:
            self._last_keepalive = now
            transport = self._SyncObj__transport  # PySyncObj keeps it private
            for node in list(self.otherNodes):
                transport.send(node, _KEEPALIVE)
        self._report_role()

    def _note_stall(self, gap: float) -> None:
        for threshold in TICK_STALLS:
            if gap > threshold:
                self.tick_stalls[threshold] += 1
        self.longest_tick_gap = max(self.longest_tick_gap, gap)
        if gap > self._tuning.connection_timeout / 2:
            log.warning("the Raft tick thread stalled %.2f s (peers count a node down after %.1f s of silence)",
                        gap, self._tuning.connection_timeout)

    def on_state_changed(self, old: int, new: int) -> None:
        self._report_role()

    def _report_role(self) -> None:
        leader = self._getLeader()
        role = (str(leader.id) if leader is not None else None, self._isLeader())
        if role != self._last_role:
            self._last_role = role
            self._owner._role_changed(*role)


class ReplicatedLog:
    """This node's replica of the log and the state it applies: one Raft voter (a PySyncObj
    ``SyncObj``, held privately) with its journal, dump file and state store. Create it in a
    thread that lives as long as the voter (PySyncObj's tick thread stops when the thread
    that created it ends), and stop it with ``close()``."""

    def __init__(
        self,
        raft_addr: str,
        peers: list[str],
        data_dir: Path,
        processor_factory: Callable[..., CommandProcessor],
        listener: ApplyListener,
        secret: str | None,
        tuning: RaftTuning = RaftTuning(),
        bind_address: str | None = None,
        fsync: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA) — the Raft port speaks mutual TLS (raft_tls.py)
        besides the Fernet sealing with ``secret``."""
        # Two locks. Readers on the event loop and the applier on the tick thread share the
        # Rust store, whose mutable borrow is held (GIL released) for a whole batch: the read
        # lock orders them, held by readers for a lookup and by writers only around a change
        # to the store or a swap of the processor — an entry's commands (up to 1024) run
        # before its one batch, outside it, so a read never waits behind a whole entry. The
        # entry lock orders whole entries against everything else that changes the state
        # (a repair's swap, a catch-up, fault injection) and the freeze and capture records.
        self._read_lock = threading.Lock()
        self._entry_lock = threading.Lock()
        self._processor_factory: Callable[[_core.StateStore], CommandProcessor] = (
            lambda store: processor_factory(store, store_lock=self._read_lock))
        self._processor = self._processor_factory(_core.StateStore())
        self._listener = listener
        self._tuning = tuning
        self._applied: tuple[int, bytes] = (0, self._processor.store.digest())
        # Repair support (synapse/integrity/repair.py), under the entry lock: views to freeze
        # right after an exact index, and the entries applied since an index.
        self._freezes: dict[int, list[concurrent.futures.Future]] = {}
        self._captured: list[tuple[int, bytes]] | None = None
        # Catch-up by diff, follower side: ``is_container(path)``, ``install(path, store) ->
        # (index, last, prev, cluster)`` (synapse/integrity/catchup.py); None: full dumps only.
        self.catchup_loader = None
        self._raft_addr = raft_addr
        self._raft: Voter  # set by Voter.__init__ before its tick thread starts
        data_dir.mkdir(parents=True, exist_ok=True)
        self.journal = SegmentedJournal(data_dir / "raft-log", fsync=fsync)
        legacy = data_dir / "raft.journal"
        if legacy.exists():
            moved = import_pysyncobj_journal(legacy, self.journal)
            log.info("node %s: moved %d entries from PySyncObj's %s into %s", raft_addr, moved, legacy, data_dir / "raft-log")
        conf = SyncObjConf(
            password=secret,
            bindAddress=bind_address,
            appendEntriesUseBatch=False,
            raftMinTimeout=tuning.min_timeout,
            raftMaxTimeout=tuning.max_timeout,
            appendEntriesPeriod=tuning.heartbeat,
            connectionTimeout=tuning.connection_timeout,
            connectionRetryTime=tuning.reconnect,
            maxBindRetries=5,
            bindRetryTime=0.2,
            leaderFallbackTimeout=tuning.leader_fallback,
            journalFile=str(data_dir / "raft-log"),  # see _CONSTRUCTION_HOOK
            fullDumpFile=str(data_dir / "raft.dump"),
            serializer=self._start_dump,  # see BackgroundSerializer
            deserializer=self._deserialize,
            dynamicMembershipChange=True,
            logCompactionMinEntries=tuning.compaction_min_entries,
            logCompactionMinTime=tuning.compaction_min_seconds,
            commandsWaitLeader=False,
            onStateChanged=lambda old, new: self._raft.on_state_changed(old, new),
        )
        transport = transport_class(contexts(*tls) if tls is not None else None)
        Voter(self, raft_addr, peers, conf, tuning, transport)

    def _apply(self, index: int, payload: bytes) -> list[dict]:
        """The replicated method's work (tick thread): never raises."""
        try:
            with self._entry_lock:
                if self._freezes:
                    # PySyncObj's own entries never come here: the state after index - 1 is
                    # the state at every index since the last entry applied here.
                    self._fire_freezes(index - 1)
                outcome = self._processor.apply_entry(index, payload)
                replaced = self._roll_back(index, outcome) if outcome.events else None
                digest = self._processor.store.digest()
                self._applied = (index, digest)
                if self._captured is not None:
                    self._captured.append((index, payload))
                if self._freezes:
                    self._fire_freezes(index)
                checkpoint = self._processor.store.freeze() if ("snapshot", index) in outcome.events else None
        except Exception:  # the processor never raises; this guards the cluster if it does
            log.exception("node %s: applying entry %d failed; the entry is skipped", self._raft_addr, index)
            return [{"ok": False, "error": "internal", "message": f"entry {index} could not be applied"}]
        try:
            if replaced is not None:
                target = next(e[1] for e in outcome.events if e[0] == "rollback")
                self._listener.state_replaced(index, replaced, "rollback", target)
            if checkpoint is not None:
                self._listener.checkpoint_made(index, checkpoint)
            self._listener.entry_applied(index, outcome, digest)
        except Exception:
            log.exception("node %s: a listener failed on entry %d", self._raft_addr, index)
        return outcome.results

    def _roll_back(self, index: int, outcome: EntryOutcome) -> _core.StateStore | None:
        """Under the entry lock, for a rollback entry: replaces the state with the listener's
        retained snapshot of the checkpoint (its digest checked against the agreed one) and
        finishes the entry on it. If this node has no such snapshot it keeps its state — it
        then differs from the others, finds out at the next checkpoint and repairs itself."""
        event = next((e for e in outcome.events if e[0] == "rollback"), None)
        if event is None:
            return None
        _, target, digest, chain = event
        try:
            store = self._listener.checkpoint_state(target, digest)
        except Exception as e:
            log.error("node %s: cannot roll back to checkpoint %d at entry %d: %s", self._raft_addr, target, index, e)
            self._listener.rollback_failed(index, target, e)
            return None
        processor = self._processor_factory(store)
        processor.finish_rollback(index, outcome.chain, target, [digest, chain], self._processor.store)
        with self._read_lock:
            self._processor = processor
        log.warning("node %s: rolled back to checkpoint %d at entry %d", self._raft_addr, target, index)
        return store

    # --- the log (any thread) ---

    def append(self, payload: bytes, callback: Callable[[object, str | None], None]) -> None:
        """Proposes one entry; ``callback(result, failure)`` runs on the tick thread once it
        is applied here (failure None) or refused (failure: one of ``FAILURES``' reasons)."""
        self._raft.apply_entry(payload, callback=lambda result, err: callback(result, _reason(err)))

    def read_index_usable(self) -> bool:
        """Whether a linearizable read here may take a read-index round instead of proposing
        a barrier entry (``Voter.read_round_possible``; from the event loop, so a tick old at
        worst: the tick thread checks again before asking)."""
        return self._raft.read_round_possible()

    def request_read_index(self, seq: int, callback: Callable[[bool], None]) -> None:
        """Starts a read-index round (from the tick thread, woken now); ``callback(True)`` on
        the tick thread once this node has applied up to the read index, ``callback(False)`` if
        there is none to be had (no leader, a term changed, too few confirmations, no answer in
        READ_INDEX_REPLY_TIMEOUT): then a barrier entry must do. ``seq`` tells this node's
        rounds apart."""
        raft = self._raft
        raft.read_requests.append((seq, callback))
        notifier = getattr(raft, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()

    def wait_bound(self) -> None:
        """Blocks until the Raft port is bound; raises RaftError if it cannot be."""
        try:
            self._raft.waitBinded()
        except Exception as e:  # PySyncObj's SyncObjException("BindError")
            raise RaftError(f"cannot listen on the Raft address {self._raft_addr}: {e}") from e

    def add_voter(self, raft_addr: str, done: Callable[[str | None], None]) -> None:
        """Starts adding a voter (one membership change at a time); ``done(failure)`` on the
        tick thread, failure None once the change is committed."""
        self._raft.addNodeToCluster(raft_addr, callback=_reason_callback(done))

    def remove_voter(self, raft_addr: str, done: Callable[[str | None], None]) -> None:
        self._raft.removeNodeFromCluster(raft_addr, callback=_reason_callback(done))

    def transfer_leadership(self, raft_addr: str | None, done: Callable[[str | None], None] | None = None) -> None:
        """Asks the leader to hand over to ``raft_addr`` (None: the most caught-up follower);
        ``done(None)`` once the request is sent, ``done("denied")`` if the target is not
        connected and fully caught up, ``done("leader_changed")`` if this node does not lead."""
        self._raft.transferLeadership(raft_addr, callback=_reason_callback(done) if done else None)

    def compact(self) -> None:
        """Writes a dump and cuts the log up to it at the next tick, whatever the thresholds."""
        self._raft.forceLogCompaction()

    def read(self, fn: Callable[[CommandProcessor], object]) -> object:
        """``fn(processor)`` on the applied state, between entries. Hold it for lookups only:
        the next entry's batch waits for ``fn`` (decode what it returns afterwards)."""
        with self._read_lock:
            return fn(self._processor)

    def frozen_now(self) -> tuple[int, _core.FrozenState]:
        """(applied index, a frozen view of the state at it) — taken between two entries
        (O(buckets); the caller writes it out at leisure)."""
        with self._entry_lock:
            return self._applied[0], self._processor.store.freeze()

    def first_log_index(self) -> int | None:
        """The index of the oldest entry still in the log (None: empty)."""
        return self.journal[0][1] if len(self.journal) else None

    # --- repair support (any thread) ---

    def set_catchup_planner(self, planner) -> None:
        """Leader side of catch-up by diff: see ``BackgroundSerializer.planner``."""
        self._raft._SyncObj__serializer.planner = planner

    def processor_for(self, store: _core.StateStore) -> CommandProcessor:
        """A processor like this node's own (same replicated settings) over ``store``."""
        return self._processor_factory(store)

    def freeze_at(self, index: int) -> concurrent.futures.Future:
        """A future of (index, FrozenState) of the state right after entry ``index``; fails at
        once with ValueError if this node has already applied past it."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._entry_lock:
            applied = self.applied()[0]
            if applied > index:
                fut.set_exception(ValueError(f"index {index} is already applied here (at {applied})"))
            elif applied == index:
                fut.set_result((index, self._processor.store.freeze()))
            else:
                self._freezes.setdefault(index, []).append(fut)
        return fut

    def cancel_freeze(self, fut: concurrent.futures.Future) -> None:
        with self._entry_lock:
            for index, waiting in list(self._freezes.items()):
                if fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del self._freezes[index]
        fut.cancel()

    def _fire_freezes(self, index: int) -> None:
        due = [i for i in self._freezes if i <= index]
        if not due:
            return
        frozen = self._processor.store.freeze()
        for i in due:
            for fut in self._freezes.pop(i):
                if not fut.done():
                    # i < index only when i was one of PySyncObj's own entries: same state.
                    fut.set_result((i, frozen))

    def start_capture(self) -> None:
        """Starts keeping (index, payload) of every entry applied from now on, for
        ``install_repaired``; call it before ``freeze_at`` so nothing after the frozen index
        is missed."""
        with self._entry_lock:
            self._captured = []

    def captured(self, after: int) -> list[tuple[int, bytes]]:
        with self._entry_lock:
            return [e for e in (self._captured or []) if e[0] > after]

    def install_repaired(
        self, processor: CommandProcessor, at_index: int, replayed: list[tuple[int, bytes, bytes]]
    ) -> tuple[int, _core.StateStore, _core.FrozenState]:
        """Swaps in a repaired processor whose state is at ``at_index``: under the entry lock
        (an entry boundary) it first replays the captured entries after ``at_index``, so the
        new state is at this node's applied index. ``replayed`` lists (index, chain, digest)
        of the entries the caller already replayed; the listener's ``state_repaired`` gets
        the applied index and them all (none, when no entry came after ``at_index``) before the
        next entry applies. Returns (the applied index, the old store, a frozen view of the
        new state at that index — the live store is the tick thread's from here on: touching
        it from another thread without the lock raced an apply, "Already mutably borrowed")."""
        with self._entry_lock:
            records = list(replayed)
            for index, payload in self._captured or []:
                if index > at_index:
                    outcome = processor.apply_entry(index, payload)
                    records.append((index, outcome.chain, processor.store.digest()))
            old = self._processor.store
            with self._read_lock:
                self._processor = processor
            self._captured = None
            applied = self.applied()[0]
            self._applied = (applied, processor.store.digest())
            frozen = processor.store.freeze()
            try:
                self._listener.state_repaired(applied, records)
            except Exception:
                log.exception("node %s: a listener failed on the repaired state", self._raft_addr)
            return applied, old, frozen

    def stop_capture(self) -> None:
        with self._entry_lock:
            self._captured = None

    def inject_fault(self, ops: list[tuple[bytes, bytes | None]]) -> bytes:
        """Writes ``ops`` straight into this node's store, behind the log's back (fault
        injection for tests and chaos runs). Returns the new digest."""
        with self._entry_lock, self._read_lock:
            self._processor.store.apply(ops)
            index, digest = self._applied[0], self._processor.store.digest()
            self._applied = (index, digest)
            return digest

    # --- reads from other threads ---

    def applied(self) -> tuple[int, bytes]:
        """(applied index, state digest at that index), consistent with each other.

        PySyncObj also applies entries that never reach ``apply_entry`` (a new leader's no-op,
        membership changes); they leave the state, and so the digest, unchanged. Our own
        record can also run one entry ahead of ``raftLastApplied`` while PySyncObj finishes
        an apply. Either way the later of the two indexes is the one the digest belongs to."""
        index, digest = self._applied
        return max(index, self._raft.raftLastApplied), digest

    # --- PySyncObj hooks (tick thread) ---

    def _start_dump(self, path: Path, raft_tuple: tuple) -> DumpJob:
        # Tick thread, between applies: the state is exactly at the tuple's last entry.
        # Freezing is O(buckets) and needs no lock (this thread is the only writer).
        job = DumpJob(path, self._processor.store.freeze(), raft_tuple, self._raft._SyncObj__serializer.job_lock)
        log.info("node %s: writing a Raft dump at index %d in the background", self._raft_addr, job.index)
        return job

    def _deserialize(self, path: str) -> tuple:
        if self.catchup_loader is not None and self.catchup_loader.is_container(Path(path)):
            return self._install_catchup(Path(path))
        dump = read_dump(path)
        Path(path + ".prev").unlink(missing_ok=True)
        self._trim_journal_to(dump.prev, dump.last)
        with self._entry_lock, self._read_lock:
            self._processor = self._processor_factory(dump.store)
            self._applied = (dump.info.log_index, dump.store.digest())
        log.info("node %s: loaded Raft dump at index %d", self._raft_addr, dump.info.log_index)
        try:
            self._listener.state_replaced(dump.info.log_index, dump.store, "dump")
        except Exception:
            log.exception("node %s: a listener failed on state replacement", self._raft_addr)
        # PySyncObj drops its own node from this list by comparing Node objects with what we
        # return; an address string never equals a Node, so a node would count itself as a
        # peer and (alone) never win an election. Leave ourselves out here.
        me = self._raft_addr
        return (dump.last, dump.prev, [addr for addr in dump.cluster if addr != me])

    def _install_catchup(self, path: Path) -> tuple:
        """A catch-up container from the leader (synapse/integrity/catchup.py): applied to
        the current state under the lock, then replaced on disk by a full dump. If it cannot
        be applied, the previous dump file comes back and nothing changes (PySyncObj logs the
        failure; the leader sends the full dump next time)."""
        previous = path.with_name(path.name + ".prev")
        with self._entry_lock, self._read_lock:  # the container changes the live store
            try:
                index, last, prev, cluster = self.catchup_loader.install(path, self._processor.store)
            except Exception:
                if previous.exists():
                    os.replace(previous, path)
                else:
                    path.unlink(missing_ok=True)
                raise
            self._applied = (index, self._processor.store.digest())
        previous.unlink(missing_ok=True)
        log.info("node %s: caught up to index %d by diff", self._raft_addr, index)
        try:
            self._listener.state_replaced(index, self._processor.store, "catchup")
        except Exception:
            log.exception("node %s: a listener failed on state replacement", self._raft_addr)
        me = self._raft_addr
        return (last, prev, [addr for addr in cluster if addr != me])

    def _trim_journal_to(self, prev: tuple, last: tuple) -> None:
        """PySyncObj keeps the journal on loading a dump only if it starts with the dump's two
        entries, and otherwise clears it — entries after the dump included. A node killed
        after its new dump was renamed into place but before the log was cut (a tick later)
        has a journal that starts earlier: cut it here, so nothing after the dump is lost."""
        journal = self.journal
        if len(journal) < 2 or journal[0] == prev:
            return
        pos = prev[1] - journal[0][1]
        if 0 < pos < len(journal) - 1 and journal[pos] == prev and journal[pos + 1] == last:
            journal.deleteEntriesTo(pos)
            log.info("node %s: cut the Raft log to the dump at index %d before loading it", self._raft_addr, last[1])

    # --- status (any thread; values may be a tick old) ---

    def is_leader(self) -> bool:
        return self._raft._isLeader()

    def lone_leader_current(self) -> bool:
        """Whether this node's applied state is already a linearizable read: it is the only
        voter, it leads, and at its last tick it had applied every entry of its log (so every
        entry acknowledged before a restart too). etcd's raft answers a single voter's
        ReadIndex the same way, without a round. Any later write was acknowledged only after
        this node applied it, so reading now sees it; a configuration with another voter
        turns this off the moment it is appended."""
        raft = self._raft
        return raft.lone_and_applied and not raft.otherNodes and raft._isLeader()

    def leader_raft_addr(self) -> str | None:
        leader = self._raft._getLeader()
        return str(leader.id) if leader is not None else None

    def status(self) -> dict:
        raft = self._raft
        leader = raft._getLeader()
        others = sorted(raft.otherNodes, key=lambda n: str(n.id))  # otherNodes is a copy
        heard, now = dict(raft.heard), time.monotonic()
        return {
            "raft_addr": self._raft_addr,
            "leader_raft_addr": str(leader.id) if leader is not None else None,
            "is_leader": raft._isLeader(),
            "term": raft.raftCurrentTerm,
            "commit_index": raft.raftCommitIndex,
            "peers": [str(n.id) for n in others],
            "connected": {str(n.id): raft.isNodeConnected(n) for n in others},
            "last_contact": {str(n.id): (None if str(n.id) not in heard else round(now - heard[str(n.id)], 3))
                             for n in others},
            "uptime": round(now - raft.started, 3),
            "entries_merged": raft.entries_merged,
            "read_index": dict(raft.read_index_counts),
            "tick_stalls": dict(raft.tick_stalls),
            "longest_tick_gap": round(raft.longest_tick_gap, 3),
            # Silent longer than this, a peer's link is dropped (tuning.connection_timeout).
            "contact_timeout": self._tuning.connection_timeout,
        }

    def _role_changed(self, leader: str | None, is_leader: bool) -> None:
        try:
            self._listener.role_changed(leader, is_leader)
        except Exception:
            log.exception("node %s: a listener failed on a role change", self._raft_addr)

    def close(self) -> None:
        """Stops the tick thread and waits for it, so the Raft port is free when this returns
        (a node restarted in the same process must be able to bind it again), then lets a dump
        being written finish (its file is complete or absent, never torn)."""
        raft = self._raft
        if raft.tick_thread_alive():
            raft.destroy_synchronous()
        else:
            raft.destroy()
        raft._SyncObj__serializer.wait()


class RaftError(RuntimeError):
    """The Raft voter cannot run (its port cannot be bound)."""


def _reason(err) -> str | None:
    """PySyncObj's error code as our reason (None: success)."""
    return None if err == FAIL_REASON.SUCCESS else FAILURES.get(err, f"raft_error_{err}")


def _reason_callback(done: Callable[[str | None], None]):
    """PySyncObj's ``callback(result, error code)`` as ``done(our reason or None)``."""
    return lambda result, err: done(_reason(err))
