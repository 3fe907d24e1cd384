"""Recall queries coalesced into batched index calls, like the group committer's entries.

A Chroma query pays a fixed cost around the vector search itself — argument validation, the
Python/Rust crossing, the result's assembly: ~1.7 ms of CPU for one k=10 query over 10K
384-dimension records, ~0.63 ms per query when 16 go in one call (same process, same vectors;
synapse/memory/DESIGN.md). So while ``workers`` calls are in flight, questions arriving
wait and go together in the next call — up to ``max_batch`` of them that share the same
(namespace, model, k, filter); questions that differ go in calls of their own. An idle node
sends a question at once, alone: batching only ever forms from a queue that would have
waited anyway.

Each question in a batch is answered exactly as it would be alone (the search is per query
vector); tests/test_memory_cluster.py compares concurrent recalls with one-at-a-time ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Hashable
from typing import Any

# Per call. 64 × 384 float32 is ~100 KB of query vectors; beyond ~16 the saving per query
# flattens (0.95 ms at 4, 0.63 ms at 16), and a larger batch only delays its first answer.
MAX_BATCH = 64


class QueryBatcher:
    """``await ask(key, question)`` → ``run(key, [questions...])[i]`` for this question.

    ``run`` executes on ``pool`` (at most ``workers`` calls at once) and returns one answer
    per question, in order, or raises — then every question of that call gets the error.
    Event-loop side only."""

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], pool: concurrent.futures.Executor,
                 workers: int, max_batch: int = MAX_BATCH) -> None:
        self._run, self._pool, self._workers, self._max_batch = run, pool, workers, max_batch
        self._waiting: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}  # oldest key first
        self._in_flight = 0
        self.calls = 0
        self.questions = 0

    async def ask(self, key: Hashable, question: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((question, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._in_flight < self._workers and self._waiting:
            key = next(iter(self._waiting))
            group = self._waiting[key]
            batch = [(q, f) for q, f in group[:self._max_batch] if not f.done()]  # done: its caller gave up
            rest = group[self._max_batch:]
            if rest:
                self._waiting[key] = rest
                # Fair to other keys: this one goes behind them.
                self._waiting[key] = self._waiting.pop(key)
            else:
                del self._waiting[key]
            if not batch:
                continue
            try:
                call = loop.run_in_executor(self._pool, self._run, key, [q for q, _ in batch])
            except RuntimeError as e:  # the pool is shut down: the node is stopping
                for _, future in batch:
                    future.set_exception(e)
                continue
            self._in_flight += 1
            self.calls += 1
            self.questions += len(batch)
            call.add_done_callback(lambda done, batch=batch: self._answer(done, batch))

    def _answer(self, done: asyncio.Future, batch: list[tuple[Any, asyncio.Future]]) -> None:
        self._in_flight -= 1
        error = done.exception()
        answers = None if error is not None else done.result()
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(answers[i])
        self._dispatch()
