"""The storage contract every backend implements, and the batch preparation they share."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from synapse.state.records import KvChange, KvRecord

# One entry handed to ``KvStorage.apply``: (log index, the changes that entry made, in order).
Entry = tuple[int, Sequence[KvChange]]

# A row as the tables hold it: (key, value as JSON text, version, create_index, mod_index).
Row = tuple[str, str, int, int, int]

# Rows per statement when a snapshot is streamed into a table: large enough that the per-call
# cost vanishes (storage/DESIGN.md: 1,000-row batches already reach ~280K rows/s on SQLite), small
# enough that a 1M-row snapshot never sits in memory twice.
REPLACE_CHUNK_ROWS = 10_000


class KvStorage(abc.ABC):
    """A database view of the applied key-value state, idempotent by log index.

    The Raft log and snapshots are the source of truth; this is a materialized view that
    converges to the state. Every write is one transaction that also records the log index
    it reaches (``last_applied``), so a crash between two writes loses nothing the log cannot
    re-apply, and re-applying is harmless.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if it is missing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    @abc.abstractmethod
    async def last_applied(self) -> int:
        """The log index the stored view reflects; 0 for an empty database."""

    @abc.abstractmethod
    async def apply(self, batch: Sequence[Entry]) -> int:
        """Write entries (strictly increasing log indexes) in one transaction.

        Entries with an index <= the stored ``last_applied`` are skipped; several changes to
        one key collapse to the last; a change with ``value`` None deletes the key;
        ``last_applied`` becomes the batch's highest index in the same transaction.
        Returns the stored ``last_applied`` after the call."""

    @abc.abstractmethod
    async def replace_all(self, records: Iterable[KvRecord], index: int) -> None:
        """Atomically make the table hold exactly ``records`` and set ``last_applied`` to
        ``index`` (which may be lower than before: a rollback). Streams ``records`` in chunks."""

    @abc.abstractmethod
    async def get(self, key: str) -> KvRecord | None:
        """The stored record of ``key``, or None."""

    @abc.abstractmethod
    async def scan(self, prefix: str = "", limit: int = 1000) -> list[KvRecord]:
        """Up to ``limit`` records whose key starts with ``prefix``, in key (code point) order."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Number of keys stored."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the data lives, for logs (a path, or a DSN without its password)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """What one ``apply`` must write once entries at or below ``last_applied`` are dropped."""

    upserts: list[Row]  # one row per key, the key's last change in the batch
    deletes: list[str]  # keys whose last change in the batch is a delete
    last_index: int  # the new last_applied (unchanged when every entry was skipped)

    @property
    def empty(self) -> bool:
        return not self.upserts and not self.deletes


def check_order(batch: Sequence[Entry]) -> None:
    """Reject a batch whose indexes do not strictly increase: that is a caller bug, and
    applying it anyway would let an older change overwrite a newer one."""
    previous = None
    for index, _ in batch:
        if previous is not None and index <= previous:
            raise ValueError(
                f"storage batch indexes must strictly increase: {index} follows {previous}"
            )
        previous = index


def prepare_batch(batch: Sequence[Entry], last_applied: int) -> PreparedBatch:
    """Drop already-applied entries and collapse each key to its last change.

    Collapsing first is required, not an optimization: a set-based upsert that names one key
    twice fails on PostgreSQL (CardinalityViolationError; storage/DESIGN.md, invariant 3)."""
    last: dict[str, KvChange] = {}
    last_index = last_applied
    for index, changes in batch:
        if index <= last_applied:
            continue
        last_index = index
        for change in changes:
            last[change.key] = change
    upserts: list[Row] = []
    deletes: list[str] = []
    for key, change in last.items():
        if change.value is None:
            deletes.append(key)
        else:
            upserts.append(
                (key, _text(change.value, key), change.version, change.create_index,
                 change.mod_index)
            )
    return PreparedBatch(upserts, deletes, last_index)


def record_row(record: KvRecord) -> Row:
    return (record.key, _text(record.value, record.key), record.version, record.create_index,
            record.mod_index)


def row_record(key: str, value: str, version: int, create_index: int, mod_index: int) -> KvRecord:
    return KvRecord(key, value.encode("utf-8"), version, create_index, mod_index)


def _text(value: bytes, key: str) -> str:
    # The column is TEXT so people can read it with sqlite3/psql; the state only ever holds
    # JSON text, which is UTF-8.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"value of key {key!r} is not UTF-8 JSON text: {exc}") from None
