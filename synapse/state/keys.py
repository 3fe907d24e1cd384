"""The layout of the replicated state in the Rust ``StateStore``: key prefixes and the msgpack
values stored under them (the table in DESIGN.md).

Everything here is part of the state digest, of snapshots and of diffs, so changing an
encoding is a schema change: every node must agree on it byte for byte.
"""

from __future__ import annotations

from typing import Any

import msgpack

from synapse.state.records import KvRecord

KV = b"kv/"
NODE = b"node/"
RID = b"rid/"
RIDX = b"ridx/"
RID_COUNT = b"meta/rid_count"
CHAIN = b"meta/chain"
CKPT = b"ckpt/"
CKPT_COUNT = b"meta/ckpt_count"
ROLLBACK = b"meta/rollback"
TASK = b"task/"
TASK_QUEUE = b"tq/"  # pending tasks: priority (inverted), then submit order
TASK_LEASE = b"tlease/"  # leased tasks per worker: worker id, NUL, task id -> lease
TASK_DONE = b"tdone/"  # ended tasks in the order they ended (retention eviction order)
TASK_IDEM = b"tidem/"  # idempotency key -> task id
TASK_DONE_COUNT = b"meta/task_done_count"
LEASE_SEQ = b"meta/lease_seq"  # the last lease (fencing token) handed out
WORKER = b"worker/"
SEC_PRINCIPAL = b"sec/p/"  # principal name -> {kind, roles, owner, created_ms, by}
SEC_ROLE = b"sec/r/"  # role name -> {allow, deny}
SEC_TOKEN = b"sec/t/"  # token accessor -> {hash, principal, allow, deny, expires_ms, parent, created_ms, label}
SEC_CHILD = b"sec/c/"  # parent accessor, NUL, child accessor -> b"" (revoking a parent revokes its children)
# Kept across a rollback: the execution history (tasks, their queue and leases, workers) — a
# rollback undoes writes, not executions — and the principals, roles and tokens — a rollback
# must never bring a revoked token back.
ROLLBACK_KEEPS = (TASK, TASK_QUEUE, TASK_LEASE, TASK_DONE, TASK_IDEM, WORKER,
                  SEC_PRINCIPAL, SEC_ROLE, SEC_TOKEN, SEC_CHILD)
ROLLBACK_KEEPS_META = (TASK_DONE_COUNT, LEASE_SEQ)
GENESIS_CHAIN = bytes(32)

_INDEX_BYTES = 8  # ridx/ keys sort by big-endian log index, so key order is eviction order


def kv_key(key: str) -> bytes:
    return KV + key.encode()


def kv_name(store_key: bytes) -> str:
    return store_key[len(KV) :].decode()


def node_key(node_id: str) -> bytes:
    return NODE + node_id.encode()


def node_name(store_key: bytes) -> str:
    return store_key[len(NODE) :].decode()


def rid_key(rid: str) -> bytes:
    return RID + rid.encode()


def ridx_key(index: int, rid: str) -> bytes:
    return RIDX + index.to_bytes(_INDEX_BYTES, "big") + rid.encode()


def ckpt_key(index: int) -> bytes:
    return CKPT + index.to_bytes(_INDEX_BYTES, "big")  # key order is index order


def ckpt_index(store_key: bytes) -> int:
    return int.from_bytes(store_key[len(CKPT) :], "big")


def split_ridx(store_key: bytes) -> tuple[int, str]:
    """The (log index, rid) of a ``ridx/`` key."""
    body = store_key[len(RIDX) :]
    return int.from_bytes(body[:_INDEX_BYTES], "big"), body[_INDEX_BYTES:].decode()


def task_key(task_id: str) -> bytes:
    return TASK + task_id.encode()


def task_name(store_key: bytes) -> str:
    return store_key[len(TASK) :].decode()


def task_queue_key(rank: int, index: int, task_id: str) -> bytes:
    return TASK_QUEUE + rank.to_bytes(2, "big") + index.to_bytes(_INDEX_BYTES, "big") + task_id.encode()


def task_queue_task(store_key: bytes) -> str:
    return store_key[len(TASK_QUEUE) + 2 + _INDEX_BYTES :].decode()


def task_lease_prefix(worker_id: str) -> bytes:
    return TASK_LEASE + worker_id.encode() + b"\x00"  # ids have no NUL: no worker's prefix holds another's


def task_lease_key(worker_id: str, task_id: str) -> bytes:
    return task_lease_prefix(worker_id) + task_id.encode()


def task_lease_task(store_key: bytes) -> str:
    return store_key.split(b"\x00", 1)[1].decode()


def task_done_key(index: int, task_id: str) -> bytes:
    return TASK_DONE + index.to_bytes(_INDEX_BYTES, "big") + task_id.encode()


def task_done_task(store_key: bytes) -> str:
    return store_key[len(TASK_DONE) + _INDEX_BYTES :].decode()


def task_idem_key(key: str) -> bytes:
    return TASK_IDEM + key.encode()


def worker_key(worker_id: str) -> bytes:
    return WORKER + worker_id.encode()


def worker_name(store_key: bytes) -> str:
    return store_key[len(WORKER) :].decode()


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def encode_kv(value: bytes, version: int, create_index: int, mod_index: int) -> bytes:
    return pack([value, version, create_index, mod_index])


def decode_kv(key: str, raw: bytes) -> KvRecord:
    """Raises ValueError if the stored bytes are not a kv record."""
    record = unpack(raw)
    if (
        not isinstance(record, list)
        or len(record) != 4
        or not isinstance(record[0], bytes)
        or not all(type(n) is int for n in record[1:])
    ):
        raise ValueError(f"state key kv/{key}: stored value is not [value, version, create_index, mod_index]")
    return KvRecord(key, record[0], record[1], record[2], record[3])


def decode_kv_rows(rows: list[tuple[bytes, bytes]]) -> list[KvRecord]:
    """Raw kv rows of the store (full keys, encoded records), as records."""
    return [decode_kv(kv_name(k), v) for k, v in rows]


def encode_node(api: str, raft: str, index: int) -> bytes:
    return pack({"api": api, "raft": raft, "index": index})


def decode_node(raw: bytes) -> dict[str, Any]:
    node = unpack(raw)
    if not isinstance(node, dict):
        raise ValueError("state node/ entry: stored value is not a map")
    return node


def encode_rid(index: int, result: dict[str, Any], request_hash: bytes | None = None) -> bytes:
    # Without a request hash the record keeps its original two-element form: entries proposed
    # before request hashes existed must replay to the very bytes (and digest) they had.
    return pack([index, result] if request_hash is None else [index, result, request_hash])


def decode_rid(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The (log index, result) of a request id's first application."""
    index, result, _ = decode_rid_record(raw)
    return index, result


def decode_rid_record(raw: bytes) -> tuple[int, dict[str, Any], bytes | None]:
    """The (log index, result, request hash or None) of a request id's first application.

    Records of commands without a ``request_hash`` (all of them before it existed) are
    ``[index, result]``; the others ``[index, result, request_hash]``."""
    record = unpack(raw)
    if (
        not isinstance(record, list)
        or len(record) not in (2, 3)
        or not isinstance(record[1], dict)
        or (len(record) == 3 and not isinstance(record[2], bytes))
    ):
        raise ValueError("state rid/ entry: stored value is not [index, result] or [index, result, request_hash]")
    return record[0], record[1], record[2] if len(record) == 3 else None


def encode_count(count: int) -> bytes:
    return pack(count)


def decode_count(raw: bytes | None) -> int:
    if raw is None:
        return 0
    count = unpack(raw)
    if type(count) is not int or count < 0:
        raise ValueError("state meta/rid_count: stored value is not a non-negative integer")
    return count


def encode_chain(index: int, chain: bytes) -> bytes:
    return pack([index, chain])


def decode_chain(raw: bytes | None) -> tuple[int, bytes]:
    """The (index, chain head) after the last applied entry; (0, 32 zero bytes) at genesis."""
    if raw is None:
        return 0, GENESIS_CHAIN
    record = unpack(raw)
    if not isinstance(record, list) or len(record) != 2 or not isinstance(record[1], bytes):
        raise ValueError("state meta/chain: stored value is not [index, chain]")
    return record[0], record[1]


def encode_checkpoint(record: dict[str, Any]) -> bytes:
    return pack(record)


def decode_checkpoint(raw: bytes) -> dict[str, Any]:
    """``{"label", "created_ms", "reports": {node_id: [digest, chain]}, "agreed": [digest,
    chain] | None, "agreed_index"}``."""
    record = unpack(raw)
    if not isinstance(record, dict) or not isinstance(record.get("reports"), dict):
        raise ValueError("state ckpt/ entry: stored value is not a checkpoint record")
    return record


def encode_rollback(index: int, target: int) -> bytes:
    return pack([index, target])


def decode_rollback(raw: bytes | None) -> tuple[int, int] | None:
    """(the rollback entry's index, the checkpoint it went back to), or None."""
    if raw is None:
        return None
    record = unpack(raw)
    if not isinstance(record, list) or len(record) != 2:
        raise ValueError("state meta/rollback: stored value is not [index, checkpoint]")
    return record[0], record[1]
