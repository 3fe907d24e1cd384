"""Linearizable reads by read index (synapse/cluster/raft.py, "linearizable reads by read
index"; synapse/cluster/read_index.py). The rules, on the tick thread's handlers with a voter
whose Raft state is set by hand; then end to end on a real three-node cluster: every read, on
the leader and on the followers, sees the write acknowledged just before it, and takes no log
entry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from synapse.cluster import raft as raft_mod
from synapse.cluster.raft import Voter
from tests.harness import Cluster, scrape


class _Node(SimpleNamespace):
    def __hash__(self):
        return hash(self.id)


A, B, C, D = (_Node(id=f"127.0.0.1:{port}") for port in (7001, 7002, 7003, 7004))


class FakeVoter:
    """The read-index handlers of ``Voter`` over a Raft state set by hand; what it sends is
    kept in ``sent``, what it calls back in ``outcomes``."""

    _init_reads = Voter._init_reads
    _read_index_message = Voter._read_index_message
    read_round_possible = Voter.read_round_possible
    _committed_in_term = Voter._committed_in_term
    _send_read_requests = Voter._send_read_requests
    _fall_back = Voter._fall_back
    _wait_for = Voter._wait_for
    _serve_reads = Voter._serve_reads

    def __init__(self, *, leads: bool, leader=None, term: int = 7, commit: int = 40, applied: int = 40,
                 commit_term: int = 7, others=(B, C)) -> None:
        self._init_reads()
        self.leads, self.leader = leads, leader
        self.raftCurrentTerm, self.raftCommitIndex, self.raftLastApplied = term, commit, applied
        self.commit_term = commit_term
        self.otherNodes = set(others)
        self.sent: list[tuple[object, dict]] = []
        self.outcomes: list[tuple[int, bool]] = []
        self._SyncObj__transport = SimpleNamespace(send=lambda node, message: self.sent.append((node, message)))

    def _isLeader(self):  # noqa: N802 (PySyncObj's name)
        return self.leads

    def _getLeader(self):  # noqa: N802
        return self.leader

    def _SyncObj__getEntries(self, first, count):  # noqa: N802
        return [(b"", first, self.commit_term)] if first == self.raftCommitIndex else []

    def hear_keepalives(self, *nodes, read_index=1) -> None:
        for node in nodes:
            self._read_index_message(node, dict(raft_mod._KEEPALIVE, read_index=read_index))

    def request(self, seq: int, now: float = 100.0) -> None:
        self.read_requests.append((seq, lambda ok, seq=seq: self.outcomes.append((seq, ok))))
        self._send_read_requests(now)


# --- the leader answers a follower ---

def test_the_leader_answers_a_follower_with_its_commit_index():
    leader = FakeVoter(leads=True)
    leader._read_index_message(B, {"type": "synapse_read_index", "seq": 3, "term": 7})
    assert leader.sent == [(B, {"type": "synapse_read_index_reply", "seq": 3, "term": 7, "index": 40})]


@pytest.mark.parametrize("why, voter, asker, term", [
    ("asked in another term", dict(), B, 6),
    ("not the leader", dict(leads=False), B, 7),
    ("no entry of its term committed yet", dict(commit_term=6), B, 7),
    ("four voters: the leader and one follower are no majority", dict(others=(B, C, D)), B, 7),
    ("the asker is not a voter", dict(), D, 7),
])
def test_the_leader_refuses_a_read_index_it_cannot_vouch_for(why, voter, asker, term):
    leader = FakeVoter(**{"leads": True, **voter})
    leader._read_index_message(asker, {"type": "synapse_read_index", "seq": 3, "term": term})
    ((to, reply),) = leader.sent
    assert to is asker and reply["index"] is None, why
    assert leader.read_index_counts["refused"] == 1


# --- a follower's round ---

def test_a_follower_asks_only_a_leader_that_said_it_answers():
    follower = FakeVoter(leads=False, leader=A, others=(A, C))
    follower.request(1)
    assert follower.outcomes == [(1, False)] and follower.sent == []  # no keep-alive from A yet
    follower.hear_keepalives(A)
    follower.request(2)
    assert follower.sent == [(A, {"type": "synapse_read_index", "seq": 2, "term": 7})]
    follower.hear_keepalives(A, read_index=None)  # A restarted as an older version
    follower.request(3)
    assert follower.outcomes[-1] == (3, False)


def test_a_follower_serves_the_read_once_it_has_applied_the_answer():
    follower = FakeVoter(leads=False, leader=A, others=(A, C), applied=38)
    follower.hear_keepalives(A)
    follower.request(5)
    follower._read_index_message(A, {"type": "synapse_read_index_reply", "seq": 5, "term": 7, "index": 40})
    assert follower.outcomes == []  # applied 38 of 40
    follower.raftLastApplied = 40
    follower._serve_reads()
    assert follower.outcomes == [(5, True)]


@pytest.mark.parametrize("why, reply, change", [
    ("the leader refused", {"term": 7, "index": None}, None),
    ("the answer is of another term", {"term": 8, "index": 40}, None),
    ("this node's term moved on meanwhile", {"term": 7, "index": 40}, "term"),
    ("this node leads now", {"term": 7, "index": 40}, "leads"),
])
def test_a_follower_falls_back_to_a_barrier_entry(why, reply, change):
    follower = FakeVoter(leads=False, leader=A, others=(A, C))
    follower.hear_keepalives(A)
    follower.request(5)
    if change == "term":
        follower.raftCurrentTerm = 8
    elif change == "leads":
        follower.leads = True
    follower._read_index_message(A, {"type": "synapse_read_index_reply", "seq": 5, **reply})
    assert follower.outcomes == [(5, False)], why


def test_only_the_asked_leader_answers_and_an_unanswered_round_expires():
    follower = FakeVoter(leads=False, leader=A, others=(A, C))
    follower.hear_keepalives(A)
    follower.request(5, now=100.0)
    follower._read_index_message(C, {"type": "synapse_read_index_reply", "seq": 5, "term": 7, "index": 40})
    assert follower.outcomes == []  # C was not asked
    follower._send_read_requests(100.0 + raft_mod.READ_INDEX_REPLY_TIMEOUT + 0.01)
    assert follower.outcomes == [(5, False)]
    follower._read_index_message(A, {"type": "synapse_read_index_reply", "seq": 5, "term": 7, "index": 40})
    assert follower.outcomes == [(5, False)]  # too late: nothing more


def test_a_follower_asks_nothing_with_more_than_two_other_voters():
    follower = FakeVoter(leads=False, leader=A, others=(A, C, D))
    follower.hear_keepalives(A)
    follower.request(1)
    assert follower.outcomes == [(1, False)] and follower.sent == []


# --- the leader's own round ---

def test_the_leader_serves_its_read_once_a_peer_confirms_its_term():
    leader = FakeVoter(leads=True)
    leader.hear_keepalives(B, C)
    leader.request(9)
    assert sorted(to.id for to, _ in leader.sent) == [B.id, C.id]
    assert all(m == {"type": "synapse_term_check", "seq": 9, "term": 7} for _, m in leader.sent)
    leader.raftCommitIndex = 55  # later commits do not move the round's index
    leader._read_index_message(C, {"type": "synapse_term_ack", "seq": 9, "term": 7})
    assert leader.outcomes == [(9, True)]  # 40 applied already; with itself, a majority of 3


def test_a_peer_in_another_term_does_not_confirm_and_too_few_left_falls_back():
    leader = FakeVoter(leads=True)
    leader.hear_keepalives(B, C)
    leader.request(9)
    leader._read_index_message(B, {"type": "synapse_term_ack", "seq": 9, "term": 8})
    assert leader.outcomes == []  # C may still confirm
    leader._read_index_message(C, {"type": "synapse_term_ack", "seq": 9, "term": 8})
    assert leader.outcomes == [(9, False)]


def test_the_leader_needs_a_majority_of_five():
    leader = FakeVoter(leads=True, others=(B, C, D, _Node(id="127.0.0.1:7005")))
    leader.hear_keepalives(*leader.otherNodes)
    leader.request(9)
    leader._read_index_message(B, {"type": "synapse_term_ack", "seq": 9, "term": 7})
    leader._read_index_message(B, {"type": "synapse_term_ack", "seq": 9, "term": 7})  # counted once
    assert leader.outcomes == []
    leader._read_index_message(D, {"type": "synapse_term_ack", "seq": 9, "term": 7})
    assert leader.outcomes == [(9, True)]


@pytest.mark.parametrize("why, voter, keepalives", [
    ("no entry of its term committed yet", dict(commit_term=6), (B, C)),
    ("no peer said it takes part", dict(), ()),
    ("a lone voter has no one to confirm", dict(others=()), ()),
])
def test_the_leader_falls_back_when_it_cannot_start_a_round(why, voter, keepalives):
    leader = FakeVoter(**{"leads": True, **voter})
    leader.hear_keepalives(*keepalives)
    leader.request(9)
    assert leader.outcomes == [(9, False)] and leader.sent == [], why


def test_a_follower_confirms_with_its_own_term():
    follower = FakeVoter(leads=False, leader=A, others=(A, C), term=8)
    follower._read_index_message(A, {"type": "synapse_term_check", "seq": 4, "term": 7})
    assert follower.sent == [(A, {"type": "synapse_term_ack", "seq": 4, "term": 8})]


@pytest.mark.parametrize("message", [
    {"type": "synapse_read_index", "seq": "x", "term": 7},
    {"type": "synapse_read_index", "seq": [1], "term": 7},
    {"type": "synapse_term_check"},
    {"type": "synapse_read_index_reply", "seq": 1.5, "index": 40},
    {"type": "synapse_term_ack", "seq": None},
])
def test_malformed_read_index_messages_are_ignored(message):
    voter = FakeVoter(leads=True)
    voter._read_index_message(B, message)
    assert voter.sent == [] and voter.outcomes == []


# --- end to end ---

def _total(node, token: str, name: str) -> float:
    return scrape(node, token).get(name, 0.0)


def test_reads_on_every_node_see_the_write_before_them_without_a_log_entry(tmp_path):
    cluster = Cluster.create(tmp_path, 3, extra=["--worker-slots", "0", "--memory-index", "off"]).start()
    try:
        leader = cluster.leader()
        nodes = [leader] + [n for n in cluster.nodes if n is not leader]
        served = 'synapse_read_index_requests_total{outcome="served"}'
        writer = cluster.client(leader)
        writer.put("warm", {"n": 0})
        # A follower takes part once it has heard the leader's keep-alive (every 0.5 s); until
        # then its reads take barrier entries, as they do with a leader of an older version.
        for node in nodes:
            reader = cluster.client(node)
            while _total(node, cluster.token, served) == 0:
                reader.get("warm")
        fell_back = 'synapse_read_index_requests_total{outcome="fell_back"}'
        before = {n.node_id: (_total(n, cluster.token, served), _total(n, cluster.token, fell_back)) for n in nodes}
        for i in range(30):
            writer = cluster.client(nodes[i % 3])
            writer.put(f"k{i}", {"n": i})
            for node in nodes:  # right after the acknowledgement, on each node
                assert cluster.client(node).get(f"k{i}")["value"] == {"n": i}
        for node in nodes:
            # Each read its own round (one client at a time), none of them a barrier entry: a
            # round falls back only without an answer in 0.5 s (~100x a round here) or when a
            # term changes, which nothing here causes.
            was_served, had_fallen_back = before[node.node_id]
            assert _total(node, cluster.token, served) == was_served + 30
            assert _total(node, cluster.token, fell_back) == had_fallen_back
    finally:
        cluster.close()
