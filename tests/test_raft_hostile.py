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
    # Each node's own writes after a start (its tokens, registering itself) must be in before
    # the test compares states across the attack.
    c.wait_registered()
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


def test_a_frame_announcing_an_absurd_length_is_dropped_before_it_is_buffered(cluster):
    """A 2 GiB length prefix (or a negative one): the node closes the connection at the
    length, instead of holding what follows until 2 GiB have come."""
    import socket
    import struct

    node = cluster.nodes[0]
    host, port = node.raft.rsplit(":", 1)
    for length in ((1 << 31) - 1, -5):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(struct.pack("i", length) + b"x" * 1024)
            s.settimeout(5)
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:
                closed = True
            assert closed, f"a frame of {length} bytes was not refused"
    assert node.alive()
    cluster.client(node).put("after/absurd-length", 1)
    assert cluster.client().get("after/absurd-length")["value"] == 1


def test_the_frame_guard_follows_frames_split_anywhere():
    from synapse.cluster.raft_transport import FrameGuard

    class Stream:
        def __init__(self, chunks):
            self.chunks = list(chunks)

        def recv(self, size):
            return self.chunks.pop(0)

    import struct

    wire = b"".join(struct.pack("i", len(m)) + m for m in (b"a" * 10, b"", b"b" * 3))
    for cut in range(1, len(wire)):  # every split point of two reads
        guard = FrameGuard(Stream([wire[:cut], wire[cut:]]), limit=10)
        assert guard.recv(99) + guard.recv(99) == wire
        assert guard._left == 0 and guard._header == b""
    too_long = struct.pack("i", 11) + b"c" * 11
    with pytest.raises(OSError):
        FrameGuard(Stream([too_long]), limit=10).recv(99)
