"""Linearizable reads on a lone voter (local mode) answer from the applied state without a
log round once it has applied its whole log (synapse/cluster/raft.py, lone_leader_current;
etcd's raft does the same for a single voter's ReadIndex). What must still hold: a read
never misses a write acknowledged before it — right after each write, and from a restarted
node's very first answer after a SIGKILL. (Measured here: 3,000 entries replay before the API
listens, so the restart half guards the order of start-up as much as the shortcut's own
"applied its whole log" condition.)"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from tests.harness import Cluster

N = 3000  # sequential writes, one log entry each: a replay that takes a while


def _get(node, token: str, key: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{node.url}/v1/kv/{key}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (ConnectionError, urllib.error.URLError):
        return 0, {}  # not listening yet


def test_a_lone_voter_reads_every_acknowledged_write_even_while_replaying_after_a_kill(tmp_path):
    cluster = Cluster.create(tmp_path, 1, extra=["--worker-slots", "0", "--memory-index", "off"]).start()
    try:
        (node,) = cluster.nodes
        c = cluster.client()
        for i in range(N):
            c.put(f"k{i:04d}", {"n": i})
            if i % 10 == 0:  # right after its acknowledgement, on a node with no other load
                assert c.get(f"k{i:04d}")["value"] == {"n": i}
        node.kill()
        node.start()
        deadline, seen = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            code, answer = _get(node, cluster.token, f"k{N - 1:04d}")
            seen[code] = seen.get(code, 0) + 1
            # Before it serves, it may refuse (503) or not listen (0); once it answers, the
            # last acknowledged write is there — never a 404 or an older value.
            assert code in (0, 200, 503), (code, answer)
            if code == 200:
                assert answer["value"] == {"n": N - 1}
                break
        assert seen.get(200) == 1, seen
        assert all(c.get(f"k{i:04d}")["value"] == {"n": i} for i in range(0, N, 7))
    finally:
        cluster.close()
