"""The memory routes (synapse/memory/DESIGN.md). A namespace is one path segment, its '/'
sent as %2F (``/v1/memory/acme%2Fagent-7/m1``): record ids and the ``recall`` action follow it
without ambiguity.

- ``PUT /v1/memory/{namespace}/{id}`` ``{"text", "metadata"?, "ttl_s"?, "vector"?, "model"?, "dedup"?}``
- ``POST /v1/memory/{namespace}`` ``{"records": [...], "dedup"?, "model"?}`` — one log entry
- ``GET`` / ``DELETE /v1/memory/{namespace}/{id}``
- ``GET /v1/memory/{namespace}?prefix&limit&start_after&consistency`` — list
- ``GET /v1/memory`` — the namespaces the caller may read, with their model and record count
- ``POST /v1/memory/{namespace}/recall`` ``{"query" | "vector", "k", "where", "min_score", "consistency"}``
"""

from __future__ import annotations

from contextlib import contextmanager

from aiohttp import web

from synapse.api.common import MAX_MEMORY_BODY, ApiError, checked_result, identified, int_query, json_body, request_id, signed
from synapse.api.context import IDENTITY_KEY, context_of
from synapse.api.pipeline import confirm
from synapse.memory.embedding import EmbeddingUnavailable
from synapse.memory.index import IndexUnavailable
from synapse.memory.service import CommandRefused, MemoryService, ModelMismatch, NamespaceNotFound
from synapse.state.security import Scope
from synapse.state.validation import CommandError, LimitError

MAX_LIST_LIMIT = 1000
_ONE = {"text", "metadata", "ttl_s", "vector", "model", "dedup"}
_BATCH = {"records", "dedup", "model"}
_RECALL = {"query", "vector", "k", "where", "min_score", "consistency"}


@contextmanager
def _answers():
    """The memory service's errors as HTTP answers."""
    try:
        yield
    except LimitError as e:
        raise ApiError(413, "too_large", e.message) from None
    except CommandError as e:
        raise ApiError(400, "bad_request", e.message, field=e.field) from None
    except NamespaceNotFound as e:
        raise ApiError(404, "not_found", str(e)) from None
    except ModelMismatch as e:
        raise ApiError(409, "model_mismatch", str(e)) from None
    except CommandRefused as e:
        checked_result(e.result)
        raise
    except (IndexUnavailable, EmbeddingUnavailable) as e:
        raise ApiError(503, "unavailable", str(e), retry=True) from None


def _service(request: web.Request) -> MemoryService:
    service = context_of(request).memory
    if service is None:
        raise ApiError(503, "unavailable", "agent memory is turned off on this node (--memory-index off); "
                       "send the request to a node that serves it")
    return service


def _stamp(request: web.Request):
    rid, identity = request_id(request), request.get(IDENTITY_KEY)
    return lambda ident, volatile: signed(identified(ident, rid, **volatile), identity)


def _after_barrier(request: web.Request):
    ctx, identity = context_of(request), request.get(IDENTITY_KEY)
    return lambda: confirm(ctx, identity)


def _consistency(request: web.Request) -> str:
    return request.query.get("consistency", "linearizable")


async def put_memory(request: web.Request) -> web.Response:
    ns, record_id = request.match_info["ns"], request.match_info["id"]
    body = await json_body(request, _ONE, {"text"}, limit=MAX_MEMORY_BODY)
    record = {k: body[k] for k in ("text", "metadata", "ttl_s", "vector") if k in body}
    with _answers():
        result = await _service(request).remember(ns, [{**record, "id": record_id}], dedup=body.get("dedup", True),
                                                  model=body.get("model"), stamp=_stamp(request))
    (one,) = result["records"]
    return web.json_response({"namespace": ns, **one, "index": result["index"]})


async def put_batch(request: web.Request) -> web.Response:
    ns = request.match_info["ns"]
    body = await json_body(request, _BATCH, {"records"}, limit=MAX_MEMORY_BODY)
    with _answers():
        result = await _service(request).remember(ns, body["records"], dedup=body.get("dedup", True),
                                                  model=body.get("model"), stamp=_stamp(request))
    return web.json_response({"namespace": ns, "records": result["records"], "index": result["index"]})


async def get_memory(request: web.Request) -> web.Response:
    with _answers():
        record = await _service(request).get(request.match_info["ns"], request.match_info["id"],
                                             consistency=_consistency(request), after_barrier=_after_barrier(request))
    return web.json_response(record)


async def delete_memory(request: web.Request) -> web.Response:
    ns, record_id = request.match_info["ns"], request.match_info["id"]
    with _answers():
        result = await _service(request).forget(ns, [record_id], stamp=_stamp(request))
    return web.json_response({"namespace": ns, "id": record_id, "deleted": bool(result["deleted"]),
                              "index": result["index"]})


async def list_memory(request: web.Request) -> web.Response:
    limit = int_query(request, "limit", 1, MAX_LIST_LIMIT) or 100
    with _answers():
        page = await _service(request).list(request.match_info["ns"], prefix=request.query.get("prefix", ""),
                                            limit=limit, start_after=request.query.get("start_after"),
                                            consistency=_consistency(request), after_barrier=_after_barrier(request))
    return web.json_response(page)


async def list_namespaces(request: web.Request) -> web.Response:
    """Every namespace holding records that the caller's token may read (others are left out,
    not refused: a token scoped to one agent's memory lists that agent's), as this node applied."""
    ctx, caller = context_of(request), request[IDENTITY_KEY]
    spaces = ctx.cluster.read(lambda p: p.memory_namespaces())
    return web.json_response({"namespaces": [
        {"namespace": ns, **space} for ns, space in spaces
        if caller.grant.missing([Scope("memory:read", ns)]) is None]})


async def recall(request: web.Request) -> web.Response:
    body = await json_body(request, _RECALL, limit=MAX_MEMORY_BODY)
    with _answers():
        found = await _service(request).recall(
            request.match_info["ns"], query=body.get("query"), vector=body.get("vector"), k=body.get("k", 10),
            where=body.get("where"), min_score=body.get("min_score"),
            consistency=body.get("consistency", "linearizable"), after_barrier=_after_barrier(request))
    return web.json_response(found)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/memory", list_namespaces)
    app.router.add_post("/v1/memory/{ns}/recall", recall)
    app.router.add_put("/v1/memory/{ns}/{id}", put_memory)
    app.router.add_get("/v1/memory/{ns}/{id}", get_memory)
    app.router.add_delete("/v1/memory/{ns}/{id}", delete_memory)
    app.router.add_post("/v1/memory/{ns}", put_batch)
    app.router.add_get("/v1/memory/{ns}", list_memory)
