"""HTTP API of principals, roles and tokens (synapse/security/DESIGN.md). Every change is a
command through the log (so the audit chain records who changed what: the sending token's
accessor is in the command), checked again at apply time by the command processor."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from synapse.api.common import ApiError, identified, json_body, now_ms, propose, request_id
from synapse.api.context import IDENTITY_KEY, ApiContext, context_of
from synapse.security import tokens
from synapse.state import keys
from synapse.state.security import PRINCIPAL_KINDS, ROOT, Scope, parse_scope, principal_key, token_key
from synapse.state.validation import CommandError

MAX_TTL_S = 10 * 365 * 86_400


def _listed(ctx: ApiContext, prefix: bytes) -> list[tuple[str, dict]]:
    rows = ctx.cluster.read(lambda p: p.store.scan_prefix(prefix))
    return [(k[len(prefix):].decode(), keys.unpack(v)) for k, v in rows]


# --- principals ---

async def list_principals(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.cluster.barrier()
    return web.json_response({"principals": [
        {"name": name, "kind": p["kind"], "roles": p["roles"], "owner": p["owner"], "created_ms": p["created_ms"]}
        for name, p in _listed(ctx, keys.SEC_PRINCIPAL)]})


async def put_principal(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await json_body(request, {"kind", "roles", "owner"}, {"kind"})
    if body["kind"] not in PRINCIPAL_KINDS or body["kind"] == ROOT:
        kinds = ", ".join(k for k in PRINCIPAL_KINDS if k != ROOT)
        raise ApiError(400, "bad_request", f"kind: expected one of {kinds}, got {body['kind']!r}")
    identity = {"op": "principal_put", "name": name, "kind": body["kind"], "roles": body.get("roles") or []}
    if body.get("owner") is not None:
        identity["owner"] = body["owner"]
    result = await propose(request, identified(identity, request_id(request), now_ms=now_ms()), 512,
                           fields=("name", "created"))
    return await _put_answer(request, name, result)


async def delete_principal(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    result = await propose(request, identified({"op": "principal_delete", "name": name}, request_id(request)), 256,
                           fields=("tokens_revoked",))
    return web.json_response({"name": name, "tokens_revoked": result["tokens_revoked"],
                              **await _everywhere(request, result)})


# --- roles ---

async def list_roles(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.cluster.barrier()
    return web.json_response({"roles": [{"name": name, "allow": r["allow"], "deny": r["deny"]}
                                        for name, r in _listed(ctx, keys.SEC_ROLE)]})


async def put_role(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await json_body(request, {"allow", "deny"}, {"allow"})
    identity = {"op": "role_put", "name": name, "allow": body["allow"], "deny": body.get("deny") or []}
    result = await propose(request, identified(identity, request_id(request)), 1024, fields=("name", "created"))
    return await _put_answer(request, name, result)


async def delete_role(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    result = await propose(request, identified({"op": "role_delete", "name": name}, request_id(request)), 256,
                           fields=("name",))
    return web.json_response({"name": name, **await _everywhere(request, result)})


# --- tokens ---

async def create_token(request: web.Request) -> web.Response:
    """A new token (its secret is in this answer only): for the caller's own principal by
    default, minted under the caller's token and never wider than it."""
    caller = request[IDENTITY_KEY]
    body = await json_body(request, {"principal", "scopes", "deny", "ttl_s", "label"}, {"scopes"})
    principal = body.get("principal") or caller.principal
    ttl = body.get("ttl_s")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= MAX_TTL_S):
        raise ApiError(400, "bad_request", f"ttl_s: expected seconds from 1 to {MAX_TTL_S}, got {ttl!r}")
    token = tokens.mint()
    identity = {"op": "token_create", "principal": principal, "allow": body["scopes"],
                "deny": body.get("deny") or []}
    if body.get("label") is not None:
        identity["label"] = body["label"]
    now = now_ms()
    volatile = {"accessor": token.accessor, "secret_hash": token.secret_hash, "now_ms": now}
    if ttl is not None:
        volatile["expires_ms"] = now + int(ttl * 1000)
    result = await propose(request, identified(identity, request_id(request), **volatile), 1024,
                           fields=("accessor", "parent"))
    if result["accessor"] != token.accessor:
        # A retry of a request that created a token already: its secret was in that answer only.
        raise ApiError(409, "token_created_earlier", f"X-Request-Id: this request created token "
                       f"{result['accessor']} already, whose secret is not kept anywhere; revoke it "
                       f"(DELETE /v1/tokens/{result['accessor']}) and create another with a new request id")
    return web.json_response({"token": str(token), "accessor": result["accessor"], "principal": principal,
                              "parent": result["parent"], "expires_ms": volatile.get("expires_ms"),
                              **await _everywhere(request, result)}, status=201)


def token_json(accessor: str, t: dict) -> dict:
    return {"accessor": accessor, "principal": t["principal"], "scopes": t["allow"], "deny": t["deny"],
            "expires_ms": t["expires_ms"], "parent": t["parent"], "created_ms": t["created_ms"], "label": t["label"]}


async def list_tokens(request: web.Request) -> web.Response:
    """Tokens by accessor, never a secret or its hash: every token for cluster:admin, else the
    caller's principal's and its agents'."""
    ctx, caller = context_of(request), request[IDENTITY_KEY]
    await ctx.cluster.barrier()
    admin = caller.grant.missing([Scope("cluster:admin")]) is None
    owners = {name: p.get("owner") for name, p in _listed(ctx, keys.SEC_PRINCIPAL)}
    rows = [(a, t) for a, t in _listed(ctx, keys.SEC_TOKEN)
            if admin or t["principal"] == caller.principal or owners.get(t["principal"]) == caller.principal]
    return web.json_response({"tokens": [token_json(a, t) for a, t in rows]})


async def revoke_token(request: web.Request) -> web.Response:
    """Revokes the token and every token minted under it."""
    accessor = request.match_info["accessor"]
    result = await propose(request, identified({"op": "token_revoke", "accessor": accessor}, request_id(request)),
                           256, fields=("revoked",))
    return web.json_response({"accessor": accessor, "revoked": result["revoked"], **await _everywhere(request, result)})


async def _put_answer(request: web.Request, name: str, result: dict) -> web.Response:
    """A principal or role created (201) or changed (200), once every node has applied it."""
    return web.json_response({"name": name, "created": result["created"], **await _everywhere(request, result)},
                             status=201 if result["created"] else 200)


async def _everywhere(request: web.Request, result: dict) -> dict:
    """Every change here answers once every reachable node has applied it: a token minted is
    accepted by every node, a token revoked refused by every node on every route, from the
    moment the call returns (each node checks tokens against its own applied records)."""
    return {"index": result["index"],
            "nodes_not_confirmed": await _wait_everywhere(context_of(request), result["index"])}


async def _wait_everywhere(ctx: ApiContext, index: int) -> list[str]:
    """Waits (up to the request timeout) until every other registered node reports having
    applied ``index``; returns those that did not answer so (unreachable ones included)."""
    members = {n: info["api"] for n, info in ctx.cluster.read(lambda p: p.nodes()).items() if n != ctx.node_id}
    if not members:
        return []
    deadline = time.monotonic() + ctx.request_timeout
    pending = set(members)
    async with ctx.peers.session(timeout=1.0) as http:
        while pending and time.monotonic() < deadline:
            for node in sorted(pending):
                try:
                    async with http.get(ctx.peers.url(members[node]) + "/v1/cluster/status") as resp:
                        if resp.status == 200 and (await resp.json())["applied_index"] >= index:
                            pending.discard(node)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                    pass
            if pending:
                await asyncio.sleep(0.02)
    return sorted(pending)


async def whoami(request: web.Request) -> web.Response:
    """Who the token is; with ``?can=SCOPE`` (repeatable, e.g. ``can=kv:write:app/config``),
    whether it may do each: the dashboard offers only what the token may do."""
    ctx, caller = context_of(request), request[IDENTITY_KEY]
    can = {}
    for text in request.query.getall("can", []):
        try:
            scope = parse_scope(text, "can")
        except CommandError as e:
            raise ApiError(400, "bad_request", e.message, field="can") from None
        can[text] = caller.grant.missing([scope]) is None
    raw_token, raw_principal = ctx.cluster.read(lambda p: (p.store.get(token_key(caller.accessor)),
                                                           p.store.get(principal_key(caller.principal))))
    token = keys.unpack(raw_token) if raw_token else None
    principal = keys.unpack(raw_principal) if raw_principal else {}
    return web.json_response({"principal": caller.principal, "kind": principal.get("kind"),
                              "roles": principal.get("roles", []),
                              "token": token_json(caller.accessor, token) if token else None,
                              **({"can": can} if can else {})})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/principals", list_principals)
    app.router.add_put("/v1/principals/{name}", put_principal)
    app.router.add_delete("/v1/principals/{name}", delete_principal)
    app.router.add_get("/v1/roles", list_roles)
    app.router.add_put("/v1/roles/{name}", put_role)
    app.router.add_delete("/v1/roles/{name}", delete_role)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_delete("/v1/tokens/{accessor}", revoke_token)
    app.router.add_get("/v1/whoami", whoami)
