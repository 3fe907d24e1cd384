"""Linearizable reads by read index: the event loop's side.

A reader needs an index that every write acknowledged before the read began is at or below;
once the node has applied that far, the local state answers. The rounds that get one are the
tick thread's (raft.py, ``Voter._read_index_message``: the leader confirms its term with a
majority, a follower asks the leader; DESIGN.md, "Read-index rounds", has the argument). One
round is out at a time per node: readers arriving meanwhile could not use its answer (it was
asked before them) and share the next. When a round cannot be had (no leader, more than three
voters for a follower, peers that do not take part, a term changed, no answer), its readers
wait for a barrier entry instead (``GroupCommitter.join_barriers``).
"""

from __future__ import annotations

import asyncio

from synapse.cluster.committer import GroupCommitter
from synapse.cluster.raft import ReplicatedLog


class IndexReads:
    def __init__(self, replica: ReplicatedLog, committer: GroupCommitter) -> None:
        self._replica = replica
        self._committer = committer
        self._loop = asyncio.get_running_loop()
        self._waiting: list[asyncio.Future] = []
        self._out: tuple[int, list[asyncio.Future]] | None = None  # (seq, its readers)
        self._seq = 0

    def usable(self) -> bool:
        return self._replica.read_index_usable()

    def future(self, timeout: float) -> asyncio.Future:
        """A reader's future: done (None) once this node has applied a read index from a round
        started after the call, or a ``ProposalError`` (the barrier entry's, if it came to that)."""
        fut = self._committer.reader(timeout)
        self._waiting.append(fut)
        if self._out is None:
            self._ask()
        return fut

    def close(self) -> None:
        """Hands every reader still waiting to the committer, whose close fails them."""
        self._committer.join_barriers(self._waiting + (self._out[1] if self._out else []))
        self._waiting, self._out = [], None

    def _ask(self) -> None:
        readers, self._waiting = [fut for fut in self._waiting if not fut.done()], []
        if not readers:
            return
        self._seq += 1
        seq = self._seq
        self._out = (seq, readers)

        def answered(ok: bool) -> None:  # tick thread: hand over and return
            try:
                self._loop.call_soon_threadsafe(self._answered, seq, readers, ok)
            except RuntimeError:  # the loop is closed: the node is gone
                pass

        self._replica.request_read_index(seq, answered)

    def _answered(self, seq: int, readers: list[asyncio.Future], ok: bool) -> None:
        if ok:
            for fut in readers:
                if not fut.done():
                    fut.set_result(None)
        else:
            self._committer.join_barriers(readers)
        if self._out is not None and self._out[0] == seq:
            self._out = None
        if self._waiting:
            self._ask()
