"""HTTP API of task orchestration: clients submit, watch and cancel tasks; execution nodes
(workers) register, heartbeat (a long poll for their assignments) and report.

The JSON a client sends is turned here into the task spec's stored form (synapse/state/tasks.py
checks it, the same check the command processor runs on apply)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

from aiohttp import web

from synapse.api.common import (
    ApiError,
    check_encodable,
    identified,
    int_query,
    json_body,
    propose,
    request_hash,
    request_id,
    signed,
)
from synapse.api.context import IDENTITY_KEY, ApiContext, context_of, leader_of
from synapse.orchestrator.scheduler import now_ms
from synapse.state.commands import CommandError, LimitError, validate_command
from synapse.state.tasks import TASK_STATES, TERMINAL, check_id

_SUBMIT_FIELDS = {"task_id", "idempotency_key", "command", "entry", "args", "env", "files", "limits",
                  "capabilities", "labels", "priority", "retries", "backoff_ms"}
MAX_WAIT_S = 60.0


# --- clients ---


async def submit_task(request: web.Request) -> web.Response:
    body = await json_body(request, _SUBMIT_FIELDS)
    spec = spec_from_json(body)
    identity: dict[str, Any] = {"op": "task_submit", "spec": spec}
    for name in ("task_id", "idempotency_key"):
        if body.get(name) is not None:
            identity[name] = body[name]
    # A generated task id is the node's choice: a retry of the request gets another one.
    command = identified(identity, request_id(request), task_id=body.get("task_id") or uuid.uuid4().hex,
                         now_ms=now_ms())
    result = await propose(request, command, 512 + sum(len(v) for v in spec.get("files", {}).values()),
                           fields=("task_id", "duplicate"))
    ctx = context_of(request)
    task = ctx.cluster.read(lambda p: p.task(result["task_id"]))
    return web.json_response({"task_id": result["task_id"], "duplicate": result["duplicate"],
                              "task": task_view(result["task_id"], task) if task else None},
                             status=200 if result["duplicate"] else 201)


async def get_task(request: web.Request) -> web.Response:
    ctx = context_of(request)
    task_id = request.match_info["task_id"]
    wait = _wait_query(request)
    await ctx.cluster.barrier()
    ended = ctx.scheduler.watch_task(task_id)
    try:
        task = ctx.cluster.read(lambda p: p.task(task_id))
        if task is None:
            raise ApiError(404, "unknown_task", f"no task {task_id!r} (never submitted, or expired)")
        # Long poll: until the task ends or the wait runs out (then its current state).
        deadline = time.monotonic() + wait
        while task["state"] not in TERMINAL and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(ended.wait(), left)
            except asyncio.TimeoutError:
                pass
            task = ctx.cluster.read(lambda p: p.task(task_id)) or task
    finally:
        ctx.scheduler.unwatch_task(task_id)
    return web.json_response(task_view(task_id, task))


async def list_tasks(request: web.Request) -> web.Response:
    ctx = context_of(request)
    state = request.query.get("state")
    if state is not None and state not in TASK_STATES:
        raise ApiError(400, "bad_request", f"state must be one of {', '.join(TASK_STATES)}, got {state!r}")
    order = request.query.get("order", "id")
    if order not in ("id", "recent"):
        raise ApiError(400, "bad_request", f"order must be id (every task, in id order, by pages) or recent "
                       f"(running, then queued, then the newest ended), got {order!r}")
    if order == "recent" and (state is not None or "start_after" in request.query):
        raise ApiError(400, "bad_request", "order=recent takes neither state nor start_after: it is one page "
                       "of the running, queued and newest ended tasks")
    limit = int_query(request, "limit", 1, 1000) or 100
    after = request.query.get("start_after")
    await ctx.cluster.barrier()
    if order == "recent":
        applied = ctx.cluster.applied()[0]
        rows, counts = ctx.cluster.read(lambda p: (p.recent_tasks(limit, applied), p.task_counts()))
        after_last = None  # one page
    else:
        rows, counts = ctx.cluster.read(lambda p: (p.tasks(state, limit, after), p.task_counts()))
        after_last = rows[-1][0] if len(rows) == limit else None
    # counts: the whole state's pending (queued), leased (assigned or running) and ended (kept).
    return web.json_response({"tasks": [task_view(t, task, brief=True) for t, task in rows], "next": after_last,
                              "counts": counts})


async def cancel_task(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    result = await propose(request, identified({"op": "task_cancel", "task_id": task_id}, request_id(request),
                                               now_ms=now_ms()), 128, fields=("state", "worker_id"))
    return web.json_response({"task_id": task_id, "state": result["state"], "was_on": result["worker_id"]})


async def task_logs(request: web.Request) -> web.Response:
    ctx = context_of(request)
    task_id = request.match_info["task_id"]
    stream = request.query.get("stream")
    if stream not in (None, "stdout", "stderr"):
        raise ApiError(400, "bad_request", f"stream must be stdout or stderr, got {stream!r}")
    await ctx.cluster.barrier()
    task = ctx.cluster.read(lambda p: p.task(task_id))
    if task is None:
        raise ApiError(404, "unknown_task", f"no task {task_id!r} (never submitted, or expired)")
    result = task.get("result") or {}
    if stream is not None:
        return web.Response(body=result.get(stream, b""), content_type="application/octet-stream")
    return web.json_response({
        "task_id": task_id, "state": task["state"], "attempt": result.get("attempt"),
        "stdout": result.get("stdout", b"").decode(errors="replace"),
        "stderr": result.get("stderr", b"").decode(errors="replace"),
        "stdout_truncated": result.get("stdout_truncated", False),
        "stderr_truncated": result.get("stderr_truncated", False),
    })


# --- workers ---


async def register_worker(request: web.Request) -> web.Response:
    body = await json_body(request, {"worker_id", "instance", "slots", "labels", "memory_mb", "driver"},
                           {"worker_id", "instance", "slots"})
    command = identified({"op": "worker_register", **{k: v for k, v in body.items() if v is not None}},
                         request_id(request), now_ms=now_ms())
    result = await propose(request, command, 512, fields=("worker_id", "epoch", "requeued", "lost"))
    return web.json_response({"worker_id": result["worker_id"], "epoch": result["epoch"],
                              "released": result["requeued"] + result["lost"]})


async def heartbeat(request: web.Request) -> web.Response:
    """The worker's heartbeat and long poll. Answered by the leader only: it keeps the
    heartbeat times and wakes the poll when the worker's leases change."""
    ctx = context_of(request)
    worker_id = _path_id(request, "worker_id")
    body = await json_body(request, {"epoch", "holding", "wait_s"}, {"epoch"})
    if isinstance(body["epoch"], bool) or not isinstance(body["epoch"], int) or body["epoch"] < 0:
        raise ApiError(400, "bad_request", f"epoch: expected the epoch POST /v1/workers gave, an integer >= 0, "
                                           f"got {json.dumps(body['epoch'])[:60]}")
    holding = body.get("holding", {})
    if not isinstance(holding, dict) or not all(isinstance(v, int) for v in holding.values()):
        raise ApiError(400, "bad_request", "holding must map task ids to the leases the worker runs them under")
    for task_id in holding:
        _checked_id(task_id, "holding", "; holding maps the ids of the tasks the worker runs to their leases")
    wait = body.get("wait_s", 0)
    if not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT_S:
        raise ApiError(400, "bad_request", f"wait_s must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    _leader_only(ctx)

    def check_up(worker: dict | None) -> None:
        if worker is None or worker["state"] != "up" or worker["epoch"] != body["epoch"]:
            raise ApiError(409, "worker_down", f"worker {worker_id!r} is not up at epoch {body['epoch']} "
                                               "(never registered, marked down, or registered again); register again",
                           state=worker["state"] if worker else None, epoch=worker["epoch"] if worker else None)

    # Ids that never registered leave no trace in the scheduler. (A registered worker's
    # heartbeat counts as heard even when it is down: it is alive, and registers again.)
    if ctx.cluster.read(lambda p: p.worker(worker_id)) is None:
        check_up(None)
    deadline = time.monotonic() + wait
    news = ctx.scheduler.news_for(worker_id)
    while True:
        news.clear()
        ctx.scheduler.heartbeat(worker_id)
        worker, leases, finished = ctx.cluster.read(lambda p: _leases_of(p, worker_id, holding))
        check_up(worker)
        revoked = {t: lease for t, lease in holding.items() if leases.get(t) != lease and t not in finished}
        new = {t: lease for t, lease in leases.items() if holding.get(t) != lease}
        left = deadline - time.monotonic()
        if revoked or new or left <= 0:
            break
        try:
            await asyncio.wait_for(news.wait(), left)
        except asyncio.TimeoutError:
            pass
        _leader_only(ctx)
    tasks = ctx.cluster.read(lambda p: {t: p.task(t) for t in new})
    assignments = [{"task_id": t, "lease": lease, "spec": spec_to_json(tasks[t]["spec"])}
                   for t, lease in new.items() if tasks.get(t) is not None]
    return web.json_response({"assign": assignments, "revoke": revoked,
                              "heartbeat_timeout_s": ctx.scheduler.heartbeat_timeout})


def _leases_of(p, worker_id: str, holding: dict[str, int]) -> tuple[dict | None, dict[str, int], set[str]]:
    """Under the state lock: the worker's record, its leases, and the tasks it says it holds
    whose lease ended with its own finish report. Those it is not running any more: telling
    it to stop them would only end its poll early — and every task's end did, a heartbeat
    round trip per task."""
    leases = p.worker_leases(worker_id)
    finished = set()
    for t, lease in holding.items():
        if leases.get(t) != lease:
            task = p.task(t)
            if task is not None and (task.get("result") or {}).get("lease") == lease:
                finished.add(t)
    return p.worker(worker_id), leases, finished


async def reports(request: web.Request) -> web.Response:
    """Start and finish reports, many per request; each is answered on its own (a refused
    lease does not fail the others). Retries are safe: each report's request id is derived
    from its task, lease and kind."""
    ctx = context_of(request)
    worker_id = request.match_info["worker_id"]
    body = await json_body(request, {"reports"}, {"reports"})
    items = body["reports"]
    if not isinstance(items, list) or not 1 <= len(items) <= 1024:
        raise ApiError(400, "bad_request", "reports must be a list of 1 to 1024 reports")
    identity = request.get(IDENTITY_KEY)
    commands = [signed(_report_command(worker_id, i, r), identity) for i, r in enumerate(items)]
    size = sum(len(json.dumps(r)) for r in items)
    results = await asyncio.gather(*(ctx.cluster.propose(c, 256 + size // len(items)) for c in commands))
    return web.json_response({"results": [
        {"task_id": c["task_id"], "ok": r.get("ok", False), **({"state": r.get("state")} if r.get("ok") else
                                                                {"error": r.get("error"), "message": r.get("message")})}
        for c, r in zip(commands, results)]})


async def leave(request: web.Request) -> web.Response:
    """A worker stopping on purpose: marked down now (not after the heartbeat timeout), so its
    tasks are rescheduled at once within their retry budget."""
    worker_id = request.match_info["worker_id"]
    body = await json_body(request, {"epoch"}, {"epoch"})
    command = identified({"op": "worker_down", "worker_id": worker_id, "epoch": body["epoch"], "reason": "left",
                          "leaving": True}, request_id(request), now_ms=now_ms())
    result = await propose(request, command, 128, fields=("requeued", "lost"))
    return web.json_response({"worker_id": worker_id, "released": result["requeued"] + result["lost"]})


async def list_workers(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.cluster.barrier()
    return web.json_response({"workers": workers_view(ctx)})


def workers_view(ctx: ApiContext) -> list[dict]:
    """The registered workers with their load and, on the leader, how long since it heard them."""
    rows = ctx.cluster.read(lambda p: [(w, info, len(p.worker_leases(w))) for w, info in p.workers().items()])
    leader = ctx.cluster.is_leader()
    out = []
    for w, info, running in rows:
        heard = ctx.scheduler.last_heard(w) if leader else None
        out.append({"worker_id": w, "state": info["state"], "epoch": info["epoch"], "slots": info["slots"],
                    "running": running, "labels": info.get("labels", {}), "memory_mb": info.get("memory_mb"),
                    "driver": info.get("driver"), "since_ms": info["since_ms"], "reason": info.get("reason"),
                    "last_heartbeat_s": None if heard is None else round(heard, 3)})
    return out


# --- conversions ---


def spec_from_json(body: dict) -> dict:
    """The stored form of a submitted spec: files and arguments as bytes, defaults left out."""
    spec: dict[str, Any] = {}
    for name in ("command", "entry", "env", "limits", "capabilities", "labels", "priority", "retries", "backoff_ms"):
        if body.get(name) is not None:
            spec[name] = body[name]
    if "args" in body:
        try:
            spec["args"] = json.dumps(body["args"], separators=(",", ":"), allow_nan=False).encode()
        except ValueError as e:
            raise ApiError(400, "bad_request", f"args: {e}") from None
    if body.get("files") is not None:
        files = body["files"]
        if not isinstance(files, dict):
            raise ApiError(400, "bad_request", 'files must map relative paths to text or {"base64": "..."}')
        spec["files"] = {}
        for name, content in files.items():
            if isinstance(content, str):
                spec["files"][name] = content.encode()
            elif isinstance(content, dict) and set(content) == {"base64"} and isinstance(content["base64"], str):
                try:
                    spec["files"][name] = base64.b64decode(content["base64"], validate=True)
                except ValueError:  # binascii.Error, or a non-ASCII character
                    raise ApiError(400, "bad_request", f"files[{name!r}].base64: not valid base64") from None
            else:
                raise ApiError(400, "bad_request", f'files[{name!r}]: give the text, or {{"base64": "..."}} for bytes')
    return spec


def spec_to_json(spec: dict) -> dict:
    out = {k: v for k, v in spec.items() if k not in ("files", "args")}
    if "args" in spec:
        out["args"] = json.loads(spec["args"])
    if "files" in spec:
        out["files"] = {name: {"base64": base64.b64encode(content).decode()} for name, content in spec["files"].items()}
    return out


def task_view(task_id: str, task: dict, brief: bool = False) -> dict:
    view = {k: task.get(k) for k in ("state", "attempts", "worker", "lease", "submitted_ms", "assigned_ms",
                                     "started_ms", "finished_ms", "not_before_ms", "idempotency_key")}
    view["task_id"] = task_id
    spec = task["spec"]
    view["what"] = spec.get("command") or spec.get("entry")
    view["priority"] = spec.get("priority", 100)
    view["labels"] = spec.get("labels", {})
    result = task.get("result")
    if result is not None:
        view["result"] = {k: result.get(k) for k in ("status", "reason", "exit_code", "signal", "output_hash",
                                                     "usage", "stdout_truncated", "stderr_truncated", "attempt",
                                                     "worker", "driver")}
        view["result"]["stdout_bytes"] = len(result.get("stdout", b""))
        view["result"]["stderr_bytes"] = len(result.get("stderr", b""))
        raw = result.get("result")
        view["result"]["return_value"] = json.loads(raw) if raw is not None else None
    if not brief:
        view["spec"] = {k: v for k, v in spec_to_json(spec).items() if k != "files"}
        view["spec"]["files"] = {name: len(content) for name, content in spec.get("files", {}).items()}
        view["history"] = [{"state": s, "at_ms": at, "detail": d} for s, at, d in task["history"]]
    return view


# --- helpers ---


def _report_command(worker_id: str, i: int, report: Any) -> dict:
    if not isinstance(report, dict) or report.get("kind") not in ("start", "finish"):
        raise ApiError(400, "bad_request", f'reports[{i}]: expected {{"kind": "start" or "finish", "task_id", "lease", ...}}')
    task_id, lease = report.get("task_id"), report.get("lease")
    at = report.get("at_ms", now_ms())
    # The report's id is derived from what it reports, and so is its request hash: a worker
    # resending a report is the same request (its clock or outcome text need not repeat).
    identity = {"op": f"task_{report['kind']}", "task_id": task_id, "lease": lease}
    command: dict[str, Any] = {**identity, "now_ms": at, "rid": f"report/{task_id}/{lease}/{report['kind']}",
                               "request_hash": request_hash(identity)}
    if report["kind"] == "finish":
        command["outcome"] = outcome_from_json(report.get("outcome"), f"reports[{i}].outcome")
    try:
        check_id(task_id, f"reports[{i}].task_id")
        validate_command(command)
        check_encodable(command)
    except LimitError as e:
        raise ApiError(413, "too_large", f"reports[{i}]: {e}") from None
    except CommandError as e:
        raise ApiError(400, "bad_request", f"reports[{i}]: {e}") from None
    return command


def outcome_from_json(outcome: Any, field: str) -> dict:
    if not isinstance(outcome, dict):
        raise ApiError(400, "bad_request", f"{field}: expected an object")
    out = dict(outcome)
    for name in ("stdout", "stderr"):
        if name in out:
            try:
                out[name] = base64.b64decode(out[name], validate=True)
            except (ValueError, TypeError):  # binascii.Error, a non-ASCII character, not a string
                raise ApiError(400, "bad_request", f"{field}.{name}: expected base64") from None
    if out.get("result") is not None:
        out["result"] = json.dumps(out["result"], separators=(",", ":")).encode()
    return out


def _leader_only(ctx: ApiContext) -> None:
    if not ctx.cluster.is_leader():
        leader, leader_api = leader_of(ctx)
        raise ApiError(421, "not_leader", "workers heartbeat to the leader; send this to leader_api",
                       leader=leader, leader_api=leader_api)


def _path_id(request: web.Request, name: str) -> str:
    """A task or worker id from the path: a 400 naming it unless it is a valid id."""
    return _checked_id(request.match_info[name], name)


def _checked_id(value: str, name: str, fix: str = "") -> str:
    """``value`` if it is a valid id, else a 400 naming ``name`` (and ``fix``, what goes there)."""
    try:
        check_id(value, name)
    except CommandError as e:
        raise ApiError(400, "bad_request", f"{e}{fix}") from None
    return value


def _wait_query(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1
    if not 0 <= wait <= MAX_WAIT_S:
        raise ApiError(400, "bad_request", f"wait must be seconds from 0 to {MAX_WAIT_S:g}, got {raw!r}")
    return wait


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/tasks", submit_task)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    app.router.add_post("/v1/tasks/{task_id}/cancel", cancel_task)
    app.router.add_get("/v1/tasks/{task_id}/logs", task_logs)
    app.router.add_get("/v1/workers", list_workers)
    app.router.add_post("/v1/workers", register_worker)
    app.router.add_post("/v1/workers/{worker_id}/heartbeat", heartbeat)
    app.router.add_post("/v1/workers/{worker_id}/reports", reports)
    app.router.add_post("/v1/workers/{worker_id}/leave", leave)
