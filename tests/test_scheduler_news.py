"""The scheduler's news from the apply thread: it reaches every waiter on the node (a task's
watcher, a worker's long poll, the leader's rounds) and wakes no loop where nothing waits."""

from __future__ import annotations

import asyncio
import threading

from synapse.orchestrator.scheduler import Scheduler


class FollowerCluster:
    """A cluster this node does not lead: the scheduler's rounds never act."""

    def read(self, fn):
        raise AssertionError("a follower's scheduler reads nothing")

    async def propose(self, command, size_hint):
        raise AssertionError("a follower's scheduler proposes nothing")

    def is_leader(self) -> bool:
        return False


class CountingLoop:
    """The scheduler's loop, counting the cross-thread hops made to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.hops = loop, 0

    def call_soon_threadsafe(self, *args):
        self.hops += 1
        return self.loop.call_soon_threadsafe(*args)


def _from_apply_thread(fn) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def test_news_wakes_a_watcher_on_a_follower_and_nothing_else():
    async def scenario():
        scheduler = Scheduler("n2", FollowerCluster(), lambda: True, heartbeat_timeout=2.0)
        scheduler.start()
        loop = CountingLoop(asyncio.get_running_loop())
        scheduler._loop = loop
        try:
            # Nothing waits here: the entry's news is counted and wakes no loop.
            _from_apply_thread(lambda: scheduler.entry_applied(
                (("task", "assigned", "t1", "w1", 5), ("task", "ended", "t1", "w1", "succeeded"))))
            assert loop.hops == 0
            assert scheduler.ended["succeeded"] == 1

            # A client waits for t2's end on this node (GET /v1/tasks/t2?wait=...).
            ended = scheduler.watch_task("t2")
            _from_apply_thread(lambda: scheduler.entry_applied((("task", "ended", "t3", "w1", "failed"),)))
            assert loop.hops == 0  # another task's end
            _from_apply_thread(lambda: scheduler.entry_applied((("task", "ended", "t2", "w1", "succeeded"),)))
            await asyncio.wait_for(ended.wait(), 5)
            assert loop.hops == 1
            scheduler.unwatch_task("t2")

            # A worker's long poll here (it was leader a moment ago): its news still comes.
            news = scheduler.news_for("w9")
            news.clear()
            _from_apply_thread(lambda: scheduler.entry_applied((("task", "assigned", "t4", "w9", 1),)))
            await asyncio.wait_for(news.wait(), 5)
            assert loop.hops == 2
        finally:
            await scheduler.close()

    asyncio.run(scenario())


def test_the_leader_is_woken_by_every_entry_with_task_news():
    async def scenario():
        scheduler = Scheduler("n1", FollowerCluster(), lambda: True, heartbeat_timeout=2.0)
        loop = CountingLoop(asyncio.get_running_loop())
        scheduler._loop = loop
        scheduler._leading = True  # as _run sets it while the node leads and serves
        _from_apply_thread(lambda: scheduler.entry_applied((("task", "queued", "t1", None),)))
        await asyncio.sleep(0)
        assert loop.hops == 1
        assert scheduler._wake.is_set()  # the next round starts now, not at its tick

    asyncio.run(scenario())


def test_close_ends_the_loop_when_news_arrives_with_it():
    # Python 3.11's wait_for swallows a cancel that lands as the event it waits on is set:
    # a node stopping just as an entry's news came would wait for its scheduler forever.
    async def scenario():
        scheduler = Scheduler("n2", FollowerCluster(), lambda: True, heartbeat_timeout=2.0)
        scheduler.start()
        await asyncio.sleep(0.01)  # the loop is in its wait
        scheduler._wake.set()
        await asyncio.wait_for(scheduler.close(), 5)

    asyncio.run(scenario())
