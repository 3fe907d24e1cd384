"""Remember, recall, get, forget, list: the memory operations the HTTP API and ``synapse.Node``
both use, and the leader's expiry of records whose time is up.

Bad input raises ``CommandError`` (``LimitError`` for sizes) naming the field, before anything
is proposed; the command processor checks the same limits again at apply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from synapse.memory.cache import EmbeddingCache
from synapse.memory.embedding import Embedder
from synapse.memory.index import MemoryIndex
from synapse.memory.libraries import load
from synapse.state import keys, memory
from synapse.state.commands import validate_command
from synapse.state.validation import CommandError, LimitError, kind_of, short

MAX_K = 100
MAX_BATCH_TEXT_BYTES = 2 << 20  # one mem_put is one log entry: keep it well under the 4 MiB entry cap
MAX_WHERE_DEPTH = 8
EXTERNAL = "external:"  # the model id prefix of vectors a caller sent
_WHERE_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")
RECORD_INPUT = {"id", "text", "metadata", "ttl_s", "vector"}
EXPIRY_CHECK_S = 1.0


class NamespaceNotFound(LookupError):
    """A namespace that holds no records (or a record that does not exist)."""


class ModelMismatch(ValueError):
    """A namespace's vectors are of another model than the request's."""


class CommandRefused(RuntimeError):
    """The state machine refused the command (its token, a failed check): ``result`` says why."""

    def __init__(self, result: dict) -> None:
        super().__init__(result.get("message", result.get("error", "refused")))
        self.result = result


class MemoryCluster(Protocol):
    """What memory needs of the cluster service (synapse/cluster/service.py's Cluster)."""

    def read(self, fn: Callable[[Any], Any]) -> Any: ...
    async def propose(self, command: dict, size_hint: int) -> dict: ...
    async def barrier(self) -> None: ...
    def applied(self) -> tuple[int, bytes]: ...
    def is_leader(self) -> bool: ...


Stamp = Callable[[dict, dict], dict]  # (what identifies the request, what the node adds) -> the command


def _plain(identity: dict, volatile: dict) -> dict:
    return {**identity, **volatile}


class MemoryService:
    def __init__(self, cluster: MemoryCluster, index: MemoryIndex, embedder: Embedder, request_timeout: float,
                 cache: EmbeddingCache | None = None) -> None:
        self._cluster = cluster
        self.index = index
        self.embedder = embedder
        self.cache = cache  # query embeddings (Redis), or None
        self._timeout = request_timeout

    # --- writes ---

    async def remember(self, ns: str, records: list[dict], *, dedup: bool = True, model: str | None = None,
                       stamp: Stamp = _plain) -> dict:
        """Stores ``records`` (``{"text", "id"?, "metadata"?, "ttl_s"?, "vector"?}``) in one log
        entry. Texts without a vector are embedded here, once, before proposing."""
        memory.check_namespace(ns)
        if not isinstance(records, list) or not records:
            raise CommandError("records", f"records: expected a non-empty list of records, got {short(records)}")
        if len(records) > memory.MAX_RECORDS:
            raise LimitError("records", f"records: {len(records)} records exceeds the {memory.MAX_RECORDS}-record "
                             "limit of one batch; send several batches")
        if not isinstance(dedup, bool):
            raise CommandError("dedup", f"dedup: expected true or false, got {kind_of(dedup)}")
        parsed = [_record_input(r, f"records[{i}]" if len(records) > 1 else "body") for i, r in enumerate(records)]
        size = sum(len(r["text"].encode()) for r in parsed)
        if size > MAX_BATCH_TEXT_BYTES:
            raise LimitError("records", f"records: {size} bytes of text exceeds the {MAX_BATCH_TEXT_BYTES}-byte "
                             "limit of one batch; send several batches")
        given = [r for r in parsed if "vec" in r]
        if given and len(given) != len(parsed):
            raise CommandError("vector", "vector: some records carry a vector and some do not; a batch is embedded "
                               "by one model: send a vector with every record, or with none")
        if model is not None and not given:
            raise CommandError("model", "model: names the model of the vectors you send; without vectors the node "
                               "embeds the text with its own model")
        if given:
            if model is not None and (not isinstance(model, str) or not 1 <= len(model) <= 100 or not model.isprintable()):
                raise CommandError("model", f"model: expected a name of 1 to 100 printable characters, got {short(model)}")
            model_id, dim = EXTERNAL + (model or "unnamed"), len(given[0]["vec"]) // 4
            if any(len(r["vec"]) != 4 * dim for r in given):
                raise CommandError("vector", "vector: the records' vectors differ in dimension; send one dimension")
        else:
            vectors = await self.embedder.embed_together([r["text"] for r in parsed])
            for r, vec in zip(parsed, vectors):
                r["vec"] = vec
            model_id, dim = self.embedder.model_id, self.embedder.dim
        space = self._cluster.read(lambda p: p.memory_namespace(ns))
        if space is not None and (space["model"] != model_id or space["dim"] != dim):
            raise ModelMismatch(f"namespace {ns!r} holds {space['dim']}-dimension vectors of model {space['model']!r}, "
                                f"not {dim} of {model_id!r}; vectors of two models are never mixed in one index: use "
                                "another namespace, or the same model")
        identity = {"op": "mem_put", "ns": ns, "records": records, "dedup": dedup}
        if model is not None:
            identity["model_name"] = model  # the request's, for its hash only
        command = stamp(identity, {"model": model_id, "dim": dim, "now_ms": _now_ms(), "records": parsed})
        command.pop("model_name", None)
        validate_command(command, check_json=False)
        hint = sum(len(r["text"]) + len(r["vec"]) + len(r["meta"]) + 96 for r in parsed) + 256
        return _checked(await self._cluster.propose(command, hint), "records")

    async def forget(self, ns: str, ids: list[str], *, stamp: Stamp = _plain) -> dict:
        memory.check_namespace(ns)
        command = stamp({"op": "mem_delete", "ns": ns, "ids": ids}, {})
        validate_command(command, check_json=False)
        return _checked(await self._cluster.propose(command, 64 + sum(len(i) for i in ids)), "deleted")

    # --- reads ---

    async def recall(self, ns: str, *, query: str | None = None, vector: list | None = None, k: int = 10,
                     where: dict | None = None, min_score: float | None = None, consistency: str = "linearizable",
                     after_barrier: Callable[[], None] | None = None) -> dict:
        """The ``k`` records nearest ``query`` (embedded here) or ``vector``, best first, each
        with its cosine similarity as ``score``."""
        memory.check_namespace(ns)
        if (query is None) == (vector is None):
            raise CommandError("query", "query: send exactly one of 'query' (text) and 'vector'")
        if type(k) is not int or not 1 <= k <= MAX_K:
            raise CommandError("k", f"k: expected an integer from 1 to {MAX_K}, got {short(k)}")
        if where is not None:
            check_where(where)
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))
                                      or not -1 <= min_score <= 1):
            raise CommandError("min_score", f"min_score: expected a number from -1 to 1, got {short(min_score)}")
        if query is not None:
            memory.check_text(query, "query")
        await self._consistent(consistency, after_barrier)
        space = self._space(ns)
        if vector is not None:
            vec = _vector_bytes(vector, "vector", space["dim"])
        elif space["model"].startswith(EXTERNAL):
            raise CommandError("query", f"query: namespace {ns!r} holds vectors of {space['model'][len(EXTERNAL):]!r} "
                               "sent by callers, which this node cannot make from text; send 'vector'")
        else:
            vec = await self._embed_query(query)
            if self.embedder.model_id != space["model"]:
                raise ModelMismatch(f"namespace {ns!r} holds vectors of model {space['model']!r}; this node embeds "
                                    f"with {self.embedder.model_id!r}; send 'vector' made by that model")
        hits = await self.index.query(ns, space["model"], space["dim"], vec, k, where, self._timeout)
        rows = dict(self._cluster.read(lambda p: p.memory_rows(ns, [i for i, _ in hits])))
        now, out = _now_ms(), []
        for record_id, distance in hits:
            raw = rows.get(record_id)
            if raw is None:
                continue  # removed since the index saw it (a stale read)
            record = memory.decode_record(ns, record_id, raw, keys.unpack)
            score = 1.0 - float(distance)
            if (record.expires_ms and record.expires_ms <= now) or (min_score is not None and score < min_score):
                continue
            out.append({**record_json(record), "score": round(score, 6)})
        return {"namespace": ns, "results": out}

    async def get(self, ns: str, record_id: str, *, consistency: str = "linearizable",
                  after_barrier: Callable[[], None] | None = None) -> dict:
        memory.check_namespace(ns)
        memory.check_record_id(record_id)
        await self._consistent(consistency, after_barrier, index=False)
        raw = self._cluster.read(lambda p: p.memory_rows(ns, [record_id]))[0][1]
        record = None if raw is None else memory.decode_record(ns, record_id, raw, keys.unpack)
        if record is None or (record.expires_ms and record.expires_ms <= _now_ms()):
            raise NamespaceNotFound(f"memory {record_id!r} does not exist in namespace {ns!r}")
        return record_json(record)

    async def list(self, ns: str, *, prefix: str = "", limit: int = 100, start_after: str | None = None,
                   consistency: str = "linearizable", after_barrier: Callable[[], None] | None = None) -> dict:
        memory.check_namespace(ns)
        if not isinstance(prefix, str) or len(prefix) > memory.MAX_ID_CHARS or "\x00" in prefix:
            raise CommandError("prefix", f"prefix: expected at most {memory.MAX_ID_CHARS} characters, got {short(prefix)}")
        if start_after is not None:
            memory.check_record_id(start_after, "start_after")
        await self._consistent(consistency, after_barrier, index=False)
        rows = self._cluster.read(lambda p: p.memory_scan_rows(ns, prefix, limit + 1, start_after))
        now, items = _now_ms(), []
        for key, raw in rows[:limit]:
            record = memory.decode_record(ns, memory.split_record_key(key)[1], raw, keys.unpack)
            if not (record.expires_ms and record.expires_ms <= now):
                items.append(record_json(record))
        more = len(rows) > limit
        return {"namespace": ns, "items": items,
                "next_start_after": memory.split_record_key(rows[limit - 1][0])[1] if more else None}

    async def _embed_query(self, query: str) -> bytes:
        """The query's vector: from the cache when it holds it (the same bytes the model gave)."""
        if self.cache is None:
            return (await self.embedder.embed_async([query]))[0]
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, lambda: self.embedder.model_id)  # loads the model once
        vec = await loop.run_in_executor(None, self.cache.get, model, query)
        if vec is None or len(vec) != 4 * self.embedder.dim:
            vec = (await self.embedder.embed_async([query]))[0]
            await loop.run_in_executor(None, self.cache.put, model, query, vec)
        return vec

    def _space(self, ns: str) -> dict:
        space = self._cluster.read(lambda p: p.memory_namespace(ns))
        if space is None:
            raise NamespaceNotFound(f"namespace {ns!r} holds no memories")
        return space

    async def _consistent(self, consistency: str, after_barrier, index: bool = True) -> None:
        """A linearizable read waits for a committed barrier (and, to recall, for this node's
        index to hold everything applied up to it); a stale one answers at once."""
        if consistency == "stale":
            return
        if consistency != "linearizable":
            raise CommandError("consistency", f"consistency: expected 'linearizable' (default) or 'stale', got "
                               f"{short(consistency)}")
        await self._cluster.barrier()
        if after_barrier is not None:
            after_barrier()
        if index:
            await self.index.wait_for(self._cluster.applied()[0], self._timeout)

    # --- expiry (on the leader) ---

    async def expire_due(self) -> None:
        """On the leader, proposes ``mem_expire`` with its clock when a record's time is up:
        every node removes the same records at the same log index."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            try:
                if not self._cluster.is_leader():
                    continue
                due = self._cluster.read(lambda p: p.memory_next_expiry())
                now = _now_ms()
                if due is not None and due <= now:
                    await self._cluster.propose({"op": "mem_expire", "now_ms": now}, 64)
            except Exception as e:  # a lost leadership, a timeout: the next round tries again
                logging.getLogger(__name__).debug("memory expiry: %s", e)


def record_json(record: memory.MemoryRecord) -> dict:
    return {
        "id": record.id, "namespace": record.ns, "text": record.text,
        "metadata": json.loads(record.meta) if record.meta else {},
        "created_ms": record.created_ms, "updated_ms": record.updated_ms,
        "expires_ms": record.expires_ms or None, "index": record.mod_index,
    }


def check_where(where: Any, field: str = "where", depth: int = 0) -> None:
    """A metadata filter: ``{"key": value}``, ``{"key": {"$op": value}}`` with $eq, $ne, $gt,
    $gte, $lt, $lte, $in, $nin, or ``{"$and" | "$or": [filter, ...]}``."""
    if depth > MAX_WHERE_DEPTH:
        raise CommandError(field, f"{field}: nested deeper than {MAX_WHERE_DEPTH} levels")
    if not isinstance(where, dict) or len(where) != 1:
        raise CommandError(field, f"{field}: expected an object with exactly one key (a metadata field, or "
                           f"$and / $or), got {short(where)}")
    (name, value), = where.items()
    if name in ("$and", "$or"):
        if not isinstance(value, list) or len(value) < 2:
            raise CommandError(f"{field}.{name}", f"{field}.{name}: expected a list of at least 2 filters")
        for i, sub in enumerate(value):
            check_where(sub, f"{field}.{name}[{i}]", depth + 1)
        return
    _check_meta_key(name, f"{field}")
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in _WHERE_OPS:
            raise CommandError(f"{field}.{name}", f"{field}.{name}: expected one operator of {', '.join(_WHERE_OPS)}, "
                               f"got {short(value)}")
        (op, operand), = value.items()
        if op in ("$in", "$nin"):
            if not isinstance(operand, list) or not operand or not all(_is_scalar(v) for v in operand):
                raise CommandError(f"{field}.{name}.{op}", f"{field}.{name}.{op}: expected a non-empty list of "
                                   "strings, numbers or booleans")
        elif not _is_scalar(operand):
            raise CommandError(f"{field}.{name}.{op}", f"{field}.{name}.{op}: expected a string, number or boolean")
    elif not _is_scalar(value):
        raise CommandError(f"{field}.{name}", f"{field}.{name}: expected a string, number, boolean or "
                           "{\"$op\": value}")


def _is_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(1 << 63) <= value < (1 << 63)
    return isinstance(value, (str, bool))


def _check_meta_key(name: Any, field: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or name.startswith(("_", "$")) or "\x00" in name:
        raise CommandError(field, f"{field}: metadata keys are 1 to 128 characters not starting with '_' or '$' "
                           f"(reserved), got {short(name)}")


def _record_input(r: Any, where: str) -> dict:
    """A record as a client sends it, checked, in the command's form."""
    if not isinstance(r, dict):
        raise CommandError(where, f"{where}: expected an object with 'text', got {kind_of(r)}")
    unknown = sorted(set(r) - RECORD_INPUT)
    if unknown:
        raise CommandError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]}: unknown field; a memory has "
                           f"{', '.join(sorted(RECORD_INPUT))}")
    if "text" not in r:
        raise CommandError(f"{where}.text", f"{where}.text: missing; a memory needs its text")
    out: dict[str, Any] = {"id": r.get("id") or uuid.uuid4().hex, "text": r["text"]}
    memory.check_record_id(out["id"], f"{where}.id")
    memory.check_text(r["text"], f"{where}.text")
    meta = r.get("metadata") or {}
    if not isinstance(meta, dict) or len(meta) > memory.MAX_META_KEYS:
        raise CommandError(f"{where}.metadata", f"{where}.metadata: expected a flat object of at most "
                           f"{memory.MAX_META_KEYS} fields, got {short(meta)}")
    for name, value in meta.items():
        _check_meta_key(name, f"{where}.metadata")
        if not _is_scalar(value):
            raise CommandError(f"{where}.metadata.{name}", f"{where}.metadata.{name}: expected a string, number or "
                               f"boolean (metadata is flat), got {short(value)}")
    out["meta"] = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(out["meta"]) > memory.MAX_META_BYTES:
        raise LimitError(f"{where}.metadata", f"{where}.metadata: {len(out['meta'])} bytes exceeds the "
                         f"{memory.MAX_META_BYTES}-byte limit")
    if r.get("ttl_s") is not None:
        ttl = r["ttl_s"]
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0.001 <= ttl <= memory.MAX_TTL_MS / 1000:
            raise CommandError(f"{where}.ttl_s", f"{where}.ttl_s: expected seconds from 0.001 to "
                               f"{memory.MAX_TTL_MS // 1000}, got {short(ttl)}")
        out["ttl_ms"] = max(1, round(ttl * 1000))
    if r.get("vector") is not None:
        out["vec"] = _vector_bytes(r["vector"], f"{where}.vector", None)
    return out


def _vector_bytes(vector: Any, field: str, dim: int | None) -> bytes:
    if not isinstance(vector, list) or not 1 <= len(vector) <= memory.MAX_DIM:
        raise CommandError(field, f"{field}: expected a list of 1 to {memory.MAX_DIM} numbers, got {short(vector)}")
    if dim is not None and len(vector) != dim:
        raise CommandError(field, f"{field}: {len(vector)} dimensions, but the namespace's vectors have {dim}")
    bad = CommandError(field, f"{field}: holds a value that is not a finite number (NaN, infinity, text...)")
    if not set(map(type, vector)) <= _NUMBER_TYPES:  # type(), not isinstance: True is not a number here
        raise bad
    np = load("numpy")  # one C pass each instead of a Python check per element (~6x faster at 384)
    try:
        values = np.array(vector, dtype="<f8")
    except OverflowError:  # an integer past float64
        raise bad from None
    if not np.isfinite(values).all() or np.abs(values).max() >= 3e38:  # 3e38: inside float32's range
        raise bad
    single = values.astype("<f4")  # rounded to nearest, as struct.pack("<f") does
    if not single.any():  # zeros, or values too small for float32 (below ~1.4e-45)
        raise CommandError(field, f"{field}: all zeros (in float32) has no direction; send a non-zero vector")
    return single.tobytes()


_NUMBER_TYPES = frozenset((int, float))


def _checked(result: dict, field: str) -> dict:
    if result.get("ok") and field in result:
        return result
    if result.get("error") == "model_mismatch":
        raise ModelMismatch(result.get("message", "model mismatch").removeprefix("ns: "))
    raise CommandRefused(result)


def _now_ms() -> int:
    return int(time.time() * 1000)
