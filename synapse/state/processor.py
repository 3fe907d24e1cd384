"""The command processor: applies one log entry to the state store, purely and deterministically.

The same processor runs in Raft apply, log replay, snapshot install and offline audit, so the
result and the new state depend only on (state, log index, entry bytes); DESIGN.md lists the
invariants. The shape of one ``apply_entry``:

1. decode the entry (a bad entry is one ``bad_entry`` result and changes nothing);
2. run each command against an overlay of pending writes, in order, each one inside a
   savepoint, so a command that fails midway leaves no trace and later commands still run;
3. bound the dedup table, extend the audit chain (every entry, bad ones included), then hand
   the overlay to Rust as one ``store.apply`` batch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synapse import _core
from synapse.state import keys, memory, security
from synapse.state.tasks import TaskOps
from synapse.state.commands import (
    CommandError,
    EntryError,
    check_key,
    check_rid,
    decode_entry,
    validate_command,
)
from synapse.state.records import KvChange, KvRecord
from synapse.state.validation import MAX_UINT64, short

if TYPE_CHECKING:
    from synapse._core import StateStore

_TASK_OPS = {
    "task_submit": TaskOps.submit, "task_cancel": TaskOps.cancel, "task_assign": TaskOps.assign,
    "task_start": TaskOps.start, "task_finish": TaskOps.finish,
    "worker_register": TaskOps.register_worker, "worker_down": TaskOps.worker_down,
}
_SECURITY_OPS = security.OPS
_MEMORY_OPS = memory.OPS
# The ops that never write principals, roles or tokens (security.py alone does, and a rollback
# replaces the whole state): a grant found before one of them still holds after it.
_KEEPS_GRANTS = frozenset(_TASK_OPS) | frozenset(_MEMORY_OPS) | {"put", "delete", "txn", "noop", "checkpoint"}
DEDUP_CAPACITY = 100_000
TASK_RETENTION = 100_000  # ended tasks kept in the state, newest; older ones are evicted
CHECKPOINT_RECORDS = 256  # ckpt/ records kept in the state, newest first

Result = dict[str, Any]


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """What applying one entry produced: one result per command (or a single ``bad_entry``),
    and the kv changes in apply order, for storage materialization."""

    results: list[Result]
    changes: list[KvChange]
    # The audit chain head after this entry (the index is the entry's).
    chain: bytes = keys.GENESIS_CHAIN
    # What happened to checkpoints, for the node's integrity tracker: ("checkpoint", index)
    # when this entry made one, ("snapshot", index) as well when it is to be snapshotted (a
    # rollback target); ("report", checkpoint, node_id, agreed pair or None) per report.
    events: tuple = ()
    # The memory records this entry changed, in apply order, for the memory index.
    memory: tuple = ()


class CommandProcessor:
    """Applies entries to a ``synapse._core.StateStore`` and serves local reads from it.

    ``dedup_capacity`` is part of the replicated behaviour: every node must use the same one."""

    def __init__(self, store: StateStore, dedup_capacity: int = DEDUP_CAPACITY,
                 store_lock: AbstractContextManager | None = None, kv_fast_path: bool = True) -> None:
        """``store_lock`` is held around each change to the store, and only then: readers on
        other threads that hold it see the state between two entries, and wait for no more
        than the one Rust batch an entry ends with (its commands run before, outside it) — or
        the one Rust call that applies a whole entry of puts and deletes.

        ``kv_fast_path``: such entries are applied by ``StateStore.apply_kv_entry`` (Rust),
        which proves the ordinary case only and leaves every other entry, unchanged, to the
        Python code below — the definition, which tests run it against (DESIGN.md). Off: every
        entry is applied here."""
        if type(dedup_capacity) is not int or dedup_capacity < 0:
            raise ValueError(f"dedup_capacity: expected an integer >= 0, got {dedup_capacity!r}")
        self.store = store
        self.dedup_capacity = dedup_capacity
        self._store_lock = store_lock if store_lock is not None else nullcontext()
        self.kv_fast_path = kv_fast_path
        self.fast_entries = 0  # entries the Rust fast path applied (the rest: this module)

    def apply_entry(self, index: int, payload: bytes) -> EntryOutcome:
        """Apply the entry at log ``index``. Never raises (an exception here would make
        PySyncObj re-apply the entry forever); every failure is a result."""
        if type(index) is not int or not 0 <= index <= MAX_UINT64:
            return EntryOutcome([_error("internal", f"index: {index!r} is not a log index (0 to 2**64-1)")], [])
        if self.kv_fast_path and type(payload) is bytes:
            with self._store_lock:
                # The rid count never nears 2**64: a larger capacity bounds nothing more.
                fast = self.store.apply_kv_entry(index, payload, min(self.dedup_capacity, MAX_UINT64))
            if fast is not None:
                self.fast_entries += 1
                results, changes, chain = fast
                return EntryOutcome(results, [KvChange(*c) for c in changes], chain)
        count, changes, events, memory_changes = 1, [], (), ()
        try:
            # PySyncObj hands over bytes; anything else is chained as empty (and is a bad entry).
            chained = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else b""
            chain = _core.chain(self.chain()[1], index, chained)
            link = (keys.CHAIN, keys.encode_chain(index, chain))
        except Exception as exc:  # a damaged meta/chain: nothing can be applied safely
            return EntryOutcome([_internal(exc)], [])
        try:
            try:
                commands = decode_entry(payload)
            except EntryError as exc:
                results, ops = [_error("bad_entry", str(exc))], []
            else:
                count = len(commands)
                run = _EntryRun(self.store, index)
                if count > 1 and any(isinstance(c, dict) and c.get("op") == "rollback" for c in commands):
                    # The whole state is replaced after a rollback: other commands in its entry
                    # would report results that do not survive it.
                    alone = "entry: a rollback must be the only command in its entry; send it alone"
                    results, ops = [_error("bad_entry", alone) for _ in commands], []
                else:
                    results = [run.apply(command) for command in commands]
                    self._bound_dedup(run.writes)
                    self._bound_tasks(run.writes)
                    ops, changes, events = run.writes.ops(), run.changes, tuple(run.events)
                    memory_changes = tuple(run.memory)
            with self._store_lock:
                self.store.apply([*ops, link])
        except Exception as exc:
            # Nothing reached the store: store.apply validates its whole batch before changing
            # anything, and it is the last step. The entry still extends the chain.
            results, changes, events, memory_changes = [_internal(exc) for _ in range(count)], [], (), ()
            try:
                with self._store_lock:
                    self.store.apply([link])
            except Exception:
                pass
        return EntryOutcome(results, changes, chain, events, memory_changes)

    def chain(self) -> tuple[int, bytes]:
        """(index of the last applied entry, audit chain head after it)."""
        return keys.decode_chain(self.store.get(keys.CHAIN))

    def checkpoints(self, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        """Checkpoint records, newest first: ``[(index, record)]`` (see keys.decode_checkpoint)."""
        rows = self.store.scan_prefix(keys.CKPT)  # oldest first (key order is index order)
        newest = rows[::-1] if limit is None else rows[: -limit - 1 : -1]
        # Only the records asked for are decoded: /v1/cluster/status asks for one of up to 256.
        return [(keys.ckpt_index(k), keys.decode_checkpoint(v)) for k, v in newest]

    def checkpoint(self, index: int) -> dict[str, Any] | None:
        raw = self.store.get(keys.ckpt_key(index))
        return None if raw is None else keys.decode_checkpoint(raw)

    def finish_rollback(self, index: int, chain: bytes, target: int, agreed: list[bytes], before: StateStore) -> None:
        """After the state was replaced by the checkpoint's (at ``target``) for the rollback
        entry at ``index``: the audit chain goes on from that entry (it covers the undone
        entries too), the checkpoint keeps its agreement (reached after it, so not in its
        state), and the rollback is recorded.

        Tasks and workers are *not* rolled back: they are carried over from ``before`` (the
        state the rollback entry met). A rollback undoes writes; it cannot undo a task that
        ran, and restoring the queue would run tasks pending at the checkpoint a second time.
        Principals, roles and tokens are carried over too: a rollback must never bring back a
        token revoked after the checkpoint."""
        record = self.checkpoint(target)
        ops = [(keys.CHAIN, keys.encode_chain(index, chain)), (keys.ROLLBACK, keys.encode_rollback(index, target))]
        for prefix in keys.ROLLBACK_KEEPS:
            ops += [(k, None) for k, _ in self.store.scan_prefix(prefix)]
            ops += before.scan_prefix(prefix)
        for key in keys.ROLLBACK_KEEPS_META:
            ops.append((key, before.get(key)))
        if record is not None:
            record["agreed"], record["agreed_index"] = agreed, record["agreed_index"] or index
            ops.append((keys.ckpt_key(target), keys.encode_checkpoint(record)))
        with self._store_lock:
            self.store.apply(ops)

    def get(self, key: str) -> KvRecord | None:
        """The key's record in this node's state (stale on a follower); None also for a key
        that no command could have written (empty, too long, NUL, not UTF-8)."""
        try:
            check_key(key)
        except CommandError:
            return None
        raw = self.store.get(keys.kv_key(key))
        return None if raw is None else keys.decode_kv(key, raw)

    def scan(self, prefix: str, limit: int | None, start_after: str | None = None) -> list[KvRecord]:
        """Records whose key starts with ``prefix``, in key (UTF-8 byte) order, after
        ``start_after`` if given, at most ``limit`` of them (None: all)."""
        return keys.decode_kv_rows(self.scan_rows(prefix, limit, start_after))

    def scan_rows(self, prefix: str, limit: int | None, start_after: str | None = None) -> list[tuple[bytes, bytes]]:
        """``scan`` as the store's raw rows: decode them with ``keys.decode_kv_rows`` after
        letting go of the state (the lookup is all a reader needs it for)."""
        if not isinstance(prefix, str):
            raise CommandError("prefix", f"prefix: expected a string, got {type(prefix).__name__}")
        if limit is not None and (type(limit) is not int or limit < 0):
            raise CommandError("limit", f"limit: expected an integer >= 0, got {limit!r}")
        if start_after is not None and not isinstance(start_after, str):
            raise CommandError(
                "start_after", f"start_after: expected a string, got {type(start_after).__name__}"
            )
        try:
            start = keys.kv_key(prefix)
            if start_after is not None:
                # k + b"\0" is the smallest key greater than k.
                start = max(start, keys.kv_key(start_after) + b"\x00")
        except UnicodeEncodeError:
            raise CommandError(
                "prefix", "prefix/start_after: not encodable as UTF-8; use valid Unicode text"
            ) from None
        end = keys.prefix_end(keys.kv_key(prefix))
        if limit == 0 or (end is not None and start >= end):
            return []
        return self.store.scan(start, end, limit)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Registered nodes in node-id order: ``{node_id: {"api", "raft", "index"}}``."""
        return {keys.node_name(k): keys.decode_node(v) for k, v in self.store.scan_prefix(keys.NODE)}

    def _bound_dedup(self, writes: _Overlay) -> None:
        """Keep at most ``dedup_capacity`` request ids, evicting the oldest in ridx/ key order
        (log index, then rid bytes) — the same victims on every node."""

        def evict(victim: bytes) -> None:
            writes.set(victim, None)
            writes.set(keys.rid_key(keys.split_ridx(victim)[1]), None)

        self._evict_oldest(writes, keys.RIDX, keys.RID_COUNT, self.dedup_capacity, evict)

    def _bound_tasks(self, writes: _Overlay) -> None:
        """Keep the newest TASK_RETENTION ended tasks; evict the oldest (tdone/ key order),
        with their records and idempotency keys."""

        def evict(victim: bytes) -> None:
            task_id = keys.task_done_task(victim)
            raw = writes.get(keys.task_key(task_id))
            if raw is not None and (idem := keys.unpack(raw).get("idempotency_key")) is not None:
                writes.set(keys.task_idem_key(idem), None)
            writes.set(keys.task_key(task_id), None)
            writes.set(victim, None)

        self._evict_oldest(writes, keys.TASK_DONE, keys.TASK_DONE_COUNT, TASK_RETENTION, evict)

    def _evict_oldest(self, writes: _Overlay, prefix: bytes, count_key: bytes, capacity: int, evict) -> None:
        """A bounded index under ``prefix`` (key order = age): counts this entry's new keys and
        evicts the oldest beyond ``capacity``. Only ``excess`` keys are read from the store —
        before eviction the overlay deletes none of them, so the store's oldest are live."""
        added = sorted(k for k, v in writes.ops() if k.startswith(prefix) and v is not None)
        if not added:
            return
        count = keys.decode_count(self.store.get(count_key)) + len(added)
        excess = count - capacity
        if excess > 0:
            oldest = [k for k, _ in self.store.scan_prefix(prefix, excess)]
            for victim in sorted(oldest + added)[:excess]:
                evict(victim)
            count -= excess
        writes.set(count_key, keys.encode_count(count))
        writes.commit()

    # --- agent memory (local, possibly stale reads; see synapse/memory) ---

    def memory_namespace(self, ns: str) -> dict[str, Any] | None:
        """``{"model", "dim", "count"}`` of a namespace holding records, else None."""
        raw = self.store.get(memory.namespace_key(ns))
        return None if raw is None else keys.unpack(raw)

    def memory_namespaces(self) -> list[tuple[str, dict[str, Any]]]:
        """Every namespace holding records, in name order, with its ``{"model", "dim", "count"}``."""
        return [(k[len(memory.MEM_NS):].decode(), keys.unpack(v)) for k, v in self.store.scan_prefix(memory.MEM_NS)]

    def memory_rows(self, ns: str, ids: list[str]) -> list[tuple[str, bytes | None]]:
        """The stored bytes of each id's record (None: absent); decode with ``memory.decode_record``."""
        return [(i, self.store.get(memory.record_key(ns, i))) for i in ids]

    def memory_scan_rows(self, ns: str, prefix: str, limit: int | None,
                         start_after: str | None = None) -> list[tuple[bytes, bytes]]:
        """Rows of the namespace's records whose id starts with ``prefix``, in id order."""
        base = memory.record_prefix(ns)
        start = base + prefix.encode()
        if start_after is not None:
            start = max(start, base + start_after.encode() + b"\x00")
        end = keys.prefix_end(base + prefix.encode())
        if limit == 0 or (end is not None and start >= end):
            return []
        return self.store.scan(start, end, limit)

    def memory_all_rows(self, start_after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """A page of every namespace's records, in key order (the index rebuilds from them)."""
        start = memory.MEM if start_after is None else start_after + b"\x00"
        return self.store.scan(start, keys.prefix_end(memory.MEM), limit)

    def memory_next_expiry(self) -> int | None:
        """The earliest expiry time of any record (ms), or None."""
        rows = self.store.scan_prefix(memory.MEM_EXPIRY, 1)
        return memory.split_expiry_key(rows[0][0])[0] if rows else None

    # --- tasks and workers (local, possibly stale reads; see synapse/orchestrator) ---

    def task(self, task_id: str) -> dict[str, Any] | None:
        raw = self.store.get(keys.task_key(task_id))
        return None if raw is None else keys.unpack(raw)

    def tasks(self, state: str | None = None, limit: int = 100, start_after: str | None = None) -> list[tuple[str, dict]]:
        """Tasks in id order (after ``start_after``), optionally only those in ``state``."""
        start, end = (keys.task_key(start_after) + b"\x00" if start_after else keys.TASK), keys.prefix_end(keys.TASK)
        out: list[tuple[str, dict]] = []
        while len(out) < limit:
            rows = self.store.scan(start, end, 256)  # in pages: a state filter may skip many
            for key, raw in rows:
                task = keys.unpack(raw)
                if state is None or task["state"] == state:
                    out.append((keys.task_name(key), task))
                    if len(out) >= limit:
                        break
            if len(rows) < 256:
                break
            start = rows[-1][0] + b"\x00"
        return out

    def recent_tasks(self, limit: int, applied_index: int) -> list[tuple[str, dict]]:
        """The leased tasks, then the pending ones in scheduling order, then the ended ones
        newest first — at most ``limit`` in all, in O(limit) rather than over every task kept
        (the ended tasks' index sorts by the entry that ended each: scanned from a window of
        recent entries, doubled until it holds enough)."""
        ids = [keys.task_lease_task(k) for k, _ in self.store.scan_prefix(keys.TASK_LEASE, limit)]
        if len(ids) < limit:
            ids += [keys.task_queue_task(k) for k, _ in self.store.scan_prefix(keys.TASK_QUEUE, limit - len(ids))]
        wanted, window = limit - len(ids), 256
        while wanted > 0:
            start = keys.task_done_key(max(0, applied_index - window), "")
            rows = self.store.scan(start, keys.prefix_end(keys.TASK_DONE), None)
            if len(rows) >= wanted or window > applied_index:
                ids += [keys.task_done_task(k) for k, _ in reversed(rows[-wanted:])]
                break
            window *= 4
        out = []
        for task_id in ids[:limit]:
            raw = self.store.get(keys.task_key(task_id))
            if raw is not None:
                out.append((task_id, keys.unpack(raw)))
        return out

    def task_counts(self) -> dict[str, int]:
        """{"pending", "leased" (assigned or running), "ended"} without decoding any task: the
        queue's keys, the leases' keys (O(queued + leased)), the ended tasks' kept count."""
        return {"pending": len(self.store.scan_prefix(keys.TASK_QUEUE)),
                "leased": len(self.store.scan_prefix(keys.TASK_LEASE)),
                "ended": keys.decode_count(self.store.get(keys.TASK_DONE_COUNT))}

    def pending_tasks(self, limit: int) -> list[str]:
        """Pending task ids in scheduling order: priority, then submission."""
        return [keys.task_queue_task(k) for k, _ in self.store.scan_prefix(keys.TASK_QUEUE, limit)]

    def worker(self, worker_id: str) -> dict[str, Any] | None:
        raw = self.store.get(keys.worker_key(worker_id))
        return None if raw is None else keys.unpack(raw)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {keys.worker_name(k): keys.unpack(v) for k, v in self.store.scan_prefix(keys.WORKER)}

    def worker_leases(self, worker_id: str) -> dict[str, int]:
        """{task_id: lease} of the tasks leased to the worker (assigned or running)."""
        return {keys.task_lease_task(k): keys.decode_count(v)
                for k, v in self.store.scan_prefix(keys.task_lease_prefix(worker_id))}


class _Overlay:
    """An entry's pending writes over the store (None deletes); reads see them first.

    Insertion order of ``_writes`` is first-write order, so the final batch is deterministic.
    ``_undo`` journals each write since the last ``commit`` so a command can be undone."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._writes: dict[bytes, bytes | None] = {}
        self._undo: list[tuple[bytes, bool, bytes | None]] = []

    def get(self, key: bytes) -> bytes | None:
        if key in self._writes:
            return self._writes[key]
        return self._store.get(key)

    def set(self, key: bytes, value: bytes | None) -> None:
        had = key in self._writes
        self._undo.append((key, had, self._writes.get(key)))
        self._writes[key] = value

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every entry under ``prefix`` as this entry has left it so far, in key order."""
        rows = dict(self._store.scan_prefix(prefix))
        for key, value in self._writes.items():
            if key.startswith(prefix):
                if value is None:
                    rows.pop(key, None)
                else:
                    rows[key] = value
        return sorted(rows.items())

    def scan_before(self, prefix: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """The store's entries under ``prefix`` as they were before this entry (the overlay
        keeps no key order); callers account for their own pending writes."""
        return self._store.scan_prefix(prefix, limit)

    def commit(self) -> None:
        self._undo.clear()

    def rollback(self) -> None:
        while self._undo:
            key, had, old = self._undo.pop()
            if had:
                self._writes[key] = old
            else:
                del self._writes[key]

    def ops(self) -> list[tuple[bytes, bytes | None]]:
        return list(self._writes.items())


class _EntryRun:
    """The application of one entry: its overlay, its index and its kv changes."""

    def __init__(self, store: StateStore, index: int) -> None:
        self.index = index
        self.writes = _Overlay(store)
        self.changes: list[KvChange] = []
        self.events: list[tuple] = []
        self.memory: list[memory.MemoryChange] = []
        # Token grants found by this entry's commands (security.authorize): an entry's
        # commands mostly carry the same few tokens, and a grant is three to five records
        # read and checked — ~18% of a follower's apply under a task load (py-spy).
        self.grants: dict[str, tuple[security.Grant, int | None]] = {}

    def apply(self, command: Any) -> Result:
        """One command, atomically: all its writes (and its dedup record) or none."""
        changes_before, events_before, memory_before = len(self.changes), len(self.events), len(self.memory)
        try:
            rid = _rid_of(command)
            if rid is not None:
                prior = self.writes.get(keys.rid_key(rid))
                if prior is not None:
                    return _replayed(rid, command, prior)
            try:
                validate_command(command, check_json=False)
            except CommandError as exc:
                # A malformed command changes nothing, not even the dedup table: validation is
                # a pure function of the command, so a retry gets the same answer anyway.
                return _error("bad_command", exc.message)
            refusal = security.authorize(self.writes.get, command, self.grants)
            if refusal is not None:
                # Refused for its token, identically on every node (a token revoked or expired
                # before this entry, a missing scope): nothing changes, not even the dedup table.
                return refusal
            op = command["op"]
            if op not in _KEEPS_GRANTS:
                # It may change principals, roles or tokens (or, a rollback, everything): the
                # commands after it look their grants up again.
                self.grants.clear()
            if op in _TASK_OPS:  # tasks and workers: synapse/state/tasks.py
                result = _TASK_OPS[op](TaskOps(self.writes, self.index, self.events, keys), command)
            elif op in _SECURITY_OPS:  # principals, roles, tokens: synapse/state/security.py
                result = _SECURITY_OPS[op](security.SecurityOps(self.writes, self.index), command)
            elif op in _MEMORY_OPS:  # agent memory: synapse/state/memory.py
                mem_ops = memory.MemoryOps(self.writes, self.index, self.memory, keys.pack, keys.unpack)
                result = _MEMORY_OPS[op](mem_ops, command)
            else:
                result = getattr(self, "_op_" + op)(command)
            if rid is not None and not _reads_only(command):
                # A transaction that only reads is not remembered: a retry has nothing to
                # repeat, and a token that may only read must not be able to fill the bounded
                # dedup table and evict the writers' records (seen while checking what a
                # read-only token can change, scripts/hostile-input).
                # request_hash is validated above: bytes, or absent.
                self.writes.set(keys.rid_key(rid), keys.encode_rid(self.index, result, command.get("request_hash")))
                self.writes.set(keys.ridx_key(self.index, rid), b"")
            self.writes.commit()
            return result
        except Exception as exc:
            self.writes.rollback()
            del self.changes[changes_before:]
            del self.events[events_before:]
            del self.memory[memory_before:]
            return _internal(exc)

    # --- ops --------------------------------------------------------------------------------

    def _op_put(self, command: dict[str, Any]) -> Result:
        key = command["key"]
        record = self._read(key)
        if "if_version" in command and (conflict := _version_conflict(key, record, command["if_version"])):
            return conflict
        return {
            "ok": True,
            "key": key,
            "version": self._put(key, record, command["value"]),
            "index": self.index,
        }

    def _op_delete(self, command: dict[str, Any]) -> Result:
        key = command["key"]
        record = self._read(key)
        if "if_version" in command and (conflict := _version_conflict(key, record, command["if_version"])):
            return conflict
        return {"ok": True, "key": key, "deleted": self._delete(key, record), "index": self.index}

    def _op_txn(self, command: dict[str, Any]) -> Result:
        succeeded = all(self._holds(cond) for cond in command.get("if", []))
        results = [self._txop(txop) for txop in command.get("then" if succeeded else "else", [])]
        return {"ok": True, "succeeded": succeeded, "results": results, "index": self.index}

    def _op_noop(self, command: dict[str, Any]) -> Result:
        return {"ok": True, "index": self.index}

    def _op_register_node(self, command: dict[str, Any]) -> Result:
        node = keys.encode_node(command["api"], command["raft"], self.index)
        self.writes.set(keys.node_key(command["node_id"]), node)
        return {"ok": True, "index": self.index}

    def _op_checkpoint(self, command: dict[str, Any]) -> Result:
        # The checkpoint is this entry: its state is the state after the whole entry.
        key = keys.ckpt_key(self.index)
        if self.writes.get(key) is None:
            self._evict_checkpoints()
            record = {"label": None, "created_ms": None, "reports": {}, "agreed": None, "agreed_index": None}
        else:
            record = keys.decode_checkpoint(self.writes.get(key))
        for name in ("label", "created_ms"):
            if name in command:
                record[name] = command[name]
        self.writes.set(key, keys.encode_checkpoint(record))
        if ("checkpoint", self.index) not in self.events:
            self.events.append(("checkpoint", self.index))
        # Absent in entries written before the flag existed: those were all snapshotted.
        if command.get("snapshot", True) and ("snapshot", self.index) not in self.events:
            self.events.append(("snapshot", self.index))
        return {"ok": True, "index": self.index, "checkpoint": self.index}

    def _evict_checkpoints(self) -> None:
        count = keys.decode_count(self.writes.get(keys.CKPT_COUNT)) + 1
        if count > CHECKPOINT_RECORDS:
            # The oldest in the store: this entry adds only its own (newest) record.
            for victim, _ in self.writes.scan_before(keys.CKPT, count - CHECKPOINT_RECORDS):
                self.writes.set(victim, None)
            count = CHECKPOINT_RECORDS
        self.writes.set(keys.CKPT_COUNT, keys.encode_count(count))

    def _op_checkpoint_report(self, command: dict[str, Any]) -> Result:
        index, node_id = command["checkpoint"], command["node_id"]
        raw = self.writes.get(keys.ckpt_key(index))
        if raw is None:
            return _error("unknown_checkpoint", f"checkpoint: no checkpoint at index {index} (never made, or evicted)")
        if self.writes.get(keys.node_key(node_id)) is None:
            return _error("unknown_node", f"node_id: {node_id!r} is not a registered node; only members report")
        record = keys.decode_checkpoint(raw)
        report = [command["digest"], command["chain"]]
        record["reports"][node_id] = report
        newly = False
        if record["agreed"] is None:
            voters = len(self.writes.scan_before(keys.NODE))
            if sum(1 for r in record["reports"].values() if r == report) >= voters // 2 + 1:
                record["agreed"], record["agreed_index"], newly = report, self.index, True
        self.writes.set(keys.ckpt_key(index), keys.encode_checkpoint(record))
        self.events.append(("report", index, node_id, record["agreed"]))
        return {
            "ok": True,
            "index": self.index,
            "checkpoint": index,
            "agreed": record["agreed"] is not None,
            "newly_agreed": newly,
            "matches": record["agreed"] == report if record["agreed"] is not None else None,
        }

    def _op_rollback(self, command: dict[str, Any]) -> Result:
        """Checks the target and announces it; the node replaces the state after this entry
        with its retained snapshot of the checkpoint (synapse/integrity/DESIGN.md)."""
        target = command["checkpoint"]
        raw = self.writes.get(keys.ckpt_key(target))
        if raw is None:
            return _error("unknown_checkpoint", f"checkpoint: no checkpoint at index {target} (never made, or evicted)")
        record = keys.decode_checkpoint(raw)
        if record["agreed"] is None:
            return _error("not_agreed", f"checkpoint: {target} was never agreed by a majority; pick an agreed one")
        self.events.append(("rollback", target, record["agreed"][0], record["agreed"][1]))
        return {"ok": True, "index": self.index, "rollback_to": target, "undone_entries": self.index - target - 1}

    def _op_unregister_node(self, command: dict[str, Any]) -> Result:
        node_key = keys.node_key(command["node_id"])
        if self.writes.get(node_key) is not None:
            self.writes.set(node_key, None)
        return {"ok": True, "index": self.index}

    # --- transaction parts ------------------------------------------------------------------

    def _holds(self, cond: dict[str, Any]) -> bool:
        record = self._read(cond["key"])
        if "version" in cond:
            return (record.version if record else 0) == cond["version"]
        if "value" in cond:
            return record is not None and record.value == cond["value"]
        return (record is not None) == cond["exists"]

    def _txop(self, txop: dict[str, Any]) -> Result:
        op, key = txop["op"], txop["key"]
        record = self._read(key)
        if op == "put":
            return {"op": "put", "key": key, "version": self._put(key, record, txop["value"])}
        if op == "delete":
            return {"op": "delete", "key": key, "deleted": self._delete(key, record)}
        return {
            "op": "get",
            "key": key,
            "value": record.value if record else None,
            "version": record.version if record else 0,
        }

    # --- kv access through the overlay ------------------------------------------------------

    def _read(self, key: str) -> KvRecord | None:
        raw = self.writes.get(keys.kv_key(key))
        return None if raw is None else keys.decode_kv(key, raw)

    def _put(self, key: str, record: KvRecord | None, value: bytes) -> int:
        version = record.version + 1 if record else 1
        created = record.create_index if record else self.index
        self.writes.set(keys.kv_key(key), keys.encode_kv(value, version, created, self.index))
        self.changes.append(KvChange(key, value, version, created, self.index, self.index))
        return version

    def _delete(self, key: str, record: KvRecord | None) -> bool:
        if record is None:
            return False
        self.writes.set(keys.kv_key(key), None)
        self.changes.append(KvChange(key, None, 0, 0, 0, self.index))
        return True


def _reads_only(command: dict[str, Any]) -> bool:
    """A transaction none of whose operations (either branch) writes."""
    return command["op"] == "txn" and all(
        txop["op"] == "get" for branch in ("then", "else") for txop in command.get(branch, []))


def _rid_of(command: Any) -> str | None:
    """The command's request id, or None if it has none or an invalid one (then validation
    reports it and the command is not deduplicated)."""
    if not isinstance(command, dict) or "rid" not in command:
        return None
    try:
        check_rid(command["rid"])
    except CommandError:
        return None
    return command["rid"]


def _replayed(rid: str, command: dict[str, Any], prior: bytes) -> Result:
    """The answer to a command whose rid was already applied: the first result — unless both
    carry a request hash and they differ. Then the rid was reused for another request (another
    op, key, body...), and answering with the first result would tell the client that *its*
    request took effect; it gets ``request_id_reused`` and nothing changes (not even the dedup
    record, so the first request's retries still get its result).

    A record without a hash (its command was proposed before request hashes existed, or by a
    proposer that sends none) cannot tell; it answers as before, with the first result."""
    index, result, first_hash = keys.decode_rid_record(prior)
    sent = command.get("request_hash")
    if first_hash is not None and isinstance(sent, bytes) and sent != first_hash:
        return _error(
            "request_id_reused",
            f"rid: request id {short(rid)} was already used by a different request (applied at log index "
            f"{index}); nothing was changed. Send a new request with a new request id (X-Request-Id); a retry "
            "must repeat its request exactly",
        )
    return result


def _version_conflict(key: str, record: KvRecord | None, expected: int) -> Result | None:
    current = record.version if record else 0
    if current == expected:
        return None
    state = f"is at version {current}" if current else "does not exist"
    wanted = "to be absent" if expected == 0 else f"at version {expected}"
    return {
        "ok": False,
        "error": "conflict",
        "key": key,
        "current_version": current,
        "message": f"if_version: expected key {key!r} {wanted} but it {state}; read it again and retry",
    }


def _error(code: str, message: str) -> Result:
    return {"ok": False, "error": code, "message": message}


def _internal(exc: Exception) -> Result:
    # Only the exception's type: its text may hold memory addresses, which differ per process.
    return _error(
        "internal",
        f"command: internal error ({type(exc).__name__}) while applying it; it changed nothing. "
        "This is a bug in Synapse or a damaged state: report it with the node's log",
    )
