"""A request id (X-Request-Id) names one request, like an idempotency key: the same id with
the same request gets the first answer and applies once; the same id with a different request
(another route, key, body or parameters) is refused with 422 ``request_id_reused`` and changes
nothing. Checked in the command processor (the replicated dedup table: deterministic, never
raising, old two-element records still read) and over HTTP, on the Rust front's hot path and
on the aiohttp app, for kv, transactions, tasks and workers."""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote, urlsplit

import msgpack
import pytest

from synapse._core import StateStore
from synapse.api.common import identified, request_hash
from synapse.state import keys
from synapse.state.commands import encode_entry
from synapse.state.processor import CommandProcessor
from tests.harness import Cluster

# --- the processor ----------------------------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.processor = CommandProcessor(StateStore())
        self.index = 0

    def entry(self, *commands) -> list[dict]:
        self.index += 1
        return self.processor.apply_entry(self.index, encode_entry(commands)).results

    def one(self, command) -> dict:
        return self.entry(command)[0]

    def state(self) -> dict[bytes, bytes]:
        """Everything but the audit chain head, which every entry extends."""
        return {k: v for k, v in self.processor.store.scan() if k != keys.CHAIN}


def put(key: str, value: bytes, rid: str, **extra) -> dict:
    return identified({"op": "put", "key": key, "value": value, **extra}, rid)


def test_the_same_request_again_gets_the_first_result_and_changes_nothing():
    log = Log()
    first = log.one(put("a", b"1", "r"))
    before = log.state()
    assert log.one(put("a", b"1", "r")) == first == {"ok": True, "key": "a", "version": 1, "index": 1}
    assert log.state() == before


@pytest.mark.parametrize("other", [
    put("a", b"2", "r"),                                   # another body
    put("b", b"1", "r"),                                   # another key
    put("a", b"1", "r", if_version=0),                     # another condition
    identified({"op": "delete", "key": "a"}, "r"),         # another route
    identified({"op": "txn", "if": [], "then": [], "else": []}, "r"),
    identified({"op": "task_cancel", "task_id": "t"}, "r", now_ms=5),
])
def test_the_same_id_with_another_request_is_refused_and_changes_nothing(other):
    log = Log()
    first = log.one(put("a", b"1", "r"))
    before = log.state()
    refused = log.one(other)
    assert refused["ok"] is False and refused["error"] == "request_id_reused"
    assert "'r'" in refused["message"] and "log index 1" in refused["message"]
    assert log.state() == before
    # The first request's own retry still gets its answer: the refusal recorded nothing.
    assert log.one(put("a", b"1", "r")) == first


def test_ids_are_compared_within_one_entry_too():
    results = Log().entry(put("a", b"1", "r"), put("a", b"2", "r"), put("a", b"1", "r"))
    assert results[0]["ok"] and results[2] == results[0]
    assert results[1]["error"] == "request_id_reused"


def test_a_volatile_field_is_not_part_of_the_request():
    # The proposer's clock and a generated task id differ between a request and its retry.
    spec = {"command": ["true"]}
    first = identified({"op": "task_submit", "spec": spec}, "r", task_id="t1", now_ms=1)
    retry = identified({"op": "task_submit", "spec": spec}, "r", task_id="t2", now_ms=2)
    log = Log()
    answer = log.one(first)
    assert answer["ok"] and answer["task_id"] == "t1"
    assert log.one(retry) == answer


def test_the_hash_is_canonical():
    assert request_hash({"a": 1, "b": {"x": [1, 2], "y": b"z"}}) == request_hash({"b": {"y": b"z", "x": [1, 2]}, "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 1.0})
    # Values no command can hold still hash (validation then refuses them with a 400).
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert all(len(request_hash(v)) == 16 for v in ({"a": 2**70}, {"b": "\udc80"}, {"c": deep}))


def test_records_without_a_hash_keep_their_old_bytes_and_meaning():
    """Entries proposed before request hashes replay to the very state they made (restarts
    replay old log entries; checkpoints agreed on their digest), and their records, like
    those in old snapshots, answer any command with that rid as before."""
    log = Log()
    result = log.one({"op": "put", "key": "a", "value": b"1", "rid": "old"})
    assert msgpack.unpackb(log.processor.store.get(b"rid/old"), raw=False) == [1, result]
    before = log.state()
    assert log.one(put("a", b"2", "old")) == result  # cannot tell: the first answer
    assert log.state() == before
    # A record with a hash, met by a command without one (an older proposer): the first answer.
    hashed = log.one(put("b", b"1", "new"))
    assert log.one({"op": "put", "key": "b", "value": b"9", "rid": "new"}) == hashed
    stored = msgpack.unpackb(log.processor.store.get(b"rid/new"), raw=False)
    assert stored == [3, hashed, request_hash({"op": "put", "key": "b", "value": b"1"})]
    assert keys.decode_rid_record(log.processor.store.get(b"rid/old")) == (1, result, None)


@pytest.mark.parametrize("command, message", [
    ({"op": "put", "key": "a", "value": b"1", "request_hash": bytes(16)}, "given without a rid"),
    ({"op": "put", "key": "a", "value": b"1", "rid": "r", "request_hash": b"short"}, "expected 16 bytes"),
    ({"op": "put", "key": "a", "value": b"1", "rid": "r", "request_hash": "0" * 16}, "expected 16 bytes"),
])
def test_a_bad_request_hash_is_a_bad_command(command, message):
    log = Log()
    result = log.one(command)
    assert result["error"] == "bad_command" and message in result["message"]
    assert log.state() == {}


def test_replay_is_deterministic():
    entries = [[put("a", b"1", "r")], [put("a", b"2", "r")], [identified({"op": "delete", "key": "a"}, "s")],
               [put("a", b"1", "r")]]
    digests = []
    for _ in range(2):
        proc = CommandProcessor(StateStore())
        for i, commands in enumerate(entries, 1):
            proc.apply_entry(i, encode_entry(commands))
        digests.append(proc.store.digest())
    assert digests[0] == digests[1]


# --- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("rid"), 1, extra=["--worker-slots", "0"]).start()
    yield c
    c.close()


def call(node, method: str, target: str, body=None, rid: str | None = None) -> tuple[int, dict]:
    url = urlsplit(node.nodes[0].url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {node.token}"}
        if rid is not None:
            headers["X-Request-Id"] = rid
        conn.request(method, target, body=None if body is None else json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def reused(answer: tuple[int, dict]) -> bool:
    status, body = answer
    return status == 422 and body["error"] == "request_id_reused" and body["message"].startswith("X-Request-Id: ")


# A plain key is answered by the Rust front's hot path; one with other characters by the app.
@pytest.mark.parametrize("key", ["rid/hot", "rid/<|J app"])
def test_kv_over_http(node, key):
    path = "/v1/kv/" + quote(key, safe="/")
    rid = f"(uF`>c^ {key}"
    first = call(node, "PUT", path, {"value": None}, rid)
    assert first[0] == 200
    assert call(node, "PUT", path, {"value": None}, rid) == first
    assert reused(call(node, "PUT", path, {"value": 1}, rid))
    assert reused(call(node, "PUT", path + "-other", {"value": None}, rid))
    assert reused(call(node, "DELETE", path, None, rid))
    assert reused(call(node, "POST", "/v1/txn", {"then": [{"op": "delete", "key": key}]}, rid))
    status, record = call(node, "GET", path)
    assert status == 200 and record["value"] is None and record["version"] == 1
    assert call(node, "GET", path + "-other")[0] == 404


def test_the_first_request_may_be_on_either_path(node):
    # DELETE is always the app's; the PUT then comes through the hot path.
    assert call(node, "DELETE", "/v1/kv/rid/first-delete", None, "first-delete")[0] == 200
    assert reused(call(node, "PUT", "/v1/kv/rid/first-delete", {"value": 1}, "first-delete"))
    assert call(node, "GET", "/v1/kv/rid/first-delete")[0] == 404


def test_tasks_and_workers_over_http(node):
    spec = {"command": ["true"], "labels": {"never": "matches"}}
    status, first = call(node, "POST", "/v1/tasks", spec, "task-rid")
    assert status == 201
    again = call(node, "POST", "/v1/tasks", spec, "task-rid")  # a retry: no second task
    assert again[1]["task_id"] == first["task_id"]
    assert reused(call(node, "POST", "/v1/tasks", {**spec, "priority": 7}, "task-rid"))
    assert reused(call(node, "POST", f"/v1/tasks/{first['task_id']}/cancel", None, "task-rid"))
    assert call(node, "GET", f"/v1/tasks/{first['task_id']}")[1]["state"] == "pending"
    worker = {"worker_id": "rid-w", "instance": "i1", "slots": 1}
    assert call(node, "POST", "/v1/workers", worker, "worker-rid")[0] == 200
    assert reused(call(node, "POST", "/v1/workers", {**worker, "instance": "i2"}, "worker-rid"))


@pytest.mark.parametrize("rid, fix", [("", "1 to 128 characters"), ("x" * 129, "1 to 128 characters"),
                                      ("report/t/1/start", "reserved"), ("ckpt-report/1/n1/0", "reserved")])
def test_a_bad_request_id_is_a_400_naming_the_header(node, rid, fix):
    status, body = call(node, "PUT", "/v1/kv/rid/bad", {"value": 1}, rid)
    assert status == 400 and body["message"].startswith("X-Request-Id: ") and fix in body["message"]
    assert call(node, "GET", "/v1/kv/rid/bad")[0] == 404
