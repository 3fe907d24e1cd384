"""Our guards against PySyncObj 0.3.17 defects, checked on the messages PySyncObj's own
handler receives (the end-to-end reproductions are tests/test_partition.py, tests/test_large_entries.py and the
chaos runs)."""

from __future__ import annotations

from types import SimpleNamespace

from pysyncobj import SyncObj

from synapse.cluster.raft import Voter


def _handled(monkeypatch, me, message) -> dict:
    seen = []
    monkeypatch.setattr(SyncObj, "_SyncObj__onMessageReceived", lambda self, node, msg: seen.append(msg))
    Voter._guarded_message(me, "peer", message)
    (forwarded,) = seen
    return forwarded


def _follower(commit: int, log: list | None = None):
    """A follower whose log holds ``log`` ((command, index, term) tuples)."""
    log = log or []

    def entries(first, count):
        if not log or first < log[0][1]:
            return []
        return log[first - log[0][1]:][:count]

    replies = []
    return SimpleNamespace(raftCommitIndex=commit, raftCurrentTerm=5, _isLeader=lambda: False, otherNodes={"peer"},
                           _SyncObj__getEntries=entries, replies=replies,
                           _SyncObj__sendNextNodeIdx=lambda node, **kw: replies.append(kw))


def test_snapshot_transfer_messages_never_move_a_followers_commit_index(monkeypatch):
    for message in ({"type": "append_entries", "term": 5, "commit_index": 900, "serialized": None},
                    {"type": "append_entries", "term": 5, "commit_index": 900, "serialized": (b"chunk", True, False)}):
        assert _handled(monkeypatch, _follower(40), message)["commit_index"] == 40


def test_checked_batches_still_carry_the_leaders_commit_index(monkeypatch):
    message = {"type": "append_entries", "term": 5, "commit_index": 900, "prevLogIdx": 41, "prevLogTerm": 5, "entries": []}
    assert _handled(monkeypatch, _follower(40), message)["commit_index"] == 900


def test_a_rejection_never_moves_next_index_forward(monkeypatch):
    leader = SimpleNamespace(raftCommitIndex=0, _isLeader=lambda: True, _SyncObj__raftNextIndex={"peer": 120}, otherNodes={"peer"})
    message = {"type": "next_node_idx", "reset": True, "next_node_idx": 500, "success": False}
    assert _handled(monkeypatch, leader, message)["next_node_idx"] == 120


def test_vote_requests_from_removed_voters_are_ignored(monkeypatch):
    seen = []
    monkeypatch.setattr(SyncObj, "_SyncObj__onMessageReceived", lambda self, node, msg: seen.append((node, msg)))
    me = SimpleNamespace(raftCommitIndex=0, _isLeader=lambda: True, otherNodes={"member"})
    vote = {"type": "request_vote", "term": 99, "last_log_index": 1, "last_log_term": 1}
    Voter._guarded_message(me, "removed", vote)
    Voter._guarded_message(me, "member", vote)
    assert seen == [("member", vote)]


_LOG = [(b"c%d" % i, i, 5) for i in range(40, 61)]  # indexes 40..60, term 5


def test_a_resent_batch_never_cuts_entries_the_follower_already_has(monkeypatch):
    seen = []
    monkeypatch.setattr(SyncObj, "_SyncObj__onMessageReceived", lambda self, node, msg: seen.append(msg))
    me = _follower(58, _LOG)
    # The leader resends 46..50 (a lower nextIndex); the follower has them and 51..60 too.
    message = {"type": "append_entries", "term": 5, "commit_index": 58, "prevLogIdx": 45, "prevLogTerm": 5,
               "entries": [e for e in _LOG if 46 <= e[1] <= 50]}
    Voter._guarded_message(me, "peer", message)
    (handed,) = seen
    assert "prevLogIdx" not in handed and "entries" not in handed  # PySyncObj cuts nothing
    assert handed["commit_index"] == 50  # only as far as this batch proved
    assert me.replies == [{"nextNodeIdx": 51, "success": True}]


def test_a_conflict_is_still_cut_from_the_first_conflicting_entry(monkeypatch):
    newer = [(b"x", 48, 6), (b"y", 49, 6)]
    message = {"type": "append_entries", "term": 6, "commit_index": 47, "prevLogIdx": 45, "prevLogTerm": 5,
               "entries": [_LOG[6], _LOG[7], *newer]}  # 46, 47 match; 48 conflicts
    handed = _handled(monkeypatch, _follower(40, _LOG), message)
    assert (handed["prevLogIdx"], handed["prevLogTerm"], handed["entries"]) == (47, 5, newer)


def test_a_batch_past_the_followers_log_end_is_appended_as_before(monkeypatch):
    message = {"type": "append_entries", "term": 5, "commit_index": 60, "prevLogIdx": 60, "prevLogTerm": 5,
               "entries": [(b"n", 61, 5)]}
    assert _handled(monkeypatch, _follower(40, _LOG), message) is message


# --- the leader's commit-index notice, held back for the next AppendEntries to carry ---


def _leader(monkeypatch, applied_says_send: bool, delay: float = 0.002):
    from synapse.cluster.raft import RaftTuning

    monkeypatch.setattr(SyncObj, "_SyncObj__applyLogEntries", lambda self: applied_says_send)
    sent = []
    me = SimpleNamespace(_isLeader=lambda: True, _tuning=RaftTuning(commit_notice_delay=delay), _commit_notice=None, _lone_leader_behind=lambda: False,
                         _SyncObj__newAppendEntriesTime=100.0, sent=sent)
    me._SyncObj__sendAppendEntries = lambda: sent.append("append_entries")
    return me


def test_the_leader_holds_back_a_commit_notice_instead_of_sending_it_at_once(monkeypatch):
    import time

    me = _leader(monkeypatch, True)
    before = time.monotonic()
    assert Voter._SyncObj__applyLogEntries(me) is False  # PySyncObj sends nothing now
    due, heartbeat_time = me._commit_notice
    assert before + 0.002 <= due <= time.monotonic() + 0.002 and heartbeat_time == 100.0
    # The tick thread's poll waits no longer than the notice.
    assert Voter._poll_timeout(me, 0.05) <= 0.002
    Voter._send_commit_notice(me, due - 0.001)
    assert me.sent == [] and me._commit_notice is not None
    Voter._send_commit_notice(me, due)
    assert me.sent == ["append_entries"] and me._commit_notice is None
    assert Voter._poll_timeout(me, 0.05) == 0.05


def test_an_append_entries_sent_meanwhile_carries_the_commit_index(monkeypatch):
    me = _leader(monkeypatch, True)
    Voter._SyncObj__applyLogEntries(me)
    due, _ = me._commit_notice
    me._SyncObj__newAppendEntriesTime = 100.05  # the next entry (or a heartbeat) went out
    Voter._send_commit_notice(me, due + 1)
    assert me.sent == [] and me._commit_notice is None


def test_followers_and_a_zero_delay_keep_pysyncobjs_behaviour(monkeypatch):
    me = _leader(monkeypatch, True, delay=0)
    assert Voter._SyncObj__applyLogEntries(me) is True and me._commit_notice is None
    me = _leader(monkeypatch, True)
    me._isLeader = lambda: False
    assert Voter._SyncObj__applyLogEntries(me) is True and me._commit_notice is None
    me = _leader(monkeypatch, False)
    assert Voter._SyncObj__applyLogEntries(me) is False and me._commit_notice is None


def test_a_lone_leader_holding_uncommitted_entries_ticks_again_at_once():
    """Alone, nothing but the next tick commits what the last one appended (a sequential
    writer in local mode waited ~45 ms per write)."""
    from pysyncobj.syncobj import SyncObj

    def voter(others, leader, last, commit):
        return SimpleNamespace(otherNodes=others, _isLeader=lambda: leader, raftCommitIndex=commit,
                               _SyncObj__getCurrentLogIndex=lambda: last)

    assert Voter._lone_leader_behind(voter(set(), True, 8, 7))
    assert not Voter._lone_leader_behind(voter(set(), True, 8, 8))  # nothing to commit: sleep
    assert not Voter._lone_leader_behind(voter({"peer"}, True, 8, 7))  # answers wake it
    assert not Voter._lone_leader_behind(voter(set(), False, 8, 7))  # not leading yet: no spinning
    assert isinstance(SyncObj.otherNodes, property) and isinstance(SyncObj.raftCommitIndex, property)
