"""Agent memory on a real 3-node cluster (real Raft, real embedded Chroma per node, the real
embedding model): remember on one node and recall on every other; dedup under concurrent
writers; tenant isolation by scope; TTL expiry by a leader's entry; rollback takes memories
back out of every node's index; a record damaged behind the log is repaired and re-indexed; a
node whose index directory was deleted rebuilds it at start; a leader killed mid-batch loses
nothing acknowledged and duplicates nothing; bad input changes nothing."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
import uuid

import pytest

from synapse.client import Client, SynapseError
from tests.harness import Cluster, post_json, scrape, wait_until

INTERVAL = 20  # log entries between periodic checkpoints (repair follows the next one)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    c = Cluster.create(root, 3, extra=["--checkpoint-interval", str(INTERVAL), "--checkpoint-retain", "3",
                                       "--debug-fault-injection"]).start()
    yield c
    c.close()


def _on(cluster, node) -> Client:
    return Client(node.url, cluster.token, timeout=15)


def _memory_state(node, token: str, ns: str, record_id: str) -> str:
    code, body = post_json(node, f"/v1/memory/{ns.replace('/', '%2F')}/{record_id}?consistency=stale", b"", token, "GET")
    return f"{code} {body}"


def _ids(results) -> list[str]:
    return [r["id"] for r in results]


def test_remembered_on_one_node_is_recalled_on_every_other(cluster):
    n1, n2, n3 = cluster.nodes
    ns = "acme/agent-1/episodic"
    w = _on(cluster, n1)
    w.remember(ns, "The customer prefers to be contacted by email", id="contact")
    w.remember(ns, "The customer's dog is called Biscuit", id="dog", metadata={"kind": "pet"})
    w.remember(ns, "Invoices are due on the first of the month", id="invoice", metadata={"kind": "billing"})
    for node in (n2, n3):  # linearizable: no waiting for replication or indexing
        found = _on(cluster, node).recall(ns, "what is the name of their pet?", k=3)
        assert found[0]["id"] == "dog" and found[0]["text"] == "The customer's dog is called Biscuit"
        assert found[0]["score"] > found[1]["score"]
        only = _on(cluster, node).recall(ns, "how to reach the customer", k=3, where={"kind": "billing"})
        assert _ids(only) == ["invoice"]
        assert _on(cluster, node).memory(ns, "dog")["metadata"] == {"kind": "pet"}


def test_sixteen_concurrent_writers_of_one_text_store_it_once(cluster):
    ns = "acme/dedup"
    answers, errors = [], []

    def write(i: int) -> None:
        node = cluster.nodes[i % 3]
        try:
            answers.append(_on(cluster, node).remember(ns, "The meeting moved to Thursday", id=f"w{i}"))
        except SynapseError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(answers) == 16
    assert len({a["id"] for a in answers}) == 1  # every writer is told the same record
    assert sum(not a["duplicate"] for a in answers) == 1
    for node in cluster.nodes:
        items = _on(cluster, node).memories(ns, consistency="linearizable")["items"]
        assert [m["text"] for m in items] == ["The meeting moved to Thursday"]


def test_a_principal_of_one_namespace_never_sees_another(cluster):
    admin = cluster.client()
    admin.remember("tenant-b/notes", "Tenant B's secret launch date is in March", id="secret")
    admin.put_role("tenant-a", ["memory:read:tenant-a/", "memory:write:tenant-a/"])
    admin.put_principal("agent-a", "agent", ["tenant-a"])
    token = admin.create_token(["memory:read:tenant-a/", "memory:write:tenant-a/"], principal="agent-a")["token"]
    for node in cluster.nodes:
        a = Client(node.url, token, timeout=15)
        a.remember("tenant-a/notes", "Tenant A likes short answers", id="style")
        assert _ids(a.recall("tenant-a/notes", "answer length", k=5)) == ["style"]
        for call in (lambda: a.recall("tenant-b/notes", "launch date"), lambda: a.memories("tenant-b/notes"),
                     lambda: a.memory("tenant-b/notes", "secret"), lambda: a.forget("tenant-b/notes", "secret"),
                     lambda: a.remember("tenant-b/notes", "overwrite", id="secret"),
                     # A namespace that does not exist answers the same: existence does not leak.
                     lambda: a.recall("tenant-b/nothing-here", "x")):
            with pytest.raises(SynapseError) as refused:
                call()
            assert refused.value.status == 403 and "memory:" in refused.value.message
            assert "March" not in refused.value.message
    assert admin.memory("tenant-b/notes", "secret")["text"] == "Tenant B's secret launch date is in March"


def test_expired_memories_are_removed_by_the_leader_on_every_node(cluster):
    ns = "acme/ttl"
    c = cluster.client()
    c.remember(ns, "A one-time code: 4471", id="otp", ttl_s=1.0)
    c.remember(ns, "The user's name is Ada", id="name")
    # The TTL is recorded as an expiry time (checked on a record that outlives the test: the
    # one-second one may already be gone by the time a loaded machine reads it back).
    c.remember(ns, "The session ends at noon", id="session", ttl_s=3600)
    session = c.memory(ns, "session")
    assert 3590_000 < session["expires_ms"] - session["created_ms"] <= 3600_000

    def gone_everywhere() -> bool:
        return all(_ids(_on(cluster, n).memories(ns)["items"]) == ["name", "session"] for n in cluster.nodes)

    wait_until(gone_everywhere, 10, "the expired memory gone from every node")
    for node in cluster.nodes:
        with pytest.raises(SynapseError) as missing:
            _on(cluster, node).memory(ns, "otp")
        assert missing.value.status == 404
        assert sorted(_ids(_on(cluster, node).recall(ns, "one-time code", k=5))) == ["name", "session"]
    assert len({s["state_hash"] for s in cluster.wait_converged().values()}) == 1


def test_a_rollback_takes_later_memories_out_of_every_index(cluster):
    ns = "acme/rollback"
    c = cluster.client()
    c.remember(ns, "The project codename is Falcon", id="before")
    point = c.checkpoint(label="memories before", wait=True)
    c.remember(ns, "The project codename changed to Osprey", id="after")
    assert set(_ids(c.recall(ns, "project codename", k=5))) == {"before", "after"}
    c.rollback(point["index"])
    cluster.wait_converged()
    for node in cluster.nodes:
        one = _on(cluster, node)
        assert _ids(one.recall(ns, "project codename", k=5)) == ["before"]
        assert _ids(one.recall(ns, "project codename", k=5, consistency="stale")) == ["before"]
        assert _ids(one.memories(ns)["items"]) == ["before"]


def test_a_memory_damaged_behind_the_log_is_repaired_and_reindexed(cluster):
    ns = "acme/repair"
    c = cluster.client()
    c.remember(ns, "The warehouse is in Rotterdam", id="where")
    victim = cluster.nodes[2]
    code, body = post_json(victim, "/v1/debug/corrupt", {"memory": {"namespace": ns, "id": "where"}}, cluster.token)
    assert code == 200, body
    on_victim = _on(cluster, victim)
    # The next checkpoint finds the victim's state hash differs; the victim repairs itself
    # from a peer and its index follows the repaired state.
    for i in range(2 * INTERVAL):
        c.put(f"repair-traffic/{i}", i)
    try:
        wait_until(lambda: _ids(on_victim.recall(ns, "warehouse location", k=1, consistency="stale")) == ["where"],
                   20, "the victim's index holding the repaired memory")
    except AssertionError as e:  # say where it stopped: the state, the index, the recall
        raise AssertionError(f"{e}; victim's memory {_memory_state(victim, cluster.token, ns, 'where')}, index "
                             f"{ {k: v for k, v in scrape(victim, cluster.token).items() if k.startswith(('synapse_memory', 'synapse_applied'))} }, recall {on_victim.recall(ns, 'warehouse', consistency='stale')}")
    assert len({s["state_hash"] for s in cluster.wait_converged().values()}) == 1


def test_a_node_whose_index_was_deleted_rebuilds_it_at_start(cluster):
    ns = "acme/rebuild"
    c = cluster.client()
    c.remember_many(ns, [{"id": f"r{i}", "text": f"Fact number {i} about the rebuild"} for i in range(40)]
                    + [{"id": "needle", "text": "The spare key is under the blue flowerpot"}])
    node = cluster.nodes[1]
    assert _ids(_on(cluster, node).recall(ns, "spare key", k=1)) == ["needle"]  # indexed there
    node.stop()
    shutil.rmtree(node.data_dir / "memory-index")
    node.start()
    cluster.wait_ready()
    one = _on(cluster, node)
    assert _ids(one.recall(ns, "where is the spare key?", k=1)) == ["needle"]
    assert len(one.recall(ns, "fact about the rebuild", k=50)) == 41


def test_a_node_past_compaction_catches_up_with_its_memories_indexed(cluster):
    from synapse.cluster.dump import dump_index

    ns = "acme/catchup"
    c = cluster.client()
    c.remember_many(ns, [{"id": f"old{i}", "text": f"Old fact {i} from the archive"} for i in range(30)])
    lagging = next(n for n in cluster.nodes if n is not cluster.leader())
    lagging.stop()
    up = [n for n in cluster.nodes if n is not lagging]
    c = cluster.client(*up)
    c.remember(ns, "The new office is on the fifth floor", id="office")
    c.forget(ns, "old3")
    for node in up:  # both compact: whoever leads has a dump past the lagging node's log
        dump = node.data_dir / "raft.dump"
        before = dump_index(dump) if dump.exists() else 0
        assert post_json(node, "/v1/debug/compact", {}, cluster.token)[0] == 200
        wait_until(lambda: dump.exists() and dump_index(dump) > before, 30, f"a dump on {node.node_id}")
    lagging.start()
    cluster.wait_ready()
    assert len({s["state_hash"] for s in cluster.wait_converged().values()}) == 1
    back = _on(cluster, lagging)
    # Linearizable: the index must have reconciled with the caught-up state first.
    assert _ids(back.recall(ns, "which floor is the office on?", k=1)) == ["office"]
    found = _ids(back.recall(ns, "old fact from the archive", k=40))
    assert len(found) == 30 and "old3" not in found


def test_a_leader_killed_mid_batch_loses_nothing_acknowledged_and_duplicates_nothing(cluster):
    ns = "acme/failover"
    leader = cluster.leader()
    others = [n for n in cluster.nodes if n is not leader]
    acked, stop = [], threading.Event()

    def writer(w: int) -> None:
        c = Client([n.url for n in cluster.nodes], cluster.token, timeout=20)
        b = 0
        while not stop.is_set():
            batch = [{"id": f"w{w}-b{b}-{i}", "text": f"writer {w} batch {b} fact {i}"} for i in range(8)]
            try:
                answer = c.remember_many(ns, batch)
                acked.extend((r["id"], r["duplicate"]) for r in answer["records"])
            except SynapseError:
                pass  # outcome unknown: may or may not have applied — never counted as lost
            b += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 40, 30, "writes before the kill")
        leader.kill()
        wait_until(lambda: cluster.leader(timeout=15) in others, 20, "a new leader")
        before = len(acked)
        wait_until(lambda: len(acked) >= before + 40, 30, "writes after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join()
    leader.start()
    cluster.wait_ready()
    assert not any(dup for _, dup in acked)  # unique texts: no record was stored as a duplicate
    expected = {i for i, _ in acked}
    for node in cluster.nodes:
        one, items, after = _on(cluster, node), [], None
        while True:
            page = one.memories(ns, limit=1000, start_after=after)
            items += page["items"]
            if not (after := page["next_start_after"]):
                break
        ids = [m["id"] for m in items]
        assert len(ids) == len(set(ids))
        assert expected <= set(ids), sorted(expected - set(ids))[:5]
        texts = [m["text"] for m in items]
        assert len(texts) == len(set(texts))  # no text stored twice
    assert len({s["state_hash"] for s in cluster.wait_converged().values()}) == 1


def test_a_full_batch_of_full_precision_vectors_fits_in_one_request(cluster):
    """256 records with 384-dimension vectors as JSON numbers (~2 MB): one request, one entry."""
    import random

    rnd = random.Random(7)
    records = [{"id": f"v{i}", "text": f"vector record {i}", "vector": [rnd.uniform(-1, 1) for _ in range(384)]}
               for i in range(256)]
    answer = cluster.client().remember_many("acme/full-batch", records)
    assert len(answer["records"]) == 256 and not any(r["duplicate"] for r in answer["records"])
    found = cluster.client().recall("acme/full-batch", vector=records[42]["vector"], k=1)
    assert found[0]["id"] == "v42" and found[0]["score"] > 0.999


def test_concurrent_recalls_answer_exactly_as_one_at_a_time(cluster):
    """48 recalls at once go to the index in shared calls (synapse/memory/query_batch.py);
    each must get the answer it gets alone, with and without a filter."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rnd = random.Random(11)
    ns = "acme/batched-recall"
    records = [{"id": f"b{i}", "text": f"batched record {i}", "metadata": {"even": i % 2 == 0},
                "vector": [rnd.uniform(-1, 1) for _ in range(32)]} for i in range(240)]
    cluster.client().remember_many(ns, records)
    queries = [([rnd.uniform(-1, 1) for _ in range(32)], None if i % 3 else {"even": True}) for i in range(48)]
    node = cluster.nodes[1]

    def ask(q):
        vector, where = q
        return [(r["id"], r["score"]) for r in _on(cluster, node).recall(ns, vector=vector, k=7, where=where)]

    before = scrape(node, cluster.token)
    alone = [ask(q) for q in queries]
    with ThreadPoolExecutor(len(queries)) as pool:
        together = list(pool.map(ask, queries))
    assert together == alone
    after = scrape(node, cluster.token)
    asked = after["synapse_memory_recall_index_questions_total"] - before["synapse_memory_recall_index_questions_total"]
    calls = after["synapse_memory_recall_index_calls_total"] - before["synapse_memory_recall_index_calls_total"]
    assert asked == 2 * len(queries) and calls <= asked  # /metrics counts them, batched or not
    held = sum(len(_on(cluster, node).memories(space, limit=1000)["items"]) for space in (ns,))
    assert after["synapse_memory_records"] >= held == len(records) and after["synapse_memory_namespaces"] >= 1
    assert all(len(a) == 7 for a in alone)
    assert all(int(i[1:]) % 2 == 0 for (vector, where), a in zip(queries, alone) if where for i, _ in a)


def test_bad_input_is_refused_by_name_and_changes_nothing(cluster):
    node = cluster.nodes[0]
    c = cluster.client()
    c.remember("acme/bad", "A valid memory", id="ok")
    # Reads add barrier entries (the audit chain, so the state hash, moves on): what must not
    # change is the records.
    def records() -> list:
        return [_on(cluster, n).memories(space)["items"] for n in cluster.nodes for space in ("acme/bad", "bad/ns")]

    before = records()
    ns = "acme%2Fbad"
    cases = [
        ("PUT", f"/v1/memory/{ns}/x", {"text": "x" * (33 << 10)}, 413, "text"),
        ("PUT", f"/v1/memory/{ns}/x", {"text": "t", "vector": [0.1] * 3}, 409, "model"),  # namespace's model
        ("PUT", f"/v1/memory/{ns}/x", {"text": ""}, 400, "text"),
        ("PUT", f"/v1/memory/{ns}/x", {"text": "t", "metadata": {"nested": {"a": 1}}}, 400, "metadata"),
        ("PUT", f"/v1/memory/{ns}/bad%20id", {"text": "t"}, 400, "id"),
        ("POST", f"/v1/memory/{ns}/recall", {"vector": [0.1] * 5}, 400, "vector"),
        ("POST", f"/v1/memory/{ns}/recall", {"query": "x", "where": {"$and": [{"a": 1}]}}, 400, "where"),
        ("POST", f"/v1/memory/{ns}/recall", {"query": "x", "k": 1000}, 400, "k"),
        ("POST", "/v1/memory/acme%2Fnowhere/recall", {"query": "x"}, 404, "namespace"),
        ("POST", "/v1/memory/bad%2F%2Fns", {"records": [{"text": "t"}]}, 400, "namespace"),
        ("POST", f"/v1/memory/{ns}", {"records": []}, 400, "records"),
    ]
    for method, path, body, status, named in cases:
        req = urllib.request.Request(node.url + path, json.dumps(body).encode(), method=method,
                                     headers={"Authorization": f"Bearer {cluster.token}",
                                              "Content-Type": "application/json", "X-Request-Id": uuid.uuid4().hex})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=15)
        payload = json.loads(answer.value.read())
        assert answer.value.code == status, (path, body, payload)
        assert named in payload["message"], (named, payload)
    # NaN is not JSON, but Python's json module writes it: refused by name too.
    code, payload = post_json(node, f"/v1/memory/{ns}/recall", b'{"vector": [NaN, 1.0]}', cluster.token)
    assert code == 400 and "vector" in payload["message"]
    assert records() == before
