"""``synapse memory remember|recall|get|forget|list``: agent memory from the command line.
Registered on the ``synapse`` group by synapse/cli/main.py."""

from __future__ import annotations

import json
import time

import click

from synapse.cli.common import ClientGroup, output_option, client_from, client_options, listing, print_json, run_call


@click.group(cls=ClientGroup)
@client_options
def memory(**_connection) -> None:
    """Remember facts in a namespace and recall them by meaning (replicated, hash-verified)."""


def _json_option(value: str | None, option: str):
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        raise click.UsageError(f"{option} {value!r} is not JSON") from None


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _when(ms: int | None) -> str:
    return "-" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@memory.command("remember")
@click.argument("namespace")
@click.argument("text")
@click.option("--id", "record_id", help="The memory's id (default: the node makes one).")
@click.option("--metadata", help='Flat JSON metadata, such as \'{"kind": "preference"}\'.')
@click.option("--ttl-s", type=float, help="Forget it this many seconds after it is written.")
@click.option("--no-dedup", is_flag=True, help="Store it even if the namespace already holds this text.")
@output_option
@click.pass_context
def memory_remember(ctx, namespace, text, record_id, metadata, ttl_s, no_dedup, as_json) -> None:
    """Remember TEXT in NAMESPACE (path-like: acme/agent-7/episodic)."""
    meta = _json_option(metadata, "--metadata")
    with client_from(ctx) as c:
        answer = run_call(lambda: c.remember(namespace, text, id=record_id, metadata=meta, ttl_s=ttl_s,
                                             dedup=not no_dedup))
    if as_json:
        print_json(answer)
    elif answer["duplicate"]:
        click.echo(f"already remembered as {answer['id']} (log index {answer['index']})")
    else:
        click.echo(f"remembered {answer['id']} (log index {answer['index']})")


@memory.command("recall")
@click.argument("namespace")
@click.argument("query")
@click.option("-k", "k", type=int, default=5, show_default=True, help="How many memories.")
@click.option("--where", help='A metadata filter, such as \'{"kind": "preference"}\' or \'{"n": {"$gt": 2}}\'.')
@click.option("--min-score", type=float, help="Leave out memories less similar than this (-1 to 1).")
@click.option("--stale", is_flag=True, help="Answer from this node's index at once (no read barrier).")
@output_option
@click.pass_context
def memory_recall(ctx, namespace, query, k, where, min_score, stale, as_json) -> None:
    """The memories of NAMESPACE nearest QUERY in meaning, best first."""
    where = _json_option(where, "--where")
    with client_from(ctx) as c:
        found = run_call(lambda: c.recall(namespace, query, k=k, where=where, min_score=min_score,
                                          consistency="stale" if stale else "linearizable"))
    listing(found, as_json, ("SCORE", "ID", "TEXT", "METADATA"),
            lambda m: (f"{m['score']:.3f}", m["id"], _clip(m["text"]), json.dumps(m["metadata"]) if m["metadata"] else "-"))


@memory.command("get")
@click.argument("namespace")
@click.argument("record_id", metavar="ID")
@click.pass_context
def memory_get(ctx, namespace, record_id) -> None:
    """One memory, as JSON."""
    with client_from(ctx) as c:
        print_json(run_call(lambda: c.memory(namespace, record_id)))


@memory.command("forget")
@click.argument("namespace")
@click.argument("record_id", metavar="ID")
@click.pass_context
def memory_forget(ctx, namespace, record_id) -> None:
    """Forget one memory, on every node and in every node's index."""
    with client_from(ctx) as c:
        answer = run_call(lambda: c.forget(namespace, record_id))
    click.echo(f"forgot {record_id}" if answer["deleted"] else f"{record_id} was not remembered")


@memory.command("list")
@click.argument("namespace")
@click.option("--prefix", default="", help="Only ids starting with this.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--start-after", help="The id to continue after (the previous page's last).")
@output_option
@click.pass_context
def memory_list(ctx, namespace, prefix, limit, start_after, as_json) -> None:
    """A namespace's memories in id order."""
    with client_from(ctx) as c:
        page = run_call(lambda: c.memories(namespace, prefix, limit, start_after))
    listing(page["items"], as_json, ("ID", "UPDATED", "EXPIRES", "TEXT"),
            lambda m: (m["id"], _when(m["updated_ms"]), _when(m["expires_ms"]), _clip(m["text"])))
    if page["next_start_after"] and not as_json:
        click.echo(f"(more: --start-after {page['next_start_after']})")
