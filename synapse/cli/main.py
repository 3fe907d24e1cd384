"""The ``synapse`` command: ``node start`` runs a daemon; ``kv`` and ``cluster`` talk to one."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

import click

from synapse.cli.allocator import keep_freed_memory
from synapse.cli.common import ClientGroup, LocalCommand, client_from, client_options, listing, output_option, print_json, run_call, table
from synapse.cli.memory import memory
from synapse.cli.security import principal, role, tls, token
from synapse.cli.tasks import task, worker
from synapse.client import Client, SynapseError
from synapse.config import (
    WORKER_DRIVERS, ConfigError, NodeConfig, check_node_id, load_config, parse_peers, settings_reference,
    split_address,
)


@click.group()
def main() -> None:
    """Synapse: replicated, hash-verified state for an agent platform."""


# --- node ---


@main.group()
def node() -> None:
    """Run a node."""


def _setting_options(command):
    """A `synapse node start` flag per node setting, its help the setting's meaning as
    synapse/config.py defines it (the one description; docs/configuration.md comes from it too)."""
    kinds = {f.name: f.type for f in fields(NodeConfig)}
    for row in reversed(settings_reference()):
        name, kind = row["setting"], kinds[row["setting"]]
        extra: dict = {}
        if kind == "bool":
            extra = {"is_flag": True, "default": None}
        elif kind in ("int", "float"):
            extra = {"type": int if kind == "int" else float}
        elif name == "worker_driver":
            extra = {"type": click.Choice(WORKER_DRIVERS)}
        command = click.option(row["flag"], name, help=f"{row['doc']} Default: {row['default'].replace('`', '')}.",
                               **extra)(command)
    return command


@node.command("start")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="TOML settings file (flags and SYNAPSE_* variables override it).")
@_setting_options
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def node_start(config_file, log_level, **flags) -> None:
    """Start a node in the foreground; Ctrl-C stops it cleanly."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        config = load_config(flags, os.environ, config_file)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    from synapse.node import Node, NodeError, _new_loop

    keep_freed_memory()

    async def run() -> None:
        node = Node(config)
        try:
            await node.start()
        except (NodeError, ConfigError) as e:
            raise click.ClickException(str(e)) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            _announce(node)
            await stop.wait()
            _say(f"synapse: stopping node {config.node_id} ...")
        finally:
            # Always stop Raft: its tick thread is not a daemon and would keep the process alive.
            await node.stop()
        _say("synapse: stopped")

    # The Raft tick thread dies with the thread that created it: run in the main thread.
    loop = _new_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def _say(text: str) -> None:
    """Prints to stderr, ignoring a closed pipe (a log reader that went away must not keep
    the node from stopping)."""
    try:
        click.echo(text, err=True)
    except OSError:
        pass


def _announce(node) -> None:
    cfg = node.config
    click.echo(f"synapse: node {cfg.node_id} serving {node.api_url} (Raft {cfg.raft}, data {cfg.data_dir})")
    token_file = cfg.root_token_file or cfg.data_dir / "root.token"
    if node.token_was_created:
        click.echo(f"synapse: root token (shown once; also in {token_file}): {node.root_token}")
    click.echo(f"synapse: authenticate with: Authorization: Bearer $(cat {token_file})")
    click.echo(f"synapse: dashboard at {node.api_url}/ui/ (sign in with that token)")
    sys.stdout.flush()


# --- clients ---


@main.group(cls=ClientGroup)
@client_options
def kv(**_connection) -> None:
    """Read and write keys."""


@kv.command("get")
@click.argument("key")
@click.option("--stale", is_flag=True, help="Read this node's local state (may lag).")
@click.pass_context
def kv_get(ctx, key, stale) -> None:
    """Print KEY's value and version as JSON (linearizable unless --stale)."""
    with client_from(ctx) as c:
        r = run_call(lambda: c.get(key, "stale" if stale else "linearizable"))
    if r is None:
        raise click.ClickException(f"key {key!r} does not exist")
    print_json(r)


@kv.command("put")
@click.argument("key")
@click.argument("value")
@click.option("--if-version", type=int, help="Only if the key's version is this (0: only if absent).")
@click.option("--string", is_flag=True, help="Store VALUE as a JSON string instead of parsing it as JSON.")
@click.pass_context
def kv_put(ctx, key, value, if_version, string) -> None:
    """Set KEY to VALUE (JSON, e.g. '{"a": 1}' or '"text"'; see --string)."""
    if not string:
        try:
            value = json.loads(value)
        except ValueError:
            raise click.UsageError(f"VALUE {value!r} is not JSON; quote it as '\"...\"' or pass --string") from None
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.put(key, value, if_version)))


@kv.command("delete")
@click.argument("key")
@click.option("--if-version", type=int)
@click.pass_context
def kv_delete(ctx, key, if_version) -> None:
    """Delete KEY (only at --if-version, when given)."""
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.delete(key, if_version)))


@kv.command("scan")
@click.option("--prefix", default="")
@click.option("--limit", type=int, default=100)
@output_option
@click.pass_context
def kv_scan(ctx, prefix, limit, as_json) -> None:
    """List keys under --prefix in key order with their values and versions."""
    with client_from(ctx) as c:
        r = run_call(lambda: c.scan(prefix, limit))
    listing(r["items"], as_json, ("KEY", "VALUE", "VERSION"),
            lambda item: (item["key"], json.dumps(item["value"], ensure_ascii=False), str(item["version"])))


_NEW_RAFT = "The new node's Raft HOST:PORT."


def _new_node_addresses(command):
    """--raft and --api of a node joining the cluster (cluster add, cluster replace)."""
    command = click.option("--api", required=True, help="The new node's API HOST:PORT.")(command)
    return click.option("--raft", required=True, help=_NEW_RAFT)(command)


@main.group(cls=ClientGroup)
@client_options
def cluster(**_connection) -> None:
    """Inspect and change the cluster."""


@cluster.command("status")
@output_option
@click.pass_context
def cluster_status(ctx, as_json) -> None:
    """This node's view of the cluster; whether each voter is up, as the leader sees it."""
    with client_from(ctx) as c:
        s = run_call(c.status)
        if as_json:
            print_json(s)
            return
        _print_status(c, s)


@cluster.command("events")
@click.option("--limit", "-n", type=click.IntRange(1, 1000), default=50, show_default=True, help="Newest events shown.")
@output_option
@click.pass_context
def cluster_events(ctx, limit, as_json) -> None:
    """Every node's timeline, newest first: leader changes, divergences, repairs, rollbacks."""
    with client_from(ctx) as c:
        overview = run_call(lambda: c.request("GET", f"/v1/cluster/overview?events={limit}"))
    silent = [f"{n['node_id'] or n['raft']} ({n['error']})" for n in overview["nodes"] if not n["reachable"]]
    if as_json:
        print_json({"events": overview["events"], "not_answering": silent})
        return
    listing(overview["events"], False, ("WHEN", "NODE", "KIND", "WHAT"), lambda e: (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])), e["node"], e.get("service") or e["kind"],
        e["message"]))
    if silent:
        click.echo(f"not answering, so not in the list: {', '.join(silent)}")


def _voter_health(c: Client, s: dict) -> tuple[str, dict[str, dict]]:
    """Whose view of the voters' health to show, and that view by Raft address: the leader's
    (it is the one that needs a majority), else this node's when there is no leader or it
    cannot be asked."""
    if not s["is_leader"] and s.get("leader_api"):
        try:
            with _client_for(c, s["leader_api"], timeout=3) as leader:
                ls = leader.status()
            return f"the leader {ls['node_id']}", {m["raft"]: m for m in ls["members"]}
        except SynapseError:
            pass
    who = f"the leader {s['node_id']}" if s["is_leader"] else f"{s['node_id']}, NOT the leader (none reachable)"
    return who, {m["raft"]: m for m in s["members"]}


def _up_text(m: dict) -> str:
    if m.get("up", True):
        return "yes"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["down_since"]))
    if m["last_contact_s"] is None:
        return f"DOWN, not heard since {since} (the observer's start)"
    return f"DOWN {_duration(m['last_contact_s'])} (since {since})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _print_status(c: Client, s: dict) -> None:
    click.echo(f"node {s['node_id']}  leader {s['leader']}  term {s['term']}  "
               f"commit {s['commit_index']}  applied {s['applied_index']}")
    click.echo(f"state hash {s['state_hash']}")
    ck = s.get("checkpoint") or {}
    latest = ck.get("latest")
    if latest:
        agreed = f"agreed {latest['digest'][:16]}" if latest["agreed"] else "NOT agreed yet"
        click.echo(f"checkpoint {latest['index']}{' ' + repr(latest['label']) if latest['label'] else ''}: {agreed}")
    if ck.get("service") and ck["service"] != "serving":
        click.echo(f"THIS NODE: {ck['service'].upper()} (diverged at checkpoint {ck.get('diverged_at')})")
    seen_by, health = _voter_health(c, s)
    down = [m["node_id"] or m["raft"] for m in s["members"] if not health.get(m["raft"], m)["up"]]
    click.echo(f"voters {len(s['members'])}, up {len(s['members']) - len(down)} (as seen by {seen_by})"
               + (f"; DOWN: {', '.join(down)} — `synapse cluster replace` swaps a dead one for a new node" if down else ""))
    rows = [("NODE", "RAFT", "API", "ROLE", "CONNECTED", "UP", "CHECKPOINT")]
    for m in s["members"]:
        role = "leader" if m["leader"] else "follower"
        agrees = {True: "agrees", False: "DIFFERS", None: "-"}[m.get("checkpoint_agrees")]
        rows.append((m["node_id"] or "?", m["raft"], m["api"] or "?", role + (" (this)" if m["self"] else ""),
                     "yes" if m["connected"] else "NO", _up_text(health.get(m["raft"], m)), agrees))
    table(rows)
    if s.get("workers"):
        click.echo("")
        rows = [("WORKER", "STATE", "RUNNING", "SLOTS", "SANDBOX", "HEARD", "LABELS")]
        for w in s["workers"]:
            heard = "-" if w["last_heartbeat_s"] is None else f"{w['last_heartbeat_s']:.1f} s ago"
            state = w["state"] + (f" ({w['reason']})" if w["state"] == "down" and w.get("reason") else "")
            rows.append((w["worker_id"], state, str(w["running"]), str(w["slots"]), w.get("driver") or "?", heard,
                         ",".join(f"{k}={v}" for k, v in w["labels"].items()) or "-"))
        table(rows)


@cluster.command("add")
@click.argument("node_id")
@_new_node_addresses
@click.pass_context
def cluster_add(ctx, node_id, raft, api) -> None:
    """Add a voter (start it with --peers listing the current voters first)."""
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.request("POST", "/v1/cluster/members", {"node_id": node_id, "raft": raft, "api": api})))


@cluster.command("remove")
@click.argument("node_id")
@click.pass_context
def cluster_remove(ctx, node_id) -> None:
    """Remove a voter (sent to the leader: a node cannot see its own removal through)."""
    with client_from(ctx) as c, _leader_client(c) as leader:
        print_json(run_call(lambda: leader.request("DELETE", f"/v1/cluster/members/{node_id}")))


@cluster.command("replace")
@click.argument("dead")
@click.argument("node_id")
@_new_node_addresses
@click.pass_context
def cluster_replace(ctx, dead, node_id, raft, api) -> None:
    """Replace the dead voter DEAD with the new node NODE_ID in one step: remove DEAD, then add
    NODE_ID (start it first, with --peers listing the voters that are up).

    Checked before anything changes: DEAD is a voter that the leader sees down, NODE_ID and
    its addresses belong to no member, and the new node answers at --api as NODE_ID. If
    interrupted between the two steps, DEAD is out and NODE_ID not in yet: the cluster runs
    on one voter fewer; finish with `synapse cluster add NODE_ID --raft ... --api ...`."""
    for name, check in (("NODE_ID", lambda: check_node_id("NODE_ID", node_id)),
                        ("--raft", lambda: split_address("--raft", raft)), ("--api", lambda: split_address("--api", api))):
        try:
            check()
        except ConfigError as e:
            raise click.UsageError(f"{e}; nothing was changed") from None
    finish = f"synapse cluster add {node_id} --raft {raft} --api {api}"
    with client_from(ctx) as c, _leader_client(c) as leader:
        s = run_call(leader.status)
        _check_replace(s, dead, node_id, raft, api, finish)
        try:
            with _client_for(c, api, timeout=3) as new:
                answered = new.request("GET", "/health").get("node_id")
        except SynapseError as e:
            raise click.ClickException(
                f"the new node does not answer at --api {api} ({e}); start it first (`synapse node start --id {node_id} "
                f"--raft {raft} --api {api} --peers <the voters that are up> ...`), then run this again; nothing was "
                "changed") from None
        if answered != node_id:
            raise click.ClickException(f"the node at --api {api} is {answered!r}, not {node_id!r}; check --api or "
                                       "NODE_ID; nothing was changed")
        removed = False
        try:
            click.echo(f"1/2 removing {dead} (Raft {_raft_of(s, dead)}) ...")
            print_json(leader.request("DELETE", f"/v1/cluster/members/{dead}"))
            removed = True
            click.echo(f"1/2 done: {dead} is no longer a voter")
            click.echo(f"2/2 adding {node_id} (Raft {raft}, API {api}) ...")
            print_json(leader.request("POST", "/v1/cluster/members", {"node_id": node_id, "raft": raft, "api": api}))
        except (SynapseError, KeyboardInterrupt) as e:
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            if removed:
                raise click.ClickException(
                    f"{dead} was removed but adding {node_id} did not finish ({what}): the cluster runs on "
                    f"{len(s['members']) - 1} voters until it is added; finish with `{finish}` (a repeat of an add "
                    "that did go through only registers the node again)") from None
            raise click.ClickException(
                f"removing {dead} did not finish ({what}); see `synapse cluster status`: if {dead} is still a voter, "
                f"nothing changed and this command can be run again; if it is gone, finish with `{finish}`") from None
        click.echo(f"2/2 done: {node_id} is a voter; it catches up from the leader (`synapse cluster status`)")


def _raft_of(s: dict, node_id: str) -> str:
    return next(m["raft"] for m in s["members"] if m["node_id"] == node_id)


def _check_replace(s: dict, dead: str, node_id: str, raft: str, api: str, finish: str) -> None:
    """Refuses, naming the input and the fix, a replacement that is not of a dead voter by a
    new node (``s``: the leader's status)."""
    members = {m["node_id"]: m for m in s["members"] if m["node_id"]}
    voters = ", ".join(sorted(members)) or "none registered"
    nothing = "nothing was changed"
    if dead not in members:
        raise click.ClickException(
            f"DEAD {dead!r} is not a voter of this cluster (voters: {voters}); if an earlier `synapse cluster replace` "
            f"was interrupted after removing it, finish with `{finish}`; {nothing}")
    m = members[dead]
    if m["self"] or m.get("up", False):
        heard = "it is the leader" if m["self"] else f"the leader {s['node_id']} heard from it {m['last_contact_s']} s ago"
        raise click.ClickException(
            f"DEAD {dead!r} is up ({heard}): replace only a voter that is down; to retire a live voter, "
            f"`synapse cluster remove {dead}` then `synapse cluster add`; {nothing}")
    if node_id in members:
        raise click.ClickException(f"NODE_ID {node_id!r} is already a voter; pick a new id; {nothing}")
    for option, value, key in (("--raft", raft, "raft"), ("--api", api, "api")):
        owner = next((m["node_id"] or m["raft"] for m in s["members"] if m[key] == value), None)
        if owner is not None:
            raise click.ClickException(f"{option} {value} is {owner}'s address already; give the new node's; {nothing}")


@cluster.command("transfer-leader")
@click.argument("node_id", required=False)
@click.pass_context
def cluster_transfer(ctx, node_id) -> None:
    """Hand leadership to NODE_ID (default: the most caught-up follower)."""
    with client_from(ctx) as c, _leader_client(c) as leader:
        print_json(run_call(lambda: leader.request("POST", "/v1/cluster/transfer-leader", {"node_id": node_id})))


@main.group(cls=ClientGroup)
@client_options
def checkpoint(**_connection) -> None:
    """Make and list checkpoints (state digests agreed by a majority)."""


@checkpoint.command("create")
@click.option("--label", help="A name for it (1-128 printable characters).")
@click.option("--wait/--no-wait", default=True, help="Wait until a majority agreed on its digest (default).")
@click.pass_context
def checkpoint_create(ctx, label, wait) -> None:
    """Make a checkpoint now: every node reports its state digest at one log index."""
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.checkpoint(label, wait)))


@checkpoint.command("list")
@click.option("--limit", type=int, default=20)
@output_option
@click.pass_context
def checkpoint_list(ctx, limit, as_json) -> None:
    """The newest checkpoints with each node's agreement (a table, or --json)."""
    with client_from(ctx) as c:
        items = run_call(lambda: c.checkpoints(limit))
    if as_json:
        print_json(items)
        return
    rows = [("INDEX", "LABEL", "AGREED DIGEST", "NODES")]
    for ck in items:
        nodes = " ".join(
            f"{n}:{ {True: 'ok', False: 'DIFFERS', None: '?'}[r['agrees']] }" for n, r in sorted(ck["nodes"].items())
        )
        missing = " ".join(f"{n}:-" for n in ck["missing"])
        rows.append((str(ck["index"]), ck["label"] or "", ck["digest"][:16] if ck["agreed"] else "(not agreed)",
                     (nodes + " " + missing).strip()))
    table(rows)


@main.group(cls=ClientGroup)
@client_options
def snapshot(**_connection) -> None:
    """Back up the whole state to a file, inspect one, make a new cluster from one."""


@snapshot.command("save")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def snapshot_save(ctx, file) -> None:
    """Save the whole state at one applied index to FILE (every write acknowledged before the
    command is in it; needs cluster:admin)."""
    from synapse.cli.progress import bar

    with client_from(ctx) as c, bar(f"saving {file.name}", unit="bytes") as saving:
        saved = run_call(lambda: c.save_snapshot(file, progress=saving))
    click.echo(f"saved {saved['file']}: log index {saved['index']}, state {saved['state_hash'][:16]}, "
               f"{saved['bytes']:,} bytes")


@snapshot.command("inspect", cls=LocalCommand)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@output_option
def snapshot_inspect(file, as_json) -> None:
    """What FILE holds: its log index, state hash and records (every checksum is verified)."""
    from synapse.integrity import backup

    try:
        info = backup.inspect(file)
    except backup.BackupError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        print_json(info)
        return
    table([("FILE", "INDEX", "STATE HASH", "RECORDS", "BYTES"),
           (info["file"], str(info["index"]), info["state_hash"][:16], str(info["records"]), f"{info['bytes']:,}")])
    click.echo("")
    table([("KIND", "COUNT")] + [(k, str(n)) for k, n in info["counts"].items()])


@snapshot.command("restore", cls=LocalCommand)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The new node's data directory (new or empty).")
@click.option("--raft", required=True, help=_NEW_RAFT)
@click.option("--peers", default="", help="The new cluster's other voters: ID=HOST:PORT,... (as `node start`).")
def snapshot_restore(file, data_dir, raft, peers) -> None:
    """Make DATA_DIR a voter of a new cluster holding FILE's state (etcd's `snapshot
    restore`). Run it for every voter of the new cluster with the same FILE and the same
    voters, then start each with `synapse node start --data-dir ... --raft ... --peers ...`
    (the same addresses). The old cluster's tokens work on the new one."""
    from synapse.cli.progress import bar
    from synapse.integrity import backup

    try:
        split_address("--raft", raft)
        voters = [raft, *parse_peers(peers).values()] if peers else [raft]
        with bar(f"restoring {file.name}", unit="steps") as restoring:
            restored = backup.restore(file, data_dir, voters, progress=restoring)
    except ConfigError as e:
        raise click.UsageError(f"{e}; nothing was written") from None
    except backup.BackupError as e:
        raise click.ClickException(f"{e}; nothing was written") from None
    click.echo(f"restored log index {restored['index']} (state {restored['state_hash'][:16]}) into "
               f"{restored['data_dir']} for voters {', '.join(restored['voters'])}")


@main.group(cls=ClientGroup)
@client_options
def debug(**_connection) -> None:
    """Fault injection for tests and chaos runs (the node must allow it)."""


@debug.command("corrupt")
@click.option("--key", required=True, help="The kv key to damage on this one node.")
@click.option("--value", default='"corrupted"', help="JSON to put there (default \"corrupted\").")
@click.option("--delete", is_flag=True, help="Remove the key instead.")
@click.pass_context
def debug_corrupt(ctx, key, value, delete) -> None:
    """Change KEY in one node's state behind the log's back (--url picks the node). The node
    must run with --debug-fault-injection; it detects the damage at the next checkpoint and
    repairs itself from a healthy peer."""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise click.UsageError(f"--value {value!r} is not JSON") from None
    body = {"key": key, "delete": True} if delete else {"key": key, "value": parsed}
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.request("POST", "/v1/debug/corrupt", body)))


@main.command("rollback")
@click.argument("checkpoint", type=int)
@client_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def rollback_cmd(ctx, checkpoint, yes, **_connection) -> None:
    """Roll the whole cluster back to CHECKPOINT (a log index from `synapse checkpoint list`):
    every write after it is undone, on every node."""
    if not yes:
        click.confirm(f"Undo every write after checkpoint {checkpoint}, on every node?", abort=True)
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.rollback(checkpoint)))


@main.group()
def chaos() -> None:
    """Break a real cluster on purpose and check it kept its promises."""


@chaos.command("run")
@click.option("--nodes", type=click.IntRange(3, 9), default=3, help="Voters in the cluster under test (default 3).")
@click.option("--duration", type=float, default=30.0, help="Seconds of load and faults per run (default 30).")
@click.option("--clients", type=click.IntRange(1, 256), default=8, help="Concurrent clients (default 8).")
@click.option("--keys", type=click.IntRange(1, 10_000), default=6, help="Keys they share (default 6).")
@click.option("--nemesis", default="kill,pause", help="Comma-separated faults, or 'all' (loopback: kill, kill-leader, kill-majority, kill-majority-at-start, pause, restart-all, corrupt, membership, clock; netns adds partition-halves, isolate-leader, one-way, ring, bridge, packet-loss).")
@click.option("--mode", type=click.Choice(["auto", "loopback", "netns"]), default="auto", help="netns: each node in its own network namespace (root); loopback: 127.0.0.1, no network faults. auto: netns when possible.")
@click.option("--mix", type=click.IntRange(1, 5), default=1, help="Up to this many different faults at once (default 1).")
@click.option("--runs", type=click.IntRange(1, 10_000), default=1, help="Runs, each with its own cluster and seed.")
@click.option("--seed", type=int, default=None, help="Seed of the first run (default: random).")
@click.option("--memory-ops", type=click.FloatRange(0, 1), default=0.0, help="Share of client operations that are agent-memory operations (remember, batches, forget, linearizable recall by vector), checked for lost and duplicated memories, recalls and each node's index (default 0: none; they slow every node: Chroma runs in each).")
@click.option("--min-acknowledged", type=click.IntRange(0, 1_000_000), default=0, help="Go on past --duration, faults included, until every kind of operation sent (read, write, cas; with --memory-ops remember, batch, duplicate, forget, recall) was acknowledged this many times; a run that still lacks some at --max-duration fails, naming them (default 0: stop at --duration).")
@click.option("--max-duration", type=float, default=0.0, help="With --min-acknowledged: the load stops here anyway (default 0: 10 x --duration).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("chaos-runs"), help="Where each run's result.json, report.html and node logs go.")
def chaos_run(nodes, duration, clients, keys, nemesis, mode, mix, runs, seed, memory_ops, min_acknowledged,
              max_duration, out) -> None:
    """Start a cluster, load it, break it, heal it, and check: linearizability per key, no
    acknowledged write lost, convergence of every node, the audit chain of every node.
    Exits 1 if any run found a violation."""
    import random as _random

    from synapse.chaos.netns import unavailable_reason
    from synapse.chaos.runner import ALL_NEMESES, LOOPBACK_NEMESES, Run, RunConfig, write_report
    from synapse.cli.progress import bars

    if max_duration < 0 or 0 < max_duration < duration:
        raise click.UsageError(f"--max-duration ({max_duration}) must be 0 (10 x --duration) or at least "
                               f"--duration ({duration})")
    reason = unavailable_reason() if mode != "loopback" else None
    if mode == "auto":
        mode = "loopback" if reason else "netns"
        if reason:
            click.echo(f"chaos: network namespaces unavailable ({reason}); loopback mode: kills and pauses only", err=True)
    elif mode == "netns" and reason:
        raise click.UsageError(f"--mode netns needs root and network namespaces: {reason}")
    chosen = list(ALL_NEMESES if nemesis == "all" else [n.strip() for n in nemesis.split(",") if n.strip()])
    if nemesis == "all" and mode == "loopback":
        chosen = list(LOOPBACK_NEMESES)
    seed = _random.randrange(1 << 30) if seed is None else seed
    # SIGTERM tears down like Ctrl-C: clusters and namespaces are closed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    failed = 0
    with bars() as shown:
        done = shown.bar("chaos runs", total=runs, unit="runs")
        within = shown.bar("run", total=duration, unit="s")
        for n in range(runs):
            config = RunConfig(nodes=nodes, duration=duration, clients=clients, keys=keys, nemeses=tuple(chosen),
                               mode=mode, seed=seed + n, mix=mix, memory_ops=memory_ops,
                               min_acknowledged=min_acknowledged, max_duration=max_duration)
            name = f"run {n + 1}/{runs} (seed {seed + n})"
            within.restart(duration, f"{name}: load and faults")

            def loading(elapsed: float, total: float, name: str = name) -> None:
                within(elapsed, total)
                if elapsed >= total:  # the load is over; healing and checking take a while longer
                    within.describe(f"{name}: checking")
                elif elapsed >= duration:
                    within.describe(f"{name}: load goes on until {min_acknowledged} of each kind are acknowledged")

            try:
                result = Run(config, out / f"run-{seed + n}").execute(progress=loading)
            except ValueError as e:
                raise click.UsageError(str(e)) from None
            _, html = write_report(result, out / f"run-{seed + n}")
            verdicts = ", ".join(f"{k} {'ok' if v['ok'] else 'VIOLATION'}" for k, v in result.checks.items())
            undecided = result.checks["linearizable"].get("undecided") or []
            if undecided:  # the search budget ran out on some keys: not checked, and said so
                verdicts += f" ({len(undecided)} keys UNDECIDED: use more --keys for fewer operations per key)"
            with shown.paused():
                click.echo(f"{name}: {'PASSED' if result.ok else 'FAILED'} — {verdicts}; "
                           f"{sum(result.ops.values())} operations, {len(result.faults)} faults; report {html}")
                for check, v in result.checks.items():
                    if not v["ok"]:
                        click.echo(json.dumps(v, indent=1, default=str)[:3000], err=True)
            failed += not result.ok
            done.advance()
    click.echo(f"chaos: {runs - failed} of {runs} runs passed")
    if failed:
        sys.exit(1)


@main.group()
def audit() -> None:
    """Check a node's data dir offline: replay its log, verify the audit chain and checkpoints."""


@audit.command("verify")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The node's data dir (read only; the node may be running).")
@output_option
def audit_verify(data_dir, as_json) -> None:
    """Replays the retained log from the node's dump through the command processor (no Raft,
    no network) and checks every entry against the node's audit trail and every agreed
    checkpoint against the replayed state. Exits 1 naming the first entry that fails."""
    from synapse.cli.progress import bar
    from synapse.integrity.audit import verify

    with bar("replaying the log", unit="entries", show=False if as_json else None) as replaying:
        result = verify(data_dir, progress=replaying)
    if as_json:
        print_json(result.as_dict())
    elif result.ok:
        click.echo(f"audit: OK — {result.entries_replayed} entries replayed ({result.first_index} to {result.last_index}) "
                   f"from {result.base_source}, {result.entries_checked_against_trail} checked against the trail, "
                   f"{len(result.checkpoints_verified)} agreed checkpoints verified")
    if not result.ok:
        if not as_json:
            click.echo(f"audit: FAILED at entry {result.failure['index']}: {result.failure['reason']}", err=True)
        sys.exit(1)


@audit.command("tail")
@click.argument("count", type=click.IntRange(1, 100_000), default=20)
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The node's data dir (read only).")
@output_option
def audit_tail(count, data_dir, as_json) -> None:
    """The last COUNT log entries (default 20), decoded: index, term, kind and commands."""
    from synapse.cluster.journal import JournalError
    from synapse.integrity.audit import format_tail, tail

    try:
        items = tail(data_dir, count)
    except JournalError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        print_json(items)
    else:
        click.echo(format_tail(items))


def _leader_client(c: Client) -> Client:
    s = run_call(c.status)
    if not s.get("leader_api"):
        raise click.ClickException("the cluster has no leader right now; try again in a moment")
    return _client_for(c, s["leader_api"])


def _client_for(c: Client, api: str, timeout: float | None = None) -> Client:
    """A client of the node at ``api`` (HOST:PORT) with ``c``'s token and TLS settings."""
    scheme = "https" if c.ssl_context is not None else "http"
    extra = {} if timeout is None else {"timeout": timeout}
    return Client(f"{scheme}://{api}", c.token, ssl_context=c.ssl_context, **extra)


main.add_command(task)
main.add_command(memory)
main.add_command(worker)
main.add_command(principal)
main.add_command(role)
main.add_command(token)

if __name__ == "__main__":
    main()
main.add_command(tls)
