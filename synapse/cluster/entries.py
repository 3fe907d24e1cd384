"""PySyncObj's log entry encoding, read without running PySyncObj (offline audit, tail, the
leader's merge, a follower's reassembly of a large entry) — and the data-only unpickler that
reads every Raft message too (``load_data``; wire.py).

An entry's command is one type byte and a pickle: ``0`` regular (a replicated method call
``(method id, (args...))`` — ours is ``apply_entry(payload)``), ``1`` no-op (a new leader's
first entry), ``2`` membership change, ``3`` code version. PySyncObj pickles with protocol 2,
which spells bytes as ``_codecs.encode(text, "latin1")`` (``__builtin__.bytes()`` when empty).
The pickle is read with an unpickler that allows exactly those two and refuses every other
global, so a tampered log can be inspected without running anything it holds.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

REGULAR, NO_OP, MEMBERSHIP, VERSION = 0, 1, 2, 3
KINDS = {REGULAR: "regular", NO_OP: "no-op", MEMBERSHIP: "membership", VERSION: "version"}


class EntryDecodeError(ValueError):
    pass


def _latin1(text: str, encoding: str) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EntryDecodeError("the entry's pickle encodes bytes in an unexpected way")
    return text.encode("latin-1")


def _empty_bytes(*args) -> bytes:
    if args:
        raise EntryDecodeError("the entry's pickle builds bytes in an unexpected way")
    return b""


_ALLOWED = {("_codecs", "encode"): _latin1, ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise EntryDecodeError(f"the entry's pickle refers to {module}.{name}: not plain data")
        return allowed


def load_data(data: bytes):
    """A pickle of plain data (what PySyncObj's messages and entries hold), refusing every
    global but the two spellings of bytes above: ``EntryDecodeError`` for anything else."""
    try:
        return _DataOnly(io.BytesIO(data)).load()
    except EntryDecodeError:
        raise
    except Exception as e:  # pickle raises many types on bad input
        raise EntryDecodeError(f"not a readable pickle ({type(e).__name__})") from None


@dataclass(frozen=True)
class RaftCommand:
    kind: str  # regular, no-op, membership, version
    payload: bytes | None = None  # ours: the argument of apply_entry
    detail: object = None  # membership: [op, address, ...]
    method: int | None = None  # regular: PySyncObj's id of the replicated method


def decode_command(command: bytes) -> RaftCommand:
    if not command:
        raise EntryDecodeError("empty command")
    kind = command[0]
    if kind == NO_OP:
        return RaftCommand("no-op")
    if kind == MEMBERSHIP:
        # [op, node id, node] — the node object is a PySyncObj class: keep the plain part.
        try:
            value = load_data(command[1:])
        except EntryDecodeError:
            return RaftCommand("membership", detail="(membership change)")
        return RaftCommand("membership", detail=value[:2] if isinstance(value, list) else value)
    if kind == VERSION:
        return RaftCommand("version", detail=load_data(command[1:]))
    if kind != REGULAR:
        raise EntryDecodeError(f"unknown command type {kind}")
    value = load_data(command[1:])
    if not (isinstance(value, tuple) and len(value) >= 2 and isinstance(value[1], tuple) and len(value[1]) == 1
            and isinstance(value[1][0], bytes)):
        raise EntryDecodeError("a regular entry that is not apply_entry(payload)")
    return RaftCommand("regular", payload=value[1][0], method=value[0])


def decode_log_entry(data: bytes) -> tuple[bytes, int, int]:
    """A log entry as PySyncObj pickles it to send it, ``(command, index, term)``, read with
    the same data-only unpickler; raises ``EntryDecodeError`` for anything else (a prefix of
    one included)."""
    value = load_data(data)
    if not (isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], bytes)
            and all(type(x) is int for x in value[1:])):
        raise EntryDecodeError("not a log entry (command, index, term)")
    return value
