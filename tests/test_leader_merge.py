"""The leader's merge of queued entries (synapse/cluster/merge.py): consecutive entries leave as
one log entry, each proposer gets exactly its own commands' results, and what cannot share an
entry keeps its own, in order. The processor is the oracle: a merged entry's results, sliced,
are what each entry alone would have given."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from types import SimpleNamespace

import pysyncobj.pickle as pysyncobj_pickle
import pytest
from pysyncobj import FAIL_REASON, SyncObj

from synapse import _core
from synapse.cluster import merge
from synapse.cluster.committer import MAX_ENTRY_COMMANDS
from synapse.cluster.raft import Voter
from synapse.state.commands import decode_entry, encode_entry
from synapse.state.processor import CommandProcessor
from tests.harness import Cluster, scrape

METHOD = 3  # PySyncObj's id of apply_entry, as a Voter would have it


def _call(payload: bytes, method: int = METHOD) -> bytes:
    return b"\x00" + pysyncobj_pickle.dumps((method, (payload,)))


def _put(key: str, value: bytes = b"1", **extra) -> dict:
    return {"op": "put", "key": key, "value": value, **extra}


MEMBERSHIP = b"\x02" + pysyncobj_pickle.dumps(["add", "127.0.0.1:9"])


def test_consecutive_entries_leave_as_one_with_a_slot_each():
    a, b = encode_entry([_put("a"), _put("b")]), encode_entry([_put("c"), {"op": "noop"}, _put("d")])
    (out,) = merge.plan([(_call(a), "cb-a"), (_call(b), ("node", 7))], METHOD)
    assert out.members == [("cb-a", (0, 2, 5)), (("node", 7), (2, 3, 5))]
    method, (payload,) = pysyncobj_pickle.loads(out.command[1:])
    assert out.command[0] == 0 and method == METHOD
    assert decode_entry(payload) == decode_entry(a) + decode_entry(b)


def test_what_cannot_share_an_entry_keeps_its_own_in_queue_order():
    e1, e2, e3 = (encode_entry([_put(k)]) for k in "xyz")
    rollback = encode_entry([{"op": "rollback", "checkpoint": 5}])
    garbage = _call(b"\xc1not msgpack")
    other_method = _call(e3, METHOD + 1)
    waiting = [(_call(e1), 1), (_call(e2), 2), (MEMBERSHIP, 3), (_call(e3), 4), (_call(rollback), 5),
               (garbage, 6), (other_method, 7), (_call(e1), 8)]
    out = merge.plan(waiting, METHOD)
    assert [o.members for o in out] == [
        [(1, (0, 1, 2)), (2, (1, 1, 2))], [(3, None)], [(4, None)], [(5, None)], [(6, None)], [(7, None)], [(8, None)]]
    # An entry left alone is the proposer's own bytes, untouched.
    assert [o.command for o in out[1:]] == [MEMBERSHIP, _call(e3), _call(rollback), garbage, other_method, _call(e1)]


def test_a_merged_entry_never_exceeds_the_committers_limits():
    big = encode_entry([_put(f"k{i}") for i in range(MAX_ENTRY_COMMANDS // 2 + 1)])
    out = merge.plan([(_call(big), 1), (_call(big), 2), (_call(encode_entry([_put("z")])), 3)], METHOD)
    assert [[cb for cb, _ in o.members] for o in out] == [[1], [2, 3]]


def test_a_slice_of_a_result_that_is_not_one_per_command_is_passed_on_whole():
    got = []
    deliver = merge.sliced(lambda res, err: got.append((res, err)), (1, 2, 4))
    deliver(["r0", "r1", "r2", "r3"], FAIL_REASON.SUCCESS)
    deliver([{"ok": False, "error": "bad_entry"}], FAIL_REASON.SUCCESS)
    deliver(None, FAIL_REASON.DISCARDED)
    assert got == [(["r1", "r2"], 0), ([{"ok": False, "error": "bad_entry"}], 0), (None, FAIL_REASON.DISCARDED)]


def _strip_indexes(result):
    if isinstance(result, dict):
        return {k: _strip_indexes(v) for k, v in result.items() if k not in ("index", "create_index", "mod_index")}
    if isinstance(result, list):
        return [_strip_indexes(r) for r in result]
    return result


def _random_command(rng: random.Random, n: int) -> dict:
    key = f"k{rng.randrange(6)}"
    rid = {"rid": f"r{rng.randrange(40)}", "request_hash": bytes(16)} if rng.random() < 0.5 else {}
    kind = rng.randrange(6)
    if kind == 0:
        return {"op": "delete", "key": key, **rid}
    if kind == 1:
        return _put(key, str(n).encode(), if_version=rng.randrange(4), **rid)
    if kind == 2:
        return {"op": "txn", "if": [{"key": key, "version": rng.randrange(3)}],
                "then": [{"op": "put", "key": f"k{rng.randrange(6)}", "value": b"2"}],
                "else": [{"op": "delete", "key": key}], **rid}
    if kind == 3:
        return {"op": "noop"}
    return _put(key, str(n).encode(), **rid)


@pytest.mark.parametrize("seed", range(25))
def test_sliced_results_of_a_merged_entry_are_each_entrys_own_results(seed):
    """The oracle: the same entries applied one by one on another replica give the same
    results (but for the log indexes in them) and the same keys, values and versions."""
    rng = random.Random(seed)
    payloads = [encode_entry([_random_command(rng, n * 10 + i) for i in range(rng.randrange(1, 6))])
                for n in range(rng.randrange(2, 6))]
    (out,) = merge.plan([(_call(p), i) for i, p in enumerate(payloads)], METHOD)
    merged, alone = CommandProcessor(_core.StateStore()), CommandProcessor(_core.StateStore())
    _, (payload,) = pysyncobj_pickle.loads(out.command[1:])
    results = merged.apply_entry(1, payload).results
    for (callback, slot), own in zip(out.members, payloads):
        got = []
        merge.sliced(lambda res, err: got.append(res), slot)(results, 0)
        expected = alone.apply_entry(1 + callback, own).results
        assert _strip_indexes(got[0]) == _strip_indexes(expected)
    kv = {(r.key, r.value, r.version) for r in merged.scan("", None)}
    assert kv == {(r.key, r.value, r.version) for r in alone.scan("", None)}


class _Queue:
    def __init__(self, items):
        self.items = list(items)

    def get_nowait(self):
        import queue

        if not self.items:
            raise queue.Empty
        return self.items.pop(0)


def _leader(waiting, dynamic=True):
    log, sent, appends = [], [], []
    me = SimpleNamespace(
        _isLeader=lambda: True, raftCurrentTerm=4, _apply_entry_id=METHOD, entries_merged=0,
        _SyncObj__commandsQueue=_Queue(waiting), _SyncObj__commandsWaitingCommit=defaultdict(list),
        _SyncObj__conf=SimpleNamespace(appendEntriesUseBatch=False, dynamicMembershipChange=dynamic),
        _SyncObj__getCurrentLogIndex=lambda: 10 + len(log),
        _SyncObj__raftLog=SimpleNamespace(add=lambda command, idx, term: log.append((command, idx, term))),
        _SyncObj__transport=SimpleNamespace(send=lambda node, message: sent.append((node, message))),
        _SyncObj__sendAppendEntries=lambda: appends.append(len(log)),
        _SyncObj__parseChangeClusterRequest=lambda command: ["add", "x"] if command == MEMBERSHIP else None,
        _SyncObj__changeCluster=lambda change: True,
        log=log, sent=sent, appends=appends,
    )
    me._append_as_leader = lambda outgoing: Voter._append_as_leader(me, outgoing)
    return me


def test_the_leader_appends_one_entry_for_consecutive_ones_and_sends_once():
    a, b, c = (encode_entry([_put(k)]) for k in "abc")
    results = []
    waiting = [(_call(a), lambda res, err: results.append(("a", res))), (_call(b), ("follower", 41)),
               (MEMBERSHIP, None), (_call(c), ("follower", 42))]
    me = _leader(waiting)
    Voter._checkCommandsToApply(me)
    assert [(idx, term) for _, idx, term in me.log] == [(11, 4), (12, 4), (13, 4)]
    assert me.log[1][0] == MEMBERSHIP and me.log[2][0] == _call(c)
    assert me.appends == [3]  # one AppendEntries round for all three, not one per entry
    assert me.entries_merged == 1
    assert me.sent == [
        ("follower", {"type": "apply_command_response", "request_id": 41, "log_idx": 11, "log_term": 4, "slot": [1, 1, 2]}),
        ("follower", {"type": "apply_command_response", "request_id": 42, "log_idx": 13, "log_term": 4}),
    ]
    ((term, callback),) = me._SyncObj__commandsWaitingCommit[11]
    callback(["result a", "result b"], 0)
    assert term == 4 and results == [("a", ["result a"])]


def test_a_denied_membership_change_is_refused_to_its_proposer_only():
    denied = []
    me = _leader([(MEMBERSHIP, lambda res, err: denied.append(err)), (_call(encode_entry([_put("a")])), None)])
    me._SyncObj__changeCluster = lambda change: False
    Voter._checkCommandsToApply(me)
    assert denied == [FAIL_REASON.REQUEST_DENIED] and [idx for _, idx, _ in me.log] == [11]


def test_a_follower_keeps_pysyncobjs_own_step(monkeypatch):
    calls = []
    monkeypatch.setattr(SyncObj, "_checkCommandsToApply", lambda self: calls.append(self))
    me = _leader([(_call(encode_entry([_put("a")])), None)])
    me._isLeader = lambda: False
    Voter._checkCommandsToApply(me)
    assert calls == [me] and me.log == []


def test_a_follower_slices_the_result_of_an_entry_the_leader_merged(monkeypatch):
    seen, got = [], []
    monkeypatch.setattr(SyncObj, "_SyncObj__onMessageReceived", lambda self, node, msg: seen.append(msg))
    waiting = {5: lambda res, err: got.append(res)}
    me = SimpleNamespace(_isLeader=lambda: False, otherNodes={"leader"}, raftCurrentTerm=4,
                         _SyncObj__commandsWaitingReply=waiting)
    for slot in ([0, 1, 1, 9], [2, 5, 3], "x"):  # malformed slots change nothing
        Voter._guarded_message(me, "leader", {"type": "apply_command_response", "request_id": 5, "slot": slot})
        waiting[5](["r0", "r1", "r2"], 0)
    Voter._guarded_message(me, "leader", {"type": "apply_command_response", "request_id": 5, "slot": [1, 2, 3]})
    waiting[5](["r0", "r1", "r2"], 0)
    assert got == [["r0", "r1", "r2"]] * 3 + [["r1", "r2"]] and len(seen) == 4


def test_writes_to_every_node_at_once_each_get_their_own_results(tmp_path):
    """A real 3-node cluster, 24 writers spread over all nodes (each one's k-th write to node
    (writer + k) mod 3): every result is the writer's own key and version, and every replica
    ends with the same state."""
    cluster = Cluster.create(tmp_path, 3).start()
    try:
        clients = [cluster.client(node) for node in cluster.nodes]
        failures: list[str] = []

        def writer(w: int) -> None:
            for k in range(25):
                key = f"merge/w{w}/k{k % 5}"
                try:
                    result = clients[(w + k) % 3].put(key, {"w": w, "k": k})
                except Exception as e:  # collected: an assertion in a thread would be lost
                    failures.append(f"{key}: {e!r}")
                    continue
                if result.get("key") not in (None, key) or result["version"] != k // 5 + 1:
                    failures.append(f"{key}: write {k} got {result}")

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        statuses = cluster.wait_converged()
        assert len({s["state_hash"] for s in statuses.values()}) == 1
        for w in range(24):
            assert clients[w % 3].get(f"merge/w{w}/k4", consistency="linearizable")["value"] == {"w": w, "k": 24}
        leader = cluster.leader()
        assert "synapse_entries_merged_total" in scrape(leader, cluster.token)
    finally:
        cluster.close()
