"""The cluster as the rest of Synapse sees it: one narrow service over this node's replica
of the log (``ReplicatedLog``) and its group committer.

Writes (``propose``, ``proposal``), linearizable-read barriers (``barrier``), reads of the
applied state (``read``), status, membership (add, remove, transfer leadership) and log
compaction. Failures are ``ProposalError`` (the outcome of a write) or ``MembershipError``
(a change the cluster refused); PySyncObj's names and error codes never leave this package.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from synapse.cluster.committer import GroupCommitter, ProposalError
from synapse.cluster.raft import ReplicatedLog
from synapse.cluster.read_index import IndexReads
from synapse.state.processor import CommandProcessor


class MembershipError(Exception):
    """The cluster refused a membership or leadership change. ``reason``: ``denied`` (the
    target is not connected and caught up, or another change is in progress),
    ``leader_changed`` (this node does not lead), ``no_leader``, ..."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Cluster:
    """This node's view of the Raft group. Runs on the node's event loop; ``read``,
    ``applied``, ``status`` and ``is_leader`` may be called from any thread."""

    def __init__(self, replica: ReplicatedLog, committer: GroupCommitter, request_timeout: float) -> None:
        self.replica = replica  # the applied state's repair and catch-up hooks (synapse/integrity)
        self._committer = committer
        self._timeout = request_timeout
        self._index_reads = IndexReads(replica, committer)

    @classmethod
    async def open(cls, replica: ReplicatedLog, request_timeout: float) -> "Cluster":
        """Waits for the replica's Raft port to be bound (off the loop), then starts group
        commit. Raises RaftError if the port cannot be bound."""
        await asyncio.get_running_loop().run_in_executor(None, replica.wait_bound)
        committer = GroupCommitter(replica)
        committer.start()
        return cls(replica, committer, request_timeout)

    async def close(self) -> None:
        """Fails what is still waiting, then stops the voter (off the loop, so callbacks in
        flight can still land)."""
        self._index_reads.close()
        await self._committer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.replica.close)

    # --- writes and barriers ---

    async def propose(self, command: dict, size_hint: int, alone: bool = False) -> dict:
        """The command's result from the state machine once it is applied on this node;
        ``ProposalError`` if it got none (``outcome_unknown`` says whether it may still)."""
        return await self._committer.submit(command, size_hint, self._timeout, alone)

    def proposal(self, command: dict, size_hint: int) -> "asyncio.Future[dict]":
        """``propose`` as a future (no coroutine): the HTTP front's writes."""
        return self._committer.proposal(command, size_hint, self._timeout)

    async def barrier(self, timeout: float | None = None) -> None:
        """Returns once this node has applied an entry committed after the call: a read of
        the local state after it is linearizable."""
        fut = self.barrier_future(timeout)
        if fut is not None:
            await fut

    async def barrier_entry(self, timeout: float | None = None) -> None:
        """Commits a barrier entry and returns once this node has applied it: moves the log on
        by one entry, for what waits for an index to be reached (a repair's freeze) — a read
        needs only ``barrier``, which may take no entry at all."""
        await self._committer.barrier_future(self._timeout if timeout is None else timeout)

    def barrier_future(self, timeout: float | None = None) -> "asyncio.Future[None] | None":
        """``barrier`` as a future (no coroutine): the HTTP front's reads. None: already there
        — a lone voter that leads and has applied its whole log (raft.py,
        lone_leader_current) needs no entry. Otherwise a read-index round (read_index.py) when
        one can be had, else a barrier entry."""
        if self.replica.lone_leader_current():
            return None
        timeout = self._timeout if timeout is None else timeout
        if self._index_reads.usable():
            return self._index_reads.future(timeout)
        return self._committer.barrier_future(timeout)

    @property
    def entries_proposed(self) -> int:
        return self._committer.entries_proposed

    @property
    def commands_proposed(self) -> int:
        return self._committer.commands_proposed

    # --- reads (any thread) ---

    def read(self, fn: Callable[[CommandProcessor], object]) -> object:
        """``fn(processor)`` on the applied state, between two entries."""
        return self.replica.read(fn)

    def frozen_now(self):
        """(applied index, a frozen view of the state at it): a backup's consistent cut."""
        return self.replica.frozen_now()

    def applied(self) -> tuple[int, bytes]:
        """(applied index, state digest at that index)."""
        return self.replica.applied()

    def status(self) -> dict:
        """raft_addr, leader_raft_addr, is_leader, term, commit_index, peers, connected, and
        each peer's last_contact (seconds since this node heard from it, None: never), uptime
        and contact_timeout (a peer silent longer is down)."""
        return self.replica.status()

    def is_leader(self) -> bool:
        return self.replica.is_leader()

    def catching_up(self) -> str | None:
        """Why this node has not applied everything it knows to be committed (no leader known
        yet, or a log still replaying or arriving), or None once it has."""
        raft, applied = self.status(), self.applied()[0]
        if raft["leader_raft_addr"] is None:
            return "no leader is known yet"
        if applied < raft["commit_index"]:
            return f"catching up: applied {applied} of {raft['commit_index']}"
        return None

    def leader_raft_addr(self) -> str | None:
        return self.replica.leader_raft_addr()

    def voters(self) -> set[str]:
        """The Raft configuration as this node applies it (it changes when appended, so a
        follower's view can run ahead of a commit by one change)."""
        status = self.replica.status()
        return {status["raft_addr"], *status["peers"]}

    # --- membership and log ---

    async def add_voter(self, raft_addr: str) -> None:
        await self._change(lambda done: self.replica.add_voter(raft_addr, done), f"adding {raft_addr}")

    async def remove_voter(self, raft_addr: str) -> None:
        await self._change(lambda done: self.replica.remove_voter(raft_addr, done), f"removing {raft_addr}")

    async def transfer_leadership(self, raft_addr: str | None) -> None:
        """Hands leadership to ``raft_addr`` (None: the most caught-up follower). Returns once
        the request is sent; the new leader shows in ``status`` a moment later."""
        await self._change(lambda done: self.replica.transfer_leadership(raft_addr, done),
                           "transferring leadership")

    def step_down(self) -> None:
        """Hands leadership to the most caught-up follower, if this node leads; no answer."""
        if self.replica.is_leader():
            self.replica.transfer_leadership(None)

    def compact(self) -> None:
        """Writes a dump and cuts the log up to it at the next tick."""
        self.replica.compact()

    async def _change(self, start: Callable[[Callable[[str | None], None]], None], what: str) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(failure: str | None) -> None:  # the tick thread
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(failure))

        start(done)
        try:
            failure = await asyncio.wait_for(fut, self._timeout)
        except asyncio.TimeoutError:
            raise ProposalError(
                "timeout", f"{what}: no answer from the cluster within {self._timeout:g} s (no leader or no "
                "quorum?); the change may still happen — see GET /v1/cluster/status, then retry", True,
            ) from None
        if failure is not None:
            raise MembershipError(failure, f"{what} failed ({failure})")
