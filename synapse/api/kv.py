"""The key-value routes: ``PUT/GET/DELETE /v1/kv/{key}``, ``GET /v1/kv`` (scan) and
``POST /v1/txn``. Writes become commands the group committer proposes; linearizable reads wait
for a committed barrier, then read local state; stale reads read local state at once.

``put_command``/``put_answer`` and ``read_value`` also answer the Rust front's hot path
(``front.py``), so a request means the same on either path."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from synapse.api.common import (
    ApiError,
    check_command,
    checked_result,
    encode_value,
    identified,
    int_field,
    int_query,
    json_body,
    propose,
    request_id,
    signed,
)
from synapse.api.context import IDENTITY_KEY, ApiContext, context_of
from synapse.api.pipeline import confirm
from synapse.state.commands import MAX_KEY_BYTES, CommandError
from synapse.state.keys import decode_kv_rows

MAX_SCAN_LIMIT = 10_000


async def _consistent(request: web.Request) -> None:
    await wait_consistent(context_of(request), request.query.get("consistency"), request.get(IDENTITY_KEY))


async def wait_consistent(ctx: ApiContext, consistency: str | None, identity) -> None:
    """Waits for a linearizable read (a committed barrier), then checks the token again:
    revoked before the read began, it is refused here as on every node."""
    if linearizable(consistency):
        await ctx.cluster.barrier()
        confirm(ctx, identity)


def linearizable(consistency: str | None) -> bool:
    """Whether a read asked for ``consistency`` waits for a barrier (and then checks its token
    again, ``confirm``); ApiError 400 for a value that is neither."""
    if consistency is None or consistency == "linearizable":
        return True
    if consistency != "stale":
        raise ApiError(400, "bad_request", f"consistency must be 'linearizable' (default) or 'stale', got {consistency!r}")
    return False


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
    command, size_hint = put_command(key, body, request_id(request), request.get(IDENTITY_KEY))
    return web.json_response(put_answer(key, await context_of(request).cluster.propose(command, size_hint)))


# PUT in two halves, for the HTTP front (synapse/api/front.py), which answers without a task.
def put_command(key: str, body: dict, rid: str, identity) -> tuple[dict, int]:
    """The put command of a PUT body, with the sender's token (checked: ApiError if bad),
    and its size hint."""
    value = encode_value("value", body["value"])
    command = {"op": "put", "key": key, "value": value}
    if_version = int_field(body, "if_version")
    if if_version is not None:
        command["if_version"] = if_version
    command = signed(identified(command, rid), identity)
    check_command(command)
    return command, len(value) + len(key) + 64


def put_answer(key: str, result: dict) -> dict:
    result = checked_result(result, ("version", "index"))
    return {"key": key, "version": result["version"], "index": result["index"]}


async def get_kv(request: web.Request) -> web.Response:
    key = _key(request)
    await _consistent(request)
    return web.json_response(read_value(context_of(request), key))


def read_value(ctx: ApiContext, key: str) -> dict:
    """GET /v1/kv/{key} once the read may be answered from local state."""
    record = ctx.cluster.read(lambda p: p.get(key))
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
        # Only the lookup holds the state; the records are decoded after.
        rows = context_of(request).cluster.read(lambda p: p.scan_rows(prefix, limit + 1, start_after))
    except CommandError as e:  # a prefix that is not UTF-8 text
        raise ApiError(400, "bad_request", str(e)) from None
    more = len(rows) > limit
    records = decode_kv_rows(rows[:limit])
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


def add_routes(app: web.Application) -> None:
    app.router.add_put("/v1/kv/{key:.+}", put_kv)
    app.router.add_get("/v1/kv/{key:.+}", get_kv)
    app.router.add_delete("/v1/kv/{key:.+}", delete_kv)
    app.router.add_get("/v1/kv", scan_kv)
    app.router.add_post("/v1/txn", txn)
