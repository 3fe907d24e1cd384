"""The group committer (synapse/cluster/committer.py) against a stand-in log: what goes into
each entry, how many entries are out at once, and when a linearizable read's barrier is done."""

from __future__ import annotations

import asyncio

from synapse.cluster.committer import GroupCommitter
from synapse.state.commands import decode_entry


class Log:
    """An ``EntryLog`` that holds each appended entry until the test applies it."""

    def __init__(self) -> None:
        self.entries: list[tuple[list, object]] = []  # (commands, callback), in append order

    def append(self, payload: bytes, callback) -> None:
        self.entries.append((decode_entry(payload), callback))

    def apply(self, n: int) -> None:
        """The n-th entry is applied: one result per command (the barrier's noop included)."""
        commands, callback = self.entries[n]
        callback([{"index": n + 1} for _ in commands], None)


def put(key: str) -> dict:
    return {"op": "put", "key": key, "value": "1"}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Committer(GroupCommitter):
    """Keeps every future it hands out, so the test can retrieve what closing failed."""

    def _deadline(self, timeout: float) -> asyncio.Future:
        fut = super()._deadline(timeout)
        self.handed_out.append(fut)
        return fut


def run(scenario) -> None:
    async def main() -> None:
        log = Log()
        committer = Committer(log)
        committer.handed_out = []
        committer.start()
        try:
            await scenario(log, committer)
        finally:
            await committer.close()
            for fut in committer.handed_out:  # what was left waiting failed with "shutting down"
                assert fut.done() and (fut.cancelled() or fut.exception() is None
                                       or "shutting down" in str(fut.exception()))

    asyncio.run(main())


def test_commands_wait_for_a_free_slot_and_then_leave_together():
    async def scenario(log, committer):
        first = [committer.proposal(put(f"a{i}"), 80, 10) for i in range(3)]
        await settle()
        second = [committer.proposal(put(f"b{i}"), 80, 10) for i in range(2)]
        await settle()
        later = [committer.proposal(put(f"c{i}"), 80, 10) for i in range(4)]
        await settle()
        # Two entries out at most; the third batch waits for a slot and leaves whole.
        assert [len(c) for c, _ in log.entries] == [3, 2]
        log.apply(0)
        await settle()
        assert [len(c) for c, _ in log.entries] == [3, 2, 4]
        assert all(f.done() for f in first) and not any(f.done() for f in second + later)

    run(scenario)


def test_barriers_ride_with_commands_as_one_noop():
    async def scenario(log, committer):
        barriers = [committer.barrier_future(10) for _ in range(3)]
        write = committer.proposal(put("k"), 80, 10)
        await settle()
        (commands, _), = log.entries
        assert commands == [put("k"), {"op": "noop"}]
        log.apply(0)
        await settle()
        assert write.result() == {"index": 1} and all(b.done() and b.exception() is None for b in barriers)

    run(scenario)


def test_reads_arriving_while_a_barrier_is_out_share_the_next_one():
    async def scenario(log, committer):
        first = committer.barrier_future(10)
        await settle()
        assert [c for c, _ in log.entries] == [[{"op": "noop"}]]
        # A free slot remains, but these readers arrived after the first barrier was proposed:
        # they need an entry proposed after them, and wait to share one.
        more = [committer.barrier_future(10) for _ in range(5)]
        await settle()
        assert len(log.entries) == 1
        log.apply(0)
        await settle()
        assert first.done() and not any(f.done() for f in more)  # the earlier entry does not do
        assert [c for c, _ in log.entries] == [[{"op": "noop"}], [{"op": "noop"}]]
        log.apply(1)
        await settle()
        assert all(f.done() and f.exception() is None for f in more)

    run(scenario)


def test_a_barrier_is_not_held_back_by_an_entry_of_commands_alone():
    async def scenario(log, committer):
        committer.proposal(put("k"), 80, 10)
        await settle()
        barrier = committer.barrier_future(10)
        await settle()
        # The entry out carries no barrier: the reader gets the second slot at once.
        assert [c for c, _ in log.entries] == [[put("k")], [{"op": "noop"}]]
        log.apply(1)
        await settle()
        assert barrier.done()

    run(scenario)
