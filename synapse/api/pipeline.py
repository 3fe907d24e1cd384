"""The request policy, written once for both transports (the aiohttp app's middleware and the
Rust front's hot path, ``front.py``): authentication, the serving check, how a failure is
answered, and the metrics. The Rust front only decides which path a request takes.
"""

from __future__ import annotations

from synapse.api.common import ApiError, error_body
from synapse.api.context import ApiContext
from synapse.api.metrics import Metrics
from synapse.cluster.committer import ProposalError

# Answered without a token.
PUBLIC_PATHS = frozenset({"/health"})
# Answered from this node's state: refused while it is known to differ from the agreed one.
STATE_PATHS = ("/v1/kv", "/v1/txn", "/v1/tasks", "/v1/workers")


class RequestPipeline:
    def __init__(self, ctx: ApiContext, metrics: Metrics) -> None:
        self.ctx = ctx
        self.metrics = metrics

    def admit(self, path: str, authorization: str | None) -> None:
        """Raises the ApiError that refuses the request (401, or 503 on a diverged node)
        before anything of it is read or done."""
        if path not in PUBLIC_PATHS:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip() or not self.ctx.check_token(token.strip()):
                raise ApiError(401, "unauthorized", "send Authorization: Bearer <token> (the root token printed at first start)")
        if path.startswith(STATE_PATHS) and not self.ctx.serving:
            status = self.ctx.integrity.status()
            raise ApiError(503, "diverged", f"this node's state differs from the one agreed at checkpoint "
                           f"{status['diverged_at']}; it is repairing itself ({status['service']}) — send the "
                           "request to another node", retry=True)

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
