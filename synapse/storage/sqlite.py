"""SQLite backend (local mode): one file, readable with the ``sqlite3`` CLI while the node runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
from collections.abc import AsyncIterator, Iterable, Sequence

import aiosqlite

from synapse.state.records import KvRecord

from .base import (
    REPLACE_CHUNK_ROWS,
    Entry,
    KvStorage,
    check_order,
    prepare_batch,
    record_row,
    row_record,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,  -- JSON text
    version BIGINT,
    create_index BIGINT,
    mod_index BIGINT
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BIGINT
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('last_applied', 0);
"""

_UPSERT = """
INSERT INTO kv (key, value, version, create_index, mod_index) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
    create_index = excluded.create_index, mod_index = excluded.mod_index
"""
_INSERT = "INSERT INTO kv (key, value, version, create_index, mod_index) VALUES (?, ?, ?, ?, ?)"
_SET_LAST_APPLIED = "UPDATE meta SET value = ? WHERE name = 'last_applied'"
_GET_LAST_APPLIED = "SELECT value FROM meta WHERE name = 'last_applied'"
_COLUMNS = "key, value, version, create_index, mod_index"


class SQLiteStorage(KvStorage):
    """The view in one SQLite file, WAL mode, ``synchronous=NORMAL``.

    Durability (see DESIGN.md): a committed write survives a crash or SIGKILL of the process;
    after a power loss or OS crash the last transactions may be rolled back (never torn:
    rows and ``last_applied`` roll back together), and the Raft log re-applies them.
    """

    def __init__(self, path: str | pathlib.Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = pathlib.Path(path)
        # How long a write waits for a lock held by another connection (someone's `sqlite3`
        # shell inside a write transaction) before failing; the materializer retries after.
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        # One connection serves every call; aiosqlite would interleave two coroutines'
        # statements into one transaction, so each operation holds this lock.
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    async def open(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the sqlite3 module opens no implicit transactions; every
        # write below states BEGIN IMMEDIATE / COMMIT itself, so the transaction boundary is
        # exactly one apply.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            # WAL: readers (the sqlite3 CLI, tools) never block the writer and see the last
            # committed state, including the old table during a replace_all.
            await conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: fsync at checkpoints only. Safe against process crashes; a
            # power loss may drop the last commits, which the Raft log re-applies by index.
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.executescript(_SCHEMA)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await conn.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = self._connection()
        async with self._lock:
            # IMMEDIATE takes the write lock up front, so a conflict with another writer
            # shows up here (after busy_timeout) rather than halfway through the batch.
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                # Also on cancellation or a failed COMMIT: a transaction left open on the
                # shared connection would make every later BEGIN fail.
                if conn.in_transaction:
                    await conn.rollback()
                raise

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self.describe()} is not open; call open() first")
        return self._conn

    async def last_applied(self) -> int:
        async with self._lock:
            return await _read_last_applied(self._connection())

    async def apply(self, batch: Sequence[Entry]) -> int:
        check_order(batch)
        async with self._transaction() as conn:
            # Read inside the transaction: the skip decision and the writes see one state.
            stored = await _read_last_applied(conn)
            prepared = prepare_batch(batch, stored)
            if prepared.deletes:
                await conn.executemany("DELETE FROM kv WHERE key = ?",
                                       [(key,) for key in prepared.deletes])
            if prepared.upserts:
                await conn.executemany(_UPSERT, prepared.upserts)
            if prepared.last_index != stored:
                await conn.execute(_SET_LAST_APPLIED, (prepared.last_index,))
            return prepared.last_index

    async def replace_all(self, records: Iterable[KvRecord], index: int) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM kv")
            rows = map(record_row, records)
            while chunk := list(itertools.islice(rows, REPLACE_CHUNK_ROWS)):
                await conn.executemany(_INSERT, chunk)
            await conn.execute(_SET_LAST_APPLIED, (index,))

    async def get(self, key: str) -> KvRecord | None:
        async with self._lock:
            async with self._connection().execute(
                f"SELECT {_COLUMNS} FROM kv WHERE key = ?", (key,)
            ) as cursor:
                row = await cursor.fetchone()
        return None if row is None else row_record(*row)

    async def scan(self, prefix: str = "", limit: int = 1000) -> list[KvRecord]:
        # Keys with a common prefix are one contiguous run in BINARY (UTF-8 byte = code
        # point) order, starting at the prefix itself: an index range scan, then stop at the
        # first key outside the run.
        async with self._lock:
            rows = await self._connection().execute_fetchall(
                f"SELECT {_COLUMNS} FROM kv WHERE key >= ? ORDER BY key LIMIT ?",
                (prefix, limit),
            )
        return [row_record(*row) for row in itertools.takewhile(
            lambda row: row[0].startswith(prefix), rows)]

    async def count(self) -> int:
        async with self._lock:
            rows = await self._connection().execute_fetchall("SELECT count(*) FROM kv")
        return int(rows[0][0])


async def _read_last_applied(conn: aiosqlite.Connection) -> int:
    rows = await conn.execute_fetchall(_GET_LAST_APPLIED)
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0
