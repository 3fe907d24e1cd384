"""The HTTP API (aiohttp). Any node serves any request: writes become commands that the group
committer proposes (PySyncObj forwards a follower's entry to the leader); linearizable reads
wait for a committed barrier, then read local state; stale reads read local state at once.
The API is documented in ``openapi.yaml`` beside this file."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from synapse.cluster.committer import ProposalError
from synapse.config import ConfigError, check_node_id, split_address
from synapse.state.commands import MAX_KEY_BYTES, MAX_VALUE_BYTES, CommandError, LimitError, validate_command

if TYPE_CHECKING:
    from synapse.node import Node

REQUEST_ID_HEADER = "X-Request-Id"
# A value may be up to 1 MiB of JSON; leave room for the envelope, refuse the rest early.
MAX_BODY = MAX_VALUE_BYTES + 64 * 1024
MAX_SCAN_LIMIT = 10_000
_PUBLIC = {"/health"}
NODE_KEY: web.AppKey["Node"] = web.AppKey("node")
METRICS_KEY: web.AppKey["Metrics"] = web.AppKey("metrics")


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.error, self.extra = status, error, extra


def _error_response(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status)


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


def _node(request: web.Request) -> "Node":
    return request.app[NODE_KEY]


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    node = _node(request)
    metrics = request.app[METRICS_KEY]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    try:
        if request.path not in _PUBLIC:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token or not node.check_token(token.strip()):
                raise ApiError(401, "unauthorized", "send Authorization: Bearer <token> (the root token printed at first start)")
        response = await handler(request)
    except ApiError as e:
        response = _error_response(e.status, e.error, str(e), **e.extra)
    except ProposalError as e:
        response = _error_response(
            503, "unavailable", str(e), reason=e.reason, outcome_unknown=e.outcome_unknown, retry=True
        )
    except web.HTTPException as e:  # aiohttp's own (404 route, 405, 413 body too large)
        response = _error_response(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
    metrics.requests.labels(route, str(response.status)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - started)
    return response


async def _json_body(request: web.Request, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "too_large", f"the body is {request.content_length} bytes; the limit is {MAX_BODY}")
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(body))
    if missing:
        raise ApiError(400, "bad_request", f"missing field(s) {', '.join(missing)}")
    return body


def _encode_value(field: str, value: Any) -> bytes:
    # Canonical JSON text, produced once by the proposer: every node stores the same bytes.
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as e:
        raise ApiError(400, "bad_request", f"{field}: {e}") from None
    if len(encoded) > MAX_VALUE_BYTES:
        raise ApiError(413, "too_large", f"{field}: {len(encoded)} bytes of JSON exceeds the {MAX_VALUE_BYTES}-byte limit")
    return encoded


def _int_field(body: dict, name: str, minimum: int = 0) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ApiError(400, "bad_request", f"{name} must be an integer >= {minimum}, got {json.dumps(v)}")
    return v


def _int_query(request: web.Request, name: str, minimum: int, maximum: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ApiError(400, "bad_request", f"query parameter {name} must be an integer >= {minimum}{bound}, got {raw!r}")
    return int(raw)


def _request_id(request: web.Request) -> str:
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is None:
        # Without a client id a retry cannot be recognized; our clients always send one.
        return "srv-" + uuid.uuid4().hex
    if not 1 <= len(rid) <= 128:
        raise ApiError(400, "bad_request", f"{REQUEST_ID_HEADER} must be 1-128 characters")
    return rid


async def _propose(request: web.Request, command: dict, size_hint: int) -> dict:
    try:
        validate_command(command)
    except LimitError as e:
        raise ApiError(413, "too_large", str(e)) from None
    except CommandError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    result = await _node(request).propose(command, size_hint)
    if not result.get("ok"):
        if result.get("error") == "conflict":
            raise ApiError(409, "conflict", result.get("message", "the condition failed"),
                           key=result.get("key"), current_version=result.get("current_version", 0))
        raise ApiError(400 if result.get("error") == "bad_command" else 500, result.get("error", "internal"),
                       result.get("message", "the command failed"))
    return result


async def _consistent(request: web.Request) -> None:
    consistency = request.query.get("consistency", "linearizable")
    if consistency == "linearizable":
        await _node(request).read_barrier()
    elif consistency != "stale":
        raise ApiError(400, "bad_request", f"consistency must be 'linearizable' (default) or 'stale', got {consistency!r}")


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
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


async def put_kv(request: web.Request) -> web.Response:
    key = _key(request)
    body = await _json_body(request, {"value", "if_version"}, {"value"})
    value = _encode_value("value", body["value"])
    command = {"op": "put", "key": key, "value": value, "rid": _request_id(request)}
    if_version = _int_field(body, "if_version")
    if if_version is not None:
        command["if_version"] = if_version
    result = await _propose(request, command, len(value) + len(key) + 64)
    return web.json_response({"key": key, "version": result["version"], "index": result["index"]})


async def get_kv(request: web.Request) -> web.Response:
    key = _key(request)
    await _consistent(request)
    record = _node(request).read(lambda p: p.get(key))
    if record is None:
        raise ApiError(404, "not_found", f"key {key!r} does not exist")
    return web.json_response(_record_json(record))


async def delete_kv(request: web.Request) -> web.Response:
    key = _key(request)
    command = {"op": "delete", "key": key, "rid": _request_id(request)}
    if_version = _int_query(request, "if_version", 0)
    if if_version is not None:
        command["if_version"] = if_version
    result = await _propose(request, command, len(key) + 64)
    return web.json_response({"key": key, "deleted": result["deleted"], "index": result["index"]})


async def scan_kv(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    start_after = request.query.get("start_after")
    limit = _int_query(request, "limit", 1, MAX_SCAN_LIMIT) or 1000
    await _consistent(request)
    records = _node(request).read(lambda p: p.scan(prefix, limit + 1, start_after))
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
        if not isinstance(op, dict) or op.get("op") not in _TXN_OPS:
            raise ApiError(400, "bad_request", f"{where} must be an object with op 'put', 'delete' or 'get'")
        unknown = sorted(set(op) - _TXN_OPS[op["op"]])
        if unknown or not isinstance(op.get("key"), str):
            raise ApiError(400, "bad_request", f"{where}: needs a string key; unknown field(s): {', '.join(unknown) or 'none'}")
        out = {"op": op["op"], "key": op["key"]}
        if op["op"] == "put":
            if "value" not in op:
                raise ApiError(400, "bad_request", f"{where}: a put needs a value")
            out["value"] = _encode_value(f"{where}.value", op["value"])
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
            conds.append({"key": c["key"], "version": _int_field(c, "version")})
        elif test == "exists":
            if not isinstance(c["exists"], bool):
                raise ApiError(400, "bad_request", f"{where}.exists must be true or false")
            conds.append({"key": c["key"], "exists": c["exists"]})
        else:
            conds.append({"key": c["key"], "value": _encode_value(f"{where}.value", c["value"])})
    return conds


async def txn(request: web.Request) -> web.Response:
    body = await _json_body(request, {"if", "then", "else"})
    command = {
        "op": "txn",
        "if": _txn_conds(body.get("if")),
        "then": _txn_ops("then", body.get("then")),
        "else": _txn_ops("else", body.get("else")),
        "rid": _request_id(request),
    }
    size = sum(len(o.get("value", b"")) + len(o["key"]) + 32 for o in command["then"] + command["else"])
    result = await _propose(request, command, size + 256)
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
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(cluster_status(_node(request)))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node_id": _node(request).config.node_id})


async def ready(request: web.Request) -> web.Response:
    node = _node(request)
    raft = node.raft.status()
    applied, _ = node.raft.applied()
    if raft["leader_raft_addr"] is None:
        raise ApiError(503, "not_ready", "no leader is known yet")
    if applied < raft["commit_index"]:
        raise ApiError(503, "not_ready", f"catching up: applied {applied} of {raft['commit_index']}")
    return web.json_response({"status": "ready", "applied_index": applied, "leader": raft["leader_raft_addr"]})


async def metrics(request: web.Request) -> web.Response:
    node, m = _node(request), request.app[METRICS_KEY]
    raft = node.raft.status()
    m.applied_index.set(node.raft.applied()[0])
    m.commit_index.set(raft["commit_index"])
    m.term.set(raft["term"])
    m.is_leader.set(1 if raft["is_leader"] else 0)
    m.entries.set(node.committer.entries_proposed)
    m.commands.set(node.committer.commands_proposed)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- membership ---


def _raft_callback(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future, Any]:
    fut = loop.create_future()

    def done(result, err):  # PySyncObj's tick thread
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))

    return fut, done


async def add_member(request: web.Request) -> web.Response:
    node = _node(request)
    body = await _json_body(request, {"node_id", "raft", "api"}, {"node_id", "raft", "api"})
    try:
        check_node_id("node_id", body["node_id"])
        split_address("raft", str(body["raft"]))
        split_address("api", str(body["api"]))
    except ConfigError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    fut, done = _raft_callback(asyncio.get_running_loop())
    node.raft.addNodeToCluster(body["raft"], callback=done)
    err = await asyncio.wait_for(fut, node.config.request_timeout)
    if err != 0:
        raise ApiError(409, "membership_change_failed", f"adding {body['raft']} failed (PySyncObj reason {err}); only one change at a time, on a cluster with a leader")
    await _propose(request, {"op": "register_node", "node_id": body["node_id"], "raft": body["raft"], "api": body["api"], "rid": _request_id(request)}, 256)
    return web.json_response({"added": body["node_id"]})


async def remove_member(request: web.Request) -> web.Response:
    node = _node(request)
    node_id = request.match_info["node_id"]
    info = node.read(lambda p: p.nodes().get(node_id))
    if info is None:
        raise ApiError(404, "not_found", f"no registered node {node_id!r}; see GET /v1/cluster/status")
    if node_id == node.config.node_id:
        # The node being removed stops hearing the outcome of its own removal.
        status = cluster_status(node)
        raise ApiError(409, "send_elsewhere", "this node is the one being removed; send the request to another node",
                       leader=status["leader"], leader_api=status["leader_api"])
    fut, done = _raft_callback(asyncio.get_running_loop())
    node.raft.removeNodeFromCluster(info["raft"], callback=done)
    err = await asyncio.wait_for(fut, node.config.request_timeout)
    if err != 0:
        raise ApiError(409, "membership_change_failed", f"removing {node_id} failed (PySyncObj reason {err})")
    await _propose(request, {"op": "unregister_node", "node_id": node_id, "rid": _request_id(request)}, 128)
    return web.json_response({"removed": node_id})


async def transfer_leader(request: web.Request) -> web.Response:
    node = _node(request)
    body = await _json_body(request, {"node_id"})
    target = None
    if body.get("node_id") is not None:
        info = node.read(lambda p: p.nodes().get(body["node_id"]))
        if info is None:
            raise ApiError(404, "not_found", f"no registered node {body['node_id']!r}")
        target = info["raft"]
    status = cluster_status(node)
    if not status["is_leader"]:
        raise ApiError(421, "not_leader", "send this to the leader", leader=status["leader"], leader_api=status["leader_api"])
    fut, done = _raft_callback(asyncio.get_running_loop())
    node.raft.transferLeadership(target, callback=done)
    err = await asyncio.wait_for(fut, node.config.request_timeout)
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
    return app


async def start_api(node: "Node") -> web.AppRunner:
    runner = web.AppRunner(make_app(node), access_log=None)
    await runner.setup()
    host, port = node.config.api_host_port()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
