"""Materializer on real SQLite files: group commit, log order with snapshots in between,
submissions from a foreign thread, flush/stop semantics, and database failures that are
retried without losing a change.

``GatedStorage`` is the real SQLiteStorage with a gate in front of its writes, so a test can
hold a write "in flight" and submit more behind it; it records every call it forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import threading
import time

import pytest

from synapse.state.records import KvRecord
from synapse.storage import Materializer, SQLiteStorage
from test_storage_sqlite import contents, delete, put, record

TIMEOUT = 20  # seconds; only so a broken materializer fails the test instead of hanging it


class GatedStorage(SQLiteStorage):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()  # set when a write reaches the gate

    async def apply(self, batch):
        self.entered.set()
        await self.gate.wait()
        result = await super().apply(batch)
        self.calls.append(("apply", [index for index, _ in batch],
                           sum(len(changes) for _, changes in batch)))
        return result

    async def replace_all(self, records, index):
        self.entered.set()
        await self.gate.wait()
        await super().replace_all(records, index)
        self.calls.append(("replace_all", index))


@contextlib.asynccontextmanager
async def materializing(storage: SQLiteStorage, **kwargs):
    await storage.open()
    materializer = Materializer(storage, **kwargs)
    task = asyncio.create_task(materializer.run())
    try:
        yield materializer
        await within(materializer.stop())
        await within(task)
    finally:
        task.cancel()
        # Always closed, even when the test failed: aiosqlite's worker thread is not a
        # daemon, so a connection left open would hang the interpreter at exit.
        await storage.close()


def within(awaitable):
    return asyncio.wait_for(awaitable, TIMEOUT)


def read_with_stdlib(path) -> dict[str, tuple]:
    with sqlite3.connect(path) as conn:
        return {row[0]: row[1:] for row in conn.execute(
            "SELECT key, value, version, create_index, mod_index FROM kv")}


class Model:
    """The state the database must converge to, built from the same submissions."""

    def __init__(self) -> None:
        self.rows: dict[str, KvRecord] = {}
        self.index = 0

    def change(self, index, changes) -> None:
        for c in changes:
            if c.value is None:
                self.rows.pop(c.key, None)
            else:
                self.rows[c.key] = KvRecord(c.key, c.value, c.version, c.create_index, c.mod_index)
        self.index = index

    def snapshot(self, index, records) -> None:
        self.rows = {r.key: r for r in records}
        self.index = index


def random_changes(rng: random.Random, model: Model, index: int, keys: int = 40):
    changes = []
    for _ in range(rng.randint(0, 4)):
        key = f"k{rng.randrange(keys)}"
        if rng.random() < 0.25:
            changes.append(delete(key, index))
        else:
            changes.append(put(key, rng.randrange(1000), index, version=rng.randint(1, 9)))
    return changes


# --- tests ------------------------------------------------------------------------------------


def test_group_commit_caps_batches_and_keeps_order(tmp_path):
    async def main() -> None:
        storage = GatedStorage(tmp_path / "s.sqlite3")
        async with materializing(storage) as m:
            # Queued without yielding to the loop, so the writer finds them all pending: they
            # must go out as few transactions, each capped, in order.
            for i in range(1, 25_001):
                m.submit(i, [put(f"k{i % 1000}", i, i)])
            await within(m.flush())
            assert m.applied_index == 25_000
            assert [call[2] for call in storage.calls] == [10_000, 10_000, 5_000]
            firsts = [call[1][0] for call in storage.calls]
            assert firsts == [1, 10_001, 20_001]
            assert await storage.count() == 1000
            assert (await storage.get("k999")).mod_index == 24_999

    asyncio.run(main())


def test_snapshot_replaces_what_was_queued_before_it(tmp_path):
    async def main() -> None:
        storage = GatedStorage(tmp_path / "s.sqlite3")
        async with materializing(storage) as m:
            await within(m.flush())
            # Submitted back to back, before the writer runs: 1 and 2 are superseded.
            m.submit(1, [put("a", 1, 1)])
            m.submit(2, [put("b", 2, 2)])
            m.submit_snapshot(3, [record("s", "snap", 1, 3, 3)])
            m.submit(4, [put("c", 4, 4)])
            await within(m.flush())
            assert storage.calls == [("replace_all", 3), ("apply", [4], 1)]
            assert set(await contents(storage)) == {"s", "c"}
            assert await storage.last_applied() == 4 == m.applied_index

    asyncio.run(main())


def test_snapshot_behind_a_write_in_flight_applies_in_order(tmp_path):
    async def main() -> None:
        storage = GatedStorage(tmp_path / "s.sqlite3")
        async with materializing(storage) as m:
            storage.gate.clear()
            m.submit(5, [put("a", 5, 5)])
            await within(storage.entered.wait())  # entry 5 is in flight, held at the gate
            m.submit(6, [put("b", 6, 6)])
            m.submit_snapshot(7, [record("s", "snap", 1, 7, 7)])
            m.submit(8, [put("c", 8, 8), delete("s", 8)])
            m.submit(9, [put("s", "again", 9)])
            storage.gate.set()
            await within(m.flush())
            assert storage.calls == [("apply", [5], 1), ("replace_all", 7), ("apply", [8, 9], 3)]
            assert await contents(storage) == {"c": record("c", 8, 1, 8, 8),
                                               "s": record("s", "again", 1, 9, 9)}
            # A rollback: a snapshot at a lower index, then the log continues above it.
            m.submit_snapshot(2, [record("r", 1, 1, 2, 2)])
            m.submit(3, [put("t", 3, 3)])
            await within(m.flush())
            assert set(await contents(storage)) == {"r", "t"}
            assert await storage.last_applied() == 3 == m.applied_index

    asyncio.run(main())


def test_submit_from_another_thread_with_interleaved_snapshots(tmp_path):
    """The tick thread's view: thousands of entries and a few snapshots (some rolling back),
    submitted from a plain thread while the loop flushes now and then. The database must end
    equal to the model, at the last index."""
    async def main() -> None:
        storage = SQLiteStorage(tmp_path / "s.sqlite3")
        model = Model()
        rng = random.Random(7)

        def tick_thread(m: Materializer) -> None:
            index = 0
            for step in range(4000):
                if step % 10 == 0:
                    time.sleep(0.0005)  # pace it like a tick thread, so writes interleave
                if step % 1000 == 500:
                    index = max(1, index - rng.choice([0, 50]))  # sometimes a rollback
                    records = [record(f"k{i}", f"snap{step}", 1, index, index)
                               for i in range(0, 40, rng.randint(1, 5))]
                    model.snapshot(index, records)
                    m.submit_snapshot(index, iter(records))  # one-shot iterator
                else:
                    index += rng.randint(1, 3)  # PySyncObj indexes have gaps
                    changes = random_changes(rng, model, index)
                    model.change(index, changes)
                    m.submit(index, changes)

        async with materializing(storage) as m:
            thread = threading.Thread(target=tick_thread, args=(m,))
            thread.start()
            while thread.is_alive():
                await within(m.flush())
                await asyncio.sleep(0.005)
            thread.join()
            await within(m.flush())
            assert await contents(storage) == model.rows
            assert await storage.last_applied() == model.index == m.applied_index

    asyncio.run(main())


def test_flush_waits_for_the_write_in_flight(tmp_path):
    path = tmp_path / "s.sqlite3"

    async def main() -> None:
        storage = GatedStorage(path)
        async with materializing(storage) as m:
            await within(m.flush())  # nothing pending: returns at once
            storage.gate.clear()
            m.submit(1, [put("a", 1, 1)])
            await within(storage.entered.wait())
            flushing = asyncio.create_task(m.flush())
            await asyncio.sleep(0.05)
            assert not flushing.done()
            storage.gate.set()
            await within(flushing)
            # Committed: another connection (the sqlite3 CLI's view) sees it.
            assert read_with_stdlib(path) == {"a": ("1", 1, 1, 1)}
            assert m.applied_index == 1

    asyncio.run(main())


def test_flush_without_run_is_an_error(tmp_path):
    async def main() -> None:
        storage = SQLiteStorage(tmp_path / "s.sqlite3")
        m = Materializer(storage)
        await within(m.flush())  # nothing submitted: nothing to wait for
        m.submit(1, [put("a", 1, 1)])
        with pytest.raises(RuntimeError, match="not running; 1 submissions are unwritten"):
            await within(m.flush())
        await m.stop()  # not running: returns

    asyncio.run(main())


def test_stop_writes_everything_then_ends_run(tmp_path):
    path = tmp_path / "s.sqlite3"

    async def main() -> None:
        storage = SQLiteStorage(path)
        await storage.open()
        try:
            m = Materializer(storage)
            # Submitted before run() starts (the node replays its log while starting up).
            for i in range(1, 101):
                m.submit(i, [put(f"k{i}", i, i)])
            task = asyncio.create_task(m.run())
            for i in range(101, 201):
                m.submit(i, [put(f"k{i}", i, i)])
            await within(m.stop())
            assert task.done() and task.exception() is None
            assert await storage.count() == 200
            assert m.applied_index == 200
        finally:
            await storage.close()

    asyncio.run(main())


def test_flush_and_stop_right_after_run_was_created(tmp_path):
    """The node creates the run() task and may flush or stop before it has started."""
    async def main() -> None:
        storage = SQLiteStorage(tmp_path / "s.sqlite3")
        await storage.open()
        try:
            m = Materializer(storage)
            m.submit(1, [put("a", 1, 1)])
            task = asyncio.create_task(m.run())
            async with asyncio.timeout(TIMEOUT):  # (wait_for would give run() a head start)
                await m.flush()  # not "not running": the task gets to start first
            assert await storage.get("a") is not None
            await within(m.stop())
            await within(task)

            m = Materializer(storage)
            m.submit(2, [put("b", 1, 2)])
            task = asyncio.create_task(m.run())
            await within(m.stop())  # before the task started: it still writes, then ends
            await within(task)
            assert await storage.get("b") is not None
        finally:
            await storage.close()

    asyncio.run(main())


def test_restart_skips_what_the_database_already_has(tmp_path):
    async def main() -> None:
        path = tmp_path / "s.sqlite3"
        storage = SQLiteStorage(path)
        await storage.open()
        await storage.apply([(10, [put("a", "from before the restart", 10)])])
        await storage.close()
        async with materializing(SQLiteStorage(path)) as m:
            for i in range(8, 13):  # the log replays from an older index
                m.submit(i, [put("a", i, i, version=i), put(f"k{i}", i, i)])
            m.submit(12, [put("a", "re-delivered", 12)])  # a duplicate delivery: ignored
            await within(m.flush())
            assert (await m.storage.get("a")).value == b"12"
            assert [r.key for r in await m.storage.scan("k")] == ["k11", "k12"]
            assert m.applied_index == 12

    asyncio.run(main())


def test_cancelled_run_keeps_the_work_in_flight(tmp_path):
    async def main() -> None:
        storage = GatedStorage(tmp_path / "s.sqlite3")
        await storage.open()
        try:
            m = Materializer(storage)
            task = asyncio.create_task(m.run())
            storage.gate.clear()
            m.submit(1, [put("a", 1, 1)])
            await within(storage.entered.wait())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            storage.gate.set()
            task = asyncio.create_task(m.run())
            await within(m.flush())
            assert await storage.get("a") is not None
            await within(m.stop())
        finally:
            await storage.close()

    asyncio.run(main())


def test_failed_writes_are_retried_without_losing_changes(tmp_path, caplog):
    """Every insert fails inside the database (a trigger) for a while; meanwhile a thread
    keeps submitting, including a snapshot as a one-shot iterator. Nothing reaches the
    submitter, the failures are logged with their log indexes, and once the database accepts
    writes again everything lands."""
    path = tmp_path / "s.sqlite3"
    caplog.set_level(logging.ERROR, logger="synapse.storage.materializer")

    async def main() -> None:
        storage = SQLiteStorage(path)
        model = Model()
        async with materializing(storage, retry_initial=0.01, retry_max=0.05) as m:
            with sqlite3.connect(path) as conn:
                conn.executescript("""
                    CREATE TABLE fail_switch (on_ INTEGER);
                    INSERT INTO fail_switch VALUES (1);
                    CREATE TRIGGER fail BEFORE INSERT ON kv
                        WHEN EXISTS (SELECT 1 FROM fail_switch)
                    BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;
                """)
            def first_half() -> None:
                for i in range(1, 301):
                    changes = [put(f"k{i % 50}", i, i)]
                    model.change(i, changes)
                    m.submit(i, changes)

            await asyncio.to_thread(first_half)

            async def failed_three_times() -> None:
                while sum("log indexes 1.." in r.getMessage() for r in caplog.records) < 3:
                    await asyncio.sleep(0.01)

            await within(failed_three_times())

            def second_half() -> None:
                records = [record(f"s{i}", i, 1, 301, 301) for i in range(100)]
                model.snapshot(301, records)
                m.submit_snapshot(301, (r for r in records))
                for i in range(302, 400):
                    changes = [put(f"k{i % 50}", i, i)] + ([delete("s7", i)] if i == 350 else [])
                    model.change(i, changes)
                    m.submit(i, changes)

            await asyncio.to_thread(second_half)
            assert await storage.last_applied() == 0  # nothing landed while it fails
            with sqlite3.connect(path) as conn:
                conn.execute("DELETE FROM fail_switch")
            await within(m.flush())
            assert await contents(storage) == model.rows
            assert m.applied_index == 399
        message = caplog.records[0].getMessage()
        assert "disk on fire" in message and "sqlite:" in message and "attempt 1" in message

    asyncio.run(main())


def test_submit_never_waits_for_a_locked_database(tmp_path):
    """Another connection holds the write lock (an operator's open transaction in the sqlite3
    shell): submissions from the tick thread still return at once, and the writer catches
    up when the lock is released."""
    path = tmp_path / "s.sqlite3"

    async def main() -> None:
        storage = SQLiteStorage(path, busy_timeout_ms=20)
        async with materializing(storage, retry_initial=0.01, retry_max=0.05) as m:
            await within(m.flush())
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            done = threading.Event()

            def tick_thread() -> None:
                for i in range(1, 2001):
                    m.submit(i, [put(f"k{i}", i, i)])
                done.set()

            threading.Thread(target=tick_thread).start()
            assert await within(asyncio.to_thread(done.wait, TIMEOUT))
            await asyncio.sleep(0.1)  # let the writer hit the lock a few times
            assert m.applied_index == 0
            blocker.execute("ROLLBACK")
            blocker.close()
            await within(m.flush())
            assert await storage.count() == 2000
            assert m.applied_index == 2000

    with caplog_silenced():
        asyncio.run(main())


@contextlib.contextmanager
def caplog_silenced():
    # The expected "database is locked" retries would otherwise flood the test output.
    logger = logging.getLogger("synapse.storage.materializer")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
