"""PostgreSQL backend (docker and distributed modes): one schema per node in a shared database."""

from __future__ import annotations

import itertools
import re
import urllib.parse
from collections.abc import Iterable, Sequence

import asyncpg

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

# Lower case only, so the name means the same quoted or unquoted in psql; 63 bytes is
# PostgreSQL's identifier limit (NAMEDATALEN - 1).
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_COLUMNS = "key, value, version, create_index, mod_index"


class PostgresStorage(KvStorage):
    """The view in tables ``<schema>.kv`` and ``<schema>.meta``.

    Each node writes its own schema, so several nodes can share one database and
    ``psql`` can compare them side by side. Commits use the server's ``synchronous_commit``
    (on by default: a commit returns once its WAL is flushed on the PostgreSQL host).
    """

    def __init__(self, dsn: str, schema: str, *, pool_size: int = 2,
                 command_timeout: float = 60.0) -> None:
        if not SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"PostgreSQL schema name {schema!r} is not a valid identifier: use 1-63 "
                "characters from a-z, 0-9 and _, not starting with a digit"
            )
        self.dsn = dsn
        self.schema = schema
        # The materializer writes one batch at a time; a second connection serves reads
        # (tests, tools) without queueing behind a long replace_all.
        self._pool_size = pool_size
        # A hung server must surface as an error the materializer logs and retries, not as a
        # write that waits forever; 60 s is far above any single chunk here.
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        s = f'"{schema}"'
        self._sql_upsert = (
            f"INSERT INTO {s}.kv ({_COLUMNS}) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], "
            "$5::bigint[]) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version, "
            "create_index = EXCLUDED.create_index, mod_index = EXCLUDED.mod_index"
        )
        self._sql_delete = f"DELETE FROM {s}.kv WHERE key = ANY($1::text[])"
        # FOR UPDATE: were two writers ever pointed at one schema, they serialize on this row
        # instead of both deciding what to skip from the same stale last_applied.
        self._sql_lock_last_applied = (
            f"SELECT value FROM {s}.meta WHERE name = 'last_applied' FOR UPDATE")
        self._sql_last_applied = f"SELECT value FROM {s}.meta WHERE name = 'last_applied'"
        self._sql_set_last_applied = f"UPDATE {s}.meta SET value = $1 WHERE name = 'last_applied'"
        self._sql_schema = [
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            # COLLATE "C": byte order, the same key order as the state store and SQLite, and
            # what makes a prefix a contiguous index range (the database default is usually
            # a locale collation that orders "a-b" and "ab" differently).
            f"""CREATE TABLE IF NOT EXISTS {s}.kv (
                key TEXT COLLATE "C" PRIMARY KEY,
                value TEXT NOT NULL,  -- JSON text
                version BIGINT,
                create_index BIGINT,
                mod_index BIGINT)""",
            f"CREATE TABLE IF NOT EXISTS {s}.meta (name TEXT PRIMARY KEY, value BIGINT)",
            f"INSERT INTO {s}.meta (name, value) VALUES ('last_applied', 0) "
            "ON CONFLICT (name) DO NOTHING",
        ]

    def describe(self) -> str:
        return f"{redact_dsn(self.dsn)} schema {self.schema}"

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self._pool_size,
            command_timeout=self._command_timeout,
            # Shows which node a session belongs to in pg_stat_activity.
            server_settings={"application_name": f"synapse {self.schema}"},
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                for statement in self._sql_schema:
                    await conn.execute(statement)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _connections(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"{self.describe()} is not open; call open() first")
        return self._pool

    async def last_applied(self) -> int:
        value = await self._connections().fetchval(self._sql_last_applied)
        return int(value or 0)

    async def apply(self, batch: Sequence[Entry]) -> int:
        check_order(batch)
        async with self._connections().acquire() as conn, conn.transaction():
            stored = int(await conn.fetchval(self._sql_lock_last_applied) or 0)
            prepared = prepare_batch(batch, stored)
            if prepared.deletes:
                await conn.execute(self._sql_delete, prepared.deletes)
            if prepared.upserts:
                # Set-based: one statement for the whole batch, columns as arrays (~120K
                # rows/s at 10,000 rows, storage/DESIGN.md), keys already unique (prepare_batch).
                columns = [list(column) for column in zip(*prepared.upserts)]
                await conn.execute(self._sql_upsert, *columns)
            if prepared.last_index != stored:
                await conn.execute(self._sql_set_last_applied, prepared.last_index)
            return prepared.last_index

    async def replace_all(self, records: Iterable[KvRecord], index: int) -> None:
        async with self._connections().acquire() as conn, conn.transaction():
            # TRUNCATE is transactional in PostgreSQL and leaves no dead rows behind (a
            # DELETE of 1M rows would); psql readers of this schema wait until the commit.
            await conn.execute(f'TRUNCATE "{self.schema}".kv')
            rows = map(record_row, records)
            while chunk := list(itertools.islice(rows, REPLACE_CHUNK_ROWS)):
                # COPY: the fastest bulk path, and nothing to conflict with after TRUNCATE.
                await conn.copy_records_to_table(
                    "kv", schema_name=self.schema, columns=_COLUMNS.split(", "),
                    records=chunk)
            await conn.execute(self._sql_set_last_applied, index)

    async def get(self, key: str) -> KvRecord | None:
        row = await self._connections().fetchrow(
            f'SELECT {_COLUMNS} FROM "{self.schema}".kv WHERE key = $1', key)
        return None if row is None else row_record(*row)

    async def scan(self, prefix: str = "", limit: int = 1000) -> list[KvRecord]:
        # A prefix is a contiguous run in "C" order starting at the prefix itself.
        rows = await self._connections().fetch(
            f'SELECT {_COLUMNS} FROM "{self.schema}".kv WHERE key >= $1 ORDER BY key LIMIT $2',
            prefix, limit)
        return [row_record(*row) for row in itertools.takewhile(
            lambda row: row[0].startswith(prefix), rows)]

    async def count(self) -> int:
        return int(await self._connections().fetchval(
            f'SELECT count(*) FROM "{self.schema}".kv'))


def redact_dsn(dsn: str) -> str:
    """The DSN with any password removed (from the user-info part and the query string)."""
    parts = urllib.parse.urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
    query = urllib.parse.urlencode(
        [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
         if k.lower() != "password"])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
