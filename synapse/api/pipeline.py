"""The request policy, written once for both transports (the aiohttp app's middleware and the
Rust front's hot path, ``front.py``): authentication against the replicated token records,
authorization by the route's scopes, the serving check, the token attached to every command
proposed (the command processor checks it again at apply time), how a failure is answered,
and the metrics. The Rust front only decides which path a request takes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from synapse.api.common import ApiError, error_body, now_ms
from synapse.api.context import ApiContext
from synapse.api.metrics import Metrics
from synapse.cluster.committer import ProposalError
from synapse.security import tokens
from synapse.state import security
from synapse.state.security import Grant, Scope

# Answered without a token: liveness, and the dashboard's files (they hold no data; the page
# asks for a token and calls the API with it — api/ui.py).
# By matched route, not path: no path outside these routes is ever answered without a token.
PUBLIC_ROUTES = frozenset({"/health", "/", "/ui", "/ui/", "/ui/{file}"})
# Answered from this node's state: refused while it is known to differ from the agreed one.
STATE_PATHS = ("/v1/kv", "/v1/txn", "/v1/tasks", "/v1/workers", "/v1/memory")


class Bootstrapping(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "bootstrapping", "the cluster has no principals yet (it is starting): retry in a moment",
                         retry=True)


@dataclass(frozen=True)
class Identity:
    """Who sent a request: its token and what the token may do."""

    token: tokens.TokenString
    grant: Grant

    @property
    def principal(self) -> str:
        return self.grant.principal

    @property
    def accessor(self) -> str:
        return self.token.accessor


def _none(match: dict, query: dict) -> list[Scope]:
    return []


def _need(*scopes: Scope) -> Callable[[dict, dict], list[Scope]]:
    return lambda match, query: list(scopes)


def _kv(kind: str) -> Callable[[dict, dict], list[Scope]]:
    return lambda match, query: [Scope(kind, match.get("key", ""))]


def _memory(kind: str) -> Callable[[dict, dict], list[Scope]]:
    return lambda match, query: [Scope(kind, match.get("ns", ""))]


# (method, route) -> the scopes the request needs, from its path parameters and query. What a
# command does beyond the route (a transaction's keys, a task's capabilities, whose token is
# minted or revoked) is checked by the command processor at apply time (state/security.py).
# A route missing here needs cluster:admin: default deny.
ROUTE_SCOPES: dict[tuple[str, str], Callable[[dict, dict], list[Scope]]] = {
    ("PUT", "/v1/kv/{key}"): _kv("kv:write"),
    ("DELETE", "/v1/kv/{key}"): _kv("kv:write"),
    ("GET", "/v1/kv/{key}"): _kv("kv:read"),
    ("GET", "/v1/kv"): lambda match, query: [Scope("kv:read", query.get("prefix", ""), range=True)],
    ("POST", "/v1/txn"): _none,
    ("GET", "/v1/cluster/status"): _none,
    ("GET", "/v1/cluster/events"): _none,
    ("GET", "/v1/cluster/overview"): _none,
    ("GET", "/ready"): _none,
    ("GET", "/metrics"): _none,
    ("POST", "/v1/cluster/members"): _need(Scope("cluster:admin")),
    ("DELETE", "/v1/cluster/members/{node_id}"): _need(Scope("cluster:admin")),
    ("POST", "/v1/cluster/transfer-leader"): _need(Scope("cluster:admin")),
    ("GET", "/v1/checkpoints"): _none,
    ("POST", "/v1/checkpoints"): _need(Scope("checkpoint")),
    ("POST", "/v1/rollback"): _need(Scope("rollback")),
    ("POST", "/v1/debug/corrupt"): _need(Scope("debug")),
    ("POST", "/v1/debug/compact"): _need(Scope("debug")),
    ("POST", "/v1/tasks"): _need(Scope("task:submit")),
    ("GET", "/v1/tasks"): _need(Scope("task:submit")),
    ("GET", "/v1/tasks/{task_id}"): _need(Scope("task:submit")),
    ("POST", "/v1/tasks/{task_id}/cancel"): _need(Scope("task:submit")),
    ("GET", "/v1/tasks/{task_id}/logs"): _need(Scope("task:submit")),
    ("GET", "/v1/workers"): _none,
    ("POST", "/v1/workers"): _need(Scope("worker")),
    ("POST", "/v1/workers/{worker_id}/heartbeat"): _need(Scope("worker")),
    ("POST", "/v1/workers/{worker_id}/reports"): _need(Scope("worker")),
    ("POST", "/v1/workers/{worker_id}/leave"): _need(Scope("worker")),
    ("GET", "/v1/principals"): _need(Scope("cluster:admin")),
    ("PUT", "/v1/principals/{name}"): _need(Scope("cluster:admin")),
    ("DELETE", "/v1/principals/{name}"): _need(Scope("cluster:admin")),
    ("GET", "/v1/roles"): _need(Scope("cluster:admin")),
    ("PUT", "/v1/roles/{name}"): _need(Scope("cluster:admin")),
    ("DELETE", "/v1/roles/{name}"): _need(Scope("cluster:admin")),
    ("GET", "/v1/tokens"): _none,  # the handler lists the caller's own, or all for cluster:admin
    ("POST", "/v1/tokens"): _none,
    ("DELETE", "/v1/tokens/{accessor}"): _none,
    ("GET", "/v1/whoami"): _none,
    ("PUT", "/v1/memory/{ns}/{id}"): _memory("memory:write"),
    ("DELETE", "/v1/memory/{ns}/{id}"): _memory("memory:write"),
    ("POST", "/v1/memory/{ns}"): _memory("memory:write"),
    ("GET", "/v1/memory/{ns}/{id}"): _memory("memory:read"),
    ("GET", "/v1/memory/{ns}"): _memory("memory:read"),
    ("GET", "/v1/memory"): _none,  # the handler lists only the namespaces the caller may read
    ("POST", "/v1/memory/{ns}/recall"): _memory("memory:read"),
}
for _route in ("/v1/internal/repair/sessions", "/v1/internal/repair/sessions/{session}/children",
               "/v1/internal/repair/sessions/{session}/buckets", "/v1/internal/catchup/{session}/children",
               "/v1/internal/catchup/{session}/elements"):
    ROUTE_SCOPES[("POST", _route)] = _need(Scope("node"))
ROUTE_SCOPES[("GET", "/v1/internal/catchup/state")] = _need(Scope("node"))
for _route in ("/v1/internal/repair/sessions/{session}", "/v1/internal/catchup/{session}"):
    ROUTE_SCOPES[("DELETE", _route)] = _need(Scope("node"))
_ADMIN = _need(Scope("cluster:admin"))


class RequestPipeline:
    def __init__(self, ctx: ApiContext, metrics: Metrics) -> None:
        self.ctx = ctx
        self.metrics = metrics

    def admit(self, method: str, path: str, route: str | None, match: dict, query: dict,
              authorization: str | None, known: dict[str, Identity] | None = None) -> Identity | None:
        """Who sent the request, once it may be answered: raises the ApiError that refuses it
        (401 no or a bad token, 403 a scope it lacks, 503 on a node still bootstrapping or
        known to differ from the agreed state) before anything of it is read or done.
        ``route``: the matched route (None: no route matched — any valid token may hear so).
        ``known``: identities established at this same instant, by Authorization header (a
        batch of requests admitted at once); a header found there is not looked up again, and
        one looked up is added."""
        identity = None
        if route not in PUBLIC_ROUTES:
            try:
                identity = known.get(authorization) if known is not None and authorization is not None else None
                if identity is None:
                    identity = self.authenticate(authorization)
                    if known is not None:
                        known[authorization] = identity
                scopes = ROUTE_SCOPES.get((method, route), _ADMIN) if route is not None else _none
                self.authorize(identity, scopes(match, query))
            except ApiError as e:  # 401 / 403: counted apart from other failures (/metrics)
                self.metrics.denied(e.error)
                raise
        if path.startswith(STATE_PATHS) and not self.ctx.serving:
            status = self.ctx.integrity.status()
            raise ApiError(503, "diverged", f"this node's state differs from the one agreed at checkpoint "
                           f"{status['diverged_at']}; it is repairing itself ({status['service']}) — send the "
                           "request to another node", retry=True)
        return identity

    async def admit_waiting(self, method: str, path: str, route: str | None, match: dict, query: dict,
                            authorization: str | None) -> Identity | None:
        """``admit``, but on a cluster still bootstrapping (a new one, before its first election
        and the root principal's entry) the request waits for it, as a write waits for an
        election, up to the request timeout."""
        deadline = time.monotonic() + self.ctx.request_timeout
        while True:
            try:
                return self.admit(method, path, route, match, query, authorization)
            except Bootstrapping:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    def authenticate(self, authorization: str | None) -> Identity:
        return authenticate(self.ctx, authorization)

    @staticmethod
    def authorize(identity: Identity, scopes: list[Scope]) -> None:
        missing = identity.grant.missing(scopes)
        if missing is not None:
            raise ApiError(403, "forbidden", f"token {identity.accessor} (principal {identity.principal}) lacks the "
                           f"scope {str(missing)!r}; ask an administrator for a token with it", scope=str(missing))

    @staticmethod
    def failure(e: ApiError | ProposalError) -> tuple[int, dict]:
        """The HTTP status and JSON body of a request that failed with ``e``."""
        if isinstance(e, ApiError):
            return e.status, error_body(e.error, str(e), **e.extra)
        if e.reason == "bad_command":  # refused before proposing: the request, not the cluster
            return 400, error_body("bad_request", str(e))
        return 503, error_body("unavailable", str(e), reason=e.reason, outcome_unknown=e.outcome_unknown, retry=True)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.metrics.observe(route, status, seconds)


def authenticate(ctx: ApiContext, authorization: str | None) -> Identity:
    """The request's token, checked against this node's applied token records."""
    scheme, _, value = (authorization or "").partition(" ")
    token = tokens.parse(value) if scheme.lower() == "bearer" else None
    if token is None:
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <token> (the root token printed at "
                       "first start, or one made with `synapse token create`)")
    return _identity(ctx, token)


def _identity(ctx: ApiContext, token: tokens.TokenString) -> Identity:
    secret_hash, now = token.secret_hash, now_ms()
    # The answer depends on the token, the applied state and the time in ms only: a token found
    # live is not looked up again with all three the same — the readers that one read index
    # releases check their tokens again at one instant. The state read after the applied
    # index is at least that index, so a reuse never sees an older state than its own lookup
    # would have. Refusals are never kept.
    memo, at = ctx.identities, (now, ctx.cluster.applied())
    if memo.get("at") != at:
        memo.clear()
        memo["at"] = at
    found = memo.get((token.accessor, secret_hash))
    if found is not None:
        return Identity(token, found)
    grant = ctx.cluster.read(lambda p: security.authenticate(p.store.get, token.accessor, secret_hash, now))
    if isinstance(grant, str):
        # Only a refused token needs to know why: a new cluster has no principals yet.
        if not ctx.cluster.read(lambda p: security.bootstrapped(p.store.get)):
            raise Bootstrapping()
        raise ApiError(401, "unauthorized", f"token {token.accessor}: {grant}; send a live token")
    memo[(token.accessor, secret_hash)] = grant
    return Identity(token, grant)


def confirm(ctx: ApiContext, identity: Identity | None) -> None:
    """Checks the request's token again — after a read barrier, so that a token revoked before
    a linearizable read began is refused by every node, as it is at apply time."""
    if identity is not None:
        _identity(ctx, identity.token)
