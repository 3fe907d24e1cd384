"""What every HTTP handler module shares: the error type and its JSON shape, the app keys,
body and query parsing, request ids, and proposing a command."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from synapse.state.commands import MAX_VALUE_BYTES, CommandError, LimitError, validate_command

if TYPE_CHECKING:
    from synapse.node import Node

REQUEST_ID_HEADER = "X-Request-Id"
# A value may be up to 1 MiB of JSON; leave room for the envelope, refuse the rest early.
MAX_BODY = MAX_VALUE_BYTES + 64 * 1024
NODE_KEY: web.AppKey["Node"] = web.AppKey("node")


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.error, self.extra = status, error, extra


def error_response(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response(error_body(error, message, **extra), status=status)


def error_body(error: str, message: str, **extra: Any) -> dict:
    return {"error": error, "message": message, **extra}


def node_of(request: web.Request) -> "Node":
    return request.app[NODE_KEY]


async def json_body(request: web.Request, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "too_large", f"the body is {request.content_length} bytes; the limit is {MAX_BODY}")
    return parse_json_object(await request.read(), allowed, required)


def parse_json_object(raw: bytes, allowed: set[str], required: set[str] = frozenset()) -> dict:
    """A request body that must be a JSON object with only ``allowed`` and all ``required`` fields."""
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


def encode_value(field: str, value: Any) -> bytes:
    # Canonical JSON text, produced once by the proposer: every node stores the same bytes.
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as e:
        raise ApiError(400, "bad_request", f"{field}: {e}") from None
    if len(encoded) > MAX_VALUE_BYTES:
        raise ApiError(413, "too_large", f"{field}: {len(encoded)} bytes of JSON exceeds the {MAX_VALUE_BYTES}-byte limit")
    return encoded


def int_field(body: dict, name: str, minimum: int = 0) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ApiError(400, "bad_request", f"{name} must be an integer >= {minimum}, got {json.dumps(v)}")
    return v


def int_query(request: web.Request, name: str, minimum: int, maximum: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ApiError(400, "bad_request", f"query parameter {name} must be an integer >= {minimum}{bound}, got {raw!r}")
    return int(raw)


def request_id(request: web.Request) -> str:
    return check_request_id(request.headers.get(REQUEST_ID_HEADER))


def check_request_id(rid: str | None) -> str:
    if rid is None:
        # Without a client id a retry cannot be recognized; our clients always send one.
        return "srv-" + uuid.uuid4().hex
    if not 1 <= len(rid) <= 128:
        raise ApiError(400, "bad_request", f"{REQUEST_ID_HEADER} must be 1-128 characters")
    return rid


# Results that refuse a command for the state it met (HTTP 409), as opposed to a bug (500).
_REFUSED = {"unknown_checkpoint", "not_agreed", "unknown_node", "already_finished", "lease_revoked", "not_pending",
            "not_due", "worker_not_up", "stale_epoch", "task_exists"}
_NOT_FOUND = {"unknown_task", "unknown_worker"}


async def propose(request: web.Request, command: dict, size_hint: int, alone: bool = False) -> dict:
    check_command(command)
    return checked_result(await node_of(request).propose(command, size_hint, alone))


def check_command(command: dict) -> None:
    """A command about to be proposed: a 400 or 413 naming what is wrong."""
    try:
        validate_command(command)
    except LimitError as e:
        raise ApiError(413, "too_large", str(e)) from None
    except CommandError as e:
        raise ApiError(400, "bad_request", str(e)) from None


def checked_result(result: dict) -> dict:
    """A command's result from the state machine, or the ApiError it means."""
    if not result.get("ok"):
        if result.get("error") == "conflict":
            raise ApiError(409, "conflict", result.get("message", "the condition failed"),
                           key=result.get("key"), current_version=result.get("current_version", 0))
        error = result.get("error", "internal")
        status = 400 if error == "bad_command" else 404 if error in _NOT_FOUND else 409 if error in _REFUSED else 500
        raise ApiError(status, error, result.get("message", "the command failed"))
    return result


async def propose_alone(request: web.Request, command: dict) -> dict:
    """A command in a log entry of its own (nothing else coalesced into it)."""
    return await propose(request, command, 128, alone=True)
