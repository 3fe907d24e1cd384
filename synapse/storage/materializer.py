"""The bridge from the Raft apply thread to the database (group commit, never blocking)."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from synapse.state.records import KvChange, KvRecord

from .base import KvStorage

log = logging.getLogger(__name__)

# Changes per storage.apply: set-based PostgreSQL upserts measured ~120K rows/s (storage/DESIGN.md)
# with 10,000-row batches; larger batches only make one failed round costlier to retry.
MAX_BATCH_CHANGES = 10_000


@dataclass(slots=True)
class _Work:
    seq: int  # submission number, for flush()
    index: int  # log index
    changes: Sequence[KvChange] | None  # set for an entry's changes
    records: Iterable[KvRecord] | None  # set for a snapshot


class Materializer:
    """Writes applied changes to a ``KvStorage`` in log order, one transaction per round.

    ``submit`` and ``submit_snapshot`` are called on PySyncObj's tick thread: they only
    append to a buffer under a lock and wake the writer with ``call_soon_threadsafe``
    (cluster/DESIGN.md: resolving an asyncio future directly from that thread stalled the loop
    for seconds). They never raise and never wait for the database. ``run()`` is a task on
    the node's event loop that drains the buffer: everything pending goes out in one
    ``storage.apply`` (up to ``MAX_BATCH_CHANGES``), so a burst of entries costs one commit.

    A failed write is logged with its log indexes and retried with backoff, forever, with
    the same work: the buffer is the only copy of those changes in this process. While the
    database is unreachable the buffer grows; a snapshot submission replaces it.
    """

    def __init__(self, storage: KvStorage, *, max_batch_changes: int = MAX_BATCH_CHANGES,
                 retry_initial: float = 0.05, retry_max: float = 5.0, linger: float = 0.0) -> None:
        self.storage = storage
        self._max_batch_changes = max_batch_changes
        # Seconds to wait after a write before taking more: under load each transaction then
        # carries more changes (the view lags by about this much more).
        self._linger = linger
        self._retry_initial = retry_initial
        self._retry_max = retry_max

        # Shared with the tick thread; everything under _lock.
        self._lock = threading.Lock()
        self._pending: collections.deque[_Work] = collections.deque()
        self._submitted_seq = 0
        self._last_submitted_index = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_scheduled = False  # one call_soon_threadsafe per wake-up, not per entry

        # Event-loop side only.
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._written_seq = 0
        self._applied_index = 0
        self._running = False
        self._stopping = False
        self._finished = asyncio.Event()

    @property
    def applied_index(self) -> int:
        """The log index the database holds, as of the last successful write (0 until
        ``run()`` has read it from the database)."""
        return self._applied_index

    # --- called from the Raft apply thread --------------------------------------------------

    def submit(self, index: int, changes: Sequence[KvChange]) -> None:
        """Queue the changes entry ``index`` made (possibly none). Never blocks or raises.

        An index at or below the last one submitted is ignored: PySyncObj re-delivers an
        entry whose apply raised, and the first delivery already queued its changes."""
        with self._lock:
            if index <= self._last_submitted_index:
                duplicate = True
            else:
                duplicate = False
                self._last_submitted_index = index
                self._submitted_seq += 1
                self._pending.append(_Work(self._submitted_seq, index, changes, None))
            wake = self._claim_wake()
        if duplicate:
            log.debug("materializer: entry %d already submitted, ignoring it", index)
        if wake is not None:
            self._send_wake(wake)

    def submit_snapshot(self, index: int, records: Iterable[KvRecord]) -> None:
        """Queue a whole-state replacement at ``index`` (snapshot install or rollback; the
        index may be lower than earlier submissions). Never blocks or raises.

        ``records`` is read later on the event loop, so it must not change after this call:
        pass a collection (re-iterable, so a retry writes the same rows) or an iterator over
        a frozen copy of the state (copied into a list before the first write attempt)."""
        with self._lock:
            # Every change queued before this is overwritten by the snapshot: drop it. Its
            # submission numbers are covered once the snapshot (a later number) is written.
            self._pending.clear()
            self._last_submitted_index = index
            self._submitted_seq += 1
            self._pending.append(_Work(self._submitted_seq, index, None, records))
            wake = self._claim_wake()
        if wake is not None:
            self._send_wake(wake)

    def _claim_wake(self) -> asyncio.AbstractEventLoop | None:
        # Under _lock. Returns the loop to wake if no wake-up is on its way yet.
        if self._loop is None or self._wake_scheduled:
            return None
        self._wake_scheduled = True
        return self._loop

    def _send_wake(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            # The loop is closed: the node is shutting down. The changes stay unwritten here
            # and the Raft log re-applies them at the next start (storage skips by index).
            log.warning("materializer: event loop closed; %s keeps what it has",
                        self.storage.describe())

    # --- on the event loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Write submitted work until ``stop()``. Run it as a task on the node's loop."""
        if self._running:
            raise RuntimeError("Materializer.run() is already running")
        self._running = True
        self._finished.clear()
        try:
            self._applied_index = await self._retrying(
                "reading last_applied", self.storage.last_applied)
            with self._lock:
                self._loop = asyncio.get_running_loop()
            while True:
                work = self._take()
                if work:
                    await self._write(work)
                    if self._linger and not self._stopping:
                        await asyncio.sleep(self._linger)
                    continue
                if self._stopping:
                    return
                await self._wake.wait()
                self._wake.clear()
        finally:
            with self._lock:
                self._loop = None
                self._wake_scheduled = False
            self._running = False
            self._finished.set()
            async with self._progress:
                self._progress.notify_all()  # flush() waiters re-check and see we stopped

    async def flush(self) -> None:
        """Wait until everything submitted before this call is in the database.

        Raises RuntimeError if ``run()`` is not running (nothing would ever write it)."""
        with self._lock:
            target = self._submitted_seq
        if self._written_seq < target and not self._running:
            # A run() task created just before this call has not had its first step yet.
            await asyncio.sleep(0)
        async with self._progress:
            while self._written_seq < target:
                if not self._running:
                    raise RuntimeError(
                        f"materializer for {self.storage.describe()} is not running; "
                        f"{target - self._written_seq} submissions are unwritten")
                await self._progress.wait()

    async def stop(self) -> None:
        """Write everything submitted so far, then end ``run()``. Stop the Raft apply first:
        ``run()`` ends only once the buffer is empty. (A ``run()`` task that had not started
        yet writes what is pending when it starts, then returns.)"""
        self._stopping = True
        self._wake.set()
        if self._running:
            await self._finished.wait()

    def _take(self) -> list[_Work]:
        """Pop the next round: one snapshot alone, or consecutive entries up to the cap."""
        with self._lock:
            self._wake_scheduled = False
            if not self._pending:
                return []
            if self._pending[0].records is not None:
                return [self._pending.popleft()]
            work: list[_Work] = []
            size = 0
            while self._pending and self._pending[0].changes is not None:
                # An entry without changes still counts, so the cap bounds entries too.
                cost = max(1, len(self._pending[0].changes))
                if work and size + cost > self._max_batch_changes:
                    break
                work.append(self._pending.popleft())
                size += cost
            return work

    async def _write(self, work: list[_Work]) -> None:
        first = work[0]
        if first.records is not None:
            records = first.records
            if iter(records) is records:  # one-shot iterator: keep the rows for a retry
                records = list(records)
            index = first.index

            async def write() -> int:
                await self.storage.replace_all(records, index)
                return index

            what = f"snapshot at log index {index}"
        else:
            batch = [(w.index, w.changes) for w in work]

            async def write() -> int:
                return await self.storage.apply(batch)

            what = (f"log index {first.index}" if len(work) == 1
                    else f"log indexes {first.index}..{work[-1].index}")
        try:
            self._applied_index = await self._retrying(f"writing {what}", write)
        except asyncio.CancelledError:
            # run() was cancelled mid-write: put the work back so a later run() writes it
            # (if it did commit, writing it again is a no-op by log index).
            with self._lock:
                self._pending.extendleft(reversed(work))
            raise
        async with self._progress:
            self._written_seq = work[-1].seq
            self._progress.notify_all()

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[int]]) -> int:
        delay = self._retry_initial
        attempt = 1
        while True:
            try:
                return await operation()
            except Exception as exc:
                # Never raised to anyone: the apply thread must not see database trouble,
                # and giving up would lose the changes. Logged every time, with the indexes.
                log.error("materializer: %s to %s failed (attempt %d), retrying in %.2f s: %r",
                          what, self.storage.describe(), attempt, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                attempt += 1
