"""The recall batcher (synapse/memory/query_batch.py) with a real thread pool: questions that
arrive while the workers are busy go together, each gets its own answer, questions of another
key never share a call, a failed call fails only its own questions, and a caller that gave up
does not disturb the rest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from synapse.memory.query_batch import QueryBatcher


class Gate:
    """A run function whose calls block until released, recording each call's questions."""

    def __init__(self, fail_key=None) -> None:
        self.calls: list[tuple[object, list]] = []
        self.release = threading.Event()
        self.fail_key = fail_key

    def __call__(self, key, questions):
        self.calls.append((key, list(questions)))
        self.release.wait(10)
        if key == self.fail_key:
            raise RuntimeError(f"index down for {key}")
        return [(key, q * 10) for q in questions]


async def _settle(batcher, pending: int) -> None:
    for _ in range(200):  # until `pending` questions wait behind the busy workers
        if sum(len(v) for v in batcher._waiting.values()) == pending:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the questions never queued")


def test_questions_arriving_while_busy_share_one_call_and_get_their_own_answers():
    async def go():
        pool = concurrent.futures.ThreadPoolExecutor(1)
        gate = Gate()
        b = QueryBatcher(gate, pool, workers=1, max_batch=8)
        first = asyncio.ensure_future(b.ask("ns-a", 0))  # an idle batcher sends it at once, alone
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.ask("ns-a", i)) for i in range(1, 11)]
        other = asyncio.ensure_future(b.ask("ns-b", 99))
        await _settle(b, 11)
        gate.release.set()
        answers = await asyncio.gather(first, *rest, other)
        pool.shutdown()
        return gate.calls, answers

    calls, answers = asyncio.run(go())
    assert answers == [("ns-a", i * 10) for i in range(11)] + [("ns-b", 990)]
    # alone, then 8 (max_batch), then the other key, then the 2 left of the first key
    assert [(k, len(q)) for k, q in calls] == [("ns-a", 1), ("ns-a", 8), ("ns-b", 1), ("ns-a", 2)]


def test_a_failed_call_fails_its_own_questions_only():
    async def go():
        pool = concurrent.futures.ThreadPoolExecutor(1)
        gate = Gate(fail_key="down")
        b = QueryBatcher(gate, pool, workers=1)
        blocker = asyncio.ensure_future(b.ask("up", 1))
        await asyncio.sleep(0.05)
        doomed = [asyncio.ensure_future(b.ask("down", i)) for i in range(3)]
        fine = asyncio.ensure_future(b.ask("up", 2))
        await _settle(b, 4)
        gate.release.set()
        results = await asyncio.gather(blocker, *doomed, fine, return_exceptions=True)
        pool.shutdown()
        return results

    results = asyncio.run(go())
    assert results[0] == ("up", 10) and results[-1] == ("up", 20)
    assert all(isinstance(r, RuntimeError) and "index down" in str(r) for r in results[1:4])


def test_a_caller_that_gave_up_is_left_out_and_the_others_are_answered():
    async def go():
        pool = concurrent.futures.ThreadPoolExecutor(1)
        gate = Gate()
        b = QueryBatcher(gate, pool, workers=1)
        blocker = asyncio.ensure_future(b.ask("k", 1))
        await asyncio.sleep(0.05)
        quitter = asyncio.ensure_future(asyncio.wait_for(b.ask("k", 2), 0.05))
        stayer = asyncio.ensure_future(b.ask("k", 3))
        with pytest.raises(asyncio.TimeoutError):
            await quitter
        gate.release.set()
        answers = await asyncio.gather(blocker, stayer)
        pool.shutdown()
        return gate.calls, answers

    calls, answers = asyncio.run(go())
    assert answers == [("k", 10), ("k", 30)]
    assert [q for _, q in calls] == [[1], [3]]  # the question given up on never reached the index


def test_a_question_to_a_stopped_pool_fails_at_once():
    async def go():
        pool = concurrent.futures.ThreadPoolExecutor(1)
        pool.shutdown()
        b = QueryBatcher(Gate(), pool, workers=1)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(b.ask("k", 1), 5)
        return b.calls

    assert asyncio.run(go()) == 0
