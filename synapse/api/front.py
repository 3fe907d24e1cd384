"""The node's API listener: the Rust HTTP front (``synapse._core.HttpFront``, rust/front)
in front of the aiohttp app.

The front owns the API address. ``PUT`` and ``GET /v1/kv/{key}`` in their plain forms
(rust/front/src/lib.rs, ``classify``) are parsed there, off the GIL, and handed over here in
batches: one wake-up of the event loop per batch instead of aiohttp's parsing, routing and
socket calls per request — on the leader that was ~80 µs of a write's ~140 µs of CPU at 64
clients (scripts/bench-cluster). Everything else goes to the aiohttp app on a Unix socket in a
private directory, unchanged. Both paths go through the same request pipeline
(``pipeline.py``: the token, the serving check, failures, metrics) and the same kv functions
(``kv.py``), so a request means the same on either path; the front decides only which path a
request takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

from aiohttp import web

from synapse import _core
from synapse.api.common import (
    MAX_BODY,
    ApiError,
    check_request_id,
    error_body,
    parse_json_object,
)
from synapse.api.context import ApiContext
from synapse.api.http import make_app
from synapse.api.kv import (
    PUT_FIELDS,
    check_key_size,
    linearizable,
    put_answer,
    put_command,
    read_value,
)
from synapse.api.metrics import Metrics
from synapse.api.pipeline import Bootstrapping, Identity, RequestPipeline, confirm
from synapse.cluster.committer import ProposalError

log = logging.getLogger("synapse.api")

_KV_ROUTE = "/v1/kv/{key}"  # the app's route, as its metrics name it
_KV_PATH = "/v1/kv/"  # what the pipeline's checks look at of a hot request's path


class TlsFiles(Protocol):
    """The TLS settings the front reads (NodeConfig has them)."""

    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None


class ApiServer:
    """The running API: the front on the node's address, the app behind it on a Unix socket."""

    def __init__(self, runner: web.AppRunner, front: _core.HttpFront, hot: "HotPath", socket_dir: Path) -> None:
        self.runner, self.front, self.hot, self._socket_dir = runner, front, hot, socket_dir

    async def cleanup(self) -> None:
        self.hot.close()
        self.front.close()  # no new requests; open connections closed
        await self.runner.cleanup()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


async def start_api(ctx: ApiContext, host: str, port: int, tls: TlsFiles | None = None) -> ApiServer:
    """Serves the API on ``host:port`` (every address it resolves to; port 0: one free port),
    over HTTPS only when ``tls`` names a certificate."""
    metrics = Metrics()
    ctx.scheduler.on_placed = metrics.task_wait.observe  # from the apply thread: the histogram locks
    pipeline = RequestPipeline(ctx, metrics)
    app = make_app(pipeline)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # The app listens on a Unix socket in a directory only this user can enter, and only the
    # front connects to it: no second network listener that would skip the front's TLS (and
    # its client certificates). A fresh short path: sun_path holds 107 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="synapse-api-"))
    backend = str(socket_dir / "app.sock")
    site = web.UnixSite(runner, backend)
    await site.start()
    try:
        files = {} if tls is None or tls.tls_cert is None else {
            "tls_cert": str(tls.tls_cert), "tls_key": str(tls.tls_key),
            "tls_client_ca": str(tls.tls_client_ca) if tls.tls_client_ca else None}
        front = _core.HttpFront(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", backend, MAX_BODY,
                                **files)
    except BaseException:
        await runner.cleanup()
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    hot = HotPath(pipeline, front)
    hot.start()
    return ApiServer(runner, front, hot, socket_dir)


class HotPath:
    """Answers the requests the front hands over. Runs on the node's event loop."""

    def __init__(self, pipeline: RequestPipeline, front: _core.HttpFront) -> None:
        self._pipeline = pipeline
        self._ctx = pipeline.ctx
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._fd = front.notify_fd()
        self._answers: list[tuple[int, int, bytes]] = []
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._take)

    def close(self) -> None:
        self._closed = True
        self._loop.remove_reader(self._fd)
        for task in self._tasks:
            task.cancel()

    def _take(self) -> None:
        # The requests of one batch are admitted at one instant, so a token several of them
        # carry is looked up once (RequestPipeline.admit's ``known``); the check that counts
        # is still each one's own — a write's token again when it is applied, a linearizable
        # read's after its barrier.
        known: dict[str, Identity] = {}
        for rid, put, key, consistency, request_id, authorization, raw in self._front.take():
            started = time.perf_counter()
            if put:
                self._put(rid, key, request_id, authorization, raw, started, known)
            else:
                self._get(rid, key, consistency, authorization, started, known)

    def _put(self, rid: int, key: str, request_id: str | None, authorization: str | None, raw: bytes,
             started: float, known: dict[str, Identity] | None = None) -> None:
        # Callbacks, not a task per request: a task and its two steps were a measurable share
        # of the leader's event loop per write.
        try:
            identity = self._pipeline.admit("PUT", _KV_PATH, _KV_ROUTE, {"key": key}, {}, authorization, known)
            check_key_size(key)
            body = parse_json_object(raw, PUT_FIELDS, {"value"})
            command, size_hint = put_command(key, body, check_request_id(request_id), identity)
            proposal = self._ctx.cluster.proposal(command, size_hint)
        except Bootstrapping:  # a new cluster: wait for its root principal, off this fast path
            self._spawn(self._admit_later("PUT", rid, key, authorization, started,
                                          lambda: self._put(rid, key, request_id, authorization, raw, started)))
            return
        except ApiError as e:
            self._answer(rid, *self._pipeline.failure(e), started)
            return
        except Exception:
            self._crashed(rid, "PUT", key, started)
            return
        proposal.add_done_callback(lambda fut: self._put_done(rid, key, started, fut))

    async def _admit_later(self, method: str, rid: int, key: str, authorization: str | None, started: float,
                           resume) -> None:
        """A request that found the cluster bootstrapping: waits (a task) until it may be
        admitted, then ``resume()`` takes it down its fast path again."""
        try:
            await self._pipeline.admit_waiting(method, _KV_PATH, _KV_ROUTE, {"key": key}, {}, authorization)
        except ApiError as e:
            self._answer(rid, *self._pipeline.failure(e), started)
            return
        resume()

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _put_done(self, rid: int, key: str, started: float, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return  # the node is stopping: the front answers 503
        try:
            status, answer = 200, put_answer(key, fut.result())
        except (ApiError, ProposalError) as e:
            status, answer = self._pipeline.failure(e)
        except Exception:
            self._crashed(rid, "PUT", key, started)
            return
        self._answer(rid, status, answer, started)

    def _get(self, rid: int, key: str, consistency: str | None, authorization: str | None, started: float,
             known: dict[str, Identity] | None = None) -> None:
        # Callbacks, as for a PUT: no task per read.
        try:
            identity = self._pipeline.admit("GET", _KV_PATH, _KV_ROUTE, {"key": key}, {}, authorization, known)
            check_key_size(key)
            waits = linearizable(consistency)
            barrier = self._ctx.cluster.barrier_future() if waits else None
        except Bootstrapping:  # a new cluster: wait for its root principal, off this fast path
            self._spawn(self._admit_later("GET", rid, key, authorization, started,
                                          lambda: self._get(rid, key, consistency, authorization, started)))
            return
        except ApiError as e:
            self._answer(rid, *self._pipeline.failure(e), started)
            return
        except Exception:
            self._crashed(rid, "GET", key, started)
            return
        if barrier is None:  # a stale read, or a lone leader that has applied its whole log
            self._get_done(rid, key, identity, waits, started, None)
        else:
            barrier.add_done_callback(lambda fut: self._get_done(rid, key, identity, waits, started, fut))

    def _get_done(self, rid: int, key: str, identity, recheck: bool, started: float,
                  barrier: asyncio.Future | None) -> None:
        if barrier is not None and barrier.cancelled():
            return  # the node is stopping: the front answers 503
        try:
            if barrier is not None:
                barrier.result()  # a ProposalError: no barrier, no read
            if recheck:
                confirm(self._ctx, identity)  # the token again, after the barrier (wait_consistent)
            status, answer = 200, read_value(self._ctx, key)
        except (ApiError, ProposalError) as e:
            status, answer = self._pipeline.failure(e)
        except Exception:
            self._crashed(rid, "GET", key, started)
            return
        self._answer(rid, status, answer, started)

    def _crashed(self, rid: int, method: str, key: str, started: float) -> None:
        log.exception("answering %s /v1/kv/%s failed", method, key)
        self._answer(rid, 500, error_body("internal", "the node failed to answer; see its log"), started)

    def _answer(self, rid: int, status: int, answer: dict, started: float) -> None:
        self._pipeline.observe(_KV_ROUTE, status, time.perf_counter() - started)
        if not self._answers:
            self._loop.call_soon(self._send)  # one crossing for every answer ready this turn
        self._answers.append((rid, status, json.dumps(answer).encode()))

    def _send(self) -> None:
        answers, self._answers = self._answers, []
        if not self._closed:  # once closed, the front has answered them all with a 503
            self._front.respond(answers)
