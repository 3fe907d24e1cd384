"""HTTP endpoints for checkpoints, peer repair and fault injection (synapse/integrity/)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import msgpack
from aiohttp import web

from synapse import _core
from synapse.api.common import (
    ApiError,
    encode_value,
    identified,
    int_query,
    json_body,
    propose_alone,
    request_id,
)
from synapse.api.context import ApiContext, context_of
from synapse.integrity import backup
from synapse.integrity.catchup import SHORT, element_shorts
from synapse.integrity.repair import RepairBusy, RepairError, b64
from synapse.state import keys
from synapse.state.commands import CommandError, check_key, check_label
from synapse.state.memory import check_namespace, check_record_id
from synapse.state.memory import record_key as memory_record_key
from synapse.state.validation import MAX_UINT64

MAX_CHECKPOINT_LIST = 256
# A peer asks for at most this many buckets (or tree nodes) per request.
MAX_BUCKETS_PER_REQUEST = 8192
# A repairing peer asks to freeze a few entries past the newer of the two nodes' applied
# indexes (synapse/integrity/repair.py); an index this far past this node's commit index is
# not reached within the freeze timeout (10 s) at the rates a cluster appends entries (a
# few thousand a second at most), so it is refused at once instead of after the wait.
MAX_FREEZE_AHEAD = 10_000


def checkpoint_json(index: int, record: dict, registered: dict, retained: set[int] | None = None) -> dict:
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
        "retained_here": retained is not None and index in retained,
        "created_ms": record["created_ms"],
        "agreed": agreed is not None,
        "digest": agreed[0].hex() if agreed else None,
        "chain": agreed[1].hex() if agreed else None,
        "agreed_index": record["agreed_index"],
        "nodes": nodes,
        "missing": sorted(set(registered) - set(record["reports"])),
    }


def checkpoint_status(ctx: ApiContext) -> dict:
    """The newest checkpoint as /v1/cluster/status shows it, with this node's integrity state."""
    latest, registered = ctx.cluster.read(lambda p: (p.checkpoints(1), p.nodes()))
    status = dict(ctx.integrity.status())
    status["latest"] = checkpoint_json(*latest[0], registered) if latest else None
    if ctx.repairer.last is not None:
        status["repair"] = ctx.repairer.last.as_dict()
        status["repairs"] = ctx.repairer.repairs
    return status


async def list_checkpoints(request: web.Request) -> web.Response:
    ctx = context_of(request)
    limit = int_query(request, "limit", 1, MAX_CHECKPOINT_LIST) or 20
    rows, registered = ctx.cluster.read(lambda p: (p.checkpoints(limit), p.nodes()))
    retained = set(ctx.snapshots.retained())
    return web.json_response({"checkpoints": [checkpoint_json(i, r, registered, retained) for i, r in rows]})


async def create_checkpoint(request: web.Request) -> web.Response:
    """Proposes a checkpoint; with ``"wait": true`` answers once a majority agreed on it."""
    ctx = context_of(request)
    body = await json_body(request, {"label", "wait"}, optional=True)
    label = body.get("label")
    if label is not None:
        try:
            check_label(label)
        except CommandError as e:
            raise ApiError(400, "bad_request", str(e)) from None
    if not isinstance(body.get("wait", False), bool):
        raise ApiError(400, "bad_request", "wait must be true or false")
    result = await ctx.integrity.propose_checkpoint(label)
    index = result["checkpoint"]
    if body.get("wait"):
        deadline = time.monotonic() + ctx.request_timeout
        while True:
            record = ctx.cluster.read(lambda p: p.checkpoint(index))
            if record is not None and record["agreed"] is not None:
                break
            if time.monotonic() > deadline:
                raise ApiError(504, "not_agreed", f"checkpoint {index} was made but no majority agreed within "
                               f"{ctx.request_timeout:g} s; see GET /v1/checkpoints", index=index)
            await asyncio.sleep(0.02)
    record, registered = ctx.cluster.read(lambda p: (p.checkpoint(index), p.nodes()))
    return web.json_response(checkpoint_json(index, record, registered))


async def rollback(request: web.Request) -> web.Response:
    """Rolls the whole cluster back to a retained, agreed checkpoint: one replicated entry
    after which every node holds the checkpoint's state (proven by its agreed digest)."""
    ctx = context_of(request)
    rid = request_id(request)
    body = await json_body(request, {"checkpoint"}, {"checkpoint"})
    target = body["checkpoint"]
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= MAX_UINT64:
        raise ApiError(400, "bad_request", "checkpoint must be the log index of a checkpoint (see GET /v1/checkpoints)")
    # This node's view may lag; the entry checks the target again where it applies, so a
    # refusal here only saves a log entry (and changes nothing).
    record = ctx.cluster.read(lambda p: p.checkpoint(target))
    if record is None:
        raise ApiError(404, "unknown_checkpoint", f"there is no checkpoint at index {target}; see GET /v1/checkpoints")
    if record["agreed"] is None:
        raise ApiError(409, "not_agreed", f"checkpoint {target} was never agreed by a majority; pick an agreed one")
    if not ctx.snapshots.available(target):
        raise ApiError(409, "not_retained", f"checkpoint {target} is not retained on this node (retained: "
                       f"{ctx.snapshots.retained()}); nothing was changed. Raise checkpoint_retain to keep more")
    result = await propose_alone(request, identified({"op": "rollback", "checkpoint": target}, rid),
                                 fields=("index", "undone_entries"))
    return web.json_response({
        "rolled_back_to": target,
        "index": result["index"],
        "undone_entries": result["undone_entries"],
        "state_hash": ctx.cluster.applied()[1].hex(),
    })


# --- repair: the serving side (a diverged peer calls these) ---


def _session(request: web.Request) -> _core.FrozenState:
    try:
        return context_of(request).repair_sessions.get(request.match_info["session"])
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
    ctx = context_of(request)
    body = await json_body(request, {"index"}, {"index"})
    index = body["index"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ApiError(400, "bad_request", "index must be a log index (an integer >= 0)")
    commit = ctx.cluster.status()["commit_index"]
    if index > commit + MAX_FREEZE_AHEAD:
        raise ApiError(409, "too_far_ahead", f"index {index} is more than {MAX_FREEZE_AHEAD} entries past this node's "
                       f"commit index {commit}: it would not be reached in time; ask for an index near the applied "
                       "indexes (GET /v1/cluster/status)", commit_index=commit)
    try:
        sid, at, digest = await ctx.repair_sessions.open(index)
    except ValueError as e:
        raise ApiError(409, "passed", str(e)) from None
    except RepairBusy as e:
        raise _busy(e) from None
    except RepairError as e:
        # The log did not move on to the index in time (a repairing peer pushes it while it
        # waits): the request asked for a future that did not come, nothing is wrong here.
        raise ApiError(409, "not_reached", f"{e}; nothing was frozen — ask for an index the log reaches "
                       "(a few entries past the applied indexes, while the log moves)") from None
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
    context_of(request).repair_sessions.close(request.match_info["session"])
    return web.json_response({"closed": True})


# --- catch-up by diff: the follower's side (its leader calls these; msgpack bodies) ---


async def _msgpack_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = msgpack.unpackb(raw, raw=False) if raw else {}
    except Exception:
        raise ApiError(400, "bad_request", "the body is not msgpack") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a msgpack map")
    return body


def _msgpack_response(value) -> web.Response:
    return web.Response(body=msgpack.packb(value, use_bin_type=True), content_type="application/msgpack")


async def catchup_state(request: web.Request) -> web.Response:
    """Freezes this node's state as it is (it is behind: nothing new applies) for the leader
    to compare with its dump."""
    ctx = context_of(request)
    for _ in range(3):
        try:
            sid, at, digest = await ctx.repair_sessions.open(ctx.cluster.applied()[0])
            return _msgpack_response({"session": sid, "index": at, "digest": digest})
        except ValueError:
            continue  # an entry applied meanwhile: freeze at the new index
        except RepairBusy as e:
            raise _busy(e) from None
    raise ApiError(409, "not_lagging", "this node keeps applying entries: it is not lagging, no catch-up needed")


def _busy(e: RepairBusy) -> ApiError:
    # Sessions are held for their callers until closed (DELETE) or expired: a 429, not a 5xx.
    return ApiError(429, "busy", f"{e}; close finished sessions with DELETE, or retry in a second")


async def catchup_children(request: web.Request) -> web.Response:
    """msgpack {level, parents} → the first bytes (catch-up's SHORT) of the digest of every
    child of each parent (level 0: the root), in order, concatenated."""
    frozen = _session(request)
    body = await _msgpack_body(request)
    level = body.get("level")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < _core.TREE_DEPTH:
        raise ApiError(400, "bad_request", f"level: expected an integer from 0 to {_core.TREE_DEPTH - 1}")
    parents = _int_list(body, "parents", _core.BUCKETS // _core.FANOUT, _core.FANOUT ** level)
    digests = frozen.children_digests(level, parents)
    return web.Response(body=b"".join(digests[i : i + SHORT] for i in range(0, len(digests), 32)),
                        content_type="application/octet-stream")


async def catchup_elements(request: web.Request) -> web.Response:
    """msgpack {buckets} → one bytes per bucket, in order: the first bytes (catch-up's SHORT)
    of the hash of each of its elements, concatenated (no keys)."""
    frozen = _session(request)
    body = await _msgpack_body(request)
    return _msgpack_response(element_shorts(frozen, _int_list(body, "buckets", MAX_BUCKETS_PER_REQUEST, _core.BUCKETS)))


# --- fault injection ---


async def corrupt(request: web.Request) -> web.Response:
    """Changes one kv key — or removes one memory record — in this node's state only, behind
    the log's back."""
    ctx = context_of(request)
    if not ctx.debug_fault_injection:
        raise ApiError(403, "forbidden", "fault injection is off on this node; start it with "
                       "--debug-fault-injection (debug_fault_injection = true) to allow it — tests only")
    body = await json_body(request, {"key", "value", "delete", "memory"})
    if "memory" in body:
        return _corrupt_memory(ctx, body["memory"])
    if "key" not in body:
        raise ApiError(400, "bad_request", "key: missing; name the kv key to change (or send memory: {namespace, id})")
    key = body["key"]
    try:
        check_key(key)
    except CommandError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    if body.get("delete"):
        op = (keys.kv_key(key), None)
    else:
        value = encode_value("value", body.get("value", "corrupted"))
        current = ctx.cluster.read(lambda p: p.get(key))
        version, created, modified = (current.version, current.create_index, current.mod_index) if current else (1, 0, 0)
        op = (keys.kv_key(key), keys.encode_kv(value, version, created, modified))
    digest = ctx.cluster.replica.inject_fault([op])
    return web.json_response({"key": key, "node_id": ctx.node_id, "state_hash": digest.hex()})


def _corrupt_memory(ctx, target) -> web.Response:
    """Removes a memory record from this node's state; its index follows the damaged state
    (as after a restart from a damaged snapshot), so repair must re-index it."""
    if not isinstance(target, dict) or set(target) != {"namespace", "id"}:
        raise ApiError(400, "bad_request", "memory: expected {\"namespace\", \"id\"} of the record to remove")
    try:
        check_namespace(target["namespace"])
        check_record_id(target["id"])
    except CommandError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    digest = ctx.cluster.replica.inject_fault([(memory_record_key(target["namespace"], target["id"]), None)])
    if ctx.memory is not None:
        ctx.memory.index.resync(ctx.cluster.applied()[0])
    return web.json_response({"memory": target, "node_id": ctx.node_id, "state_hash": digest.hex()})


async def save_snapshot(request: web.Request) -> web.StreamResponse:
    """The whole state at one applied index, after a read barrier (so every write acknowledged
    before this request is in it), as a snapshot file (synapse/integrity/backup.py). Its index
    and digest come as headers before the body."""
    ctx = context_of(request)
    await ctx.cluster.barrier()
    index, frozen = ctx.cluster.frozen_now()
    # Written next to the checkpoints' snapshots (a start removes a *.tmp a kill left there).
    fd, name = tempfile.mkstemp(prefix="save-", suffix=".tmp", dir=ctx.snapshots.directory)
    os.close(fd)
    path = Path(name)
    try:
        info = await asyncio.get_running_loop().run_in_executor(None, backup.save, frozen, index, path)
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(info.file_size),
            "X-Synapse-Index": str(index), "X-Synapse-State-Hash": info.state_digest.hex(),
            "Content-Disposition": f'attachment; filename="synapse-{index}.snap"'})
        await response.prepare(request)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        path.unlink(missing_ok=True)


async def compact(request: web.Request) -> web.Response:
    """Asks this node's Raft log to compact into a dump now (tests and benchmarks)."""
    ctx = context_of(request)
    if not ctx.debug_fault_injection:
        raise ApiError(403, "forbidden", "debug endpoints are off on this node; start it with --debug-fault-injection")
    ctx.cluster.compact()
    return web.json_response({"compacting": True, "node_id": ctx.node_id})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/checkpoints", list_checkpoints)
    app.router.add_post("/v1/checkpoints", create_checkpoint)
    app.router.add_post("/v1/rollback", rollback)
    app.router.add_post("/v1/internal/repair/sessions", open_repair_session)
    app.router.add_post("/v1/internal/repair/sessions/{session}/children", repair_children)
    app.router.add_post("/v1/internal/repair/sessions/{session}/buckets", repair_buckets)
    app.router.add_delete("/v1/internal/repair/sessions/{session}", close_repair_session)
    app.router.add_get("/v1/internal/catchup/state", catchup_state)
    app.router.add_post("/v1/internal/catchup/{session}/children", catchup_children)
    app.router.add_post("/v1/internal/catchup/{session}/elements", catchup_elements)
    app.router.add_delete("/v1/internal/catchup/{session}", close_repair_session)
    app.router.add_post("/v1/debug/corrupt", corrupt)
    app.router.add_post("/v1/debug/compact", compact)
    app.router.add_get("/v1/snapshot", save_snapshot)
