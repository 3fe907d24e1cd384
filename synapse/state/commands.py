"""The replicated command schema (version 1): log-entry encoding and command validation.

DESIGN.md has the table of ops and their results. Validation is shared: the API layer calls
``validate_command`` before proposing, so a user gets a 400 naming the field instead of a
failed log entry, and the ``CommandProcessor`` calls it again on every applied command, so a
forged or corrupted entry cannot bypass a limit. It is a pure function of the command.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from synapse.state import memory, security, tasks
from synapse.state.validation import (
    CommandError,
    LimitError,
    check_fields,
    check_uint,
    is_int,
    kind_of,
    join_names,
    short,
)

SCHEMA_VERSION = 1

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20  # 1 MiB
MAX_TXN_OPS = 128  # per branch (then / else)
MAX_TXN_CONDS = 64
MAX_RID_CHARS = 128
REQUEST_HASH_BYTES = 16
MAX_NODE_ID_CHARS = 128
MAX_ADDRESS_CHARS = 255
MAX_LABEL_CHARS = 128
DIGEST_BYTES = 32

OPS = ("put", "delete", "txn", "noop", "register_node", "unregister_node", "checkpoint", "checkpoint_report", "rollback",
       "task_submit", "task_cancel", "task_assign", "task_start", "task_finish", "worker_register", "worker_down",
       *security.SECURITY_OPS, *memory.MEMORY_OPS)
TXN_OPS = ("put", "delete", "get")

# op -> (required fields, optional fields); "op" itself is implied.
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "put": (("key", "value"), ("if_version", "rid")),
    "delete": (("key",), ("if_version", "rid")),
    "txn": ((), ("if", "then", "else", "rid")),
    "noop": ((), ("rid",)),
    "register_node": (("node_id", "api", "raft"), ("rid",)),
    "unregister_node": (("node_id",), ("rid",)),
    "checkpoint": ((), ("label", "created_ms", "snapshot", "rid")),
    "checkpoint_report": (("checkpoint", "node_id", "digest", "chain"), ("rid",)),
    "rollback": (("checkpoint",), ("rid",)),
    **tasks.FIELDS,  # the task and worker ops: synapse/state/tasks.py
    **security.FIELDS,  # principals, roles, tokens: synapse/state/security.py
    **memory.FIELDS,  # agent memory: synapse/state/memory.py
}
# Every op a client can send may carry the token that sent it (its accessor) and the
# proposer's clock: the processor checks the token's scopes at apply time (security.py).
_FIELDS = {op: (req, opt if "auth" in opt or op == "security_bootstrap" else (*opt, "auth", "auth_ms"))
           for op, (req, opt) in _FIELDS.items()}
# Every op that takes a request id also takes the hash of the request it was sent with, so
# that a rid used again by a *different* request is refused instead of answered with the first
# request's result (processor.py, _EntryRun.apply).
_FIELDS = {op: (req, (*opt, "request_hash") if "rid" in opt else opt) for op, (req, opt) in _FIELDS.items()}
_TASK_OPS = frozenset(tasks.FIELDS)
_SECURITY_OPS = frozenset(security.FIELDS)
_MEMORY_OPS = frozenset(memory.FIELDS)
_TXN_FIELDS: dict[str, tuple[str, ...]] = {
    "put": ("key", "value"),
    "delete": ("key",),
    "get": ("key",),
}
_COND_TESTS = ("version", "value", "exists")


class EntryError(ValueError):
    """A log entry is not a schema-1 entry (bad msgpack, wrong shape or another version)."""


def encode_entry(commands: Iterable[Mapping[str, Any]]) -> bytes:
    """The log-entry bytes for ``commands`` (validate each with ``validate_command`` first)."""
    return msgpack.packb([SCHEMA_VERSION, [dict(c) for c in commands]], use_bin_type=True)


def decode_entry(payload: bytes) -> list[Any]:
    """The entry's commands, not yet validated; raises ``EntryError`` for anything else."""
    try:
        entry = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        # Only the type name: the message must not depend on anything but the bytes.
        raise EntryError(
            f"entry: not a msgpack document ({type(exc).__name__}); build entries with encode_entry"
        ) from None
    if not isinstance(entry, list) or len(entry) != 2:
        raise EntryError(
            f"entry: expected a 2-element array [schema_version, [command, ...]], "
            f"got {kind_of(entry)}; build entries with encode_entry"
        )
    version, commands = entry
    if not is_int(version) or version != SCHEMA_VERSION:
        raise EntryError(
            f"entry: schema version {short(version)} is not supported (this node reads version "
            f"{SCHEMA_VERSION}); upgrade the node or re-encode the entry"
        )
    if not isinstance(commands, list):
        raise EntryError(
            f"entry: expected an array of commands, got {kind_of(commands)}; build entries with encode_entry"
        )
    return commands


def shareable_commands(payload: bytes) -> list[Any] | None:
    """The commands of an entry that may share a log entry with other entries' commands (the
    leader merges entries waiting in its queue), or None: an entry that does not decode stays
    as it is (every node then fails it the same way), and a rollback must be alone in its
    entry. Each command is applied on its own (in a savepoint), so a command's result does
    not depend on which other commands share its entry."""
    try:
        commands = decode_entry(payload)
    except EntryError:
        return None
    if any(isinstance(c, dict) and c.get("op") == "rollback" for c in commands):
        return None
    return commands


def validate_command(command: Any, *, check_json: bool = True) -> None:
    """Raise ``CommandError`` unless ``command`` is a valid schema-1 command.

    ``check_json`` also parses each value as JSON. The processor turns it off: how deeply
    nested a document Python's parser accepts depends on the caller's stack depth, which is
    not the same on every node, and apply must be deterministic. Sizes and types are always
    checked."""
    if not isinstance(command, dict):
        raise CommandError(
            "command",
            f'command: expected a map with an "op" field, got {kind_of(command)}; '
            'send a map such as {"op": "put", "key": ..., "value": ...}',
        )
    if "op" not in command:
        raise CommandError("op", f'op: missing; set "op" to one of {join_names(OPS)}')
    op = command["op"]
    if not isinstance(op, str) or op not in _FIELDS:
        raise CommandError("op", f"op: unknown op {short(op)}; use one of {join_names(OPS)}")
    required, optional = _FIELDS[op]
    check_fields(command, "", op, required, ("op", *optional))

    if "rid" in command:
        check_rid(command["rid"])
    if "request_hash" in command:
        check_request_hash(command)
    security.check_auth(command)
    if op in ("put", "delete"):
        check_key(command["key"])
        if "if_version" in command:
            check_uint(
                command["if_version"], "if_version", 'use 0 for "must not exist" or the version you read'
            )
    if op == "put":
        check_value(command["value"], "value", check_json=check_json)
    elif op == "txn":
        _check_txn(command, check_json)
    elif op == "register_node":
        check_node_id(command["node_id"])
        _check_address(command["api"], "api")
        _check_address(command["raft"], "raft")
    elif op == "unregister_node":
        check_node_id(command["node_id"])
    elif op == "checkpoint":
        if "label" in command:
            check_label(command["label"])
        if "created_ms" in command:
            check_uint(command["created_ms"], "created_ms", "send milliseconds since the Unix epoch")
        if "snapshot" in command and not isinstance(command["snapshot"], bool):
            raise CommandError("snapshot", f"snapshot: expected true or false, got {kind_of(command['snapshot'])}")
    elif op == "rollback":
        check_uint(command["checkpoint"], "checkpoint", "send the log index of an agreed checkpoint")
    elif op in _TASK_OPS:
        tasks.check_command(op, command, check_uint)
    elif op in _SECURITY_OPS:
        security.check_command(op, command)
    elif op in _MEMORY_OPS:
        memory.check_command(op, command)
    elif op == "checkpoint_report":
        check_uint(command["checkpoint"], "checkpoint", "send the log index of the checkpoint")
        check_node_id(command["node_id"])
        for name in ("digest", "chain"):
            if not isinstance(command[name], bytes) or len(command[name]) != DIGEST_BYTES:
                raise CommandError(name, f"{name}: expected {DIGEST_BYTES} bytes, got {short(command[name])}")


def check_key(key: Any, field: str = "key") -> None:
    """A kv key: a string of 1 to MAX_KEY_BYTES bytes of UTF-8, with no NUL."""
    if not isinstance(key, str):
        raise CommandError(field, f"{field}: expected a string, got {kind_of(key)}; send the key as text")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise CommandError(
            field, f"{field}: not encodable as UTF-8 (it has a lone surrogate); use valid Unicode text"
        ) from None
    if size == 0:
        raise CommandError(field, f"{field}: empty; use a key of 1 to {MAX_KEY_BYTES} bytes")
    if size > MAX_KEY_BYTES:
        raise LimitError(
            field, f"{field}: {size} bytes exceeds the {MAX_KEY_BYTES}-byte limit; use a shorter key"
        )
    if "\x00" in key:
        raise CommandError(field, f"{field}: contains a NUL character; remove it from the key")


def check_value(value: Any, field: str = "value", *, check_json: bool = True) -> None:
    """A value: JSON text as bytes, at most MAX_VALUE_BYTES."""
    if not isinstance(value, bytes):
        raise CommandError(
            field,
            f"{field}: expected bytes holding JSON text, got {kind_of(value)}; "
            "encode the JSON text as UTF-8 bytes",
        )
    if len(value) > MAX_VALUE_BYTES:
        raise LimitError(
            field,
            f"{field}: {len(value)} bytes exceeds the {MAX_VALUE_BYTES}-byte (1 MiB) limit; "
            "store a smaller value",
        )
    if check_json:
        try:
            json.loads(value.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandError(field, f"{field}: not valid JSON text ({exc}); send a JSON document") from None
        except RecursionError:
            raise CommandError(field, f"{field}: JSON nested too deeply; flatten the document") from None


def check_rid(rid: Any, field: str = "rid") -> None:
    """A request id: a string of 1 to MAX_RID_CHARS characters, encodable as UTF-8."""
    if not isinstance(rid, str):
        raise CommandError(
            field, f"{field}: expected a string, got {kind_of(rid)}; send the request id as text"
        )
    if not 1 <= len(rid) <= MAX_RID_CHARS:
        raise CommandError(
            field,
            f"{field}: {len(rid)} characters is outside 1 to {MAX_RID_CHARS}; "
            f"use a request id of at most {MAX_RID_CHARS} characters, such as a UUID",
        )
    _check_utf8(rid, field)


def check_request_hash(command: dict[str, Any]) -> None:
    """``request_hash``: REQUEST_HASH_BYTES bytes, and only beside a ``rid`` (it says which
    request the rid was first used with; synapse/api/common.py computes it)."""
    value = command["request_hash"]
    if "rid" not in command:
        raise CommandError(
            "request_hash", "request_hash: given without a rid; it identifies the request a rid names, send both or neither"
        )
    if not isinstance(value, bytes) or len(value) != REQUEST_HASH_BYTES:
        raise CommandError(
            "request_hash",
            f"request_hash: expected {REQUEST_HASH_BYTES} bytes, got {short(value)}; "
            "send a 16-byte digest of the request (the API uses BLAKE2b)",
        )


def check_node_id(node_id: Any, field: str = "node_id") -> None:
    if not isinstance(node_id, str):
        raise CommandError(
            field, f"{field}: expected a string, got {kind_of(node_id)}; send the node id as text"
        )
    if not 1 <= len(node_id) <= MAX_NODE_ID_CHARS:
        raise CommandError(
            field,
            f"{field}: {len(node_id)} characters is outside 1 to {MAX_NODE_ID_CHARS}; use a shorter node id",
        )
    _check_utf8(node_id, field)


def check_label(label: Any, field: str = "label") -> None:
    """A checkpoint label: 1 to MAX_LABEL_CHARS printable characters."""
    if not isinstance(label, str):
        raise CommandError(field, f"{field}: expected a string, got {kind_of(label)}; send the label as text")
    if not 1 <= len(label) <= MAX_LABEL_CHARS or not label.isprintable():
        raise CommandError(
            field, f"{field}: use 1 to {MAX_LABEL_CHARS} printable characters (got {len(label)} characters)"
        )
    _check_utf8(label, field)


def _check_txn(command: dict[str, Any], check_json: bool) -> None:
    conds = _check_list(command.get("if", []), "if", MAX_TXN_CONDS, "condition")
    for i, cond in enumerate(conds):
        path = f"if[{i}]"
        if not isinstance(cond, dict):
            raise CommandError(
                path,
                f"{path}: expected a map, got {kind_of(cond)}; "
                'write a condition as {"key": ..., "exists": true}',
            )
        tests = [name for name in _COND_TESTS if name in cond]
        if len(tests) != 1:
            raise CommandError(
                path,
                f"{path}: has {len(tests)} tests; "
                'give exactly one of "version", "value" or "exists" besides "key"',
            )
        check_fields(cond, f"{path}.", "condition", ("key", tests[0]), ())
        check_key(cond["key"], f"{path}.key")
        test = tests[0]
        if test == "version":
            check_uint(cond["version"], f"{path}.version", 'use 0 for "absent" or the version you read')
        elif test == "value":
            check_value(cond["value"], f"{path}.value", check_json=check_json)
        elif not isinstance(cond["exists"], bool):
            raise CommandError(
                f"{path}.exists",
                f"{path}.exists: expected true or false, got {kind_of(cond['exists'])}; send a boolean",
            )
    for branch in ("then", "else"):
        ops = _check_list(command.get(branch, []), branch, MAX_TXN_OPS, "operation")
        for i, txop in enumerate(ops):
            path = f"{branch}[{i}]"
            if not isinstance(txop, dict):
                raise CommandError(
                    path,
                    f"{path}: expected a map, got {kind_of(txop)}; "
                    'write an operation as {"op": "get", "key": ...}',
                )
            op = txop.get("op")
            if not isinstance(op, str) or op not in _TXN_FIELDS:
                raise CommandError(
                    f"{path}.op",
                    f"{path}.op: unknown transaction op {short(op)}; use one of {join_names(TXN_OPS)}",
                )
            check_fields(txop, f"{path}.", f"transaction {op}", _TXN_FIELDS[op], ("op",))
            check_key(txop["key"], f"{path}.key")
            if op == "put":
                check_value(txop["value"], f"{path}.value", check_json=check_json)


def _check_list(items: Any, field: str, limit: int, noun: str) -> list[Any]:
    if not isinstance(items, list):
        raise CommandError(
            field, f"{field}: expected a list of {noun}s, got {kind_of(items)}; send a list, even of one"
        )
    if len(items) > limit:
        raise LimitError(
            field, f"{field}: {len(items)} {noun}s exceeds the {limit}-{noun} limit; split the transaction"
        )
    return items


def _check_address(address: Any, field: str) -> None:
    fix = 'use "host:port" with a port from 1 to 65535, e.g. "10.0.0.5:7400"'
    if not isinstance(address, str) or len(address) > MAX_ADDRESS_CHARS:
        raise CommandError(
            field, f"{field}: expected a string of at most {MAX_ADDRESS_CHARS} characters; {fix}"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CommandError(field, f"{field}: {short(address)} is not host:port; {fix}")
    _check_utf8(address, field)


def _check_utf8(text: str, field: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise CommandError(
            field, f"{field}: not encodable as UTF-8 (it has a lone surrogate); use valid Unicode text"
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
