"""What every HTTP handler module shares: the error type and its JSON shape, body and query
parsing, request ids, and proposing a command."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any

import msgpack
import orjson
from aiohttp import web

from synapse.api.context import IDENTITY_KEY, context_of
from synapse.state.commands import (
    MAX_RID_CHARS,
    MAX_VALUE_BYTES,
    REQUEST_HASH_BYTES,
    CommandError,
    LimitError,
    check_rid,
    encode_entry,
    validate_command,
)

REQUEST_ID_HEADER = "X-Request-Id"
# A value may be up to 1 MiB of JSON; leave room for the envelope, refuse the rest early.
MAX_BODY = MAX_VALUE_BYTES + 64 * 1024
# A memory batch: 256 records whose vectors travel as JSON numbers (a 384-dimension float32
# vector is ~8 KB of JSON at full precision; 256 of them ~2.1 MB) besides their text.
MAX_MEMORY_BODY = 8 << 20


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.error, self.extra = status, error, extra


def error_response(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response(error_body(error, message, **extra), status=status)


def error_body(error: str, message: str, **extra: Any) -> dict:
    return {"error": error, "message": message, **extra}


async def json_body(request: web.Request, allowed: set[str], required: set[str] = frozenset(),
                    optional: bool = False, limit: int = MAX_BODY) -> dict:
    """The request's JSON object body; ``optional``: an empty body is ``{}``. ``limit``: its
    size at most (the app reads up to the largest route's)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"the body is {request.content_length} bytes; the limit is {limit}")
    raw = await request.read()
    if len(raw) > limit:  # sent without a length (chunked)
        raise ApiError(413, "too_large", f"the body is {len(raw)} bytes; the limit is {limit}")
    return {} if optional and not raw.strip() else parse_json_object(raw, allowed, required)


# A \u escape of a UTF-16 surrogate: a pair of them is one character, a lone one is no text at all.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


# A run of 19+ digits: an integer that may not fit 64 bits, which orjson turns into a float.
_LONG_DIGITS = re.compile(rb"\d{19}")


def _loads(raw: bytes) -> Any:
    """``json.loads``, the reference, sped up by orjson (10x on a 384-number vector) where the
    two agree: orjson refuses what json reads leniently (a lone surrogate escape, NaN, 1e400,
    a byte-order mark, UTF-16), and those go to json with its own error or value; a long
    integer, which orjson would silently make a float, never goes to orjson."""
    if not _LONG_DIGITS.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def parse_json_object(raw: bytes, allowed: set[str], required: set[str] = frozenset()) -> dict:
    """A request body that must be a JSON object with only ``allowed`` and all ``required`` fields."""
    try:
        body = _loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the body is nested too deeply to parse; flatten the document") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and not _is_text(body):
        # Python's parser lets a lone one through; it cannot be stored or sent on as UTF-8.
        raise ApiError(400, "bad_json", "the body has a string with a lone UTF-16 surrogate escape (\\ud800 to "
                       "\\udfff without its pair); send valid Unicode text")
    try:
        body = _integral(body)
    except RecursionError:
        raise ApiError(400, "bad_json", "the body is nested too deeply; flatten the document") from None
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(body))
    if missing:
        raise ApiError(400, "bad_request", f"missing field(s) {', '.join(missing)}")
    return body


# Fields holding a JSON document of the user's, kept as sent (stored as its JSON text).
_OPAQUE = frozenset(("value", "args", "result"))
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)  # the integers msgpack (a log entry) holds


def _integral(value: Any) -> Any:
    """JSON numbers with no fraction as ints (5.0 -> 5): in JSON, and for JSON Schema's
    ``integer`` (openapi.yaml), 5.0 is the integer 5, and the fields that hold counts, indexes
    and versions take it as such. Documents in ``_OPAQUE`` fields are left exactly as sent."""
    if isinstance(value, float):
        # Only where an int can go: a larger one would be out of range anyway, and as a float
        # it stays a number that validation bounds or stores (a usage figure, say).
        return int(value) if value.is_integer() and _INT_RANGE[0] <= value <= _INT_RANGE[1] else value
    if isinstance(value, dict):
        return {k: v if k in _OPAQUE else _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _is_text(value: Any) -> bool:
    """Whether every string in the parsed JSON ``value`` (keys included) is valid Unicode."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def encode_value(field: str, value: Any) -> bytes:
    # Canonical JSON text, produced once by the proposer: every node stores the same bytes.
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as e:  # NaN or Infinity, a lone surrogate (UnicodeEncodeError)
        raise ApiError(400, "bad_request", f"{field}: {e}; send finite numbers and valid Unicode text") from None
    except RecursionError:
        raise ApiError(400, "bad_request", f"{field}: nested too deeply; flatten the document") from None
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
    # isascii: str.isdigit() also accepts digits int() refuses, such as "²".
    if not (raw.isascii() and raw.isdigit()) or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ApiError(400, "bad_request", f"query parameter {name} must be an integer >= {minimum}{bound}, got {raw!r}")
    return int(raw)


# Request ids the nodes derive for their own commands (worker reports, checkpoint reports, a
# node registering itself): a client id in these namespaces could take the place of one of them.
RESERVED_RID_PREFIXES = ("report/", "ckpt-report/", "register/")


def request_id(request: web.Request) -> str:
    return check_request_id(request.headers.get(REQUEST_ID_HEADER))


def check_request_id(rid: str | None) -> str:
    if rid is None:
        # Without a client id a retry cannot be recognized; our clients always send one.
        return "srv-" + uuid.uuid4().hex
    try:
        check_rid(rid, REQUEST_ID_HEADER)
    except CommandError:
        raise ApiError(400, "bad_request", f"{REQUEST_ID_HEADER}: expected 1 to {MAX_RID_CHARS} characters of "
                       f"UTF-8 text, got {len(rid)} characters; send a fresh id per request, such as a UUID") from None
    if rid.startswith(RESERVED_RID_PREFIXES):
        raise ApiError(400, "bad_request", f"{REQUEST_ID_HEADER}: ids starting with "
                       f"{' or '.join(map(repr, RESERVED_RID_PREFIXES))} are reserved for the nodes' own commands; "
                       "send another id, such as a UUID")
    return rid


def request_hash(identity: dict) -> bytes:
    """What identifies a request, for its request id: a digest of ``identity``, the command as
    the request alone determines it (op, key, body, path parameters) in canonical form (map keys
    sorted). The replicated dedup table keeps it beside the first result, and refuses the id
    when it comes back with another request (synapse/state/processor.py, ``_replayed``)."""
    try:
        encoded = msgpack.packb(_canonical(identity), use_bin_type=True)
    except (OverflowError, ValueError, TypeError, RecursionError):
        # No valid command holds such a value (an integer past 64 bits, a lone surrogate, deep
        # nesting): validation refuses the command with a 400 before anything is proposed.
        encoded = b""
    return hashlib.blake2b(encoded, digest_size=REQUEST_HASH_BYTES).digest()


_CONTAINERS = (dict, list, tuple)


def _canonical(value: dict | list | tuple) -> dict | list:
    # Scalars are not passed down: a put's identity is hashed on every write.
    if isinstance(value, dict):
        return {k: _canonical(v) if isinstance(v, _CONTAINERS) else v for k, v in sorted(value.items())}
    return [_canonical(v) if isinstance(v, _CONTAINERS) else v for v in value]


def identified(identity: dict, rid: str, **volatile: Any) -> dict:
    """The command of a request: ``identity`` with its request id and request hash, then the
    ``volatile`` fields — those the node, not the request, chooses (the proposer's clock, a
    generated task id) and that therefore differ between a request and its retry."""
    return {**identity, **volatile, "rid": rid, "request_hash": request_hash(identity)}


# Results that refuse a command for the state it met (HTTP 409), as opposed to a bug (500).
_REFUSED = {"unknown_checkpoint", "not_agreed", "unknown_node", "already_finished", "lease_revoked", "not_pending",
            "not_due", "worker_not_up", "stale_epoch", "task_exists", "refused"}
_NOT_FOUND = {"unknown_task", "unknown_worker", "unknown_principal", "unknown_role", "unknown_token"}


async def propose(request: web.Request, command: dict, size_hint: int, alone: bool = False,
                  fields: tuple[str, ...] = ()) -> dict:
    """Proposes ``command`` with the request's token and returns its result, which has
    ``fields`` (see checked_result)."""
    command = signed(command, request.get(IDENTITY_KEY))
    check_command(command)
    return checked_result(await context_of(request).cluster.propose(command, size_hint, alone), fields)


def now_ms() -> int:
    """The proposer's clock, carried in commands (expiry and times are judged by it at apply)."""
    return int(time.time() * 1000)


def signed(command: dict, identity) -> dict:
    """The command as proposed: with the token that sent it (``identity``, the pipeline's
    Identity; None on the nodes' own commands) and the proposer's clock, for the command
    processor to check again when it applies it (synapse/state/security.py)."""
    if identity is None:
        return command
    return {**command, "auth": identity.accessor, "auth_ms": now_ms()}


def check_command(command: dict) -> None:
    """A command about to be proposed: a 400 or 413 naming what is wrong. Its values are JSON
    text made by ``encode_value`` — valid by construction, so not parsed a second time."""
    try:
        validate_command(command, check_json=False)
        check_encodable(command)
    except LimitError as e:
        raise ApiError(413, "too_large", str(e)) from None
    except CommandError as e:
        raise ApiError(400, "bad_request", str(e)) from None


# Validation bounds every field of these ops to what msgpack encodes (the hot path skips the
# extra encoding); other ops carry numbers it leaves unbounded, such as a task's usage figures.
_BOUNDED_OPS = frozenset(("put", "delete"))


def check_encodable(command: dict) -> None:
    """CommandError naming the field unless ``command`` can be encoded into a log entry. (One
    that cannot would fail in the group committer, after the request was accepted.)"""
    if command.get("op") in _BOUNDED_OPS:
        return
    try:
        encode_entry([command])
    except (OverflowError, ValueError, TypeError):
        path = _unencodable(command, "")
        raise CommandError(path or "command", f"{path or 'command'}: a number outside the 64-bit range or text that "
                           "is not valid Unicode; send integers from -2**63 to 2**64-1 and valid text") from None


def _unencodable(value: Any, path: str) -> str | None:
    """The path of the first value msgpack cannot encode, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = _unencodable(k, path) or _unencodable(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if found := _unencodable(v, f"{path}[{i}]"):
                return found
    elif isinstance(value, int) and not isinstance(value, bool) and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        return path or "command"
    elif isinstance(value, str) and not _is_text(value):
        return path or "command"
    return None


def checked_result(result: dict, fields: tuple[str, ...] = ()) -> dict:
    """A command's result from the state machine, or the ApiError it means.

    ``fields``: what a result of this command has. A result without them is the first result
    of another kind of command under the same request id, recorded without a request hash
    (before request hashes existed), which the state machine could not tell apart."""
    if not result.get("ok"):
        if result.get("error") == "conflict":
            raise ApiError(409, "conflict", result.get("message", "the condition failed"),
                           key=result.get("key"), current_version=result.get("current_version", 0))
        error = result.get("error", "internal")
        message = result.get("message", "the command failed")
        if error == "forbidden":  # a scope the token lacks, found at apply time
            raise ApiError(403, error, message, scope=result.get("scope"))
        if error == "unauthorized":  # revoked or expired before the command's entry applied
            raise ApiError(401, error, message)
        if error == "request_id_reused":  # the state machine's "rid" is this header
            raise ApiError(422, error, f"{REQUEST_ID_HEADER}: {message.removeprefix('rid: ')}")
        status = 400 if error == "bad_command" else 404 if error in _NOT_FOUND else 409 if error in _REFUSED else 500
        raise ApiError(status, error, message)
    if any(name not in result for name in fields):
        raise ApiError(422, "request_id_reused", f"{REQUEST_ID_HEADER}: this request id was already used by a "
                       "different request; nothing was changed. Send this request with a new request id")
    return result


async def propose_alone(request: web.Request, command: dict, fields: tuple[str, ...] = ()) -> dict:
    """A command in a log entry of its own (nothing else coalesced into it)."""
    return await propose(request, command, 128, alone=True, fields=fields)
