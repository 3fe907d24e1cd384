"""Our guards against two PySyncObj 0.3.17 defects, checked on the messages PySyncObj's own
handler receives (the end-to-end reproductions are tests/test_partition.py and the chaos runs)."""

from __future__ import annotations

from types import SimpleNamespace

from pysyncobj import SyncObj

from synapse.cluster.raft import ReplicatedLog


def _handled(monkeypatch, me, message) -> dict:
    seen = []
    monkeypatch.setattr(SyncObj, "_SyncObj__onMessageReceived", lambda self, node, msg: seen.append(msg))
    ReplicatedLog._SyncObj__onMessageReceived(me, "peer", message)
    (forwarded,) = seen
    return forwarded


def _follower(commit: int):
    return SimpleNamespace(raftCommitIndex=commit, _isLeader=lambda: False, otherNodes={"peer"})


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
    ReplicatedLog._SyncObj__onMessageReceived(me, "removed", vote)
    ReplicatedLog._SyncObj__onMessageReceived(me, "member", vote)
    assert seen == [("member", vote)]
