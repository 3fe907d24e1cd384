"""The Raft port under hostile traffic, on a real 3-node cluster: random bytes, frames with a
nonsense length, frames sealed with a wrong secret, and genuine frames (sealed with the
cluster secret) replayed on new connections and out of place. Every node keeps serving, the
cluster keeps taking writes, and not one byte of the state changes because of the attack
(the attacks: synapse/chaos/hostile.py)."""

from __future__ import annotations

import time

import pytest

from synapse.chaos.hostile import attack
from tests.harness import SECRET, Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("raft-hostile"), 3, extra=["--checkpoint-interval", "0"]).start()
    c.client().put("before", "the attack")
    c.wait_converged()
    yield c
    c.close()


def test_hostile_frames_on_every_raft_port_change_nothing(cluster):
    before = cluster.wait_converged()
    for node in cluster.nodes:
        attack(node.raft, SECRET)
    time.sleep(1.0)  # give a node that would misbehave time to act on what it read
    assert all(n.alive() for n in cluster.nodes), [n.log()[-2000:] for n in cluster.nodes if not n.alive()]
    after = cluster.wait_converged()
    assert {k: (v["applied_index"], v["state_hash"], v["term"]) for k, v in after.items()} == \
        {k: (v["applied_index"], v["state_hash"], v["term"]) for k, v in before.items()}
    # And the cluster still works: a write through every node, read back everywhere.
    for node in cluster.nodes:
        cluster.client(node).put(f"after/{node.node_id}", 1)
    final = cluster.wait_converged()
    assert len({v["state_hash"] for v in final.values()}) == 1
    assert cluster.client().get("before")["value"] == "the attack"
