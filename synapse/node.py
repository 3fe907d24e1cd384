"""A Synapse node: builds its parts and wires them together, nothing more (docs/ARCHITECTURE.md).
``synapse node start`` runs one; Python programs embed one with ``Node``.

The parts are built in ``start`` in dependency order — the storage view, the checkpoint
tracker and audit trail (the log replays into them as soon as the replica exists), the replica
and the cluster service over it, catch-up, the scheduler, repair, the HTTP API, the embedded
worker — and ``stop`` takes down whatever was built, in reverse. While PySyncObj's tick thread
applies entries, the node is the replica's ``ApplyListener`` and hands each event to the parts
that want it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from pathlib import Path

from synapse import _core
from synapse.api.context import ApiContext
from synapse.api.front import ApiServer, start_api
from synapse.cluster.committer import ProposalError
from synapse.cluster.raft import RaftError, ReplicatedLog
from synapse.cluster.service import Cluster
from synapse.config import ConfigError, NodeConfig
from synapse.integrity.audit import TRAIL as AUDIT_TRAIL
from synapse.integrity.audit import AuditTrail
from synapse.integrity.catchup import CatchUpPlanner, ContainerLoader
from synapse.integrity.checkpoints import CheckpointPolicy, CheckpointTracker, Service
from synapse.integrity.repair import Repairer, RepairSessions
from synapse.integrity.snapshots import CheckpointSnapshots, NotRetained
from synapse.memory.cache import EmbeddingCache
from synapse.memory.embedding import Embedder
from synapse.memory.index import ChromaBackend, MemoryIndex
from synapse.memory.service import MemoryService
from synapse.orchestrator.scheduler import Scheduler
from synapse.security import credentials, tls, tokens
from synapse.state import keys
from synapse.state.processor import CommandProcessor, EntryOutcome
from synapse.storage import open_storage
from synapse.storage.materializer import Materializer
from synapse.timeline import Timeline

log = logging.getLogger("synapse.node")

_IDENTITY = "node.json"


class NodeError(RuntimeError):
    """The node cannot start; the message says why and what to do."""


class Node:
    """One Synapse node in this process.

    From asyncio: ``async with Node(config) as node: ...`` (or ``await node.start()`` /
    ``await node.stop()``) runs it on the running loop. From plain code: ``with Node(config)
    as node: ...`` (or ``node.run_in_background()`` / ``node.close()``) runs it on its own
    loop in a background thread. Either way the Raft tick thread lives as long as the thread
    that started the node. While it runs, ``node.cluster`` is the cluster service (propose,
    read, status, membership) and ``node.integrity`` its checkpoint tracker.
    """

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config or NodeConfig()
        self.root_token: str = ""
        self.token_was_created = False
        self.started = False
        # What happened to this node, for operators (/ui, GET /v1/cluster/events).
        self.timeline = Timeline(self.config.node_id)
        self._had_leader = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The parts, in the order start() builds them; each None until built.
        self._storage = None
        self._materializer: Materializer | None = None
        self._materializer_task: asyncio.Task | None = None
        self._memory_index: MemoryIndex | None = None
        self._memory: MemoryService | None = None
        self._memory_tasks: list[asyncio.Task] = []
        self._integrity: CheckpointTracker | None = None
        self._audit: AuditTrail | None = None
        self._snapshots: CheckpointSnapshots | None = None
        self._replica: ReplicatedLog | None = None
        self._catchup: CatchUpPlanner | None = None
        self._cluster: Cluster | None = None
        self._scheduler: Scheduler | None = None
        self._repairer: Repairer | None = None
        self._api: ApiServer | None = None
        self._register_task: asyncio.Task | None = None
        self._checkpoint_task: asyncio.Task | None = None
        self._worker = None  # the embedded execution node (local mode)
        self._worker_token: tokens.TokenString | None = None
        self._peers: tls.PeerAccess | None = None
        # A divergence found while the log replayed at start, before the repairer existed.
        self._unrepaired: int | None = None

    # --- the running parts ---

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            raise NodeError("the node is not running; start it first")
        return self._cluster

    @property
    def integrity(self) -> CheckpointTracker:
        if self._integrity is None:
            raise NodeError("the node is not running; start it first")
        return self._integrity

    @property
    def memory(self) -> MemoryService:
        """Agent memory in-process: ``await node.memory.remember(ns, [{"text": ...}])``,
        ``recall``, ``get``, ``forget``, ``list`` (synapse/memory/DESIGN.md)."""
        if self._memory is None:
            raise NodeError("agent memory is not available: the node is not running, or runs with --memory-index off")
        return self._memory

    @property
    def api_url(self) -> str:
        return f"{'https' if self.config.tls else 'http'}://{self.config.api}"

    # --- lifecycle (asyncio) ---

    async def start(self) -> None:
        if self.started:
            raise NodeError("the node is already running")
        try:
            await self._build()
        except BaseException:
            await self.stop()
            raise
        self.started = True
        self.timeline.record("started", f"started at entry {self._cluster.applied()[0]}",
                             index=self._cluster.applied()[0])
        log.info("node %s: API on %s, Raft on %s, data in %s", self.config.node_id, self.api_url,
                 self.config.raft, self.config.data_dir)

    async def _build(self) -> None:
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        data_dir = cfg.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._check_identity(data_dir)
        secret = cfg.read_secret()
        try:
            root, self.token_was_created = credentials.root_token(data_dir, secret, cfg.root_token_file, cfg.multi_node)
        except credentials.CredentialError as e:
            raise ConfigError("root_token_file", str(e)) from None
        self.root_token = str(root)
        node_token = credentials.own_token(data_dir, credentials.NODE_TOKEN_FILE, credentials.node_accessor(cfg.node_id))
        own = [("node", node_token)]
        try:
            # The node's certificate is also its client certificate towards the other nodes.
            peer_tls = tls.client_context(cfg.peer_ca, cfg.tls_cert, cfg.tls_key) if cfg.tls else None
        except tls.TlsError as e:
            raise ConfigError("tls_cert", str(e)) from None
        self._peers = peers = tls.PeerAccess(str(node_token), peer_tls)
        if cfg.embedded_worker_slots > 0:
            self._worker_token = credentials.own_token(data_dir, credentials.WORKER_TOKEN_FILE,
                                                       credentials.worker_accessor(cfg.node_id))
            own.append(("worker", self._worker_token))
        self._storage = open_storage(cfg.storage, data_dir, cfg.node_id)
        await self._storage.open()
        # A node's view may lag by ~0.2 s more (storage/DESIGN.md, "Lag"): with 20 ms between
        # transactions, at ~5K writes/s each node's SQLite thread took 7-8 µs of CPU per write
        # and the three nodes' WAL writes ~50 MB/s (the same leaf pages rewritten in every small
        # transaction); with 0.2 s, 2-3 µs and throughput at 64 clients +15% (scripts/bench-cluster).
        self._materializer = Materializer(self._storage, linger=0.2)
        self._materializer_task = loop.create_task(self._materializer.run(), name="materializer")
        # Before the replica: replaying the log at start already reaches the tracker.
        self._integrity = integrity = CheckpointTracker(
            cfg.node_id, loop, self._propose_when_ready, lambda fn: self._replica.read(fn), self._diverged,
            CheckpointPolicy(cfg.checkpoint_interval, cfg.checkpoint_seconds, cfg.checkpoint_snapshot_seconds),
            is_leader=lambda: self._replica is not None and self._replica.is_leader(),
            timeline=self.timeline,
        )
        if cfg.memory_index != "off":
            # Before the replica too: it follows the log replayed at start (synapse/memory).
            self._memory_index = MemoryIndex(
                ChromaBackend(cfg.memory_index, data_dir, cfg.node_id), lambda fn: self._replica.read(fn),
                catching_up=lambda: self._cluster.catching_up() if self._cluster is not None else "starting")
        self._audit = AuditTrail(data_dir / AUDIT_TRAIL)
        self._snapshots = CheckpointSnapshots(data_dir / "checkpoints", cfg.checkpoint_retain)
        self._replica = replica = ReplicatedLog(
            raft_addr=cfg.raft,
            peers=sorted(cfg.peers.values()),
            data_dir=data_dir,
            processor_factory=CommandProcessor,
            listener=self,
            secret=secret,
            tuning=cfg.tuning,
            bind_address=cfg.raft,
            fsync=cfg.raft_fsync,
            # A TLS node's Raft port speaks mutual TLS too, with the same certificate and CA.
            tls=(cfg.tls_cert, cfg.tls_key, cfg.peer_ca) if cfg.tls and cfg.peer_ca is not None else None,
        )
        self._catchup = CatchUpPlanner(cfg.node_id, replica.read, peers)
        replica.set_catchup_planner(self._catchup.payload_for)
        replica.catchup_loader = ContainerLoader(self._catchup.stats)
        try:
            self._cluster = cluster = await Cluster.open(replica, cfg.request_timeout)
        except RaftError as e:
            raise NodeError(f"{e} (is it in use?)") from e
        if self._memory_index is not None:
            cache = EmbeddingCache(cfg.embedding_cache) if cfg.embedding_cache != "off" else None
            self._memory = MemoryService(cluster, self._memory_index, Embedder(), cfg.request_timeout, cache)
            self._memory_tasks += [loop.create_task(self._memory_index.run(), name="memory-index"),
                                   loop.create_task(self._memory.expire_due(), name="memory-expiry")]
        serving = lambda: integrity.service == Service.SERVING  # noqa: E731
        self._scheduler = Scheduler(cfg.node_id, cluster, serving, cfg.heartbeat_timeout)
        self._scheduler.start()
        self._repairer = Repairer(cfg.node_id, cluster, integrity, self._materializer.submit, peers, self.timeline)
        if self._unrepaired is not None:
            self._repairer.start(self._unrepaired)
        context = ApiContext(
            node_id=cfg.node_id, request_timeout=cfg.request_timeout, debug_fault_injection=cfg.debug_fault_injection,
            cluster=cluster, integrity=integrity, repairer=self._repairer, repair_sessions=RepairSessions(replica),
            snapshots=self._snapshots, scheduler=self._scheduler, catchup=self._catchup.stats,
            peers=peers, timeline=self.timeline, memory=self._memory,
        )
        try:
            self._api = await start_api(context, *cfg.api_host_port(), tls=cfg)
        except OSError as e:
            raise NodeError(f"cannot listen on the API address {cfg.api}: {e.strerror}") from e
        self._register_task = loop.create_task(self._register_self(root, own), name="register")
        self._checkpoint_task = loop.create_task(self._periodic_checkpoints(), name="checkpoints")
        if cfg.embedded_worker_slots > 0:
            self._worker = self._new_worker(cfg.embedded_worker_slots)  # started once its token is in the state

    async def stop(self) -> None:
        """Stops serving, then Raft, then writes out what the materializer still holds."""
        if self._worker is not None:
            # Its tasks are cancelled; their leases lapse when the cluster marks it down.
            await self._loop.run_in_executor(None, self._worker.close)
            self._worker = None
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._api is not None:
            await self._api.cleanup()
            self._api = None
        for task in (self._register_task, self._checkpoint_task, *self._memory_tasks):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._repairer is not None:
            await self._repairer.close()
        if self._catchup is not None:
            await self._catchup.close()
        if self._integrity is not None:
            await self._integrity.close()
        if self._cluster is not None:
            await self._cluster.close()  # the committer, then the voter (waits for its tick thread)
        elif self._replica is not None:
            await self._loop.run_in_executor(None, self._replica.close)
        if self._memory_index is not None:
            # After Raft: nothing submits any more. The next start reconciles what is left.
            await self._loop.run_in_executor(None, self._memory_index.stop)
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        if self._snapshots is not None:
            self._snapshots.wait(60)
        if self._materializer is not None:
            await self._materializer.stop()
        if self._materializer_task is not None:
            await asyncio.gather(self._materializer_task, return_exceptions=True)
        if self._storage is not None:
            await self._storage.close()
        self._cluster = self._replica = None
        self.started = False

    async def __aenter__(self) -> "Node":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # --- lifecycle (blocking, own loop in a thread) ---

    def run_in_background(self, timeout: float = 30.0) -> "Node":
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = _new_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"synapse-node-{self.config.node_id}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise NodeError(f"the node did not start within {timeout:g} s")
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> "Node":
        return self.run_in_background()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- ApplyListener (PySyncObj's tick thread: hand off, return at once) ---

    def entry_applied(self, index: int, outcome: EntryOutcome, digest: bytes) -> None:
        if self._materializer is not None and outcome.changes:
            self._materializer.submit(index, outcome.changes)
        if self._integrity is not None:
            self._integrity.entry_applied(index, outcome, digest)
        if outcome.memory and self._memory_index is not None:
            self._memory_index.submit(index, outcome.memory)
        if outcome.events and self._scheduler is not None:
            self._scheduler.entry_applied(outcome.events)
        if self._audit is not None:
            self._audit.append(index, outcome.chain, digest)
            if index % 10_000 == 0 and (first := self._replica.first_log_index()) is not None:
                self._audit.trim_below(first)  # nothing before the log verifies

    def checkpoint_made(self, index: int, frozen: _core.FrozenState) -> None:
        if self._snapshots is not None:
            self._snapshots.take(index, frozen)

    def checkpoint_state(self, index: int, digest: bytes) -> _core.StateStore:
        if self._snapshots is None:
            raise NotRetained("this node keeps no checkpoint snapshots")
        return self._snapshots.load(index, digest)

    def rollback_failed(self, index: int, target: int, error: Exception) -> None:
        if self._integrity is not None:
            self._integrity.cannot_follow(index, f"rollback to checkpoint {target}: {error}")

    def state_repaired(self, index: int, records: list[tuple[int, bytes, bytes]]) -> None:
        # Under the entry lock: the next entry's record comes after these.
        if self._audit is not None:
            self._audit.rewrite(records)
        if self._memory_index is not None:
            # A repaired record may be a memory — also when no entry was replayed after the
            # repair's snapshot (records empty): skipping the resync then left a memory the
            # damage had removed out of the index for good (a test caught it under load).
            self._memory_index.resync(index)

    def state_replaced(self, index: int, store: _core.StateStore, cause: str, checkpoint: int | None = None) -> None:
        if cause == "rollback":
            self.timeline.record("rollback", f"rolled back to checkpoint {checkpoint} at entry {index}", index=index,
                                 checkpoint=checkpoint)
        elif self.started:  # a dump loaded at start is the node's own, not a catch-up
            how = "a diff of the leader's state" if cause == "catchup" else "the leader's whole state"
            self.timeline.record("caught_up", f"caught up to entry {index} from {how}", index=index, by=cause)
        if self._integrity is not None:
            self._integrity.state_replaced(index)
        if self._materializer is not None:
            self._materializer.submit_snapshot(index, _kv_records(store.clone()))
        if self._memory_index is not None:
            self._memory_index.resync(index)
        # The new state may predate this node's registration (a rollback, an old dump).
        if self.started and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._reregister)
            except RuntimeError:  # the loop is closed: stopping
                pass

    def role_changed(self, leader: str | None, is_leader: bool) -> None:
        log.info("node %s: leader is now %s%s", self.config.node_id, leader, " (this node)" if is_leader else "")
        if leader is None and not self._had_leader:
            return  # a node starting has no leader yet: not news
        self._had_leader = True
        # By node id where the configuration names it (a voter added since: its Raft address).
        name = {raft: node_id for node_id, raft in self.config.peers.items()}.get(leader, leader)
        self.timeline.record("leader", "this node leads" if is_leader else
                             (f"leader is now {name}" if leader else "lost its leader"), leader_raft=leader)

    # --- wiring ---

    def _diverged(self, checkpoint: int) -> None:
        if self._repairer is not None:
            self._repairer.start(checkpoint)
        else:
            self._unrepaired = checkpoint  # repaired as soon as the repairer exists

    async def _propose_when_ready(self, command: dict, size_hint: int) -> dict:
        # Reports can be due while the log replays at start, before the cluster service exists.
        while self._cluster is None:
            await asyncio.sleep(0.05)
        return await self._cluster.propose(command, size_hint)

    async def _periodic_checkpoints(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self._cluster.is_leader():
                await self._integrity.propose_if_due(self._cluster.applied()[0])

    def _reregister(self) -> None:
        if self._register_task is None or self._register_task.done():
            self._register_task = self._loop.create_task(self._register_self(), name="register")

    async def _register_self(self, root: tokens.TokenString | None = None,
                             own: list[tuple[str, tokens.TokenString]] = ()) -> None:
        """Publishes this node's API address in the replicated state, so any node can tell
        clients where the others (and the leader) are; at start, first bootstraps the root
        principal and this node's own tokens (synapse/security/credentials.py), then starts
        the embedded worker. Checks a linearizable view first, so a restarted node that is
        already registered writes nothing (its state hash must come back unchanged). Retries
        until it lands."""
        cfg, cluster = self.config, self._cluster
        command = {"op": "register_node", "node_id": cfg.node_id, "api": cfg.api, "raft": cfg.raft}
        while True:
            try:
                await cluster.barrier()
                if root is not None:
                    await credentials.ensure(cluster.propose, cluster.read, root, cfg.node_id, list(own))
                    root = None
                    if self._worker is not None:
                        self._worker.start()
                known = cluster.read(lambda p: p.nodes().get(cfg.node_id))
                if known and known.get("api") == cfg.api and known.get("raft") == cfg.raft:
                    return
                await cluster.propose(dict(command, rid=f"register/{cfg.node_id}/{secrets.token_hex(8)}"), 256)
                return
            except ProposalError:
                await asyncio.sleep(0.5)

    def _new_worker(self, slots: int):
        from synapse.execution.worker import Worker  # the sandbox is only needed with a worker

        cfg = self.config
        try:
            return Worker(self.api_url, str(self._worker_token), worker_id=cfg.node_id, slots=slots,
                          driver=cfg.worker_driver, request_timeout=cfg.request_timeout, ssl_context=self._peers.ssl if self._peers else None)
        except Exception as e:  # SandboxUnavailable: the driver asked for cannot run here
            raise NodeError(f"the embedded worker cannot start: {e}") from e

    def _check_identity(self, data_dir: Path) -> None:
        path = data_dir / _IDENTITY
        me = {"node_id": self.config.node_id, "raft": self.config.raft}
        if path.exists():
            try:
                recorded = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise NodeError(f"{path} is unreadable ({e}); it records which node owns {data_dir}") from e
            if recorded.get("node_id") != me["node_id"]:
                raise ConfigError(
                    "data_dir",
                    f"{data_dir} belongs to node {recorded.get('node_id')!r}, not {me['node_id']!r}; "
                    "give each node its own data directory",
                )
        else:
            credentials.write_private(path, json.dumps(me) + "\n")


def _kv_records(store: _core.StateStore):
    for key, value in store.scan_prefix(keys.KV):
        yield keys.decode_kv(keys.kv_name(key), value)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


__all__ = ["Node", "NodeError"]
