"""What the HTTP API serves from: the node's parts it may use, and nothing else of the node.

``synapse/node.py`` builds one ``ApiContext`` when the node starts; every handler reaches it
through ``context_of(request)``, the Rust front's hot path holds it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from aiohttp import web

from synapse.cluster.service import Cluster
from synapse.integrity.catchup import CatchUpStats
from synapse.integrity.checkpoints import CheckpointTracker, Service
from synapse.integrity.repair import Repairer, RepairSessions
from synapse.integrity.snapshots import CheckpointSnapshots
from synapse.memory.service import MemoryService
from synapse.orchestrator.scheduler import Scheduler
from synapse.security.tls import PeerAccess
from synapse.timeline import Timeline


@dataclass(frozen=True)
class ApiContext:
    node_id: str
    request_timeout: float
    debug_fault_injection: bool
    cluster: Cluster
    integrity: CheckpointTracker
    repairer: Repairer
    repair_sessions: RepairSessions
    snapshots: CheckpointSnapshots
    scheduler: Scheduler
    catchup: CatchUpStats
    peers: PeerAccess  # how this node calls the others: its own token, and TLS when served
    timeline: Timeline  # what happened to this node (GET /v1/cluster/events, the dashboard)
    memory: MemoryService | None = None  # None: turned off (--memory-index off)
    # Tokens found live at one instant (api/pipeline.py, _identity): reused only at that
    # instant — the same applied state, the same millisecond.
    identities: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def serving(self) -> bool:
        """False while this node's state is known to differ from the agreed one."""
        return self.integrity.service == Service.SERVING


CONTEXT_KEY: web.AppKey[ApiContext] = web.AppKey("context")
# Who sent the request (api/pipeline.py's Identity; None on public routes), set by the pipeline.
IDENTITY_KEY: web.RequestKey = web.RequestKey("identity", object)


def context_of(request: web.Request) -> ApiContext:
    return request.app[CONTEXT_KEY]


def leader_of(ctx: ApiContext) -> tuple[str | None, str | None]:
    """(node id, API address) of the leader as this node knows it; (None, None) if none."""
    addr = ctx.cluster.leader_raft_addr()
    if addr is None:
        return None, None
    for node_id, info in ctx.cluster.read(lambda p: p.nodes()).items():
        if info["raft"] == addr:
            return node_id, info["api"]
    return None, None
