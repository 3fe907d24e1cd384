"""The HTTP API (aiohttp). Any node serves any request: writes become commands that the group
committer proposes (PySyncObj forwards a follower's entry to the leader); linearizable reads
wait for a committed barrier, then read local state; stale reads read local state at once.
The API is documented in ``openapi.yaml`` beside this file."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from synapse.api import integrity, tasks
from synapse.api.common import (
    MAX_BODY,
    NODE_KEY,
    ApiError,
    check_command,
    checked_result,
    encode_value,
    error_body,
    error_response,
    identified,
    int_field,
    int_query,
    json_body,
    node_of,
    propose,
    request_id,
)
from synapse.cluster.committer import ProposalError
from synapse.config import ConfigError, check_node_id, split_address
from synapse.state.commands import MAX_KEY_BYTES, CommandError

if TYPE_CHECKING:
    from synapse.node import Node

MAX_SCAN_LIMIT = 10_000
_PUBLIC = {"/health"}
# Answered from this node's state: refused while it is known to differ from the agreed one.
_STATE_PATHS = ("/v1/kv", "/v1/txn", "/v1/tasks", "/v1/workers")
METRICS_KEY: web.AppKey["Metrics"] = web.AppKey("metrics")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("synapse_http_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "synapse_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.applied_index = Gauge("synapse_applied_index", "Last applied log index", registry=self.registry)
        self.commit_index = Gauge("synapse_commit_index", "Raft commit index", registry=self.registry)
        self.term = Gauge("synapse_raft_term", "Raft term", registry=self.registry)
        self.is_leader = Gauge("synapse_is_leader", "1 if this node is the Raft leader", registry=self.registry)
        self.entries = Gauge("synapse_entries_proposed", "Log entries proposed by this node", registry=self.registry)
        self.commands = Gauge("synapse_commands_proposed", "Commands proposed by this node", registry=self.registry)
        self.serving = Gauge("synapse_integrity_serving", "1 unless this node's state diverged from the agreed one", registry=self.registry)
        self.repairs = Gauge("synapse_repairs", "Repairs completed by this node since it started", registry=self.registry)
        self.catchup_sent = Gauge("synapse_catchup_bytes_sent", "Bytes of catch-up containers sent to lagging followers", registry=self.registry)
        self.catchup_received = Gauge("synapse_catchup_bytes_received", "Bytes of catch-up containers received from the leader", registry=self.registry)
        self.catchup_probe = Gauge("synapse_catchup_probe_bytes", "Bytes exchanged with followers to plan catch-ups", ["direction"], registry=self.registry)
        self.repair_bytes = Gauge("synapse_repair_bytes", "Bytes received by the last repair", registry=self.registry)
        # The labelled children, looked up once: labels() takes a lock and builds a key per call.
        self._counted: dict[tuple[str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        counter = self._counted.get((route, status))
        if counter is None:
            counter = self._counted[(route, status)] = self.requests.labels(route, str(status))
        timer = self._timed.get(route)
        if timer is None:
            timer = self._timed[route] = self.latency.labels(route)
        counter.inc()
        timer.observe(seconds)


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    node = node_of(request)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    try:
        if request.path not in _PUBLIC:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token or not node.check_token(token.strip()):
                raise ApiError(401, "unauthorized", "send Authorization: Bearer <token> (the root token printed at first start)")
        if request.path.startswith(_STATE_PATHS):
            check_serving(node)
        response = await handler(request)
    except (ApiError, ProposalError) as e:
        status, body = failure(e)
        response = web.json_response(body, status=status)
    except web.HTTPException as e:  # aiohttp's own (404 route, 405, 413 body too large)
        response = error_response(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
    request.app[METRICS_KEY].observe(route, response.status, time.perf_counter() - started)
    return response


def check_serving(node: "Node") -> None:
    """Requests answered from this node's state are refused while it is known to differ."""
    if not node.serving:
        status = node.integrity.status()
        raise ApiError(503, "diverged", f"this node's state differs from the one agreed at checkpoint "
                       f"{status['diverged_at']}; it is repairing itself ({status['service']}) — send the "
                       "request to another node", retry=True)


def failure(e: ApiError | ProposalError) -> tuple[int, dict]:
    """The HTTP status and JSON body of a request that failed with ``e``."""
    if isinstance(e, ApiError):
        return e.status, error_body(e.error, str(e), **e.extra)
    if e.reason == "bad_command":  # refused before proposing: the request, not the cluster
        return 400, error_body("bad_request", str(e))
    return 503, error_body("unavailable", str(e), reason=e.reason, outcome_unknown=e.outcome_unknown, retry=True)


async def _consistent(request: web.Request) -> None:
    await wait_consistent(node_of(request), request.query.get("consistency"))


async def wait_consistent(node: "Node", consistency: str | None) -> None:
    if consistency is None or consistency == "linearizable":
        await node.read_barrier()
    elif consistency != "stale":
        raise ApiError(400, "bad_request", f"consistency must be 'linearizable' (default) or 'stale', got {consistency!r}")


def _key(request: web.Request) -> str:
    return check_key_size(request.match_info["key"])


def check_key_size(key: str) -> str:
    size = len(key.encode())
    if size > MAX_KEY_BYTES:
        raise ApiError(413, "too_large", f"key: {size} bytes exceeds the {MAX_KEY_BYTES}-byte limit; use a shorter key")
    return key


def _record_json(record) -> dict:
    return {
        "key": record.key,
        "value": json.loads(record.value),
        "version": record.version,
        "index": record.mod_index,
        "create_index": record.create_index,
    }


# --- handlers ---


PUT_FIELDS = {"value", "if_version"}


async def put_kv(request: web.Request) -> web.Response:
    key = _key(request)
    body = await json_body(request, PUT_FIELDS, {"value"})
    return web.json_response(await put_value(node_of(request), key, body, request_id(request)))


async def put_value(node: "Node", key: str, body: dict, rid: str) -> dict:
    """PUT /v1/kv/{key} once the request is read."""
    command, size_hint = put_command(key, body, rid)
    return put_answer(key, await node.propose(command, size_hint))


# PUT in two halves, for the HTTP front (synapse/api/front.py), which answers without a task.
def put_command(key: str, body: dict, rid: str) -> tuple[dict, int]:
    """The put command of a PUT body (checked: ApiError if bad), and its size hint."""
    value = encode_value("value", body["value"])
    command = {"op": "put", "key": key, "value": value}
    if_version = int_field(body, "if_version")
    if if_version is not None:
        command["if_version"] = if_version
    command = identified(command, rid)
    check_command(command)
    return command, len(value) + len(key) + 64


def put_answer(key: str, result: dict) -> dict:
    result = checked_result(result, ("version", "index"))
    return {"key": key, "version": result["version"], "index": result["index"]}


async def get_kv(request: web.Request) -> web.Response:
    key = _key(request)
    await _consistent(request)
    return web.json_response(read_value(node_of(request), key))


def read_value(node: "Node", key: str) -> dict:
    """GET /v1/kv/{key} once the read may be answered from local state."""
    record = node.read(lambda p: p.get(key))
    if record is None:
        raise ApiError(404, "not_found", f"key {key!r} does not exist")
    return _record_json(record)


async def delete_kv(request: web.Request) -> web.Response:
    key = _key(request)
    command = {"op": "delete", "key": key}
    if_version = int_query(request, "if_version", 0)
    if if_version is not None:
        command["if_version"] = if_version
    result = await propose(request, identified(command, request_id(request)), len(key) + 64, fields=("deleted", "index"))
    return web.json_response({"key": key, "deleted": result["deleted"], "index": result["index"]})


async def scan_kv(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    start_after = request.query.get("start_after")
    limit = int_query(request, "limit", 1, MAX_SCAN_LIMIT) or 1000
    await _consistent(request)
    try:
        records = node_of(request).read(lambda p: p.scan(prefix, limit + 1, start_after))
    except CommandError as e:  # a prefix that is not UTF-8 text
        raise ApiError(400, "bad_request", str(e)) from None
    more = len(records) > limit
    records = records[:limit]
    return web.json_response(
        {"items": [_record_json(r) for r in records], "next_start_after": records[-1].key if more else None}
    )


_TXN_OPS = {"put": {"op", "key", "value"}, "delete": {"op", "key"}, "get": {"op", "key"}}


def _txn_ops(branch: str, raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, "bad_request", f"{branch} must be a list of operations")
    ops = []
    for i, op in enumerate(raw):
        where = f"{branch}[{i}]"
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or op["op"] not in _TXN_OPS:
            raise ApiError(400, "bad_request", f"{where} must be an object with op 'put', 'delete' or 'get'")
        unknown = sorted(set(op) - _TXN_OPS[op["op"]])
        if unknown or not isinstance(op.get("key"), str):
            raise ApiError(400, "bad_request", f"{where}: needs a string key; unknown field(s): {', '.join(unknown) or 'none'}")
        out = {"op": op["op"], "key": op["key"]}
        if op["op"] == "put":
            if "value" not in op:
                raise ApiError(400, "bad_request", f"{where}: a put needs a value")
            out["value"] = encode_value(f"{where}.value", op["value"])
        ops.append(out)
    return ops


def _txn_conds(raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, "bad_request", "if must be a list of conditions")
    conds = []
    for i, c in enumerate(raw):
        where = f"if[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("key"), str):
            raise ApiError(400, "bad_request", f"{where} must be an object with a string key")
        tests = sorted(set(c) - {"key"})
        if len(tests) != 1 or tests[0] not in ("version", "value", "exists"):
            raise ApiError(400, "bad_request", f"{where} must have exactly one of version, value, exists")
        test = tests[0]
        if test == "version":
            conds.append({"key": c["key"], "version": int_field(c, "version")})
        elif test == "exists":
            if not isinstance(c["exists"], bool):
                raise ApiError(400, "bad_request", f"{where}.exists must be true or false")
            conds.append({"key": c["key"], "exists": c["exists"]})
        else:
            conds.append({"key": c["key"], "value": encode_value(f"{where}.value", c["value"])})
    return conds


async def txn(request: web.Request) -> web.Response:
    body = await json_body(request, {"if", "then", "else"})
    command = identified({
        "op": "txn",
        "if": _txn_conds(body.get("if")),
        "then": _txn_ops("then", body.get("then")),
        "else": _txn_ops("else", body.get("else")),
    }, request_id(request))
    size = sum(len(o.get("value", b"")) + len(o["key"]) + 32 for o in command["then"] + command["else"])
    result = await propose(request, command, size + 256, fields=("succeeded", "results", "index"))
    results = []
    for r in result["results"]:
        r = dict(r)
        if r.get("op") == "get":
            r["value"] = json.loads(r["value"]) if r.get("value") is not None else None
        results.append(r)
    return web.json_response({"succeeded": result["succeeded"], "results": results, "index": result["index"]})


def cluster_status(node: "Node") -> dict:
    raft = node.raft.status()
    applied_index, digest = node.raft.applied()
    registered = node.read(lambda p: p.nodes())
    by_raft = {info["raft"]: (node_id, info) for node_id, info in registered.items()}
    leader_addr = raft["leader_raft_addr"]
    members = []
    for addr in sorted({raft["raft_addr"], *raft["peers"]}):
        node_id, info = by_raft.get(addr, (None, {}))
        members.append({
            "node_id": node_id,
            "raft": addr,
            "api": info.get("api"),
            "leader": addr == leader_addr,
            "self": addr == raft["raft_addr"],
            "connected": True if addr == raft["raft_addr"] else raft["connected"].get(addr, False),
        })
    checkpoint = integrity.checkpoint_status(node)
    latest = (checkpoint.get("latest") or {}).get("nodes", {})
    for member in members:
        report = latest.get(member["node_id"])
        member["checkpoint_digest"] = report["digest"] if report else None
        member["checkpoint_agrees"] = report["agrees"] if report else None
    leader = by_raft.get(leader_addr, (None, {}))
    return {
        "node_id": node.config.node_id,
        "leader": leader[0],
        "leader_api": leader[1].get("api"),
        "leader_raft": leader_addr,
        "is_leader": raft["is_leader"],
        "term": raft["term"],
        "commit_index": raft["commit_index"],
        "applied_index": applied_index,
        "state_hash": digest.hex(),
        "members": members,
        "workers": tasks.workers_view(node),
        "checkpoint": checkpoint,
        "catchup": node.catchup.stats.as_dict() if node.catchup is not None else None,
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(cluster_status(node_of(request)))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node_id": node_of(request).config.node_id})


async def ready(request: web.Request) -> web.Response:
    node = node_of(request)
    raft = node.raft.status()
    applied, _ = node.raft.applied()
    if raft["leader_raft_addr"] is None:
        raise ApiError(503, "not_ready", "no leader is known yet")
    if applied < raft["commit_index"]:
        raise ApiError(503, "not_ready", f"catching up: applied {applied} of {raft['commit_index']}")
    if not node.serving:
        raise ApiError(503, "not_ready", f"diverged from the agreed state; {node.integrity.status()['service']}")
    return web.json_response({"status": "ready", "applied_index": applied, "leader": raft["leader_raft_addr"]})


async def metrics(request: web.Request) -> web.Response:
    node, m = node_of(request), request.app[METRICS_KEY]
    raft = node.raft.status()
    m.applied_index.set(node.raft.applied()[0])
    m.commit_index.set(raft["commit_index"])
    m.term.set(raft["term"])
    m.is_leader.set(1 if raft["is_leader"] else 0)
    m.entries.set(node.committer.entries_proposed)
    m.commands.set(node.committer.commands_proposed)
    m.serving.set(1 if node.serving else 0)
    if node.catchup is not None:
        st = node.catchup.stats
        m.catchup_sent.set(st.container_bytes_sent)
        m.catchup_received.set(st.container_bytes_received)
        m.catchup_probe.labels("sent").set(st.probe_bytes_sent)
        m.catchup_probe.labels("received").set(st.probe_bytes_received)
    if node.repairer is not None:
        m.repairs.set(node.repairer.repairs)
        m.repair_bytes.set(node.repairer.last.bytes_received if node.repairer.last else 0)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- membership ---


async def _raft_change(node: "Node", start, what: str) -> int:
    """Starts a PySyncObj membership or leadership change (``start(callback)``) and returns its
    error code (0: done). No answer within the request timeout is a 503, as for a write."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done(result, err):  # PySyncObj's tick thread
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))

    start(done)
    try:
        return await asyncio.wait_for(fut, node.config.request_timeout)
    except asyncio.TimeoutError:
        raise ApiError(503, "unavailable", f"{what}: no answer from the cluster within {node.config.request_timeout:g} s "
                       "(no leader or no quorum?); the change may still happen — see GET /v1/cluster/status, then "
                       "retry", reason="timeout", outcome_unknown=True, retry=True) from None


def _address(body: dict, name: str) -> str:
    value = body[name]
    if not isinstance(value, str) or not value.isascii():
        raise ApiError(400, "bad_request", f"{name}: expected \"HOST:PORT\" text, e.g. \"10.0.0.5:7071\"")
    try:
        split_address(name, value)
    except ConfigError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    return value


def _voters(node: "Node") -> set[str]:
    """The Raft configuration as this node applies it (it changes when appended, so a
    follower's view can run ahead of a commit by one change)."""
    raft = node.raft.status()
    return {raft["raft_addr"], *raft["peers"]}


async def add_member(request: web.Request) -> web.Response:
    node = node_of(request)
    rid = request_id(request)  # checked before anything changes
    body = await json_body(request, {"node_id", "raft", "api"}, {"node_id", "raft", "api"})
    try:
        check_node_id("node_id", body["node_id"])
    except ConfigError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    _address(body, "raft")
    _address(body, "api")
    # Idempotent: a retry after a timed-out add (the voter is in already) only registers it.
    if body["raft"] not in _voters(node):
        err = await _raft_change(node, lambda done: node.raft.addNodeToCluster(body["raft"], callback=done),
                                 f"adding {body['raft']}")
        if err != 0:
            raise ApiError(409, "membership_change_failed", f"adding {body['raft']} failed (PySyncObj reason {err}); only one change at a time, on a cluster with a leader")
    await propose(request, identified({"op": "register_node", "node_id": body["node_id"], "raft": body["raft"],
                                       "api": body["api"]}, rid), 256, fields=("index",))
    return web.json_response({"added": body["node_id"]})


async def remove_member(request: web.Request) -> web.Response:
    node = node_of(request)
    node_id = request.match_info["node_id"]
    rid = request_id(request)  # checked before anything changes
    info = node.read(lambda p: p.nodes().get(node_id))
    if info is None:
        raise ApiError(404, "not_found", f"no registered node {node_id!r}; see GET /v1/cluster/status")
    if node_id == node.config.node_id:
        # The node being removed stops hearing the outcome of its own removal.
        status = cluster_status(node)
        raise ApiError(409, "send_elsewhere", "this node is the one being removed; send the request to another node",
                       leader=status["leader"], leader_api=status["leader_api"])
    # Idempotent: a retry after a timed-out removal (the voter is out already) only unregisters it.
    if info["raft"] in _voters(node):
        err = await _raft_change(node, lambda done: node.raft.removeNodeFromCluster(info["raft"], callback=done),
                                 f"removing {node_id}")
        if err != 0:
            raise ApiError(409, "membership_change_failed", f"removing {node_id} failed (PySyncObj reason {err})")
    await propose(request, identified({"op": "unregister_node", "node_id": node_id}, rid), 128,
                  fields=("index",))
    return web.json_response({"removed": node_id})


async def transfer_leader(request: web.Request) -> web.Response:
    node = node_of(request)
    body = await json_body(request, {"node_id"}, optional=True)
    target = None
    if body.get("node_id") is not None and not isinstance(body["node_id"], str):
        raise ApiError(400, "bad_request", "node_id: expected a node id (text) or null for the most caught-up follower")
    if body.get("node_id") is not None:
        info = node.read(lambda p: p.nodes().get(body["node_id"]))
        if info is None:
            raise ApiError(404, "not_found", f"no registered node {body['node_id']!r}")
        target = info["raft"]
    status = cluster_status(node)
    if not status["is_leader"]:
        raise ApiError(421, "not_leader", "send this to the leader", leader=status["leader"], leader_api=status["leader_api"])
    err = await _raft_change(node, lambda done: node.raft.transferLeadership(target, callback=done),
                             "transferring leadership")
    if err != 0:
        raise ApiError(409, "transfer_denied", "the target is not connected or not fully caught up; try again")
    return web.json_response({"transferring_to": body.get("node_id") or "most caught-up follower"})


def make_app(node: "Node") -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[NODE_KEY] = node
    app[METRICS_KEY] = Metrics()
    app.router.add_put("/v1/kv/{key:.+}", put_kv)
    app.router.add_get("/v1/kv/{key:.+}", get_kv)
    app.router.add_delete("/v1/kv/{key:.+}", delete_kv)
    app.router.add_get("/v1/kv", scan_kv)
    app.router.add_post("/v1/txn", txn)
    app.router.add_get("/v1/cluster/status", status)
    app.router.add_post("/v1/cluster/members", add_member)
    app.router.add_delete("/v1/cluster/members/{node_id}", remove_member)
    app.router.add_post("/v1/cluster/transfer-leader", transfer_leader)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    integrity.add_routes(app)
    tasks.add_routes(app)
    return app

