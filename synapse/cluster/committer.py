"""Group commit: many concurrent requests, one log entry.

PySyncObj's own batch mode adds ~100 ms per commit (DESIGN.md, measured); with it off, one entry
costs ~0.6 ms and a Fernet-encrypted message per follower. So the committer coalesces every
command that arrives while earlier entries are in flight into the next entry (up to
``max_commands`` / ``max_bytes``), keeping at most ``max_in_flight`` entries outstanding.
Linearizable-read barriers ride along: all readers waiting when an entry is formed share one
``noop`` in it. An entry of barriers alone is out one at a time: readers arriving while one is
out need an entry proposed after them anyway, and share the next (reads 1.13× spread, 1.06× to
the leader, with less CPU per read: scripts/bench-ab, 4 rounds each).

Runs on the node's event loop. PySyncObj calls back on its tick thread; results cross back
with ``loop.call_soon_threadsafe`` only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from typing import Callable, Protocol

from synapse.state.commands import encode_entry

log = logging.getLogger("synapse.cluster")


# The largest entry a committer makes, and the leader's merge of queued entries too (merge.py).
MAX_ENTRY_COMMANDS = 1024
MAX_ENTRY_BYTES = 4 << 20

# How long to wait before proposing again when there is no leader (an election takes ~0.3-0.6 s).
_ELECTION_RETRY = 0.05


class ProposalError(Exception):
    """A command did not get a result. ``outcome_unknown``: it may still have been (or yet be)
    applied — retry with the same request id and the dedup table makes the retry safe."""

    def __init__(self, reason: str, message: str, outcome_unknown: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.outcome_unknown = outcome_unknown


class EntryLog(Protocol):
    """Where entries go (``ReplicatedLog``): ``append`` calls back on another thread with
    (result, None) once the entry is applied on this node, or (None, the failure's reason)."""

    def append(self, payload: bytes, callback: Callable[[object, str | None], None]) -> None: ...


@dataclass
class _Entry:
    commands: list[tuple[dict, int, bool]]  # (command, size hint, alone), aligned with futures
    futures: list[asyncio.Future]
    barriers: list[asyncio.Future]
    started: float = field(default_factory=time.monotonic)
    done: bool = False


class GroupCommitter:
    def __init__(
        self,
        raft: EntryLog,
        max_commands: int = MAX_ENTRY_COMMANDS,
        max_bytes: int = MAX_ENTRY_BYTES,
        # Two: one entry filling while one commits. With one, 64 small-write clients ran
        # within the noise of two (8 alternated rounds, scripts/bench-cluster's load), but
        # 128-put transactions from 8 clients loaded ~1.5x slower: the next entry waited for
        # the whole previous one to be applied on the leader before it was even sent.
        max_in_flight: int = 2,
        entry_timeout: float = 10.0,
    ) -> None:
        self._raft = raft
        self._max_commands = max_commands
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight
        self._entry_timeout = entry_timeout
        self._pending: deque[tuple[dict, int, asyncio.Future, bool]] = deque()
        self._barriers: list[asyncio.Future] = []
        self._in_flight: list[_Entry] = []
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.entries_proposed = 0
        self.commands_proposed = 0

    def start(self) -> None:
        self._task = self._loop.create_task(self._run(), name="group-committer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        error = ProposalError("shutting_down", "the node is shutting down", outcome_unknown=True)
        for _, _, fut, _ in self._pending:
            _fail(fut, error)
        for fut in self._barriers:
            _fail(fut, error)
        for entry in list(self._in_flight):  # _finish removes from the list
            self._finish(entry, error)

    async def submit(self, command: dict, size_hint: int, timeout: float, alone: bool = False) -> dict:
        """Proposes one command and returns its result from the state machine. ``alone``:
        in an entry of its own (a rollback replaces the whole state after its entry)."""
        return await self.proposal(command, size_hint, timeout, alone)

    def proposal(self, command: dict, size_hint: int, timeout: float, alone: bool = False) -> asyncio.Future:
        """``submit`` without a coroutine: a future that gets the command's result, or a
        ``ProposalError`` (a timeout after ``timeout`` seconds included). Cancelling it
        withdraws a command not proposed yet."""
        fut = self._deadline(timeout)
        self._pending.append((command, size_hint, fut, alone))
        self._wake.set()
        return fut

    async def barrier(self, timeout: float) -> None:
        """Returns once this node has applied an entry committed after the call began: a read
        of local state after that is linearizable. On a leader cut off from the majority the
        barrier never commits, so the read fails instead of returning stale data."""
        await self.barrier_future(timeout)

    def barrier_future(self, timeout: float) -> asyncio.Future:
        """``barrier`` without a coroutine: a future done (with None, or a ``ProposalError``)
        when the barrier is."""
        fut = self._deadline(timeout)
        self._barriers.append(fut)
        self._wake.set()
        return fut

    def reader(self, timeout: float) -> asyncio.Future:
        """A reader's future with the request's deadline, for a read resolved another way (a
        read-index round, read_index.py); ``join_barriers`` hands it back here."""
        return self._deadline(timeout)

    def join_barriers(self, futures: list[asyncio.Future]) -> None:
        """Readers that could not get a read index: they wait for the next barrier entry."""
        self._barriers.extend(fut for fut in futures if not fut.done())
        self._wake.set()

    def _deadline(self, timeout: float) -> asyncio.Future:
        # One timer per request rather than asyncio.wait_for, which adds a second future and
        # two callbacks per request (measured on the leader's event loop). A future that has
        # timed out is done, so a late result is dropped and a command still waiting to be
        # proposed never is (_propose_next skips it).
        fut = self._loop.create_future()
        timer = self._loop.call_later(timeout, _time_out, fut, timeout)
        fut.add_done_callback(lambda _, timer=timer: timer.cancel())
        return fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._expire_stuck_entries()
            while self._room_for_next():
                self._propose_next()
            if self._in_flight and (self._expiry is None or self._expiry.when() <= self._loop.time()):
                # While entries are out, wake at least once a second to expire those whose
                # callbacks never come (one timer at a time, however busy the loop is).
                self._expiry = self._loop.call_later(1.0, self._wake.set)

    def _room_for_next(self) -> bool:
        if len(self._in_flight) >= self._max_in_flight:
            return False
        if self._pending:
            return True
        # Barriers alone: while an entry with barriers is out, readers arriving meanwhile wait
        # for the next one together (it must be proposed after them anyway) rather than each
        # free slot carrying a few.
        return bool(self._barriers) and not any(entry.barriers for entry in self._in_flight)

    def _propose_next(self) -> None:
        commands, hints, flags, futures, size = [], [], [], [], 0
        while self._pending and len(commands) < self._max_commands:
            command, hint, fut, alone = self._pending[0]
            if commands and (alone or size + hint > self._max_bytes):
                break
            self._pending.popleft()
            if fut.done():  # its caller timed out before it was proposed: drop it
                continue
            commands.append(command)
            hints.append(hint)
            flags.append(alone)
            futures.append(fut)
            size += hint
            if alone:
                break
        commands, hints, flags, futures = _encodable(commands, hints, flags, futures)
        solo = any(flags)
        barriers, self._barriers = ([], self._barriers) if solo else (self._barriers, [])
        if barriers:
            commands.append({"op": "noop"})
        if not commands:
            return
        entry = _Entry(commands=list(zip(commands, hints, flags)), futures=futures, barriers=barriers)
        self._in_flight.append(entry)
        self.entries_proposed += 1
        self.commands_proposed += len(futures)
        self._raft.append(encode_entry(commands), functools.partial(self._on_applied, entry))

    def _on_applied(self, entry: _Entry, result, failure: str | None) -> None:
        # Tick thread: hand over and return.
        try:
            self._loop.call_soon_threadsafe(self._resolve, entry, result, failure)
        except RuntimeError:  # the loop is closed: the node is gone
            pass

    def _resolve(self, entry: _Entry, result, reason: str | None) -> None:
        if reason is not None:
            if reason == "no_leader":
                # Nothing was appended anywhere: wait for the election and propose again, as
                # etcd does, rather than fail every request during the ~0.4 s without a leader.
                # The caller's timeout still bounds the wait.
                self._finish(entry, None)
                self._loop.call_later(_ELECTION_RETRY, self._requeue, entry)
                return
            # Only these say for sure that nothing was appended; an entry on a deposed leader
            # may still be committed by its successor, so the rest are "unknown".
            surely_not_applied = reason in ("no_leader", "queue_full", "denied")
            self._finish(
                entry,
                ProposalError(reason, f"the entry was not committed ({reason}); retry", not surely_not_applied),
            )
        elif not isinstance(result, list) or len(result) != len(entry.futures) + (1 if entry.barriers else 0):
            self._finish(entry, ProposalError("internal", "the state machine returned a malformed result", True))
        else:
            for fut, res in zip(entry.futures, result):
                if not fut.done():
                    fut.set_result(res)
            for fut in entry.barriers:
                if not fut.done():
                    fut.set_result(None)
            self._finish(entry, None)

    def _requeue(self, entry: _Entry) -> None:
        waiting = [(c, h, f, a) for (c, h, a), f in zip(entry.commands, entry.futures) if not f.done()]
        self._pending.extendleft(reversed(waiting))
        self._barriers.extend(f for f in entry.barriers if not f.done())
        self._wake.set()

    def _finish(self, entry: _Entry, error: Exception | None) -> None:
        if error is not None:
            for fut in entry.futures + entry.barriers:
                _fail(fut, error)
        if not entry.done:
            entry.done = True
            self._in_flight.remove(entry)
            self._wake.set()

    def _expire_stuck_entries(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self._in_flight if now - e.started > self._entry_timeout]:
            log.warning("an entry proposed %.1f s ago has no outcome; releasing its slot", now - entry.started)
            self._finish(
                entry,
                ProposalError("timeout", "no outcome from the cluster in time (no quorum?)", outcome_unknown=True),
            )


def _encodable(commands: list, hints: list, flags: list, futures: list) -> tuple[list, list, list, list]:
    """The commands msgpack can encode, with their hints, flags and futures; the others' futures
    fail. The API validates every command before proposing it, so this only guards: an encoding
    error raised here would end the committer's task, and every later write would time out."""
    try:
        encode_entry(commands)
        return commands, hints, flags, futures
    except (TypeError, ValueError, OverflowError):
        pass
    kept: tuple[list, list, list, list] = ([], [], [], [])
    for row in zip(commands, hints, flags, futures):
        try:
            encode_entry([row[0]])
        except (TypeError, ValueError, OverflowError) as e:
            log.error("a %r command cannot be encoded into a log entry (%s); refused", row[0].get("op"), e)
            _fail(row[3], ProposalError("bad_command", f"the command cannot be encoded into a log entry: {e}", False))
            continue
        for column, value in zip(kept, row):
            column.append(value)
    return kept


def _fail(fut: asyncio.Future, error: Exception) -> None:
    if not fut.done():
        fut.set_exception(error)


def _time_out(fut: asyncio.Future, timeout: float) -> None:
    _fail(fut, ProposalError(
        "timeout", f"no result within {timeout:g} s; the cluster may lack a quorum", outcome_unknown=True
    ))
