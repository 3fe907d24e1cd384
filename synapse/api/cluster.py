"""The cluster routes: status, events, the whole cluster's overview, health, readiness and
membership (add or remove a voter, hand leadership over)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from synapse.api import integrity, tasks
from synapse.api.common import ApiError, identified, int_query, json_body, propose, request_id
from synapse.api.context import ApiContext, context_of
from synapse.cluster.service import MembershipError
from synapse.config import ConfigError, check_node_id, split_address


def contact(raft: dict, addr: str, now: float) -> dict:
    """A voter's health as this node sees it: ``up`` (heard from within the contact timeout,
    the silence after which the Raft link is dropped too), ``last_contact_s`` (seconds since
    this node last heard from it; None: not since this node started) and ``down_since`` (the
    wall-clock time it was last heard from — this node's start when never — while down)."""
    if addr == raft["raft_addr"]:
        return {"up": True, "last_contact_s": 0.0, "down_since": None}
    ago = raft["last_contact"].get(addr)
    up = ago is not None and ago <= raft["contact_timeout"]
    silent = raft["uptime"] if ago is None else ago
    return {"up": up, "last_contact_s": None if ago is None else round(ago, 3),
            "down_since": None if up else round(now - silent, 3)}


def cluster_status(ctx: ApiContext) -> dict:
    raft = ctx.cluster.status()
    now = time.time()
    applied_index, digest = ctx.cluster.applied()
    registered = ctx.cluster.read(lambda p: p.nodes())
    by_raft = {info["raft"]: (node_id, info) for node_id, info in registered.items()}
    leader_addr = raft["leader_raft_addr"]
    members = []
    for addr in sorted({raft["raft_addr"], *raft["peers"]}):
        node_id, info = by_raft.get(addr, (None, {}))
        members.append({
            "node_id": node_id,
            "raft": addr,
            "api": info.get("api"),
            "leader": addr == leader_addr,
            "self": addr == raft["raft_addr"],
            "connected": True if addr == raft["raft_addr"] else raft["connected"].get(addr, False),
            **contact(raft, addr, now),
        })
    checkpoint = integrity.checkpoint_status(ctx)
    latest = (checkpoint.get("latest") or {}).get("nodes", {})
    for member in members:
        report = latest.get(member["node_id"])
        member["checkpoint_digest"] = report["digest"] if report else None
        member["checkpoint_agrees"] = report["agrees"] if report else None
    leader = by_raft.get(leader_addr, (None, {}))
    return {
        "node_id": ctx.node_id,
        "role": "leader" if raft["is_leader"] else ("follower" if leader_addr else "no leader"),
        "leader": leader[0],
        "leader_api": leader[1].get("api"),
        "leader_raft": leader_addr,
        "is_leader": raft["is_leader"],
        "term": raft["term"],
        "commit_index": raft["commit_index"],
        "applied_index": applied_index,
        "state_hash": digest.hex(),
        "members": members,
        "workers": tasks.workers_view(ctx),
        "checkpoint": checkpoint,
        "catchup": ctx.catchup.as_dict(),
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(cluster_status(context_of(request)))


async def events(request: web.Request) -> web.Response:
    """This node's timeline (synapse/timeline.py): ``after`` a sequence number, oldest first."""
    ctx = context_of(request)
    after = int_query(request, "after", 0) or 0
    limit = int_query(request, "limit", 1, 1000) or 1000
    return web.json_response({"node_id": ctx.node_id, "events": ctx.timeline.since(after, limit)})


# How long the overview waits for each other node: it answers within about this even while a
# node is cut off, so a dashboard polling every second keeps up (a stopped node's refused
# connection answers at once).
OVERVIEW_WAIT = 0.8


async def overview(request: web.Request) -> web.Response:
    """Every member's own status and newest events, asked now by this node (the dashboard's
    Cluster page): which nodes answer, their role, indexes and integrity state as each sees
    itself, the lag behind the leader's commit index and one merged timeline, newest first."""
    ctx = context_of(request)
    newest = int_query(request, "events", 0, 1000)
    newest = 100 if newest is None else newest
    mine = cluster_status(ctx)
    async with ctx.peers.session(timeout=OVERVIEW_WAIT) as http:
        views = await asyncio.gather(*(_member_view(ctx, http, member, mine, newest) for member in
                                       sorted(mine["members"], key=lambda m: (m["node_id"] is None, m["node_id"] or m["raft"]))))
    leader_commit = next((v["status"]["commit_index"] for v in views
                          if v["status"] is not None and v["status"]["role"] == "leader"), mine["commit_index"])
    merged: list[dict] = []
    for view in views:
        merged += view.pop("events")
        if view["status"] is not None:
            view["lag"] = max(0, leader_commit - view["status"]["applied_index"])
    # A node's own order breaks ties (times are to the millisecond: a divergence and the start
    # of its repair can share one).
    merged.sort(key=lambda e: (e["at"], e["seq"]), reverse=True)
    return web.json_response({
        "node_id": ctx.node_id, "at": round(time.time(), 3), "leader": mine["leader"], "term": mine["term"],
        "leader_commit_index": leader_commit, "checkpoint": mine["checkpoint"], "workers": mine["workers"],
        "nodes": views, "events": merged[:newest],
    })


async def _member_view(ctx: ApiContext, http: aiohttp.ClientSession, member: dict, mine: dict, newest: int) -> dict:
    """One member as the overview shows it: ``reachable`` (it answered now), ``status`` (its own
    /v1/cluster/status; None when it did not answer) and ``error`` (why not)."""
    view = {**member, "reachable": False, "error": None, "status": None, "lag": None, "events": []}
    if member["self"]:
        view.update(reachable=True, status=mine, events=ctx.timeline.since(0, newest) if newest else [])
        return view
    if member["api"] is None:
        view["error"] = "not registered yet: its API address is unknown"
        return view
    base = ctx.peers.url(member["api"])
    try:
        async with http.get(base + "/v1/cluster/status") as resp:
            if resp.status != 200:
                view["error"] = f"answered {resp.status}: {(await resp.text())[:200]}"
                return view
            view["status"] = await resp.json()
        view["reachable"] = True
        if newest:
            async with http.get(base + "/v1/cluster/events", params={"limit": str(newest)}) as resp:
                if resp.status == 200:
                    view["events"] = (await resp.json())["events"]
    except asyncio.TimeoutError:
        view["error"] = f"no answer within {OVERVIEW_WAIT:g} s"
    except (aiohttp.ClientError, ValueError, KeyError) as e:
        view["error"] = f"{type(e).__name__}: {e}"
    return view


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node_id": context_of(request).node_id})


async def ready(request: web.Request) -> web.Response:
    ctx = context_of(request)
    why = ctx.cluster.catching_up()
    if why is not None:
        raise ApiError(503, "not_ready", why)
    raft = ctx.cluster.status()
    applied, _ = ctx.cluster.applied()
    if not ctx.serving:
        raise ApiError(503, "not_ready", f"diverged from the agreed state; {ctx.integrity.status()['service']}")
    return web.json_response({"status": "ready", "applied_index": applied, "leader": raft["leader_raft_addr"]})


# --- membership ---


def _address(body: dict, name: str) -> str:
    value = body[name]
    if not isinstance(value, str) or not value.isascii():
        raise ApiError(400, "bad_request", f"{name}: expected \"HOST:PORT\" text, e.g. \"10.0.0.5:7071\"")
    try:
        split_address(name, value)
    except ConfigError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    return value


async def add_member(request: web.Request) -> web.Response:
    ctx = context_of(request)
    rid = request_id(request)  # checked before anything changes
    body = await json_body(request, {"node_id", "raft", "api"}, {"node_id", "raft", "api"})
    try:
        check_node_id("node_id", body["node_id"])
    except ConfigError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    _address(body, "raft")
    _address(body, "api")
    # Idempotent: a retry after a timed-out add (the voter is in already) only registers it.
    if body["raft"] not in ctx.cluster.voters():
        try:
            await ctx.cluster.add_voter(body["raft"])
        except MembershipError as e:
            raise ApiError(409, "membership_change_failed", f"{e}; only one change at a time, on a cluster with a leader") from None
    await propose(request, identified({"op": "register_node", "node_id": body["node_id"], "raft": body["raft"],
                                       "api": body["api"]}, rid), 256, fields=("index",))
    return web.json_response({"added": body["node_id"]})


async def remove_member(request: web.Request) -> web.Response:
    ctx = context_of(request)
    node_id = request.match_info["node_id"]
    rid = request_id(request)  # checked before anything changes
    info = ctx.cluster.read(lambda p: p.nodes().get(node_id))
    if info is None:
        raise ApiError(404, "not_found", f"no registered node {node_id!r}; see GET /v1/cluster/status")
    if node_id == ctx.node_id:
        # The node being removed stops hearing the outcome of its own removal.
        status = cluster_status(ctx)
        raise ApiError(409, "send_elsewhere", "this node is the one being removed; send the request to another node",
                       leader=status["leader"], leader_api=status["leader_api"])
    # Idempotent: a retry after a timed-out removal (the voter is out already) only unregisters it.
    if info["raft"] in ctx.cluster.voters():
        try:
            await ctx.cluster.remove_voter(info["raft"])
        except MembershipError as e:
            raise ApiError(409, "membership_change_failed", f"removing {node_id}: {e}") from None
    await propose(request, identified({"op": "unregister_node", "node_id": node_id}, rid), 128,
                  fields=("index",))
    return web.json_response({"removed": node_id})


async def transfer_leader(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body = await json_body(request, {"node_id"}, optional=True)
    target = None
    if body.get("node_id") is not None and not isinstance(body["node_id"], str):
        raise ApiError(400, "bad_request", "node_id: expected a node id (text) or null for the most caught-up follower")
    if body.get("node_id") is not None:
        info = ctx.cluster.read(lambda p: p.nodes().get(body["node_id"]))
        if info is None:
            raise ApiError(404, "not_found", f"no registered node {body['node_id']!r}")
        target = info["raft"]
    status = cluster_status(ctx)
    if not status["is_leader"]:
        raise ApiError(421, "not_leader", "send this to the leader", leader=status["leader"], leader_api=status["leader_api"])
    try:
        await ctx.cluster.transfer_leadership(target)
    except MembershipError:
        raise ApiError(409, "transfer_denied", "the target is not connected or not fully caught up; try again") from None
    return web.json_response({"transferring_to": body.get("node_id") or "most caught-up follower"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/cluster/status", status)
    app.router.add_get("/v1/cluster/events", events)
    app.router.add_get("/v1/cluster/overview", overview)
    app.router.add_post("/v1/cluster/members", add_member)
    app.router.add_delete("/v1/cluster/members/{node_id}", remove_member)
    app.router.add_post("/v1/cluster/transfer-leader", transfer_leader)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
