"""The replicated task queue and worker registry: task specs, and the pure ops that move a
task through its states (synapse/orchestrator/DESIGN.md has the state machine).

Like the rest of ``synapse.state`` this does no I/O and reads no clock: every time a command
needs (``now_ms``) is put in it by its proposer, the leader's scheduler or the API. Leases
are numbered from a replicated counter, so a lease token is the same on every node and a
result carrying a revoked token is refused everywhere (fencing).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from synapse.state.validation import MAX_UINT64, CommandError, LimitError, check_fields, is_int, kind_of, short

TASK_STATES = ("pending", "assigned", "running", "succeeded", "failed", "timed-out", "cancelled", "lost")
TERMINAL = frozenset(("succeeded", "failed", "timed-out", "cancelled", "lost"))
LEASED = frozenset(("assigned", "running"))
OUTCOME_STATES = ("succeeded", "failed", "timed-out", "cancelled")  # what a sandbox reports

MAX_PRIORITY = 1000
DEFAULT_PRIORITY = 100
MAX_RETRIES = 100
MAX_BACKOFF_MS = 3_600_000
MAX_ARGV = 256
MAX_ARG_CHARS = 4096
MAX_ENV = 128
MAX_FILES = 64
MAX_FILES_BYTES = 1 << 20  # input files travel in the log entry: keep them small
MAX_ARGS_BYTES = 256 << 10
MAX_LABELS = 32
MAX_PATHS = 32
MAX_PATH_CHARS = 1024
MAX_OUTPUT_BYTES = 256 << 10  # per stream, stored in the replicated state
MAX_RESULT_BYTES = 256 << 10
MAX_ID_CHARS = 128
MAX_SLOTS = 4096
HISTORY_KEPT = 32  # state changes kept in a task's record

_LIMIT_RANGES = {  # name -> (min, max, integer only)
    "cpu_s": (1, 86_400, False),
    "memory_mb": (16, 1 << 20, True),
    "wall_s": (0.1, 86_400, False),
    "output_bytes": (0, MAX_OUTPUT_BYTES, True),
    "processes": (1, 65_536, True),
}
_SPEC_FIELDS = ("command", "entry", "args", "env", "files", "limits", "capabilities", "labels", "priority",
                "retries", "backoff_ms")
_ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


# --- validation (pure; the API calls it before proposing, the processor on every apply) ----


def check_id(value: Any, field: str) -> None:
    """Task and worker ids: 1-128 characters of letters, digits and ``._:-``."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS or not _ID.match(value):
        raise CommandError(field, f"{field}: {short(value)} is not an id; use 1 to {MAX_ID_CHARS} "
                                  "letters, digits, '.', '_', ':' or '-', starting with a letter or digit")


def check_spec(spec: Any, field: str = "spec") -> None:
    """A task spec in its stored (normalized) form; DESIGN.md lists the fields."""
    if not isinstance(spec, dict):
        raise CommandError(field, f"{field}: expected a map, got {kind_of(spec)}")
    check_fields(spec, f"{field}.", "task spec", (), _SPEC_FIELDS)
    command, entry = spec.get("command"), spec.get("entry")
    if (command is None) == (entry is None):
        raise CommandError(f"{field}.command", f"{field}.command: give either a command (argv list) or an entry "
                                               "point ('module:function'), not both and not neither")
    if command is not None:
        if not isinstance(command, list) or not 1 <= len(command) <= MAX_ARGV:
            raise CommandError(f"{field}.command", f"{field}.command: expected a list of 1 to {MAX_ARGV} strings, "
                                                   'e.g. ["python3", "-c", "print(1)"]')
        for i, arg in enumerate(command):
            if not isinstance(arg, str) or len(arg) > MAX_ARG_CHARS or "\x00" in arg:
                raise CommandError(f"{field}.command[{i}]", f"{field}.command[{i}]: expected a string of at most "
                                                            f"{MAX_ARG_CHARS} characters without NUL")
    if entry is not None and (not isinstance(entry, str) or not _ENTRY.match(entry)):
        raise CommandError(f"{field}.entry", f"{field}.entry: {short(entry)} is not 'package.module:function'")
    if "args" in spec:
        if entry is None:
            raise CommandError(f"{field}.args", f"{field}.args: arguments go with an entry point; "
                                                "put a command's arguments in its argv")
        _check_bytes(spec["args"], f"{field}.args", MAX_ARGS_BYTES, "JSON text of the arguments")
    env = spec.get("env", {})
    _check_map(env, f"{field}.env", MAX_ENV)
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name) or not isinstance(value, str) or "\x00" in value:
            raise CommandError(f"{field}.env", f"{field}.env: {short(name)} must be a variable name "
                                               "(letters, digits, _) with a string value")
    files = spec.get("files", {})
    _check_map(files, f"{field}.files", MAX_FILES)
    total = 0
    for name, content in files.items():
        check_relative_path(name, f"{field}.files")
        _check_bytes(content, f"{field}.files[{name!r}]", MAX_FILES_BYTES, "the file's bytes")
        total += len(content)
    if total > MAX_FILES_BYTES:
        raise LimitError(f"{field}.files", f"{field}.files: {total} bytes in all exceeds {MAX_FILES_BYTES}; "
                                           "ship large inputs through a granted read path instead")
    limits = spec.get("limits", {})
    _check_map(limits, f"{field}.limits", len(_LIMIT_RANGES))
    for name, value in limits.items():
        if name not in _LIMIT_RANGES:
            label = f"{field}.limits.{name if isinstance(name, str) and len(name) <= 60 else short(name)}"
            raise CommandError(label, f"{label}: unknown limit; use {', '.join(_LIMIT_RANGES)}")
        low, high, integer = _LIMIT_RANGES[name]
        if value is None and name != "wall_s" and name != "output_bytes":
            continue
        ok = is_int(value) if integer else (is_int(value) or isinstance(value, float))
        if not ok or not low <= value <= high:
            raise CommandError(f"{field}.limits.{name}", f"{field}.limits.{name}: {short(value)} is outside "
                                                         f"{low} to {high}{' (an integer)' if integer else ''}")
    caps = spec.get("capabilities", {})
    _check_map(caps, f"{field}.capabilities", 3)
    check_fields(caps, f"{field}.capabilities.", "capabilities", (), ("network", "read_paths", "write_paths"))
    if not isinstance(caps.get("network", False), bool):
        raise CommandError(f"{field}.capabilities.network", f"{field}.capabilities.network: expected true or false")
    for name in ("read_paths", "write_paths"):
        paths = caps.get(name, [])
        if not isinstance(paths, list) or len(paths) > MAX_PATHS:
            raise CommandError(f"{field}.capabilities.{name}", f"{field}.capabilities.{name}: expected a list "
                                                                f"of at most {MAX_PATHS} absolute paths")
        for path in paths:
            if (not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH_CHARS
                    or "\x00" in path or ".." in path.split("/")):
                raise CommandError(f"{field}.capabilities.{name}", f"{field}.capabilities.{name}: {short(path)} "
                                                                    "is not an absolute path without '..'")
    labels = spec.get("labels", {})
    check_labels(labels, f"{field}.labels")
    _check_int(spec.get("priority", DEFAULT_PRIORITY), f"{field}.priority", 0, MAX_PRIORITY)
    _check_int(spec.get("retries", 0), f"{field}.retries", 0, MAX_RETRIES)
    _check_int(spec.get("backoff_ms", 0), f"{field}.backoff_ms", 0, MAX_BACKOFF_MS)


def check_labels(labels: Any, field: str) -> None:
    _check_map(labels, field, MAX_LABELS)
    for name, value in labels.items():
        if not isinstance(name, str) or not _ID.match(name) or not isinstance(value, str) or len(value) > 256:
            raise CommandError(field, f"{field}: {short(name)}={short(value)} is not a label; use "
                                      "name=value with a name of letters, digits, '.', '_', ':' or '-'")


def check_relative_path(name: Any, field: str) -> None:
    if (not isinstance(name, str) or not name or name.startswith("/") or len(name) > MAX_PATH_CHARS
            or "\x00" in name or any(part in ("", ".", "..") for part in name.split("/"))):
        raise CommandError(field, f"{field}: {short(name)} is not a relative path inside the working "
                                  "directory (no leading '/', no '..', no empty parts)")


def check_outcome(outcome: Any, field: str = "outcome") -> None:
    """What a worker reports when a task ends (its stored form)."""
    if not isinstance(outcome, dict):
        raise CommandError(field, f"{field}: expected a map, got {kind_of(outcome)}")
    check_fields(outcome, f"{field}.", "task outcome", ("status",),
                  ("reason", "exit_code", "signal", "stdout", "stderr", "stdout_truncated", "stderr_truncated",
                   "output_hash", "result", "usage", "started_ms", "driver"))
    if outcome["status"] not in OUTCOME_STATES:
        raise CommandError(f"{field}.status", f"{field}.status: {short(outcome['status'])} is not one of "
                                              f"{', '.join(OUTCOME_STATES)}")
    for name in ("stdout", "stderr"):
        if name in outcome:
            _check_bytes(outcome[name], f"{field}.{name}", MAX_OUTPUT_BYTES, "the captured output")
    if outcome.get("result") is not None:
        _check_bytes(outcome["result"], f"{field}.result", MAX_RESULT_BYTES, "JSON text of the return value")
    for name in ("reason", "output_hash", "driver"):
        if name in outcome and not (isinstance(outcome[name], str) and len(outcome[name]) <= 256):
            raise CommandError(f"{field}.{name}", f"{field}.{name}: expected a string of at most 256 characters")
    for name in ("exit_code", "signal"):
        if outcome.get(name) is not None:
            _check_int(outcome[name], f"{field}.{name}", -(1 << 31), 1 << 31)
    if "started_ms" in outcome:
        _check_int(outcome["started_ms"], f"{field}.started_ms", 0, MAX_UINT64)
    usage = outcome.get("usage", {})
    _check_map(usage, f"{field}.usage", 16)
    for name, value in usage.items():
        if not isinstance(name, str) or not (is_int(value) or isinstance(value, float)):
            raise CommandError(f"{field}.usage", f"{field}.usage: {short(name)} must map to a number")


def _check_map(value: Any, field: str, limit: int) -> None:
    if not isinstance(value, dict):
        raise CommandError(field, f"{field}: expected a map, got {kind_of(value)}")
    if len(value) > limit:
        raise LimitError(field, f"{field}: {len(value)} entries exceeds the limit of {limit}")


def _check_bytes(value: Any, field: str, limit: int, what: str) -> None:
    if not isinstance(value, bytes):
        raise CommandError(field, f"{field}: expected bytes ({what}), got {kind_of(value)}")
    if len(value) > limit:
        raise LimitError(field, f"{field}: {len(value)} bytes exceeds the {limit}-byte limit")


def _check_int(value: Any, field: str, low: int, high: int) -> None:
    if not is_int(value) or not low <= value <= high:
        raise CommandError(field, f"{field}: expected an integer from {low} to {high}, got {short(value)}")


# --- the ops (run by the command processor inside one entry's overlay) --------------------


class TaskOps:
    """The task and worker ops of one entry. ``writes`` is the entry's overlay (get / set /
    scan); ``events`` collects what the node's scheduler must hear about:
    ``("task", kind, task_id, worker_id)`` with kind queued / assigned / revoked / ended, and
    ``("worker", worker_id)`` when a worker registers or goes down."""

    def __init__(self, writes, index: int, events: list, keys) -> None:
        self.w, self.index, self.events, self.k = writes, index, events, keys

    # submit / cancel (clients)

    def submit(self, c: dict) -> dict:
        idem = c.get("idempotency_key")
        if idem is not None:
            existing = self.w.get(self.k.task_idem_key(idem))
            if existing is not None:
                return {"ok": True, "task_id": existing.decode(), "duplicate": True, "index": self.index}
        task_id = c["task_id"]
        if self.w.get(self.k.task_key(task_id)) is not None:
            return _error("task_exists", f"task_id: {task_id!r} exists already; submit with a new id")
        task = {
            "spec": c["spec"], "state": "pending", "submitted_ms": c["now_ms"], "submitted_index": self.index,
            "attempts": 0, "worker": None, "lease": None, "not_before_ms": 0, "assigned_ms": None,
            "started_ms": None, "finished_ms": None, "result": None, "idempotency_key": idem,
            "history": [["pending", c["now_ms"], "submitted"]],
        }
        if idem is not None:
            self.w.set(self.k.task_idem_key(idem), task_id.encode())
        self._enqueue(task_id, task)
        self._put(task_id, task)
        return {"ok": True, "task_id": task_id, "duplicate": False, "index": self.index}

    def cancel(self, c: dict) -> dict:
        task_id = c["task_id"]
        task = self._task(task_id)
        if task is None:
            return _unknown_task(task_id)
        if task["state"] in TERMINAL:
            return _error("already_finished", f"task_id: {task_id!r} already ended ({task['state']}); nothing to cancel")
        worker = task["worker"] if task["state"] in LEASED else None
        self._end(task_id, task, "cancelled", c["now_ms"], c.get("reason") or "cancelled by a client")
        return {"ok": True, "task_id": task_id, "state": "cancelled", "worker_id": worker, "index": self.index}

    # scheduling (the leader)

    def assign(self, c: dict) -> dict:
        task_id, worker_id, now = c["task_id"], c["worker_id"], c["now_ms"]
        task = self._task(task_id)
        if task is None:
            return _unknown_task(task_id)
        if task["state"] != "pending":
            # Two schedulers (an old and a new leader) raced: the first assignment stands.
            return _error("not_pending", f"task_id: {task_id!r} is {task['state']}, not pending")
        if task["not_before_ms"] > now:
            return _error("not_due", f"task_id: {task_id!r} waits for its retry backoff until {task['not_before_ms']}")
        worker = self._worker(worker_id)
        if worker is None or worker["state"] != "up":
            return _error("worker_not_up", f"worker_id: {worker_id!r} is not a registered worker that is up")
        lease = self.k.decode_count(self.w.get(self.k.LEASE_SEQ)) + 1
        self.w.set(self.k.LEASE_SEQ, self.k.encode_count(lease))
        self._dequeue(task)
        # How long it waited to be placed since it could be (its submission, or the end of a
        # retry's backoff): for /metrics; an event, not state.
        waited_ms = max(0, now - max(task["submitted_ms"], task.get("not_before_ms") or 0))
        task.update(state="assigned", worker=worker_id, lease=lease, assigned_ms=now, attempts=task["attempts"] + 1)
        _remember(task, "assigned", now, f"{worker_id} lease {lease}")
        self.w.set(self.k.task_lease_key(worker_id, task_id), self.k.encode_count(lease))
        self._put(task_id, task)
        self.events.append(("task", "assigned", task_id, worker_id, waited_ms))
        return {"ok": True, "task_id": task_id, "worker_id": worker_id, "lease": lease, "index": self.index}

    # reports (workers; fenced by the lease)

    def start(self, c: dict) -> dict:
        task_id = c["task_id"]
        task, refused = self._leased(task_id, c["lease"])
        if refused:
            return refused
        if task["state"] == "assigned":
            task.update(state="running", started_ms=c["now_ms"])
            _remember(task, "running", c["now_ms"], task["worker"])
            self._put(task_id, task)
        return {"ok": True, "task_id": task_id, "state": task["state"], "index": self.index}

    def finish(self, c: dict) -> dict:
        task_id, now, outcome = c["task_id"], c["now_ms"], c["outcome"]
        task, refused = self._leased(task_id, c["lease"])
        if refused:
            return refused
        result = dict(outcome, worker=task["worker"], lease=task["lease"], attempt=task["attempts"])
        task["result"] = result
        if task["started_ms"] is None and "started_ms" in outcome:
            task["started_ms"] = outcome["started_ms"]
        status = outcome["status"]
        if status in ("failed", "timed-out") and task["attempts"] <= task["spec"].get("retries", 0):
            backoff = task["spec"].get("backoff_ms", 0) * (1 << min(task["attempts"] - 1, 16))
            self._requeue(task_id, task, now, min(backoff, MAX_BACKOFF_MS), f"attempt {task['attempts']} {status}")
            return {"ok": True, "task_id": task_id, "state": "pending", "retry": True, "index": self.index}
        self._end(task_id, task, status, now, outcome.get("reason") or status)
        return {"ok": True, "task_id": task_id, "state": status, "retry": False, "index": self.index}

    # workers

    def register_worker(self, c: dict) -> dict:
        worker_id, now = c["worker_id"], c["now_ms"]
        old = self._worker(worker_id)
        # A registration is a new life of the worker: whatever its earlier life held is gone.
        moved = self._release_worker(worker_id, now, "worker re-registered") if old else {"requeued": [], "lost": []}
        worker = {
            "labels": c.get("labels", {}), "slots": c["slots"], "memory_mb": c.get("memory_mb"),
            "state": "up", "epoch": (old["epoch"] + 1) if old else 1, "since_ms": now, "instance": c["instance"],
            "driver": c.get("driver"), "reason": None,
        }
        self.w.set(self.k.worker_key(worker_id), self.k.pack(worker))
        self.events.append(("worker", worker_id))
        return {"ok": True, "worker_id": worker_id, "epoch": worker["epoch"], **moved, "index": self.index}

    def worker_down(self, c: dict) -> dict:
        worker_id, now = c["worker_id"], c["now_ms"]
        worker = self._worker(worker_id)
        if worker is None:
            return _error("unknown_worker", f"worker_id: no worker {worker_id!r}")
        if worker["state"] == "down":
            return {"ok": True, "worker_id": worker_id, "requeued": [], "lost": [], "index": self.index}
        if "epoch" in c and c["epoch"] != worker["epoch"]:
            # The scheduler judged an earlier life; the worker registered again since.
            return _error("stale_epoch", f"epoch: worker {worker_id!r} is at epoch {worker['epoch']}, not {c['epoch']}")
        reason = c.get("reason") or "missed heartbeats"
        moved = self._release_worker(worker_id, now, f"worker down: {reason}", leaving=c.get("leaving", False))
        worker.update(state="down", since_ms=now, reason=reason)
        self.w.set(self.k.worker_key(worker_id), self.k.pack(worker))
        self.events.append(("worker", worker_id))
        return {"ok": True, "worker_id": worker_id, **moved, "index": self.index}

    # internals

    def _release_worker(self, worker_id: str, now: int, why: str, leaving: bool = False) -> dict:
        """Revokes every lease the worker holds; each task goes back to the queue within its
        retry budget (a lost worker is not the task's fault: no backoff) or ends ``lost``. A
        worker that leaves on purpose hands every task back, and the interrupted attempt does
        not count."""
        requeued, lost = [], []
        for key, _ in self.w.scan(self.k.task_lease_prefix(worker_id)):
            task_id = self.k.task_lease_task(key)
            task = self._task(task_id)
            if leaving:
                task["attempts"] -= 1
            if task["attempts"] <= task["spec"].get("retries", 0):
                self._requeue(task_id, task, now, 0, why)
                requeued.append(task_id)
            else:
                self._end(task_id, task, "lost", now, why)
                lost.append(task_id)
        return {"requeued": requeued, "lost": lost}

    def _leased(self, task_id: str, lease: int) -> tuple[dict | None, dict | None]:
        task = self._task(task_id)
        if task is None:
            return None, _unknown_task(task_id)
        if task["state"] not in LEASED or task["lease"] != lease:
            return None, _error("lease_revoked", f"lease: {lease} no longer holds task {task_id!r} (it is "
                                                 f"{task['state']}, lease {task['lease']}); the result is refused")
        return task, None

    def _requeue(self, task_id: str, task: dict, now: int, backoff_ms: int, why: str) -> None:
        worker = task["worker"]
        self._release_lease(task_id, task)
        task.update(state="pending", not_before_ms=now + backoff_ms, started_ms=None)
        _remember(task, "pending", now, why)
        self._enqueue(task_id, task)
        self._put(task_id, task)
        self.events.append(("task", "revoked", task_id, worker))

    def _end(self, task_id: str, task: dict, state: str, now: int, why: str) -> None:
        worker = task["worker"] if task["state"] in LEASED else None
        self._dequeue(task)
        self._release_lease(task_id, task)
        task.update(state=state, finished_ms=now)
        _remember(task, state, now, why)
        self._put(task_id, task)
        self.w.set(self.k.task_done_key(self.index, task_id), b"")
        self.events.append(("task", "ended", task_id, worker, state))

    def _release_lease(self, task_id: str, task: dict) -> None:
        if task["state"] in LEASED:
            self.w.set(self.k.task_lease_key(task["worker"], task_id), None)
            task["lease"] = None

    def _enqueue(self, task_id: str, task: dict) -> None:
        key = self.k.task_queue_key(MAX_PRIORITY - task["spec"].get("priority", DEFAULT_PRIORITY), self.index, task_id)
        task["queue_key"] = key
        self.w.set(key, b"")
        self.events.append(("task", "queued", task_id, None))

    def _dequeue(self, task: dict) -> None:
        if task.get("queue_key") is not None:
            self.w.set(task["queue_key"], None)
            task["queue_key"] = None

    def _task(self, task_id: str) -> dict | None:
        raw = self.w.get(self.k.task_key(task_id))
        return None if raw is None else self.k.unpack(raw)

    def _worker(self, worker_id: str) -> dict | None:
        raw = self.w.get(self.k.worker_key(worker_id))
        return None if raw is None else self.k.unpack(raw)

    def _put(self, task_id: str, task: dict) -> None:
        self.w.set(self.k.task_key(task_id), self.k.pack(task))


def _remember(task: dict, state: str, now: int, detail: str) -> None:
    task["history"].append([state, now, detail])
    del task["history"][:-HISTORY_KEPT]


def _error(code: str, message: str) -> dict:
    return {"ok": False, "error": code, "message": message}


def _unknown_task(task_id: str) -> dict:
    return _error("unknown_task", f"task_id: no task {task_id!r} (never submitted, or expired)")


# op -> (required, optional) fields, for commands.py
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "task_submit": (("task_id", "spec", "now_ms"), ("idempotency_key", "rid")),
    "task_cancel": (("task_id", "now_ms"), ("reason", "rid")),
    "task_assign": (("task_id", "worker_id", "now_ms"), ("rid",)),
    "task_start": (("task_id", "lease", "now_ms"), ("rid",)),
    "task_finish": (("task_id", "lease", "now_ms", "outcome"), ("rid",)),
    "worker_register": (("worker_id", "instance", "slots", "now_ms"), ("labels", "memory_mb", "driver", "rid")),
    "worker_down": (("worker_id", "now_ms"), ("epoch", "reason", "leaving", "rid")),
}


def check_command(op: str, c: dict, check_uint: Callable[[Any, str, str], None]) -> None:
    """Field checks of the task and worker ops, specs and outcomes included."""
    check_uint(c["now_ms"], "now_ms", "send milliseconds since the Unix epoch")
    if "task_id" in c:
        check_id(c["task_id"], "task_id")
    if "worker_id" in c:
        check_id(c["worker_id"], "worker_id")
    if "lease" in c:
        check_uint(c["lease"], "lease", "send the lease of the assignment")
    if "epoch" in c:
        check_uint(c["epoch"], "epoch", "send the worker's epoch")
    if op == "task_submit":
        check_spec(c["spec"])
    if op == "task_finish":
        check_outcome(c["outcome"])
    if op == "task_submit" and c.get("idempotency_key") is not None:
        key = c["idempotency_key"]
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_ID_CHARS:
            raise CommandError("idempotency_key", f"idempotency_key: expected 1 to {MAX_ID_CHARS} characters")
    if op == "worker_register":
        check_id(c["instance"], "instance")
        _check_int(c["slots"], "slots", 1, MAX_SLOTS)
        check_labels(c.get("labels", {}), "labels")
        if c.get("memory_mb") is not None:
            _check_int(c["memory_mb"], "memory_mb", 1, 1 << 30)
        if c.get("driver") is not None and not (isinstance(c["driver"], str) and len(c["driver"]) <= 64):
            raise CommandError("driver", "driver: expected a short name such as 'bwrap'")
    if not isinstance(c.get("leaving", False), bool):
        raise CommandError("leaving", "leaving: expected true or false")
    for name in ("reason",):
        if c.get(name) is not None and not (isinstance(c[name], str) and len(c[name]) <= 256):
            raise CommandError(name, f"{name}: expected a string of at most 256 characters")
