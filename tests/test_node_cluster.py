"""A real 3-node cluster on loopback: `synapse node start` subprocesses, the HTTP API, the
Python client. Destructive tests get their own cluster."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import pytest

from synapse.client import Client, ConflictError, SynapseError
from tests.harness import Cluster, scrape


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("c3"), 3).start()
    yield c
    c.close()


def test_write_on_any_node_is_read_linearizably_on_every_node(cluster):
    for writer in cluster.nodes:
        key = f"rep/{writer.node_id}"
        cluster.client(writer).put(key, {"from": writer.node_id})
        for reader in cluster.nodes:
            got = cluster.client(reader).get(key)
            assert got is not None and got["value"] == {"from": writer.node_id}, reader.node_id
    deadline = time.monotonic() + 10
    while True:  # each node registers its API address through the log shortly after start
        statuses = cluster.wait_converged()
        registered = all(len(s["members"]) == 3 and all(m["api"] for m in s["members"]) for s in statuses.values())
        if registered or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert registered, statuses
    assert len({s["leader"] for s in statuses.values()}) == 1


def test_versions_and_conditional_writes(cluster):
    c = cluster.client()
    first = c.put("cas/k", 1)
    assert first["version"] == 1
    assert c.put("cas/k", 2, if_version=1)["version"] == 2
    with pytest.raises(ConflictError) as e:
        c.put("cas/k", 3, if_version=1)
    assert e.value.current_version == 2
    with pytest.raises(ConflictError):
        c.put("cas/k", 3, if_version=0)  # 0: only if absent
    assert c.get("cas/k")["value"] == 2
    with pytest.raises(ConflictError):
        c.delete("cas/k", if_version=7)
    assert c.delete("cas/k", if_version=2)["deleted"] is True
    assert c.get("cas/k") is None
    assert c.put("cas/k", "again", if_version=0)["version"] == 1


def test_transaction_is_all_or_nothing(cluster):
    c = cluster.client()
    c.put("txn/a", 10)
    ok = c.txn(if_=[{"key": "txn/a", "value": 10}], then=[{"op": "put", "key": "txn/b", "value": 1}, {"op": "get", "key": "txn/a"}],
               else_=[{"op": "put", "key": "txn/c", "value": 1}])
    assert ok["succeeded"] is True and ok["results"][1]["value"] == 10
    no = c.txn(if_=[{"key": "txn/a", "version": 99}], then=[{"op": "put", "key": "txn/d", "value": 1}],
               else_=[{"op": "get", "key": "txn/b"}])
    assert no["succeeded"] is False, no
    assert no["results"][0]["value"] == 1, no
    assert c.get("txn/d") is None and c.get("txn/c") is None


def test_retry_with_the_same_request_id_applies_once(cluster):
    token = cluster.token
    body = json.dumps({"value": "once"}).encode()
    rid = uuid.uuid4().hex
    results = []
    for node in cluster.nodes:  # the retry may land on any node
        import http.client

        host, port = node.api.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("PUT", "/v1/kv/once", body, {"Authorization": f"Bearer {token}", "X-Request-Id": rid})
        resp = conn.getresponse()
        results.append((resp.status, json.loads(resp.read())))
    assert [r[0] for r in results] == [200, 200, 200]
    assert len({json.dumps(r[1], sort_keys=True) for r in results}) == 1
    assert cluster.client().get("once")["version"] == 1


def test_scan_is_ordered_and_paged(cluster):
    c = cluster.client()
    for i in (3, 1, 2, 10):
        c.put(f"scan/{i:02d}", i)
    page = c.scan("scan/", limit=3)
    assert [i["key"] for i in page["items"]] == ["scan/01", "scan/02", "scan/03"]
    rest = c.scan("scan/", limit=3, start_after=page["next_start_after"])
    assert [i["key"] for i in rest["items"]] == ["scan/10"] and rest["next_start_after"] is None


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("PUT", "/v1/kv/k", b"{not json", 400),
        ("PUT", "/v1/kv/k", b'{"value": 1, "extra": true}', 400),
        ("PUT", "/v1/kv/k", b'{"if_version": 1}', 400),
        ("PUT", "/v1/kv/k", b'{"value": 1, "if_version": "one"}', 400),
        ("PUT", "/v1/kv/k", b'[1, 2]', 400),
        ("PUT", "/v1/kv/" + "k" * 1100, b'{"value": 1}', 413),
        ("PUT", "/v1/kv/k", b'{"value": "' + b"x" * (1 << 20) + b'"}', 413),
        ("GET", "/v1/kv/k?consistency=eventual", None, 400),
        ("GET", "/v1/kv?limit=0", None, 400),
        ("POST", "/v1/txn", b'{"if": [{"key": "a", "version": 1, "value": 2}]}', 400),
        ("POST", "/v1/txn", b'{"then": [{"op": "drop", "key": "a"}]}', 400),
    ],
)
def test_bad_input_is_refused_with_a_json_error_and_changes_nothing(cluster, method, path, body, status):
    import http.client

    before = cluster.client().status()["state_hash"]
    host, port = cluster.nodes[0].api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body, {"Authorization": f"Bearer {cluster.token}"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    assert resp.status == status, payload
    assert set(payload) >= {"error", "message"} and payload["message"]
    assert cluster.client().status()["state_hash"] == before


def test_auth_is_required_except_for_health(cluster):
    import http.client

    host, port = cluster.nodes[1].api.split(":")
    for path, expected in [("/health", 200), ("/ready", 401), ("/v1/kv/x", 401), ("/v1/cluster/status", 401), ("/metrics", 401)]:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", path, headers={"Authorization": "Bearer wrong-token"})
        assert conn.getresponse().status == expected, path
    with pytest.raises(SynapseError) as e:
        Client(cluster.nodes[1].url, "wrong-token").get("x")
    assert e.value.status == 401


def test_metrics_and_readiness(cluster):
    import http.client

    host, port = cluster.nodes[0].api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {cluster.token}"})
    text = conn.getresponse().read().decode()
    assert "synapse_applied_index" in text and "synapse_http_requests_total" in text


def test_state_is_materialized_in_sqlite(cluster):
    c = cluster.client()
    c.put("sql/k", {"n": 1})
    cluster.wait_converged()
    for node in cluster.nodes:
        deadline = time.monotonic() + 5
        while True:
            db = sqlite3.connect(node.data_dir / "state.sqlite3")
            row = db.execute("select value, version from kv where key = ?", ("sql/k",)).fetchone()
            db.close()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert row is not None and json.loads(row[0]) == {"n": 1} and row[1] == 1, node.node_id


def test_leader_kill_fails_over_and_keeps_every_acknowledged_write(tmp_path):
    cluster = Cluster.create(tmp_path, 3).start()
    try:
        c = cluster.client()
        acked = {f"fo/{i}": i for i in range(50) if c.put(f"fo/{i}", i)}
        leader = cluster.leader()
        leader.kill()
        survivors = [n for n in cluster.nodes if n is not leader]
        s = cluster.client(*survivors)
        started = time.monotonic()
        s.put("fo/after", "new leader")
        assert time.monotonic() - started < 5
        assert cluster.leader() is not leader
        for k, v in acked.items():
            assert s.get(k)["value"] == v
        leader.start()  # the old leader rejoins and catches up
        cluster.wait_ready()
        statuses = cluster.wait_converged()
        assert len(statuses) == 3
        assert cluster.client(leader).get("fo/after", consistency="stale")["value"] == "new leader"
    finally:
        cluster.close()


@pytest.mark.parametrize("fsync", [False, True], ids=["page-cache", "raft-fsync"])
def test_restart_of_every_node_keeps_state_and_hash(tmp_path, fsync):
    cluster = Cluster.create(tmp_path, 3, extra=["--raft-fsync"] if fsync else None).start()
    try:
        c = cluster.client()
        for i in range(30):
            c.put(f"rs/{i}", {"i": i})
        before = cluster.wait_converged()
        for n in cluster.nodes:  # SIGKILL every node: only the page cache has the journal
            n.kill()
        for n in cluster.nodes:
            n.start()
        cluster.wait_ready()
        c = cluster.client()
        assert all(c.get(f"rs/{i}")["value"] == {"i": i} for i in range(30))
        after = cluster.wait_converged()
        # Every node replayed the same log to the same state. (The hash itself moved on: each
        # entry since — the reads' barriers — extends the audit chain held in the state.)
        assert len({s["state_hash"] for s in after.values()}) == 1
        assert min(s["applied_index"] for s in after.values()) > max(s["applied_index"] for s in before.values())
    finally:
        cluster.close()


def test_node_down_during_writes_catches_up(tmp_path):
    cluster = Cluster.create(tmp_path, 3).start()
    try:
        follower = next(n for n in cluster.nodes if n is not cluster.leader())
        follower.stop()
        c = cluster.client(*[n for n in cluster.nodes if n is not follower])
        for i in range(100):
            c.put(f"cu/{i}", i)
        follower.start()
        cluster.wait_ready()
        cluster.wait_converged()
        assert cluster.client(follower).get("cu/99", consistency="stale")["value"] == 99
    finally:
        cluster.close()


def test_paused_leader_is_replaced_and_never_serves_a_stale_linearizable_read(tmp_path):
    cluster = Cluster.create(tmp_path, 3).start()
    try:
        c = cluster.client()
        c.put("stale/k", "old")
        leader = cluster.leader()
        leader.pause()  # SIGSTOP: frozen, still believes it leads when it wakes
        others = [n for n in cluster.nodes if n is not leader]
        cluster.client(*others).put("stale/k", "new")
        leader.resume()
        got = cluster.client(leader).get("stale/k")
        assert got["value"] == "new"
    finally:
        cluster.close()


def test_a_stalled_raft_thread_is_counted_in_the_metrics(tmp_path):
    """A node frozen (SIGSTOP) for 1.2 s: its Raft thread's next tick comes that much after
    the last one — the silence after which peers count a node down, seen from the node."""
    cluster = Cluster.create(tmp_path, 1).start()
    try:
        node = cluster.nodes[0]
        before = scrape(node, cluster.token)
        assert before['synapse_raft_tick_stalls_total{over_seconds="1"}'] == 0
        node.pause()
        time.sleep(1.2)  # the stall made on purpose
        node.resume()
        cluster.client().put("stall/after", 1)
        after = scrape(node, cluster.token)
        assert after['synapse_raft_tick_stalls_total{over_seconds="0.5"}'] >= 1
        assert after['synapse_raft_tick_stalls_total{over_seconds="1"}'] >= 1
        assert after["synapse_raft_longest_tick_gap_seconds"] >= 1.2
        assert "the Raft tick thread stalled" in node.log()
    finally:
        cluster.close()


def test_membership_add_then_remove_a_voter(tmp_path):
    cluster = Cluster.create(tmp_path, 3).start()
    try:
        c = cluster.client()
        c.put("mb/before", 1)
        n4 = cluster.new_node("n4")
        n4.start()
        assert c.request("POST", "/v1/cluster/members", {"node_id": "n4", "raft": n4.raft, "api": n4.api}) == {"added": "n4"}
        cluster.wait_ready()
        statuses = cluster.wait_converged()
        assert all(len(s["members"]) == 4 for s in statuses.values())
        assert cluster.client(n4).get("mb/before")["value"] == 1
        c.put("mb/after-add", 2)
        assert cluster.client(n4).get("mb/after-add")["value"] == 2

        leader = cluster.leader()
        victim = next(n for n in cluster.nodes if n is not leader and n is not n4)
        with pytest.raises(SynapseError) as e:  # a node cannot see its own removal through
            cluster.client(victim).request("DELETE", f"/v1/cluster/members/{victim.node_id}")
        assert e.value.error == "send_elsewhere" and e.value.body["leader"] == leader.node_id
        assert cluster.client(leader).request("DELETE", f"/v1/cluster/members/{victim.node_id}") == {"removed": victim.node_id}
        victim.stop()
        rest = [n for n in cluster.nodes if n is not victim]
        c = cluster.client(*rest)
        c.put("mb/after-remove", 3)
        deadline = time.monotonic() + 10
        while True:
            s = cluster.client(rest[0]).status()
            if len(s["members"]) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sorted(m["node_id"] for m in s["members"]) == sorted(n.node_id for n in rest)
    finally:
        cluster.close()
