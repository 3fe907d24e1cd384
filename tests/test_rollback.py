"""Cluster-wide rollback to a retained checkpoint on a real 3-node cluster: under concurrent
writes, with a node down during it (it catches up to the same state), refused when the
checkpoint is not agreed or not retained — and the audit replays through it."""

from __future__ import annotations

import threading
import time

import pytest

from synapse.client import Client, SynapseError
from synapse.integrity.audit import verify
from tests.harness import Cluster, wait_until

EXTRA = ["--checkpoint-interval", "0", "--checkpoint-retain", "3"]


@pytest.fixture
def cluster(tmp_path):
    c = Cluster.create(tmp_path, 3, extra=EXTRA).start()
    yield c
    c.close()


def test_rollback_under_concurrent_writes_leaves_every_node_on_the_checkpoint(cluster):
    c = cluster.client()
    for i in range(20):
        c.put(f"keep/{i}", i)
    c.put("counter", "at checkpoint")
    point = c.checkpoint(label="known good", wait=True)
    for i in range(30):
        c.put(f"undo/{i}", i)
    c.put("counter", "after checkpoint")

    stop, acked = threading.Event(), []

    def writer() -> None:
        w = cluster.client()
        i = 0
        while not stop.is_set():
            try:
                w.put(f"w/{i}", i)
                acked.append((i, time.monotonic()))
            except SynapseError:
                pass
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        done = c.rollback(point["index"])
        rolled_at = time.monotonic()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert done["rolled_back_to"] == point["index"] and done["undone_entries"] >= 31
    converged = cluster.wait_converged()
    assert len({s["state_hash"] for s in converged.values()}) == 1
    for node in cluster.nodes:
        one = Client(node.url, cluster.token)
        assert one.get("counter", consistency="stale")["value"] == "at checkpoint"
        assert one.get("undo/0", consistency="stale") is None
        assert one.get("keep/19", consistency="stale")["value"] == 19
        assert "rolled back to checkpoint" in node.log()
    # Writes acknowledged after the rollback answered are kept.
    later = [i for i, t in acked if t > rolled_at + 0.05]
    assert later and all(c.get(f"w/{i}")["value"] == i for i in later[-5:])
    # The checkpoint keeps its agreement; new checkpoints are agreed by everyone again.
    assert c.checkpoint(label="after rollback", wait=True)["agreed"]
    assert any(ck["index"] == point["index"] and ck["agreed"] for ck in c.checkpoints(50))


def test_a_node_down_during_the_rollback_catches_up_to_the_same_state(cluster):
    c = cluster.client()
    down = next(n for n in cluster.nodes if n.node_id != c.status()["leader"])
    c.put("x", "before")
    down.stop()
    c = cluster.client(*[n for n in cluster.nodes if n is not down])
    point = c.checkpoint(wait=True)  # agreed by the two that are up
    c.put("x", "after")
    c.put("y", "after")
    assert c.rollback(point["index"])["rolled_back_to"] == point["index"]
    c.put("z", "after the rollback")
    down.start()
    cluster.wait_ready()
    converged = cluster.wait_converged()
    assert len({s["state_hash"] for s in converged.values()}) == 1
    back = Client(down.url, cluster.token)
    assert back.get("x", consistency="stale")["value"] == "before"
    assert back.get("y", consistency="stale") is None
    assert back.get("z", consistency="stale")["value"] == "after the rollback"
    # Its own audit replays through the rollback too.
    result = verify(down.data_dir)
    assert result.ok, result.failure


def test_rollback_is_refused_for_an_unknown_unagreed_or_unretained_checkpoint(cluster):
    c = cluster.client()
    first = c.checkpoint(wait=True)
    for i in range(3):  # retain is 3: the first one's snapshot goes
        c.put(f"r/{i}", i)
        c.checkpoint(wait=True)
    wait_until(lambda: all(first["index"] not in _retained(n, cluster.token) for n in cluster.nodes), 10, "pruning")
    # A majority agreed; every node's report is an entry too — of each of the four checkpoints:
    # a slow node's report of an earlier one can land after the last one's (seen once under
    # load, when only the last one's were waited for) — let them all land before comparing.
    wait_until(lambda: all(len(ck["nodes"]) == len(cluster.nodes) for ck in c.checkpoints(4)), 10,
               "every node's reports")
    # One node's state before and after (the client may move between nodes, which need not be
    # at the same index); a linearizable read first: that node applied everything committed.
    # Not in between: a read's barrier is a log entry too.
    one = Client(cluster.nodes[0].url, cluster.token)
    assert one.get("r/2")["value"] == 2
    before = one.status()["state_hash"]
    for target, status, error in [(first["index"], 409, "not_retained"), (10**9, 404, "unknown_checkpoint")]:
        with pytest.raises(SynapseError) as e:
            c.rollback(target)
        assert e.value.status == status and e.value.error == error, e.value
    assert one.status()["state_hash"] == before
    assert c.get("r/2")["value"] == 2


def _retained(node, token) -> set[int]:
    return {ck["index"] for ck in Client(node.url, token).checkpoints(50) if ck["retained_here"]}


def test_periodic_checkpoints_are_snapshotted_at_most_every_snapshot_seconds(tmp_path):
    # A snapshot writes the whole state; at a checkpoint every few entries that was O(state)
    # per write. Periodic ones get a snapshot only when the last one is old enough; one asked
    # for always does.
    # Nothing may write between the two state hashes compared below; under load, once, an
    # entry did. What writes on its own after a start: the embedded worker's registration (an
    # entry once its token is in the state: none here) and checkpoint reports sent again while
    # the node was not registered yet (waited for below).
    extra = ["--checkpoint-interval", "5", "--checkpoint-snapshot-seconds", "3600", "--checkpoint-retain", "10",
             "--worker-slots", "0"]
    cluster = Cluster.create(tmp_path, 1, extra=extra).start()
    try:
        c = cluster.client()
        for i in range(40):
            c.put(f"p/{i}", i)
        wait_until(lambda: len(c.checkpoints(50)) >= 4, 10, "periodic checkpoints")
        periodic = sorted(ck["index"] for ck in c.checkpoints(50))
        asked = c.checkpoint(label="asked", wait=True)["index"]
        wait_until(lambda: asked in _retained(cluster.nodes[0], cluster.token), 10, "the asked-for snapshot")
        assert _retained(cluster.nodes[0], cluster.token) == {periodic[0], asked}
        wait_until(lambda: all(ck["nodes"] for ck in c.checkpoints(50)), 10, "every checkpoint's report")
        before = c.status()["state_hash"]
        with pytest.raises(SynapseError) as e:
            c.rollback(periodic[-1])
        assert e.value.status == 409 and e.value.error == "not_retained", e.value
        assert c.status()["state_hash"] == before
    finally:
        cluster.close()
