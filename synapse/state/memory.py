"""Agent memory in the replicated state: the record layout, the checks and the pure ops
(``mem_put``, ``mem_delete``, ``mem_expire``). synapse/memory/DESIGN.md has the model.

A memory record is state like a kv key: in the digest, snapshots, rollback, repair and
catch-up. Its embedding is computed once, by the node that took the request, and travels in
the command as little-endian float32 bytes, so every replica holds (and indexes) the same
vector. Like the rest of ``synapse.state`` this does no I/O and reads no clock: times come
from the proposer (``now_ms``).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from synapse.state.validation import CommandError, LimitError, check_fields, check_uint, is_int, kind_of, short

MEMORY_OPS = ("mem_put", "mem_delete", "mem_expire")
_AUTH = ("auth", "auth_ms")
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mem_put": (("ns", "records", "model", "dim", "now_ms"), ("dedup", "rid", *_AUTH)),
    "mem_delete": (("ns", "ids"), ("rid", *_AUTH)),
    # Proposed by the leader (synapse/memory/expiry.py): removes records whose time is up, as
    # of the leader's clock carried here, so every node removes the same ones.
    "mem_expire": (("now_ms",), ("limit", "rid", *_AUTH)),
}
RECORD_FIELDS = (("id", "text", "meta", "vec"), ("ttl_ms",))

MAX_NAMESPACE_CHARS = 256
MAX_ID_CHARS = 128
MAX_TEXT_BYTES = 32 << 10
MAX_META_BYTES = 8 << 10  # canonical JSON text of the flat metadata object
MAX_META_KEYS = 32
MAX_RECORDS = 256  # per mem_put (one log entry)
MAX_DELETE_IDS = 1024
MAX_DIM = 4096
MAX_MODEL_CHARS = 200
MAX_TTL_MS = 10 * 365 * 86_400_000
EXPIRE_BATCH = 1000  # records removed per mem_expire entry at most
HASH_BYTES = 16

_NAMESPACE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")

MEM = b"mem/"  # namespace, NUL, id -> the record
MEM_HASH = b"memh/"  # namespace, NUL, content hash -> id (dedup)
MEM_EXPIRY = b"memx/"  # expiry (8 B), namespace, NUL, id -> b"" (expiry order)
MEM_NS = b"memns/"  # namespace -> {"model", "dim", "count"}


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    ns: str
    id: str
    text: str
    meta: bytes  # canonical JSON text of a flat object
    vec: bytes  # float32, little-endian
    hash: bytes  # BLAKE2b-128 of the text
    created_ms: int
    updated_ms: int
    expires_ms: int  # 0: never
    create_index: int
    mod_index: int


@dataclass(frozen=True, slots=True)
class MemoryChange:
    """One applied change for the memory index: ``record`` None for a removal."""

    ns: str
    id: str
    index: int
    record: MemoryRecord | None


# --- keys ------------------------------------------------------------------------------------


def record_prefix(ns: str) -> bytes:
    return MEM + ns.encode() + b"\x00"  # names have no NUL: no namespace's prefix holds another's


def record_key(ns: str, record_id: str) -> bytes:
    return record_prefix(ns) + record_id.encode()


def split_record_key(store_key: bytes) -> tuple[str, str]:
    ns, record_id = store_key[len(MEM):].split(b"\x00", 1)
    return ns.decode(), record_id.decode()


def hash_key(ns: str, digest: bytes) -> bytes:
    return MEM_HASH + ns.encode() + b"\x00" + digest


def expiry_key(expires_ms: int, ns: str, record_id: str) -> bytes:
    return MEM_EXPIRY + expires_ms.to_bytes(8, "big") + ns.encode() + b"\x00" + record_id.encode()


def split_expiry_key(store_key: bytes) -> tuple[int, str, str]:
    body = store_key[len(MEM_EXPIRY):]
    ns, record_id = body[8:].split(b"\x00", 1)
    return int.from_bytes(body[:8], "big"), ns.decode(), record_id.decode()


def namespace_key(ns: str) -> bytes:
    return MEM_NS + ns.encode()


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=HASH_BYTES).digest()


def encode_record(r: MemoryRecord, pack) -> bytes:
    return pack([r.text, r.meta, r.vec, r.hash, r.created_ms, r.updated_ms, r.expires_ms, r.create_index, r.mod_index])


def decode_record(ns: str, record_id: str, raw: bytes, unpack) -> MemoryRecord:
    """Raises ValueError if the stored bytes are not a memory record."""
    v = unpack(raw)
    if (not isinstance(v, list) or len(v) != 9 or not isinstance(v[0], str)
            or not all(isinstance(b, bytes) for b in v[1:4]) or not all(type(n) is int for n in v[4:])):
        raise ValueError(f"state key mem/{ns}/{record_id}: stored value is not a memory record")
    return MemoryRecord(ns, record_id, *v)


# --- validation (pure; the API calls it before proposing, the processor on every apply) -----


def check_namespace(ns: Any, field: str = "namespace") -> None:
    if not isinstance(ns, str) or not 1 <= len(ns) <= MAX_NAMESPACE_CHARS or not _NAMESPACE.match(ns):
        raise CommandError(field, f"{field}: expected a path-like name of 1 to {MAX_NAMESPACE_CHARS} characters "
                           f"(letters, digits, '.', '_', '-' in segments joined by '/', such as "
                           f"'acme/agent-7/episodic'), got {short(ns)}")


def check_record_id(record_id: Any, field: str = "id") -> None:
    if not isinstance(record_id, str) or not 1 <= len(record_id) <= MAX_ID_CHARS or not _ID.match(record_id):
        raise CommandError(field, f"{field}: expected 1 to {MAX_ID_CHARS} letters, digits and '._:-' "
                           f"(starting with a letter or digit), got {short(record_id)}")


def check_text(text: Any, field: str = "text") -> None:
    if not isinstance(text, str):
        raise CommandError(field, f"{field}: expected a string, got {kind_of(text)}")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise CommandError(field, f"{field}: not encodable as UTF-8 (a lone surrogate); use valid Unicode text") from None
    if size == 0 or not text.strip():
        raise CommandError(field, f"{field}: empty; a memory needs some text")
    if size > MAX_TEXT_BYTES:
        raise LimitError(field, f"{field}: {size} bytes exceeds the {MAX_TEXT_BYTES}-byte limit; split it into "
                         "several memories")


def check_vector_bytes(vec: Any, dim: int, field: str) -> None:
    if not isinstance(vec, bytes) or len(vec) != 4 * dim:
        raise CommandError(field, f"{field}: expected {dim} float32 values ({4 * dim} bytes), got {short(vec)}")
    # Every lane at once, on the vector as one integer: unpacking and testing 384 floats one by
    # one took ~7% of a node's start (log replay) with 30K memories.
    masks = _lane_masks(dim)
    bits = int.from_bytes(vec, "little")
    spare = (bits & masks.exponent) ^ masks.exponent  # a lane is 0 where the exponent is all ones
    if (spare - masks.low) & ~spare & masks.high:  # some lane is 0: NaN or an infinity
        raise CommandError(field, f"{field}: holds NaN or infinite values; send finite numbers")
    if not bits & masks.magnitude:  # only zeros (+0.0 or -0.0)
        raise CommandError(field, f"{field}: all zeros has no direction; send a non-zero vector")


@dataclass(frozen=True, slots=True)
class _LaneMasks:
    exponent: int  # 0x7F800000 in every 32-bit lane
    low: int  # 0x00000001 in every lane
    high: int  # 0x80000000 in every lane
    magnitude: int  # 0x7FFFFFFF in every lane


@functools.cache
def _lane_masks(dim: int) -> _LaneMasks:
    def every(lane: int) -> int:
        return int.from_bytes(lane.to_bytes(4, "little") * dim, "little")

    return _LaneMasks(every(0x7F800000), every(1), every(0x80000000), every(0x7FFFFFFF))


def check_command(op: str, c: dict[str, Any]) -> None:
    """Field checks of the memory ops."""
    if "now_ms" in c:
        check_uint(c["now_ms"], "now_ms", "send milliseconds since the Unix epoch")
    if op == "mem_expire":
        if "limit" in c and (not is_int(c["limit"]) or not 1 <= c["limit"] <= EXPIRE_BATCH):
            raise CommandError("limit", f"limit: expected an integer from 1 to {EXPIRE_BATCH}, got {short(c['limit'])}")
        return
    check_namespace(c["ns"], "ns")
    if op == "mem_delete":
        ids = c["ids"]
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_DELETE_IDS:
            raise CommandError("ids", f"ids: expected a list of 1 to {MAX_DELETE_IDS} ids, got {short(ids)}")
        for i, record_id in enumerate(ids):
            check_record_id(record_id, f"ids[{i}]")
        return
    model, dim = c["model"], c["dim"]
    if not isinstance(model, str) or not 1 <= len(model) <= MAX_MODEL_CHARS or not model.isprintable():
        raise CommandError("model", f"model: expected a model id of 1 to {MAX_MODEL_CHARS} printable characters, got {short(model)}")
    if not is_int(dim) or not 1 <= dim <= MAX_DIM:
        raise CommandError("dim", f"dim: expected an integer from 1 to {MAX_DIM}, got {short(dim)}")
    if "dedup" in c and not isinstance(c["dedup"], bool):
        raise CommandError("dedup", f"dedup: expected true or false, got {kind_of(c['dedup'])}")
    records = c["records"]
    if not isinstance(records, list) or not records:
        raise CommandError("records", f"records: expected a non-empty list of records, got {short(records)}")
    if len(records) > MAX_RECORDS:
        raise LimitError("records", f"records: {len(records)} records exceeds the {MAX_RECORDS}-record limit of one "
                         "batch; send several batches")
    for i, r in enumerate(records):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise CommandError(where, f"{where}: expected a map, got {kind_of(r)}")
        check_fields(r, where + ".", "memory record", *RECORD_FIELDS)
        check_record_id(r["id"], f"{where}.id")
        check_text(r["text"], f"{where}.text")
        if not isinstance(r["meta"], bytes) or len(r["meta"]) > MAX_META_BYTES:
            raise LimitError(f"{where}.metadata", f"{where}.metadata: expected a JSON object of at most "
                             f"{MAX_META_BYTES} bytes; send less metadata")
        check_vector_bytes(r["vec"], dim, f"{where}.vector")
        if "ttl_ms" in r and (not is_int(r["ttl_ms"]) or not 1 <= r["ttl_ms"] <= MAX_TTL_MS):
            raise CommandError(f"{where}.ttl_s", f"{where}.ttl_s: expected a number of seconds from 0.001 to "
                               f"{MAX_TTL_MS // 1000}, got {short(r['ttl_ms'])} ms")


# --- the ops -----------------------------------------------------------------------------------


class MemoryOps:
    """The memory ops against one entry's overlay (processor.py's ``_Overlay``)."""

    def __init__(self, writes, index: int, changes: list, pack, unpack) -> None:
        self.writes, self.index, self.changes = writes, index, changes
        self._pack, self._unpack = pack, unpack

    def put(self, c: dict[str, Any]) -> dict[str, Any]:
        ns, model, dim, now = c["ns"], c["model"], c["dim"], c["now_ms"]
        space = self._namespace(ns)
        if space is not None and (space["model"] != model or space["dim"] != dim):
            return {"ok": False, "error": "model_mismatch",
                    "message": f"ns: namespace {ns!r} holds {space['dim']}-dimension vectors of model "
                               f"{space['model']!r}, not {dim} of {model!r}; vectors of two models are never "
                               "mixed in one index: use another namespace, or the same model"}
        space = space or {"model": model, "dim": dim, "count": 0}
        dedup, out = c.get("dedup", True), []
        for r in c["records"]:
            digest = content_hash(r["text"])
            same = self.writes.get(hash_key(ns, digest))
            if dedup and same is not None and same.decode() != r["id"]:
                out.append({"id": same.decode(), "duplicate": True, "created": False})
                continue
            old = self.record(ns, r["id"])
            if old is not None:
                self._unlink(old)
            else:
                space["count"] += 1
            expires = now + r["ttl_ms"] if "ttl_ms" in r else 0
            record = MemoryRecord(ns, r["id"], r["text"], r["meta"], r["vec"], digest,
                                  old.created_ms if old else now, now, expires,
                                  old.create_index if old else self.index, self.index)
            self.writes.set(record_key(ns, r["id"]), encode_record(record, self._pack))
            # The first id of a text is the one dedup answers with; an id put again with
            # dedup off keeps the link of the id that holds it.
            if same is None or (old is not None and old.hash == digest):
                self.writes.set(hash_key(ns, digest), r["id"].encode())
            if expires:
                self.writes.set(expiry_key(expires, ns, r["id"]), b"")
            self.changes.append(MemoryChange(ns, r["id"], self.index, record))
            out.append({"id": r["id"], "duplicate": False, "created": old is None})
        self.writes.set(namespace_key(ns), self._pack(space))
        return {"ok": True, "index": self.index, "records": out}

    def delete(self, c: dict[str, Any]) -> dict[str, Any]:
        ns, deleted = c["ns"], []
        for record_id in c["ids"]:
            if (old := self.record(ns, record_id)) is not None:
                self._remove(old)
                deleted.append(record_id)
        return {"ok": True, "index": self.index, "deleted": deleted}

    def expire(self, c: dict[str, Any]) -> dict[str, Any]:
        now, removed = c["now_ms"], 0
        # The store's oldest expiries: this op writes no expiry keys before reading them.
        for key, _ in self.writes.scan_before(MEM_EXPIRY, c.get("limit", EXPIRE_BATCH)):
            expires, ns, record_id = split_expiry_key(key)
            if expires > now:
                break
            old = self.record(ns, record_id)
            if old is not None and old.expires_ms == expires:
                self._remove(old)
                removed += 1
            elif self.writes.get(key) is not None:
                self.writes.set(key, None)  # a stale link (never written so; kept safe)
        return {"ok": True, "index": self.index, "expired": removed}

    # --- record access through the overlay ---

    def record(self, ns: str, record_id: str) -> MemoryRecord | None:
        raw = self.writes.get(record_key(ns, record_id))
        return None if raw is None else decode_record(ns, record_id, raw, self._unpack)

    def _namespace(self, ns: str) -> dict[str, Any] | None:
        raw = self.writes.get(namespace_key(ns))
        return None if raw is None else self._unpack(raw)

    def _unlink(self, old: MemoryRecord) -> None:
        """Drops the record's dedup and expiry links (the record itself is rewritten or removed)."""
        if self.writes.get(hash_key(old.ns, old.hash)) == old.id.encode():
            self.writes.set(hash_key(old.ns, old.hash), None)
        if old.expires_ms:
            self.writes.set(expiry_key(old.expires_ms, old.ns, old.id), None)

    def _remove(self, old: MemoryRecord) -> None:
        self._unlink(old)
        self.writes.set(record_key(old.ns, old.id), None)
        space = self._namespace(old.ns)
        space["count"] -= 1
        # An empty namespace is gone: its model binding with it.
        self.writes.set(namespace_key(old.ns), self._pack(space) if space["count"] > 0 else None)
        self.changes.append(MemoryChange(old.ns, old.id, self.index, None))


OPS = {"mem_put": MemoryOps.put, "mem_delete": MemoryOps.delete, "mem_expire": MemoryOps.expire}
