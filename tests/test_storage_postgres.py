"""PostgresStorage against the machine's real PostgreSQL: the shared contract plus what is
PostgreSQL-specific (schemas per node, a killed connection mid-transaction).

Every test works in its own schema and drops it afterwards. The server is the one
``./scripts/test`` starts for the run (tests/services.py: how it is found, and why the tests
fail rather than skip under ``SYNAPSE_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from synapse.storage import PostgresStorage, open_storage
from tests.services import postgres_dsn, postgres_unavailable
from test_storage_sqlite import (  # the backend-neutral contract (see that file's docstring)
    CONTRACT,
    check_failed_batch_leaves_nothing,
    check_reopen_keeps_state,
    contents,
    put,
    record,
)

DSN = postgres_dsn()
if DSN is None:
    pytestmark = pytest.mark.skip(reason=postgres_unavailable())


def new_schema() -> str:
    return f"synapse_test_{uuid.uuid4().hex[:12]}"


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def sql(statement: str, *args):
    conn = await asyncpg.connect(DSN)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def script(statements: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


async def with_postgres(body, schema: str | None = None) -> None:
    schema = schema or new_schema()
    storage = PostgresStorage(DSN, schema)
    try:
        await storage.open()
        await body(storage)
    finally:
        await storage.close()
        await drop_schema(schema)


def pg_failure(schema: str):
    async def install() -> None:
        await script(f"""
            CREATE FUNCTION "{schema}".boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.key = 'boom' THEN RAISE EXCEPTION 'injected failure'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER boom BEFORE INSERT OR UPDATE ON "{schema}".kv
                FOR EACH ROW EXECUTE FUNCTION "{schema}".boom();
        """)
    return install


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_contract(check):
    asyncio.run(with_postgres(check))


def test_failed_batch_leaves_nothing():
    schema = new_schema()
    asyncio.run(with_postgres(
        lambda s: check_failed_batch_leaves_nothing(s, pg_failure(schema)), schema))


def test_reopen_keeps_state():
    schema = new_schema()

    async def main() -> None:
        try:
            await check_reopen_keeps_state(lambda: PostgresStorage(DSN, schema))
        finally:
            await drop_schema(schema)

    asyncio.run(main())


def test_connection_killed_mid_transaction_leaves_nothing():
    """The server ends the writer's session while its batch is half written: nothing of the
    batch lands, last_applied is unchanged, and the next apply works on a fresh connection."""
    schema = new_schema()

    async def body(storage: PostgresStorage) -> None:
        await storage.apply([(1, [put("a", 1, 1)])])
        # Rows named "slow" make the insert sleep, so the transaction is surely open when the
        # session is terminated from outside.
        await script(f"""
            CREATE FUNCTION "{schema}".slow() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.key = 'slow' THEN PERFORM pg_sleep(30); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER slow BEFORE INSERT ON "{schema}".kv
                FOR EACH ROW EXECUTE FUNCTION "{schema}".slow();
        """)
        batch = [(2, [put("a", 2, 2, version=2, create_index=1), put("b", 2, 2)]),
                 (3, [put("slow", 3, 3)])]
        writer = asyncio.create_task(storage.apply(batch))
        for _ in range(200):
            killed = await sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND wait_event = 'PgSleep'",
                f"synapse {schema}")
            if killed:
                break
            await asyncio.sleep(0.02)
        assert killed, "the writer never reached the sleeping row"
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await writer
        assert await storage.last_applied() == 1
        assert await contents(storage) == {"a": record("a", 1)}
        assert await storage.apply(batch[:1]) == 2
        assert (await storage.get("a")).version == 2

    asyncio.run(with_postgres(body, schema))


def test_nodes_share_one_database_in_separate_schemas(tmp_path):
    async def main() -> None:
        one = open_storage(DSN, tmp_path, f"t{uuid.uuid4().hex[:8]}-1")
        two = open_storage(DSN, tmp_path, f"t{uuid.uuid4().hex[:8]}-2")
        try:
            await one.open()
            await two.open()
            await one.apply([(1, [put("only-in-one", 1, 1)])])
            await two.apply([(5, [put("only-in-two", 2, 5)])])
            assert [r.key for r in await one.scan("")] == ["only-in-one"]
            assert [r.key for r in await two.scan("")] == ["only-in-two"]
            assert (await one.last_applied(), await two.last_applied()) == (1, 5)
            # What an operator sees with psql: plain tables, JSON text values.
            rows = await sql(f'SELECT key, value, version, create_index, mod_index '
                             f'FROM "{two.schema}".kv')
            assert [tuple(r) for r in rows] == [("only-in-two", "2", 1, 5, 5)]
            meta = await sql(f'SELECT value FROM "{one.schema}".meta WHERE name = $1',
                             "last_applied")
            assert meta[0]["value"] == 1
            # Keys use byte ("C") order whatever the database's default collation is.
            collation = await sql(
                "SELECT collation_name FROM information_schema.columns "
                "WHERE table_schema = $1 AND table_name = 'kv' AND column_name = 'key'",
                one.schema)
            assert collation[0]["collation_name"] == "C"
        finally:
            for storage in (one, two):
                await storage.close()
                await drop_schema(storage.schema)

    asyncio.run(main())


@pytest.mark.parametrize("schema", ["", "Synapse", "1node", "a-b", "x" * 64, 'a"; DROP TABLE x',
                                    "a.b", "é"])
def test_schema_name_must_be_an_identifier(schema):
    with pytest.raises(ValueError, match="not a valid identifier"):
        PostgresStorage(DSN or "postgresql://h/db", schema)


def test_describe_hides_the_password():
    storage = PostgresStorage("postgresql://u:hunter2@db:5432/x?password=hunter2&sslmode=require",
                              "synapse_n1")
    assert "hunter2" not in storage.describe()
    assert storage.describe() == "postgresql://u@db:5432/x?sslmode=require schema synapse_n1"
