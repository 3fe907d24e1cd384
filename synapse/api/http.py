"""The HTTP API as an aiohttp app: the routes of every part, behind the request pipeline
(``pipeline.py``). Any node serves any request. The Rust front (``front.py``) owns the API
address and hands the app every request it does not answer itself. The API is documented in
``openapi.yaml`` beside this file."""

from __future__ import annotations

import time

from aiohttp import web

from synapse.api import cluster, integrity, kv, memory, security, tasks, ui
from synapse.api.common import MAX_MEMORY_BODY, ApiError, error_response
from synapse.api.context import CONTEXT_KEY, IDENTITY_KEY
from synapse.api.metrics import METRICS_KEY, metrics
from synapse.api.pipeline import RequestPipeline
from synapse.cluster.committer import ProposalError

PIPELINE_KEY: web.AppKey[RequestPipeline] = web.AppKey("pipeline")


@web.middleware
async def through_the_pipeline(request: web.Request, handler):
    pipeline = request.app[PIPELINE_KEY]
    resource = request.match_info.route.resource
    route = resource.canonical.replace("{key:.+}", "{key}") if resource is not None else None
    started = time.perf_counter()
    try:
        request[IDENTITY_KEY] = await pipeline.admit_waiting(request.method, request.path, route, request.match_info,
                                               request.query, request.headers.get("Authorization"))
        response = await handler(request)
    except (ApiError, ProposalError) as e:
        status, body = pipeline.failure(e)
        response = web.json_response(body, status=status)
    except web.HTTPException as e:  # aiohttp's own (404 route, 405, 413 body too large)
        response = error_response(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
    pipeline.observe(route or "unmatched", response.status, time.perf_counter() - started)
    return response


def make_app(pipeline: RequestPipeline) -> web.Application:
    app = web.Application(middlewares=[through_the_pipeline], client_max_size=MAX_MEMORY_BODY)  # each route's own limit: json_body
    app[PIPELINE_KEY] = pipeline
    app[CONTEXT_KEY] = pipeline.ctx
    app[METRICS_KEY] = pipeline.metrics
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    """Every route of the API (openapi.yaml documents exactly these)."""
    kv.add_routes(app)
    cluster.add_routes(app)
    app.router.add_get("/metrics", metrics)
    integrity.add_routes(app)
    tasks.add_routes(app)
    security.add_routes(app)
    memory.add_routes(app)
    ui.add_routes(app)
