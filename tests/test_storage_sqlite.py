"""SQLiteStorage on real files, and the storage contract every backend must meet.

The ``check_*`` coroutines are the backend-neutral contract; this file runs them on SQLite and
``test_storage_postgres.py`` imports and runs them on PostgreSQL, so both backends are held to
exactly the same behaviour.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable

import pytest

from synapse.state.records import KvChange, KvRecord
from synapse.storage import (
    KvStorage,
    PostgresStorage,
    SQLiteStorage,
    open_storage,
    schema_for_node,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --- helpers shared with the PostgreSQL tests ----------------------------------------------


def put(key: str, value: object, index: int, version: int = 1,
        create_index: int | None = None) -> KvChange:
    return KvChange(key, json.dumps(value).encode(), version,
                    index if create_index is None else create_index, index, index)


def delete(key: str, index: int) -> KvChange:
    return KvChange(key, None, 0, 0, 0, index)


def record(key: str, value: object, version: int = 1, create_index: int = 1,
           mod_index: int = 1) -> KvRecord:
    return KvRecord(key, json.dumps(value).encode(), version, create_index, mod_index)


async def contents(storage: KvStorage) -> dict[str, KvRecord]:
    return {r.key: r for r in await storage.scan("", limit=10**9)}


# An async callable that makes every later write of key "boom" fail inside the database
# (a trigger), so a batch fails after its other statements already ran.
InstallFailure = Callable[[], Awaitable[None]]


# --- the contract ---------------------------------------------------------------------------


async def check_empty(storage: KvStorage) -> None:
    assert await storage.last_applied() == 0
    assert await storage.count() == 0
    assert await storage.get("missing") is None
    assert await storage.scan("") == []


async def check_apply_get_scan(storage: KvStorage) -> None:
    keys = ["b", "a", "a/2", "a/10", "a-b", "ab", "a_b", "A", "é", "z", "\u4e2d", "a\U0001F600"]
    assert await storage.apply([(i + 1, [put(k, {"n": i}, i + 1)]) for i, k in enumerate(keys)]) \
        == len(keys)
    assert await storage.last_applied() == len(keys)
    assert await storage.count() == len(keys)
    assert await storage.get("a/10") == record("a/10", {"n": 3}, 1, 4, 4)
    # Key order is code point order (= UTF-8 byte order) on every backend.
    assert [r.key for r in await storage.scan("")] == sorted(keys)
    assert [r.key for r in await storage.scan("a")] == sorted(k for k in keys if k.startswith("a"))
    assert [r.key for r in await storage.scan("a/")] == ["a/10", "a/2"]
    assert [r.key for r in await storage.scan("a", limit=2)] == sorted(
        k for k in keys if k.startswith("a"))[:2]
    assert await storage.scan("nothing") == []
    assert [r.key for r in await storage.scan("é")] == ["é"]


async def check_idempotent_reapply(storage: KvStorage) -> None:
    batch = [(1, [put("a", 1, 1)]),
             (2, [put("b", 2, 2), put("a", 3, 2, version=2, create_index=1)]),
             (3, [delete("b", 3)])]
    assert await storage.apply(batch) == 3
    before = await contents(storage)
    assert before == {"a": record("a", 3, 2, 1, 2)}
    assert await storage.apply(batch) == 3
    assert await contents(storage) == before
    # Skipping is by log index, not by comparing rows: entries at or below last_applied are
    # ignored even when their content differs, and only the newer ones in the batch land.
    assert await storage.apply([(2, [put("a", "stale", 2)]), (3, [put("x", "stale", 3)]),
                                (4, [put("c", 4, 4)])]) == 4
    assert await contents(storage) == {"a": record("a", 3, 2, 1, 2), "c": record("c", 4, 1, 4, 4)}
    # A batch entirely at or below last_applied changes nothing, not even last_applied.
    assert await storage.apply([(1, [delete("a", 1)])]) == 4
    assert await storage.last_applied() == 4
    assert await storage.get("a") is not None


async def check_duplicate_keys_in_one_batch(storage: KvStorage) -> None:
    await storage.apply([(1, [put("gone", 0, 1), put("kept", 0, 1)])])
    batch = [
        (2, [put("a", 1, 2), put("a", 2, 2, version=2, create_index=2), delete("gone", 2)]),
        (3, [put("a", 3, 3, version=3, create_index=2), delete("kept", 3), put("b", 1, 3)]),
        (4, [put("kept", "again", 4), delete("b", 4), put("gone", "back", 4), delete("gone", 4)]),
    ]
    assert await storage.apply(batch) == 4
    assert await contents(storage) == {
        "a": record("a", 3, 3, 2, 3),
        "kept": record("kept", "again", 1, 4, 4),
    }
    # Many duplicates in one large batch (a set-based upsert naming a key twice would fail).
    big = [(i, [put(f"k{i % 100}", i, i, version=i)]) for i in range(5, 10_005)]
    assert await storage.apply(big) == 10_004
    assert await storage.count() == 102
    assert await storage.get("k7") == record("k7", 9907, 9907, 9907, 9907)


async def check_deletes(storage: KvStorage) -> None:
    await storage.apply([(1, [put("a", 1, 1), put("b", 2, 1)])])
    await storage.apply([(2, [delete("a", 2), delete("never-existed", 2)])])
    assert await storage.get("a") is None
    assert await contents(storage) == {"b": record("b", 2)}
    await storage.apply([(3, [put("a", "new", 3)])])
    assert await storage.get("a") == record("a", "new", 1, 3, 3)
    assert await storage.last_applied() == 3


async def check_entries_without_changes(storage: KvStorage) -> None:
    # No-op entries still move last_applied: the view is "as of" that index.
    assert await storage.apply([(7, []), (9, [])]) == 9
    assert await storage.last_applied() == 9
    assert await storage.count() == 0


async def check_out_of_order_rejected(storage: KvStorage) -> None:
    with pytest.raises(ValueError, match="strictly increase"):
        await storage.apply([(2, [put("a", 1, 2)]), (2, [put("b", 1, 2)])])
    with pytest.raises(ValueError, match="strictly increase"):
        await storage.apply([(3, [put("a", 1, 3)]), (1, [put("b", 1, 1)])])
    assert await storage.count() == 0
    assert await storage.last_applied() == 0


async def check_replace_all(storage: KvStorage, rows: int = 50_000) -> None:
    await storage.apply([(1, [put("stale", 1, 1), put("k00000007", "old", 1)])])
    await storage.apply([(2, [put("stale2", 1, 2)])])

    def snapshot():  # a one-shot generator: replace_all must stream it, not len() it
        for i in range(rows):
            yield record(f"k{i:08d}", {"i": i, "pad": "x" * 20}, i % 7 + 1, i + 1, i + 2)

    await storage.replace_all(snapshot(), 100_000)
    assert await storage.count() == rows
    assert await storage.last_applied() == 100_000
    assert await storage.get("stale") is None
    assert await storage.get("k00000007") == record("k00000007", {"i": 7, "pad": "x" * 20}, 1, 8, 9)
    assert await storage.get(f"k{rows - 1:08d}") is not None
    # Entries after the snapshot apply on top; entries it already covers are skipped.
    await storage.apply([(99_999, [put("skipped", 1, 99_999)]),
                         (100_001, [put("after", 1, 100_001)])])
    assert await storage.get("skipped") is None
    assert await storage.get("after") is not None
    # A rollback installs an older state: last_applied goes down, and entries above it apply.
    await storage.replace_all([record("r", "rolled back", 1, 5, 5)], 50)
    assert await storage.last_applied() == 50
    assert await contents(storage) == {"r": record("r", "rolled back", 1, 5, 5)}
    await storage.apply([(51, [put("s", 1, 51)])])
    assert await storage.count() == 2
    # An empty snapshot empties the table.
    await storage.replace_all([], 60)
    assert await storage.count() == 0
    assert await storage.last_applied() == 60


async def check_failed_batch_leaves_nothing(storage: KvStorage,
                                            install_failure: InstallFailure) -> None:
    await storage.apply([(1, [put("a", 1, 1), put("doomed", 1, 1)])])
    await install_failure()
    # The failing row comes after a delete and other upserts of the same transaction.
    batch = [(2, [delete("doomed", 2), put("a", 2, 2, version=2, create_index=1)]),
             (3, [put("new", 3, 3)]), (4, [put("boom", 4, 4)])]
    with pytest.raises(Exception, match="injected"):
        await storage.apply(batch)
    assert await storage.last_applied() == 1
    assert await contents(storage) == {"a": record("a", 1), "doomed": record("doomed", 1)}
    with pytest.raises(Exception, match="injected"):
        await storage.replace_all([record("x", 1), record("boom", 1)], 10)
    assert await storage.last_applied() == 1
    assert await storage.count() == 2
    # The storage is usable after a failed transaction.
    assert await storage.apply(batch[:2]) == 3
    assert await storage.get("new") is not None


async def check_reopen_keeps_state(make: Callable[[], KvStorage]) -> None:
    storage = make()
    await storage.open()
    try:
        await storage.apply([(5, [put("a", 1, 5)])])
    finally:
        await storage.close()
    await storage.close()  # closing twice is harmless
    storage = make()
    await storage.open()
    await storage.open()  # opening twice is harmless
    try:
        assert await storage.last_applied() == 5
        assert await storage.get("a") == record("a", 1, 1, 5, 5)
    finally:
        await storage.close()


CONTRACT = [
    check_empty,
    check_apply_get_scan,
    check_idempotent_reapply,
    check_duplicate_keys_in_one_batch,
    check_deletes,
    check_entries_without_changes,
    check_out_of_order_rejected,
    check_replace_all,
]


# --- SQLite -----------------------------------------------------------------------------------


def sqlite_failure(path: pathlib.Path) -> InstallFailure:
    async def install() -> None:
        # From a separate, stdlib connection: the failure is the database's, not ours.
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TRIGGER boom BEFORE INSERT ON kv WHEN NEW.key = 'boom' "
                         "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    return install


async def with_sqlite(path: pathlib.Path, body) -> None:
    storage = SQLiteStorage(path)
    await storage.open()
    try:
        await body(storage)
    finally:
        await storage.close()


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_contract(tmp_path, check):
    asyncio.run(with_sqlite(tmp_path / "state.sqlite3", check))


def test_failed_batch_leaves_nothing(tmp_path):
    path = tmp_path / "state.sqlite3"
    asyncio.run(with_sqlite(
        path, lambda s: check_failed_batch_leaves_nothing(s, sqlite_failure(path))))


def test_reopen_keeps_state(tmp_path):
    asyncio.run(check_reopen_keeps_state(lambda: SQLiteStorage(tmp_path / "d" / "s.sqlite3")))


def test_readable_with_stdlib_sqlite3_while_open(tmp_path):
    path = tmp_path / "state.sqlite3"

    async def body(storage: KvStorage) -> None:
        await storage.apply([(3, [put("user/1", {"name": "ada"}, 3), put("user/2", [1, 2], 3)])])
        # What an operator sees with `sqlite3 state.sqlite3` while the node runs.
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            rows = conn.execute("SELECT key, value, version, create_index, mod_index "
                                "FROM kv ORDER BY key").fetchall()
            assert rows == [("user/1", '{"name": "ada"}', 1, 3, 3), ("user/2", "[1, 2]", 1, 3, 3)]
            assert json.loads(rows[0][1]) == {"name": "ada"}
            assert conn.execute("SELECT value FROM meta WHERE name = 'last_applied'"
                                ).fetchone() == (3,)

    asyncio.run(with_sqlite(path, body))


def test_committed_batch_survives_sigkill(tmp_path):
    """A write that apply() returned from survives SIGKILL of the process (WAL, NORMAL)."""
    path = tmp_path / "state.sqlite3"
    child = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from synapse.state.records import KvChange
        from synapse.storage import SQLiteStorage

        async def main():
            storage = SQLiteStorage({str(path)!r})
            await storage.open()
            changes = [KvChange(f"k{{i}}", b"1", 1, 7, 7, 7) for i in range(1000)]
            await storage.apply([(7, changes)])
            print("applied", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "applied"
    assert (tmp_path / "state.sqlite3-wal").exists()  # the data is still only in the WAL

    async def body(storage: KvStorage) -> None:
        assert await storage.last_applied() == 7
        assert await storage.count() == 1000

    asyncio.run(with_sqlite(path, body))


def test_not_open_is_a_clear_error(tmp_path):
    storage = SQLiteStorage(tmp_path / "s.sqlite3")
    with pytest.raises(RuntimeError, match="not open"):
        asyncio.run(storage.last_applied())


def test_invalid_utf8_value_is_rejected_and_nothing_lands(tmp_path):
    async def body(storage: KvStorage) -> None:
        bad = KvChange("bad", b"\xff", 1, 2, 2, 2)
        with pytest.raises(ValueError, match="'bad' is not UTF-8"):
            await storage.apply([(1, [put("a", 1, 1)]), (2, [bad])])
        assert await storage.last_applied() == 0
        assert await storage.count() == 0

    asyncio.run(with_sqlite(tmp_path / "s.sqlite3", body))


# --- open_storage ---------------------------------------------------------------------------


def test_open_storage_sqlite(tmp_path):
    storage = open_storage("sqlite", tmp_path, "n1")
    assert isinstance(storage, SQLiteStorage)
    assert storage.path == tmp_path / "state.sqlite3"
    assert storage.describe() == f"sqlite:{tmp_path / 'state.sqlite3'}"


@pytest.mark.parametrize("dsn", ["postgresql://synapse:s3cret@db:5432/synapse",
                                 "postgres://synapse:s3cret@db/synapse?sslmode=disable"])
def test_open_storage_postgres(tmp_path, dsn):
    storage = open_storage(dsn, tmp_path, "Node-1.eu")
    assert isinstance(storage, PostgresStorage)
    assert storage.schema == "synapse_node_1_eu"
    assert "s3cret" not in storage.describe()
    assert "synapse@db" in storage.describe()


@pytest.mark.parametrize("spec", ["", "sqlite3", "SQLite:///x.db", "mysql://db/x", "redis://x"])
def test_open_storage_rejects_other_forms(tmp_path, spec):
    with pytest.raises(ValueError, match=r"--storage .*'sqlite'.*postgresql://"):
        open_storage(spec, tmp_path, "n1")


def test_schema_for_node():
    assert schema_for_node("n1") == "synapse_n1"
    assert schema_for_node("Node-1") == "synapse_node_1"
    assert schema_for_node("ünï côde") == "synapse__n__c_de"
    long_a, long_b = "x" * 80 + "a", "x" * 80 + "b"
    assert len(schema_for_node(long_a)) == 63
    assert schema_for_node(long_a) != schema_for_node(long_b)
    for node_id in ["n1", "Node-1", "ünï côde", long_a, "1", ""]:
        PostgresStorage("postgresql://h/db", schema=schema_for_node(node_id))  # validates
