"""HTTP endpoints for checkpoints, peer repair and fault injection (synapse/integrity/)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from synapse import _core
from synapse.api.common import ApiError, encode_value, int_query, json_body, node_of
from synapse.integrity.repair import RepairError, b64
from synapse.state import keys
from synapse.state.commands import CommandError, check_key, check_label

MAX_CHECKPOINT_LIST = 256
# A peer asks for at most this many buckets (or tree nodes) per request.
MAX_BUCKETS_PER_REQUEST = 8192


def checkpoint_json(index: int, record: dict, registered: dict) -> dict:
    agreed = record["agreed"]
    nodes = {}
    for node_id, report in record["reports"].items():
        nodes[node_id] = {
            "digest": report[0].hex(),
            "chain": report[1].hex(),
            "agrees": None if agreed is None else report == agreed,
        }
    return {
        "index": index,
        "label": record["label"],
        "created_ms": record["created_ms"],
        "agreed": agreed is not None,
        "digest": agreed[0].hex() if agreed else None,
        "chain": agreed[1].hex() if agreed else None,
        "agreed_index": record["agreed_index"],
        "nodes": nodes,
        "missing": sorted(set(registered) - set(record["reports"])),
    }


def checkpoint_status(node) -> dict:
    """The newest checkpoint as /v1/cluster/status shows it, with this node's integrity state."""
    latest, registered = node.read(lambda p: (p.checkpoints(1), p.nodes()))
    status = dict(node.integrity.status())
    status["latest"] = checkpoint_json(*latest[0], registered) if latest else None
    if node.repairer is not None and node.repairer.last is not None:
        status["repair"] = node.repairer.last.as_dict()
        status["repairs"] = node.repairer.repairs
    return status


async def list_checkpoints(request: web.Request) -> web.Response:
    node = node_of(request)
    limit = int_query(request, "limit", 1, MAX_CHECKPOINT_LIST) or 20
    rows, registered = node.read(lambda p: (p.checkpoints(limit), p.nodes()))
    return web.json_response({"checkpoints": [checkpoint_json(i, r, registered) for i, r in rows]})


async def create_checkpoint(request: web.Request) -> web.Response:
    """Proposes a checkpoint; with ``"wait": true`` answers once a majority agreed on it."""
    node = node_of(request)
    body = await json_body(request, {"label", "wait"})
    label = body.get("label")
    if label is not None:
        try:
            check_label(label)
        except CommandError as e:
            raise ApiError(400, "bad_request", str(e)) from None
    if not isinstance(body.get("wait", False), bool):
        raise ApiError(400, "bad_request", "wait must be true or false")
    result = await node.integrity.propose_checkpoint(label)
    index = result["checkpoint"]
    if body.get("wait"):
        deadline = time.monotonic() + node.config.request_timeout
        while True:
            record = node.read(lambda p: p.checkpoint(index))
            if record is not None and record["agreed"] is not None:
                break
            if time.monotonic() > deadline:
                raise ApiError(504, "not_agreed", f"checkpoint {index} was made but no majority agreed within "
                               f"{node.config.request_timeout:g} s; see GET /v1/checkpoints", index=index)
            await asyncio.sleep(0.02)
    record, registered = node.read(lambda p: (p.checkpoint(index), p.nodes()))
    return web.json_response(checkpoint_json(index, record, registered))


# --- repair: the serving side (a diverged peer calls these) ---


def _session(request: web.Request) -> _core.FrozenState:
    try:
        return node_of(request).repair_sessions.get(request.match_info["session"])
    except KeyError:
        raise ApiError(404, "not_found", "no such repair session (expired?); open a new one") from None


def _int_list(body: dict, name: str, limit: int, maximum: int) -> list[int]:
    values = body.get(name)
    if (
        not isinstance(values, list) or len(values) > limit
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < maximum for v in values)
    ):
        raise ApiError(400, "bad_request", f"{name} must be a list of at most {limit} integers in 0..{maximum - 1}")
    return values


async def open_repair_session(request: web.Request) -> web.Response:
    node = node_of(request)
    body = await json_body(request, {"index"}, {"index"})
    index = body["index"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ApiError(400, "bad_request", "index must be a log index (an integer >= 0)")
    try:
        sid, at, digest = await node.repair_sessions.open(index)
    except ValueError as e:
        raise ApiError(409, "passed", str(e)) from None
    except RepairError as e:
        raise ApiError(503, "unavailable", str(e)) from None
    return web.json_response({"session": sid, "index": at, "digest": b64(digest)})


async def repair_children(request: web.Request) -> web.Response:
    frozen = _session(request)
    body = await json_body(request, {"level", "parents"}, {"level", "parents"})
    level = body["level"]
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < _core.TREE_DEPTH:
        raise ApiError(400, "bad_request", f"level must be 0 to {_core.TREE_DEPTH - 1}")
    parents = _int_list(body, "parents", MAX_BUCKETS_PER_REQUEST, _core.FANOUT**level)
    return web.json_response({"digests": b64(frozen.children_digests(level, parents))})


async def repair_buckets(request: web.Request) -> web.Response:
    frozen = _session(request)
    body = await json_body(request, {"buckets"}, {"buckets"})
    buckets = _int_list(body, "buckets", MAX_BUCKETS_PER_REQUEST, _core.BUCKETS)
    entries = frozen.bucket_entries(buckets)
    return web.json_response({"entries": [[b64(k), b64(v)] for k, v in entries]})


async def close_repair_session(request: web.Request) -> web.Response:
    node_of(request).repair_sessions.close(request.match_info["session"])
    return web.json_response({"closed": True})


# --- fault injection ---


async def corrupt(request: web.Request) -> web.Response:
    """Changes one kv key in this node's state only, behind the log's back."""
    node = node_of(request)
    if not node.config.debug_fault_injection:
        raise ApiError(403, "forbidden", "fault injection is off on this node; start it with "
                       "--debug-fault-injection (debug_fault_injection = true) to allow it — tests only")
    body = await json_body(request, {"key", "value", "delete"}, {"key"})
    key = body["key"]
    try:
        check_key(key)
    except CommandError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    if body.get("delete"):
        op = (keys.kv_key(key), None)
    else:
        value = encode_value("value", body.get("value", "corrupted"))
        current = node.read(lambda p: p.get(key))
        version, created, modified = (current.version, current.create_index, current.mod_index) if current else (1, 0, 0)
        op = (keys.kv_key(key), keys.encode_kv(value, version, created, modified))
    digest = node.raft.inject_fault([op])
    return web.json_response({"key": key, "node_id": node.config.node_id, "state_hash": digest.hex()})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/checkpoints", list_checkpoints)
    app.router.add_post("/v1/checkpoints", create_checkpoint)
    app.router.add_post("/v1/internal/repair/sessions", open_repair_session)
    app.router.add_post("/v1/internal/repair/sessions/{session}/children", repair_children)
    app.router.add_post("/v1/internal/repair/sessions/{session}/buckets", repair_buckets)
    app.router.add_delete("/v1/internal/repair/sessions/{session}", close_repair_session)
    app.router.add_post("/v1/debug/corrupt", corrupt)
