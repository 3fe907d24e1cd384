"""The node's Prometheus metrics: request counts and latencies (observed by the request
pipeline for both transports) and the node's state, read when ``/metrics`` is scraped."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from synapse.api.cluster import contact
from synapse.api.context import context_of

METRICS_KEY: web.AppKey["Metrics"] = web.AppKey("metrics")


class Totals:
    """Running totals the node's parts keep themselves (entries proposed, repairs done, bytes
    sent, tasks ended): read at each scrape and exposed as Prometheus counters
    (``<name>_total``), so rate() and increase() apply and a restarted node, starting again
    from zero, reads as a counter reset."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._declared: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._values: dict[str, dict[tuple[str, ...], float]] = {}
        registry.register(self)

    def declare(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> str:
        self._declared[name] = (documentation, labels)
        self._values[name] = {}
        return name

    def set(self, name: str, value: float, *labels: str) -> None:
        self._values[name][labels] = value

    def collect(self):
        for name, (documentation, labels) in self._declared.items():
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for values, total in list(self._values[name].items()):
                family.add_metric(list(values), total)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("synapse_http_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "synapse_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.applied_index = Gauge("synapse_applied_index", "Last applied log index", registry=self.registry)
        self.commit_index = Gauge("synapse_commit_index", "Raft commit index", registry=self.registry)
        self.term = Gauge("synapse_raft_term", "Raft term", registry=self.registry)
        self.is_leader = Gauge("synapse_is_leader", "1 if this node is the Raft leader", registry=self.registry)
        self.totals = t = Totals(self.registry)
        self.entries = t.declare("synapse_entries_proposed", "Log entries proposed by this node")
        self.commands = t.declare("synapse_commands_proposed", "Commands proposed by this node")
        self.merged = t.declare("synapse_entries_merged", "Entries this node, as leader, joined into another "
                                "entry's log entry (its own and those followers forwarded)")
        self.read_index = t.declare(
            "synapse_read_index_requests", "Read-index rounds of linearizable reads, by outcome: this node's "
            "asked, served (applied up to the read index), fell_back (a barrier entry instead); as leader, "
            "followers' requests answered or refused", ("outcome",))
        self.tick_stalls = t.declare(
            "synapse_raft_tick_stalls", "Gaps between two ticks of this node's Raft thread longer than "
            "over_seconds: nothing left the node meanwhile; past the contact timeout (2 s) peers counted it down",
            ("over_seconds",))
        self.longest_tick_gap = Gauge("synapse_raft_longest_tick_gap_seconds", "The longest gap between two ticks "
                                      "of this node's Raft thread since it started", registry=self.registry)
        self.serving = Gauge("synapse_integrity_serving", "1 unless this node's state diverged from the agreed one", registry=self.registry)
        self.repairs = t.declare("synapse_repairs", "Repairs completed by this node since it started")
        self.catchup_sent = t.declare("synapse_catchup_bytes_sent", "Bytes of catch-up containers sent to lagging followers")
        self.catchup_received = t.declare("synapse_catchup_bytes_received",
                                          "Bytes of catch-up containers received from the leader")
        self.catchup_full_dumps = t.declare(
            "synapse_catchup_full_dumps", "Whole dumps sent to lagging followers instead of a catch-up container, "
            "by reason", ("reason",))
        self.catchup_probe = t.declare("synapse_catchup_probe_bytes", "Bytes exchanged with followers to plan "
                                       "catch-ups", ("direction",))
        self.repair_bytes = Gauge("synapse_repair_bytes", "Bytes received by the last repair", registry=self.registry)
        # Each voter as this node sees it (the leader's view is the one that counts: a voter
        # down there is one `synapse cluster replace` candidate). node: its id, or its Raft
        # address while it is not registered.
        self.voter_up = Gauge("synapse_voter_up", "1 if this node heard from the voter within the contact timeout "
                              "(itself: 1)", ["node"], registry=self.registry)
        self.voter_contact = Gauge("synapse_voter_last_contact_seconds", "Seconds since this node last heard from "
                                   "the voter (never since this node started: its uptime)", ["node"],
                                   registry=self.registry)
        # Agent memory's index on this node (synapse/memory/DESIGN.md): absent with --memory-index off.
        self.memory_indexed = Gauge("synapse_memory_indexed_index", "Every memory change up to this log index is "
                                    "in this node's vector index", registry=self.registry)
        self.memory_whole = Gauge("synapse_memory_index_whole", "1 while the vector index holds the whole state "
                                  "(0: reconciling after a start, rollback, repair or failure)", registry=self.registry)
        self.memory_reconciles = t.declare("synapse_memory_index_reconciles", "Reconciles of the vector index "
                                           "against the state since the node started")
        self.memory_repaired = t.declare("synapse_memory_index_repaired", "Records a reconcile found missing from "
                                         "the vector index (no query by their own vector found them) and added again")
        self.memory_failing = Gauge("synapse_memory_index_failing", "1 while the last index write or reconcile "
                                    "failed (the node log says why)", registry=self.registry)
        self.recall_calls = t.declare("synapse_memory_recall_index_calls", "Index calls that answered recalls (each "
                                      "a batch of concurrent ones)")
        self.recall_questions = t.declare("synapse_memory_recall_index_questions", "Recalls answered by the index")
        self.checkpoint_last = Gauge("synapse_checkpoint_last_index", "The newest checkpoint this node applied",
                                     registry=self.registry)
        self.checkpoint_agreed = Gauge("synapse_checkpoint_agreed_index", "The newest checkpoint whose digest a "
                                       "majority agreed on and this node's matched", registry=self.registry)
        self.denials = Counter("synapse_auth_denials", "Requests refused by the token check (unauthorized: no, a "
                               "bad or a revoked token; forbidden: a scope it lacks)", ["reason"], registry=self.registry)
        # Tasks and workers (synapse/orchestrator): the replicated state's counts, and what this
        # node applied since it started.
        self.tasks = Gauge("synapse_tasks", "Tasks in the state: pending (queued), leased (assigned or "
                           "running), ended (kept, newest 100,000)", ["state"], registry=self.registry)
        self.tasks_ended = t.declare("synapse_tasks_ended", "Tasks ended by entries this node applied since it "
                                     "started, by outcome", ("outcome",))
        self.task_wait = Histogram("synapse_task_schedule_seconds", "How long each task waited to be placed on a "
                                   "worker (from its submission or its retry's backoff end), as applied here",
                                   registry=self.registry,
                                   buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.workers = Gauge("synapse_workers", "Registered execution nodes by state", ["state"], registry=self.registry)
        self.memory_records = Gauge("synapse_memory_records", "Memory records in the state", registry=self.registry)
        self.memory_namespaces = Gauge("synapse_memory_namespaces", "Memory namespaces holding records",
                                       registry=self.registry)
        # The labelled children, looked up once: labels() takes a lock and builds a key per call.
        self._counted: dict[tuple[str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    def denied(self, reason: str) -> None:
        self.denials.labels(reason).inc()

    def observe(self, route: str, status: int, seconds: float) -> None:
        counter = self._counted.get((route, status))
        if counter is None:
            counter = self._counted[(route, status)] = self.requests.labels(route, str(status))
        timer = self._timed.get(route)
        if timer is None:
            timer = self._timed[route] = self.latency.labels(route)
        counter.inc()
        timer.observe(seconds)


async def metrics(request: web.Request) -> web.Response:
    ctx, m = context_of(request), request.app[METRICS_KEY]
    raft = ctx.cluster.status()
    m.applied_index.set(ctx.cluster.applied()[0])
    m.commit_index.set(raft["commit_index"])
    m.term.set(raft["term"])
    m.is_leader.set(1 if raft["is_leader"] else 0)
    totals = m.totals
    totals.set(m.entries, ctx.cluster.entries_proposed)
    totals.set(m.commands, ctx.cluster.commands_proposed)
    totals.set(m.merged, raft["entries_merged"])
    for outcome, count in raft["read_index"].items():
        totals.set(m.read_index, count, outcome)
    for over, count in raft["tick_stalls"].items():
        totals.set(m.tick_stalls, count, f"{over:g}")
    m.longest_tick_gap.set(raft["longest_tick_gap"])
    m.serving.set(1 if ctx.serving else 0)
    integrity = ctx.integrity.status()
    m.checkpoint_last.set(integrity["last_checkpoint"] or 0)
    m.checkpoint_agreed.set(integrity["last_agreed"] or 0)
    st = ctx.catchup
    totals.set(m.catchup_sent, st.container_bytes_sent)
    totals.set(m.catchup_received, st.container_bytes_received)
    totals.set(m.catchup_probe, st.probe_bytes_sent, "sent")
    totals.set(m.catchup_probe, st.probe_bytes_received, "received")
    for reason, count in list(st.full_dumps.items()):
        totals.set(m.catchup_full_dumps, count, reason)
    totals.set(m.repairs, ctx.repairer.repairs)
    m.repair_bytes.set(ctx.repairer.last.bytes_received if ctx.repairer.last else 0)
    counts, workers, spaces, nodes = ctx.cluster.read(  # one read: the applier waits for none twice
        lambda p: (p.task_counts(), [w["state"] for w in p.workers().values()], p.memory_namespaces(), p.nodes()))
    for state, n in counts.items():
        m.tasks.labels(state).set(n)
    for state in ("up", "down"):
        m.workers.labels(state).set(workers.count(state))
    for outcome, n in list(ctx.scheduler.ended.items()):
        totals.set(m.tasks_ended, n, outcome)
    m.memory_records.set(sum(space["count"] for _, space in spaces))
    m.memory_namespaces.set(len(spaces))
    if ctx.memory is not None:
        index = ctx.memory.index
        m.memory_indexed.set(index.indexed_upto)
        m.memory_whole.set(1 if index.whole else 0)
        totals.set(m.memory_reconciles, index.reconciles)
        totals.set(m.memory_repaired, index.repaired)
        m.memory_failing.set(1 if index.last_error else 0)
        totals.set(m.recall_calls, index.recall_batches.calls)
        totals.set(m.recall_questions, index.recall_batches.questions)
    names = {info["raft"]: node_id for node_id, info in nodes.items()}
    now = time.time()
    m.voter_up.clear()  # a voter removed since the last scrape is no longer reported
    m.voter_contact.clear()
    for addr in {raft["raft_addr"], *raft["peers"]}:
        health, name = contact(raft, addr, now), names.get(addr, addr)
        m.voter_up.labels(name).set(1 if health["up"] else 0)
        silent = health["last_contact_s"] if health["last_contact_s"] is not None else raft["uptime"]
        m.voter_contact.labels(name).set(silent)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
