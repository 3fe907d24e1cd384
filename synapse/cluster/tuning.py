"""Raft timing for a node (``RaftTuning``), apart from the PySyncObj bridge: the settings
(``synapse/config.py``) and the CLI read it without loading PySyncObj, which ``raft.py``
patches for the whole process when it is imported."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RaftTuning:
    """Timing, tuned by measurement (DESIGN.md: 20 leader SIGKILLs each, 3 nodes on loopback).

    PySyncObj's defaults (0.4/1.4 s, 0.1 s heartbeats) gave a median failover of 1.44 s, every
    time in two election rounds: idle follower-to-follower links hit ``connectionTimeout``, so
    the first vote requests went nowhere. 0.3/0.6 s with 0.05 s heartbeats plus a keep-alive
    on every link gave a median of 0.42 s in one round, with no spurious elections under load.
    """

    min_timeout: float = 0.3
    max_timeout: float = 0.6
    heartbeat: float = 0.05
    # Keep-alives make every link carry traffic, so a dead peer is still noticed by this
    # timeout (unlike with the timeout disabled, where a silently dropped link is only seen
    # after ~15 minutes of TCP retries).
    keepalive: float = 0.5
    connection_timeout: float = 2.0
    # PySyncObj redials a lost peer every connectionRetryTime (default 5 s): a restarted node
    # then took 5-7 s to hear the leader and, with no pre-vote in PySyncObj, disturbed the
    # cluster with elections meanwhile (scripts/bench-node, 10 restarts).
    reconnect: float = 0.5
    # A leader cut off from the majority steps down after this long (PySyncObj default: 30 s).
    # Linearizable reads never depend on it — they need a committed barrier — but clients
    # find the new leader sooner.
    leader_fallback: float = 2.0
    # How long the leader holds back telling followers that its commit index moved, hoping
    # the next entry (which carries the commit index) goes out first (_SyncObj__applyLogEntries).
    commit_notice_delay: float = 0.002
    compaction_min_entries: int = 50_000
    compaction_min_seconds: float = 600.0
    # ...or as soon as the log holds this much on disk (dumps are written off the tick thread,
    # so compacting by size no longer stalls heartbeats).
    compaction_max_log_bytes: int = 256 << 20
