"""HTTP clients for a Synapse cluster: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both follow leader changes and retry safely: every write carries a request id that stays the
same across retries, and the cluster applies a request id at most once, so a retry after a
timeout, a dropped connection or a leader change never applies a write twice. Requests go to
the leader when it is known (a write sent to a follower costs an extra hop) and move to the
next node when one fails.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

REQUEST_ID_HEADER = "X-Request-Id"
_RETRY_STATUSES = {421, 502, 503, 504}  # 421: only the leader answers this (worker heartbeats)


class SynapseError(Exception):
    """The cluster answered with an error. ``status`` is the HTTP status, ``error`` the code."""

    def __init__(self, status: int, error: str, message: str, body: dict | None = None) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message, self.body = status, error, message, body or {}


class ConflictError(SynapseError):
    """A condition (if_version) failed; ``current_version`` is the key's version (0: absent)."""

    @property
    def current_version(self) -> int:
        return int(self.body.get("current_version", 0))


class UnavailableError(SynapseError):
    """No node gave an answer before the deadline. ``outcome_unknown``: a write may have been
    applied — retrying it with the same request id is safe."""

    @property
    def outcome_unknown(self) -> bool:
        return bool(self.body.get("outcome_unknown", True))


@dataclass
class _Request:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Endpoints:
    """The nodes' base URLs, the leader's first; learned from /v1/cluster/status."""

    urls: list[str]
    refreshed: float = 0.0

    @property
    def scheme(self) -> str:
        """The scheme the caller chose: nodes learned from the cluster are reached the same way."""
        return urlsplit(self.urls[0]).scheme if self.urls else "http"

    def rotate(self) -> None:
        self.urls.append(self.urls.pop(0))

    def follow(self, status: int, payload: bytes) -> bool:
        """After a 421 that names the leader: put the leader first. False if none is named."""
        if status != 421:
            return False
        try:
            leader = json.loads(payload).get("leader_api")
        except (ValueError, AttributeError):
            return False
        if not leader:
            return False
        url = f"{self.scheme}://{leader}"
        self.urls = [url] + [u for u in self.urls if u != url]
        return True

    def learn(self, status: dict) -> None:
        seen = {m["api"] for m in status.get("members", []) if m.get("api")}
        known = [u for u in self.urls if urlsplit(u).netloc not in seen]
        found = sorted(f"{self.scheme}://{a}" for a in seen)
        leader = status.get("leader_api")
        if leader:
            found.sort(key=lambda u: u != f"{self.scheme}://{leader}")
        self.urls = found + known
        self.refreshed = time.monotonic()


def _normalize(urls: str | list[str]) -> list[str]:
    items = [urls] if isinstance(urls, str) else list(urls)
    out = []
    for u in items:
        for part in u.split(","):
            part = part.strip().rstrip("/")
            if part:
                out.append(part if "://" in part else f"http://{part}")
    if not out:
        raise ValueError("give at least one node URL, e.g. http://127.0.0.1:7070")
    schemes = {urlsplit(u).scheme for u in out}
    if not schemes <= {"http", "https"} or len(schemes) > 1:
        raise ValueError(f"node URLs must all be http:// or all https:// (got {', '.join(sorted(schemes))})")
    return out


def _tls_context(urls: list[str], tls_ca, tls_cert, tls_key, ssl_context) -> ssl.SSLContext | None:
    """The context https:// URLs are verified with (None for http://)."""
    if ssl_context is None and (tls_ca or tls_cert or tls_key):
        from synapse.security.tls import client_context

        ssl_context = client_context(*(Path(p) if p else None for p in (tls_ca, tls_cert, tls_key)))
    if ssl_context is not None and urlsplit(urls[0]).scheme != "https":
        raise ValueError(f"TLS settings were given but {urls[0]} is not an https:// URL")
    if ssl_context is None and urlsplit(urls[0]).scheme == "https":
        ssl_context = ssl.create_default_context()  # the system's roots
    return ssl_context


def _kv_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty string")
    return "/v1/kv/" + quote(key, safe="")


def _backoff(attempt: int, remaining: float, last: SynapseError) -> float:
    """The pause before retry ``attempt`` (jittered exponential, ≤ 0.5 s), or raises
    UnavailableError when the pause would pass the deadline."""
    pause = min(0.5, 0.02 * 2**attempt) * (0.5 + random.random())
    if pause > remaining:
        raise UnavailableError(last.status, last.error, last.message, last.body)
    return pause


def _interpret(status: int, payload: bytes) -> Any:
    try:
        body = json.loads(payload) if payload else {}
    except ValueError:
        body = {"error": "bad_response", "message": payload[:200].decode(errors="replace")}
    if 200 <= status < 300:
        return body
    error, message = body.get("error", "error"), body.get("message", "")
    if status == 409 and error == "conflict":
        raise ConflictError(status, error, message, body)
    raise SynapseError(status, error, message, body)


class _Calls:
    """The API calls, written once over an abstract ``_call`` (blocking or async)."""

    def _put(self, key: str, value: Any, if_version: int | None) -> _Request:
        body: dict[str, Any] = {"value": value}
        if if_version is not None:
            body["if_version"] = if_version
        return _Request("PUT", _kv_path(key), json.dumps(body).encode(), {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _get(self, key: str, consistency: str) -> _Request:
        return _Request("GET", _kv_path(key) + "?" + urlencode({"consistency": consistency}))

    def _delete(self, key: str, if_version: int | None) -> _Request:
        q = "" if if_version is None else "?" + urlencode({"if_version": if_version})
        return _Request("DELETE", _kv_path(key) + q, None, {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _scan(self, prefix: str, limit: int | None, start_after: str | None, consistency: str) -> _Request:
        q = {"prefix": prefix, "consistency": consistency}
        if limit is not None:
            q["limit"] = str(limit)
        if start_after is not None:
            q["start_after"] = start_after
        return _Request("GET", "/v1/kv?" + urlencode(q))

    def _txn(self, if_: list, then: list, else_: list) -> _Request:
        body = json.dumps({"if": if_, "then": then, "else": else_}).encode()
        return _Request("POST", "/v1/txn", body, {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _checkpoint(self, label: str | None, wait: bool) -> _Request:
        body: dict[str, Any] = {"wait": wait}
        if label is not None:
            body["label"] = label
        return _Request("POST", "/v1/checkpoints", json.dumps(body).encode(), {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _rollback(self, checkpoint: int) -> _Request:
        body = json.dumps({"checkpoint": checkpoint}).encode()
        return _Request("POST", "/v1/rollback", body, {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _checkpoints(self, limit: int) -> _Request:
        return _Request("GET", "/v1/checkpoints?" + urlencode({"limit": limit}))


    def _submit_task(self, spec: dict, idempotency_key: str | None) -> _Request:
        body = dict(spec, **({"idempotency_key": idempotency_key} if idempotency_key else {}))
        return _Request("POST", "/v1/tasks", json.dumps(body).encode(), {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _task(self, task_id: str, wait: float) -> _Request:
        query = f"?wait={wait:g}" if wait else ""
        return _Request("GET", f"/v1/tasks/{quote(task_id, safe='')}{query}")

    def _tasks(self, state: str | None, limit: int, start_after: str | None) -> _Request:
        query = {"limit": limit, **({"state": state} if state else {}), **({"start_after": start_after} if start_after else {})}
        return _Request("GET", "/v1/tasks?" + urlencode(query))

    def _cancel_task(self, task_id: str) -> _Request:
        return _Request("POST", f"/v1/tasks/{quote(task_id, safe='')}/cancel", b"{}", {REQUEST_ID_HEADER: uuid.uuid4().hex})

    def _task_logs(self, task_id: str) -> _Request:
        return _Request("GET", f"/v1/tasks/{quote(task_id, safe='')}/logs")

    # Principals, roles, tokens: written once for both clients (``_done`` calls and returns,
    # blocking or as a coroutine).

    def principals(self) -> list[dict]:
        """Every principal (needs cluster:admin)."""
        return self._done(_Request("GET", "/v1/principals"), lambda r: r["principals"])

    def put_principal(self, name: str, kind: str, roles: list[str] = (), owner: str | None = None) -> dict:
        """Creates or changes a principal: kind person, agent, worker or node (needs cluster:admin)."""
        body = {"kind": kind, "roles": list(roles), **({"owner": owner} if owner else {})}
        return self._done(_write("PUT", f"/v1/principals/{quote(name, safe='')}", body))

    def delete_principal(self, name: str) -> dict:
        return self._done(_write("DELETE", f"/v1/principals/{quote(name, safe='')}"))

    def roles(self) -> list[dict]:
        return self._done(_Request("GET", "/v1/roles"), lambda r: r["roles"])

    def put_role(self, name: str, allow: list[str], deny: list[str] = ()) -> dict:
        return self._done(_write("PUT", f"/v1/roles/{quote(name, safe='')}", {"allow": list(allow), "deny": list(deny)}))

    def delete_role(self, name: str) -> dict:
        return self._done(_write("DELETE", f"/v1/roles/{quote(name, safe='')}"))

    def create_token(self, scopes: list[str], principal: str | None = None, ttl_s: float | None = None,
                     deny: list[str] = (), label: str | None = None) -> dict:
        """Mints a token: ``{"token": the secret (shown once), "accessor", ...}``."""
        body: dict[str, Any] = {"scopes": list(scopes), "deny": list(deny)}
        for name, value in (("principal", principal), ("ttl_s", ttl_s), ("label", label)):
            if value is not None:
                body[name] = value
        return self._done(_write("POST", "/v1/tokens", body))

    def tokens(self) -> list[dict]:
        """Tokens by accessor (never secrets): yours and your agents', or all with cluster:admin."""
        return self._done(_Request("GET", "/v1/tokens"), lambda r: r["tokens"])

    def revoke_token(self, accessor: str) -> dict:
        """Revokes the token and every token minted under it; answers once every reachable
        node refuses it."""
        return self._done(_write("DELETE", f"/v1/tokens/{quote(accessor, safe='')}"))

    def whoami(self) -> dict:
        return self._done(_Request("GET", "/v1/whoami"))

    # Agent memory (synapse/memory/DESIGN.md): written once for both clients too.

    def remember(self, namespace: str, text: str, *, id: str | None = None, metadata: dict | None = None,
                 ttl_s: float | None = None, vector: list[float] | None = None, dedup: bool = True) -> dict:
        """Stores one memory (the node embeds the text unless ``vector`` is given):
        ``{"id", "duplicate", "created", "index"}`` — with ``duplicate``, ``id`` is the memory
        that already holds this text."""
        record = {"text": text, **{name: value for name, value in (("metadata", metadata), ("ttl_s", ttl_s),
                                                                    ("vector", vector)) if value is not None}}
        if id is None:  # the node names it
            return self._done(_write("POST", _memory_path(namespace), {"records": [record], "dedup": dedup}),
                              lambda r: {**r["records"][0], "index": r["index"]})
        return self._done(_write("PUT", _memory_path(namespace, id), {**record, "dedup": dedup}))

    def remember_many(self, namespace: str, records: list[dict], dedup: bool = True) -> dict:
        """Stores a batch (``{"text", "id"?, "metadata"?, "ttl_s"?, "vector"?}`` each) in one
        log entry: ``{"records": [...], "index"}``."""
        return self._done(_write("POST", _memory_path(namespace), {"records": list(records), "dedup": dedup}))

    def recall(self, namespace: str, query: str | None = None, *, vector: list[float] | None = None, k: int = 10,
               where: dict | None = None, min_score: float | None = None,
               consistency: str = "linearizable") -> list[dict]:
        """The ``k`` memories nearest ``query`` (or ``vector``), best first, each with ``score``."""
        body: dict[str, Any] = {"k": k, "consistency": consistency}
        for name, value in (("query", query), ("vector", vector), ("where", where), ("min_score", min_score)):
            if value is not None:
                body[name] = value
        return self._done(_Request("POST", _memory_path(namespace, "recall"), json.dumps(body).encode()),
                          lambda r: r["results"])

    def memory(self, namespace: str, id: str, consistency: str = "linearizable") -> dict:
        return self._done(_Request("GET", _memory_path(namespace, id) + "?" + urlencode({"consistency": consistency})))

    def forget(self, namespace: str, id: str) -> dict:
        return self._done(_write("DELETE", _memory_path(namespace, id)))

    def memories(self, namespace: str, prefix: str = "", limit: int = 100, start_after: str | None = None,
                 consistency: str = "linearizable") -> dict:
        """A page of a namespace's memories in id order: ``{"items", "next_start_after"}``."""
        query = {"prefix": prefix, "limit": limit, "consistency": consistency,
                 **({"start_after": start_after} if start_after else {})}
        return self._done(_Request("GET", _memory_path(namespace) + "?" + urlencode(query)))


def _memory_path(namespace: str, *rest: str) -> str:
    # The namespace is one path segment: its '/' travel as %2F.
    return "/".join(["/v1/memory", quote(namespace, safe=""), *(quote(r, safe="") for r in rest)])


def _write(method: str, path: str, body: dict | None = None) -> _Request:
    return _Request(method, path, json.dumps(body).encode() if body is not None else None,
                    {REQUEST_ID_HEADER: uuid.uuid4().hex})


def _same(result: Any) -> Any:
    return result


class Client(_Calls):
    """Blocking client. ``Client("http://127.0.0.1:7070", token=...)``; several URLs may be
    given (a list or comma-separated); the rest are learned from the cluster.

    HTTPS: ``https://`` URLs, verified against ``tls_ca`` (the cluster's CA certificate; the
    system's roots when None); ``tls_cert``/``tls_key`` for nodes that require a client
    certificate; or a ready ``ssl_context``."""

    def __init__(self, urls: str | list[str], token: str, timeout: float = 10.0, *, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._endpoints = _Endpoints(_normalize(urls))
        self.ssl_context = _tls_context(self._endpoints.urls, tls_ca, tls_cert, tls_key, ssl_context)
        self._token = token
        self._timeout = timeout
        # One keep-alive connection per node *per thread*: an http.client connection carries
        # one request at a time, and a Client shared by threads (as users do) interleaved
        # their requests on it — ResponseNotReady, CannotSendRequest, retries with backoff:
        # 16 threads on one Client made 20 writes/s where 16 Clients made hundreds.
        self._local = threading.local()
        self._all_conns: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()  # for close()
        self._all_lock = threading.Lock()

    @property
    def _conns(self) -> dict[str, http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    @property
    def token(self) -> str:
        return self._token

    def close(self) -> None:
        """Closes the connections of every thread that used this client."""
        with self._all_lock:
            for c in list(self._all_conns):
                c.close()
            self._all_conns.clear()
        self._conns.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, key: str, value: Any, if_version: int | None = None) -> dict:
        return self._call(self._put(key, value, if_version))

    def get(self, key: str, consistency: str = "linearizable") -> dict | None:
        try:
            return self._call(self._get(key, consistency))
        except SynapseError as e:
            if e.status == 404:
                return None
            raise

    def delete(self, key: str, if_version: int | None = None) -> dict:
        return self._call(self._delete(key, if_version))

    def scan(self, prefix: str = "", limit: int | None = None, start_after: str | None = None,
             consistency: str = "linearizable") -> dict:
        return self._call(self._scan(prefix, limit, start_after, consistency))

    def txn(self, if_: list | None = None, then: list | None = None, else_: list | None = None) -> dict:
        return self._call(self._txn(if_ or [], then or [], else_ or []))

    def status(self) -> dict:
        return self._call(_Request("GET", "/v1/cluster/status"))

    def checkpoint(self, label: str | None = None, wait: bool = False) -> dict:
        """Makes a checkpoint; ``wait``: answer once a majority agreed on its digest."""
        return self._call(self._checkpoint(label, wait))

    def checkpoints(self, limit: int = 20) -> list[dict]:
        return self._call(self._checkpoints(limit))["checkpoints"]

    def rollback(self, checkpoint: int) -> dict:
        """Rolls the whole cluster back to an agreed, retained checkpoint (writes after it are
        undone); the answer says how many log entries were undone."""
        return self._call(self._rollback(checkpoint))

    def submit_task(self, spec: dict, idempotency_key: str | None = None) -> dict:
        """Submits a task (the spec's fields: README, "Tasks"); ``{"task_id", "duplicate", "task"}``.
        With an idempotency key, a second submission returns the first task."""
        return self._call(self._submit_task(spec, idempotency_key))

    def task(self, task_id: str, wait: float = 0.0) -> dict:
        """The task's state; ``wait`` > 0: until it ends or that many seconds pass."""
        return self._call(self._task(task_id, wait))

    def tasks(self, state: str | None = None, limit: int = 100, start_after: str | None = None) -> dict:
        return self._call(self._tasks(state, limit, start_after))

    def cancel_task(self, task_id: str) -> dict:
        return self._call(self._cancel_task(task_id))

    def task_logs(self, task_id: str) -> dict:
        return self._call(self._task_logs(task_id))

    def save_snapshot(self, path: str | Path, progress: Callable[[int, int | None], None] | None = None) -> dict:
        """Writes a snapshot of the whole state (every write acknowledged before the call is
        in it) to ``path``, streamed, through a temp file renamed into place:
        ``{"file", "index", "state_hash", "bytes"}``. Needs the ``cluster:admin`` scope.
        ``progress(bytes received, bytes in all)`` is called as it arrives (the size None if
        the node did not say it; from 0 again if another node is asked after a failure)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        last: Exception | None = None
        for url in self._endpoints.urls:
            conn = self._connection(url, max(self._timeout, 60))  # its own: a long stream, closed after
            try:
                conn.request("GET", "/v1/snapshot", headers={"Authorization": f"Bearer {self._token}"})
                resp = conn.getresponse()
                if resp.status != 200:
                    _interpret(resp.status, resp.read())  # raises the node's error
                size, length = 0, resp.headers.get("Content-Length")
                total = int(length) if length is not None else None
                if progress is not None:
                    progress(0, total)
                with open(tmp, "wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        size += len(chunk)
                        if progress is not None:
                            progress(size, total)
                    f.flush()
                    os.fsync(f.fileno())
                if total is not None and size != total:
                    raise SynapseError(503, "unavailable", f"{url}: the snapshot was cut off after {size} bytes")
                os.replace(tmp, path)
                return {"file": str(path), "index": int(resp.headers["X-Synapse-Index"]),
                        "state_hash": resp.headers["X-Synapse-State-Hash"], "bytes": size}
            except (OSError, http.client.HTTPException) as e:
                last = e
            finally:
                conn.close()
                tmp.unlink(missing_ok=True)
        raise SynapseError(503, "unreachable", f"no node answered with a snapshot: {last}", {"outcome_unknown": False})

    def _done(self, req: _Request, then=_same) -> Any:
        return then(self._call(req))

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """Any other API call (e.g. membership), with the same retry policy."""
        headers = {REQUEST_ID_HEADER: uuid.uuid4().hex} if method != "GET" else {}
        return self._call(_Request(method, path, json.dumps(body).encode() if body is not None else None, headers))

    def _call(self, req: _Request) -> Any:
        deadline = time.monotonic() + self._timeout
        attempt, last, follows = 0, None, 0
        while True:
            url = self._endpoints.urls[0]
            try:
                status, payload = self._send(url, req, max(0.1, deadline - time.monotonic()))
                if status not in _RETRY_STATUSES:
                    return _interpret(status, payload)
                last = _interpret_quiet(status, payload)
                if follows < 3 and self._endpoints.follow(status, payload):
                    follows += 1  # bounded: two nodes that name each other must not spin
                    continue
            except ssl.SSLError as e:
                self._conns.pop(url, None)
                raise _tls_failure(url, e) from None
            except (OSError, http.client.HTTPException) as e:
                self._conns.pop(url, None)
                last = SynapseError(503, "unreachable", f"{url}: {e}", {"outcome_unknown": True})
            self._endpoints.rotate()
            attempt += 1
            time.sleep(_backoff(attempt, deadline - time.monotonic(), last))
            if attempt % len(self._endpoints.urls) == 0:
                self._refresh(deadline)

    def _refresh(self, deadline: float) -> None:
        for url in list(self._endpoints.urls):
            try:
                status, payload = self._send(url, _Request("GET", "/v1/cluster/status"), max(0.1, min(1.0, deadline - time.monotonic())))
                if status == 200:
                    self._endpoints.learn(json.loads(payload))
                    return
            except (OSError, http.client.HTTPException, ValueError):
                self._conns.pop(url, None)

    def _connection(self, url: str, timeout: float) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                               context=self.ssl_context)
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)

    def _send(self, url: str, req: _Request, timeout: float) -> tuple[int, bytes]:
        conn = self._conns.get(url)
        if conn is None:
            conn = self._connection(url, timeout)
            self._conns[url] = conn
            with self._all_lock:
                self._all_conns.add(conn)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json", **req.headers}
        conn.request(req.method, req.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()


class AsyncClient(_Calls):
    """asyncio client with the same calls, retry policy and TLS settings as ``Client``."""

    def __init__(self, urls: str | list[str], token: str, timeout: float = 10.0, *, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._endpoints = _Endpoints(_normalize(urls))
        self.ssl_context = _tls_context(self._endpoints.urls, tls_ca, tls_cert, tls_key, ssl_context)
        self._token = token
        self._timeout = timeout
        self._session = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def put(self, key: str, value: Any, if_version: int | None = None) -> dict:
        return await self._call(self._put(key, value, if_version))

    async def get(self, key: str, consistency: str = "linearizable") -> dict | None:
        try:
            return await self._call(self._get(key, consistency))
        except SynapseError as e:
            if e.status == 404:
                return None
            raise

    async def delete(self, key: str, if_version: int | None = None) -> dict:
        return await self._call(self._delete(key, if_version))

    async def scan(self, prefix: str = "", limit: int | None = None, start_after: str | None = None,
                   consistency: str = "linearizable") -> dict:
        return await self._call(self._scan(prefix, limit, start_after, consistency))

    async def txn(self, if_: list | None = None, then: list | None = None, else_: list | None = None) -> dict:
        return await self._call(self._txn(if_ or [], then or [], else_ or []))

    async def status(self) -> dict:
        return await self._call(_Request("GET", "/v1/cluster/status"))

    async def checkpoint(self, label: str | None = None, wait: bool = False) -> dict:
        return await self._call(self._checkpoint(label, wait))

    async def checkpoints(self, limit: int = 20) -> list[dict]:
        return (await self._call(self._checkpoints(limit)))["checkpoints"]

    async def rollback(self, checkpoint: int) -> dict:
        return await self._call(self._rollback(checkpoint))

    async def submit_task(self, spec: dict, idempotency_key: str | None = None) -> dict:
        return await self._call(self._submit_task(spec, idempotency_key))

    async def task(self, task_id: str, wait: float = 0.0) -> dict:
        return await self._call(self._task(task_id, wait))

    async def tasks(self, state: str | None = None, limit: int = 100, start_after: str | None = None) -> dict:
        return await self._call(self._tasks(state, limit, start_after))

    async def cancel_task(self, task_id: str) -> dict:
        return await self._call(self._cancel_task(task_id))

    async def _done(self, req: _Request, then=_same) -> Any:
        return then(await self._call(req))

    async def _call(self, req: _Request) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._token}"},
                                                  connector=aiohttp.TCPConnector(ssl=self.ssl_context or True))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        attempt, last, follows = 0, None, 0
        while True:
            url = self._endpoints.urls[0]
            try:
                timeout = aiohttp.ClientTimeout(total=max(0.1, deadline - loop.time()))
                async with self._session.request(
                    req.method, url + req.path, data=req.body, timeout=timeout,
                    headers={"Content-Type": "application/json", **req.headers},
                ) as resp:
                    payload = await resp.read()
                    if resp.status not in _RETRY_STATUSES:
                        return _interpret(resp.status, payload)
                    last = _interpret_quiet(resp.status, payload)
                    if follows < 3 and self._endpoints.follow(resp.status, payload):
                        follows += 1  # bounded: two nodes that name each other must not spin
                        continue
            except (aiohttp.ClientSSLError, ssl.SSLError) as e:
                raise _tls_failure(url, e) from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                if isinstance(e.__cause__, ssl.SSLError):  # an alert after the handshake (no client certificate)
                    raise _tls_failure(url, e.__cause__) from None
                last = SynapseError(503, "unreachable", f"{url}: {e!r}", {"outcome_unknown": True})
            self._endpoints.rotate()
            attempt += 1
            await asyncio.sleep(_backoff(attempt, deadline - loop.time(), last))
            if attempt % len(self._endpoints.urls) == 0:
                await self._refresh(deadline)

    async def _refresh(self, deadline: float) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        for url in list(self._endpoints.urls):
            try:
                timeout = aiohttp.ClientTimeout(total=max(0.1, min(1.0, deadline - loop.time())))
                async with self._session.get(url + "/v1/cluster/status", timeout=timeout) as resp:
                    if resp.status == 200:
                        self._endpoints.learn(await resp.json())
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                continue


def _tls_failure(url: str, e: Exception) -> SynapseError:
    """A certificate that does not verify, or one the node asked for and did not get: retrying
    cannot help, so the caller hears it at once (495: nginx's "SSL Certificate Error")."""
    return SynapseError(495, "tls_error", f"{url}: {e} — check --tls-ca (the cluster's CA certificate) and, "
                        "where nodes require client certificates, --tls-cert and --tls-key")


def _interpret_quiet(status: int, payload: bytes) -> SynapseError:
    try:
        _interpret(status, payload)
    except SynapseError as e:
        return e
    return SynapseError(status, "error", "unexpected success status in retry path")
