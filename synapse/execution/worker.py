"""An execution node: registers with the cluster, heartbeats to the leader (a long poll that
brings its assignments), runs each task in the sandbox and reports start and finish.

``synapse worker start --join URL --token T`` runs one; a local-mode node runs one inside
itself (``worker_slots``). The protocol is in synapse/orchestrator/DESIGN.md. Threads: the
heartbeat loop, the reporter, and one per running task (the sandbox blocks while it runs).
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field

from synapse.client import Client, SynapseError, UnavailableError
from synapse.execution import Driver, Grants, Job, JobError, Limits, Outcome, choose_driver
from synapse.state.tasks import MAX_RESULT_BYTES

log = logging.getLogger("synapse.worker")

REPORT_BATCH = 256


def default_worker_id() -> str:
    # Unique per process: two workers on one host must not share an id (each registration
    # starts a new life of the id and releases what the other holds).
    return f"{socket.gethostname()}-{os.getpid()}"


def job_from_spec(spec: dict) -> Job:
    """The sandbox job for a task spec in its JSON form (as the heartbeat delivers it)."""
    limits = spec.get("limits") or {}
    caps = spec.get("capabilities") or {}
    memory = limits.get("memory_mb")
    return Job(
        argv=tuple(spec["command"]) if spec.get("command") else None,
        entry=spec.get("entry"),
        args=spec.get("args"),
        env=dict(spec.get("env") or {}),
        files={name: base64.b64decode(c["base64"]) for name, c in (spec.get("files") or {}).items()},
        limits=Limits(
            cpu_s=limits.get("cpu_s"),
            memory_bytes=None if memory is None else memory << 20,
            wall_s=float(limits.get("wall_s") or 600.0),
            output_bytes=int(limits.get("output_bytes", 64 << 10)),
            processes=limits.get("processes"),
            # What the replicated state stores: a bigger return value fails the task here
            # (result_limit) instead of its report being refused.
            result_bytes=MAX_RESULT_BYTES,
        ),
        grants=Grants(network=bool(caps.get("network", False)), read_paths=tuple(caps.get("read_paths") or ()),
                      write_paths=tuple(caps.get("write_paths") or ())),
    )


def outcome_json(outcome: Outcome) -> dict:
    return {
        "status": outcome.status, "reason": outcome.reason, "exit_code": outcome.exit_code, "signal": outcome.signal,
        "stdout": base64.b64encode(outcome.stdout).decode(), "stderr": base64.b64encode(outcome.stderr).decode(),
        "stdout_truncated": outcome.stdout_truncated, "stderr_truncated": outcome.stderr_truncated,
        "output_hash": outcome.output_hash, "result": outcome.result,
        "usage": {k: v for k, v in outcome.usage.items() if isinstance(v, (int, float))},
        "started_ms": int(outcome.started_at * 1000), "driver": outcome.driver,
    }


@dataclass
class _Running:
    lease: int
    cancel: threading.Event = field(default_factory=threading.Event)
    # Killed because this worker stops, not because the task was cancelled: no result is
    # reported (it would end the task "cancelled"); leaving hands it back to the scheduler.
    abandoned: bool = False


class Worker:
    """One execution node. ``run(stop)`` blocks; ``start()`` / ``close()`` run it in threads."""

    def __init__(self, urls: str | list[str], token: str, worker_id: str | None = None, slots: int | None = None,
                 labels: dict[str, str] | None = None, memory_mb: int | None = None, driver: str | Driver = "auto",
                 request_timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.worker_id = worker_id or default_worker_id()
        self.slots = slots or os.cpu_count() or 1
        self.labels = labels or {}
        self.memory_mb = memory_mb
        self.driver = choose_driver(driver) if isinstance(driver, str) else driver
        self._urls, self._token, self._timeout = urls, token, request_timeout
        self._ssl = ssl_context  # for https:// URLs: the cluster's CA (and a client certificate)
        self.epoch: int | None = None
        self.heartbeat_timeout = 5.0
        # Tasks this worker holds a lease on, from assignment until the cluster answered its
        # finish report: the heartbeat tells the leader about all of them, so an assignment
        # whose result is still in flight is never handed out (and run) again.
        self._holding: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._reports: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ran = 0

    # --- lifecycle ---

    def start(self) -> "Worker":
        self._threads = [threading.Thread(target=self.run, args=(self._stop,), name=f"worker-{self.worker_id}",
                                          daemon=True)]
        self._threads[0].start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        reporter = threading.Thread(target=self._report_loop, name=f"worker-{self.worker_id}-reports", daemon=True)
        reporter.start()
        client = Client(self._urls, self._token, timeout=self._timeout, ssl_context=self._ssl)
        try:
            while not stop.is_set():
                try:
                    if self.epoch is None:
                        self._register(client)
                    self._heartbeat(client)
                except SynapseError as e:
                    if e.status == 409 and e.error == "worker_down":
                        log.warning("worker %s: the cluster marked it down; registering again", self.worker_id)
                        self._forget_all()
                        self.epoch = None
                    else:
                        log.info("worker %s: %s", self.worker_id, e)
                        stop.wait(0.5)
                except Exception:  # a bug or a malformed answer must not end the worker
                    log.exception("worker %s: heartbeat failed", self.worker_id)
                    stop.wait(1.0)
        finally:
            stop.set()
            # Stopping: kill what runs here without reporting it; leaving hands it back.
            with self._lock:
                for running in self._holding.values():
                    running.abandoned = True
                    running.cancel.set()
            reporter.join(self._timeout + 5)
            self._leave(client)
            client.close()

    # --- talking to the cluster ---

    def _register(self, client: Client) -> None:
        answer = client.request("POST", "/v1/workers", {
            "worker_id": self.worker_id, "instance": uuid.uuid4().hex, "slots": self.slots, "labels": self.labels,
            "memory_mb": self.memory_mb, "driver": self.driver.name})
        self.epoch = answer["epoch"]
        log.info("worker %s: registered (epoch %d, %d slots, driver %s)", self.worker_id, self.epoch, self.slots,
                 self.driver.name)

    def _leave(self, client: Client) -> None:
        """Stopping on purpose: the cluster marks this worker down now and reschedules what
        it held, instead of waiting out the heartbeat timeout."""
        if self.epoch is None:
            return
        try:
            answer = client.request("POST", f"/v1/workers/{self.worker_id}/leave", {"epoch": self.epoch})
            log.info("worker %s: left the cluster; released %s", self.worker_id, answer["released"])
        except SynapseError as e:
            log.info("worker %s: could not say it leaves (%s); the heartbeat timeout will tell", self.worker_id, e)

    def _heartbeat(self, client: Client) -> None:
        with self._lock:
            holding = {t: r.lease for t, r in self._holding.items()}
        answer = client.request("POST", f"/v1/workers/{self.worker_id}/heartbeat", {
            # Three polls per timeout, each well inside the client's own request timeout.
            "epoch": self.epoch, "holding": holding,
            "wait_s": round(min(self.heartbeat_timeout / 3, self._timeout / 2), 3)})
        self.heartbeat_timeout = float(answer.get("heartbeat_timeout_s", self.heartbeat_timeout))
        with self._lock:
            for task_id, lease in answer["revoke"].items():
                running = self._holding.get(task_id)
                if running is not None and running.lease == lease:
                    running.cancel.set()  # cancelled, or reassigned: stop it; its report is refused
            for item in answer["assign"]:
                if item["task_id"] in self._holding:
                    continue
                running = self._holding[item["task_id"]] = _Running(item["lease"])
                threading.Thread(target=self._execute, args=(item["task_id"], running, item["spec"]),
                                 name=f"task-{item['task_id']}", daemon=True).start()

    def _execute(self, task_id: str, running: _Running, spec: dict) -> None:
        def started(at: float) -> None:
            self._reports.put({"kind": "start", "task_id": task_id, "lease": running.lease, "at_ms": int(at * 1000)})

        try:
            outcome = self.driver.run(job_from_spec(spec), cancel=running.cancel, on_start=started)
            report = outcome_json(outcome)
        except JobError as e:
            report = {"status": "failed", "reason": "bad_job", "stderr": base64.b64encode(str(e).encode()).decode()}
        except Exception as e:  # the sandbox could not run it here (SandboxUnavailable, ...)
            log.exception("worker %s: task %s could not run", self.worker_id, task_id)
            report = {"status": "failed", "reason": "sandbox_error",
                      "stderr": base64.b64encode(f"{type(e).__name__}: {e}".encode()).decode()}
        self.ran += 1
        if running.abandoned:
            return
        self._reports.put({"kind": "finish", "task_id": task_id, "lease": running.lease,
                           "at_ms": int(time.time() * 1000), "outcome": report})

    def _report_loop(self) -> None:
        """Sends reports in batches until each has an answer (ok, or refused for its lease);
        a batch that got no answer is sent again — its request ids make that safe."""
        client = Client(self._urls, self._token, timeout=self._timeout, ssl_context=self._ssl)
        pending: list[dict] = []
        try:
            while not (self._stop.is_set() and not pending and self._reports.empty()):
                if not pending:
                    try:
                        pending.append(self._reports.get(timeout=0.2))
                    except queue.Empty:
                        continue
                while len(pending) < REPORT_BATCH:
                    try:
                        pending.append(self._reports.get_nowait())
                    except queue.Empty:
                        break
                pending = _without_superseded_starts(pending)
                try:
                    results = self._deliver(client, pending)
                except SynapseError as e:  # no answer (unavailable, 5xx): the same batch again
                    if self._stop.is_set():
                        return  # stopping: the leases lapse when the cluster marks this worker down
                    log.info("worker %s: reports not delivered yet (%s); retrying", self.worker_id, e)
                    self._stop.wait(0.2)
                    continue
                for report, result in zip(pending, results):
                    if report["kind"] == "finish":
                        with self._lock:
                            running = self._holding.get(report["task_id"])
                            if running is not None and running.lease == report["lease"]:
                                del self._holding[report["task_id"]]
                        if not result.get("ok"):
                            log.info("worker %s: result of %s refused: %s", self.worker_id, report["task_id"],
                                     result.get("message") or result.get("error"))
                pending = []
        finally:
            client.close()

    def _deliver(self, client: Client, reports: list[dict]) -> list[dict]:
        """Each report's answer. A batch refused as malformed (a 4xx: one bad report) is sent
        again one report at a time, and a finish refused on its own is replaced by a bare
        failure — a finish that never lands would be handed out and run again. Raises
        SynapseError when the cluster gave no answer (retry the same batch)."""
        try:
            return self._post(client, reports)
        except SynapseError as e:
            if _no_answer(e):
                raise
            log.error("worker %s: reports refused (%s); sending them one at a time", self.worker_id, e)
        results = []
        for report in reports:
            try:
                results += self._post(client, [report])
            except SynapseError as e:
                if _no_answer(e):
                    raise
                if report["kind"] != "finish":
                    results.append({"task_id": report["task_id"], "ok": False, "error": e.error})
                    continue
                log.error("worker %s: the result of %s was refused (%s); reporting a bare failure",
                          self.worker_id, report["task_id"], e)
                bare = {**report, "outcome": {"status": "failed", "reason": "report_refused"}}
                results += self._post(client, [bare])
        return results

    def _post(self, client: Client, reports: list[dict]) -> list[dict]:
        return client.request("POST", f"/v1/workers/{self.worker_id}/reports", {"reports": reports})["results"]

    def _forget_all(self) -> None:
        """After being marked down: every lease is revoked, so stop every task."""
        with self._lock:
            for running in self._holding.values():
                running.cancel.set()


def _without_superseded_starts(reports: list[dict]) -> list[dict]:
    """A start whose finish is in the same batch says nothing the finish does not (it carries
    the start time): one log command fewer per short task."""
    finished = {(r["task_id"], r["lease"]) for r in reports if r["kind"] == "finish"}
    return [r for r in reports if r["kind"] != "start" or (r["task_id"], r["lease"]) not in finished]


def _no_answer(error: SynapseError) -> bool:
    return isinstance(error, UnavailableError) or error.status >= 500
