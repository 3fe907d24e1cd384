"""``synapse principal``, ``synapse role`` and ``synapse token``: who may do what
(synapse/security/DESIGN.md). Every change goes through the log; lists never show secrets."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from synapse.cli.common import ClientGroup, output_option, client_from, client_options, listing, print_json, run_call

_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def _ttl_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    m = _TTL.match(value.strip())
    if not m:
        raise click.BadParameter(f"{value!r}: give seconds, or a number with s, m, h or d (e.g. 90s, 15m, 12h, 30d)",
                                 param_hint="--ttl")
    return float(m.group(1)) * _TTL_UNITS[m.group(2)]


def _when(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


@click.group(cls=ClientGroup)
@client_options
def principal(**_connection) -> None:
    """People, agents, workers and nodes that tokens belong to (needs cluster:admin)."""


@principal.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(["person", "agent", "worker", "node"]), default="person", show_default=True)
@click.option("--role", "roles", multiple=True, help="A role to give it (repeat for more).")
@click.option("--owner", help="The principal that may mint tokens for this one (an agent's person).")
@click.pass_context
def principal_create(ctx, name, kind, roles, owner) -> None:
    """Create (or change) a principal."""
    with client_from(ctx) as c:
        r = run_call(lambda: c.put_principal(name, kind, list(roles), owner))
    click.echo(f"principal {name} {'created' if r['created'] else 'changed'}")


@principal.command("list")
@output_option
@click.pass_context
def principal_list(ctx, as_json) -> None:
    """Every principal with its kind, roles and owner."""
    with client_from(ctx) as c:
        rows = run_call(c.principals)
    listing(rows, as_json, ("NAME", "KIND", "ROLES", "OWNER", "CREATED"), lambda p: (
        p["name"], p["kind"], ",".join(p["roles"]) or "-", p["owner"] or "-", _when(p["created_ms"])))


@principal.command("delete")
@click.argument("name")
@click.pass_context
def principal_delete(ctx, name) -> None:
    """Delete a principal and revoke its tokens."""
    with client_from(ctx) as c:
        r = run_call(lambda: c.delete_principal(name))
    click.echo(f"principal {name} deleted; {r['tokens_revoked']} token(s) revoked")


@click.group(cls=ClientGroup)
@client_options
def role(**_connection) -> None:
    """Bundles of scopes given to principals; deny wins (needs cluster:admin)."""


@role.command("create")
@click.argument("name")
@click.option("--allow", multiple=True, required=True, help="A scope it grants, e.g. kv:read:app/ (repeat for more).")
@click.option("--deny", multiple=True, help="A scope it takes away, whatever else grants it (repeat for more).")
@click.pass_context
def role_create(ctx, name, allow, deny) -> None:
    """Create (or change) a role."""
    with client_from(ctx) as c:
        r = run_call(lambda: c.put_role(name, list(allow), list(deny)))
    click.echo(f"role {name} {'created' if r['created'] else 'changed'}")


@role.command("list")
@output_option
@click.pass_context
def role_list(ctx, as_json) -> None:
    """Every role with the scopes it allows and denies."""
    with client_from(ctx) as c:
        rows = run_call(c.roles)
    listing(rows, as_json, ("NAME", "ALLOW", "DENY"), lambda r: (r["name"], " ".join(r["allow"]), " ".join(r["deny"]) or "-"))


@role.command("delete")
@click.argument("name")
@click.pass_context
def role_delete(ctx, name) -> None:
    """Delete a role."""
    with client_from(ctx) as c:
        run_call(lambda: c.delete_role(name))
    click.echo(f"role {name} deleted")


@click.group(cls=ClientGroup)
@client_options
def token(**_connection) -> None:
    """Tokens: an accessor (public) and a secret (shown once)."""


@token.command("create")
@click.option("--scope", "scopes", multiple=True, required=True, help="A scope the token has (repeat for more).")
@click.option("--deny", multiple=True, help="A scope it must never have (repeat for more).")
@click.option("--principal", "for_principal", help="Whose token (default: yours; another needs cluster:admin or ownership).")
@click.option("--ttl", help="Lifetime: seconds, or with s, m, h, d (default: until revoked).")
@click.option("--label", help="A note shown in lists.")
@output_option
@click.pass_context
def token_create(ctx, scopes, deny, for_principal, ttl, label, as_json) -> None:
    """Mint a token, never wider than the one you use; its secret is printed once."""
    seconds = _ttl_seconds(ttl)
    with client_from(ctx) as c:
        r = run_call(lambda: c.create_token(list(scopes), for_principal, seconds, list(deny), label))
    if as_json:
        print_json(r)
        return
    click.echo(r["token"])
    click.echo(f"(accessor {r['accessor']}, principal {r['principal']}, expires {_when(r['expires_ms'])}; "
               "the secret is shown only now)", err=True)


@token.command("list")
@output_option
@click.pass_context
def token_list(ctx, as_json) -> None:
    """Tokens by accessor, never secrets: yours and your agents' (all with cluster:admin)."""
    with client_from(ctx) as c:
        rows = run_call(c.tokens)
    listing(rows, as_json, ("ACCESSOR", "PRINCIPAL", "SCOPES", "EXPIRES", "PARENT", "LABEL"), lambda t: (
        t["accessor"], t["principal"], " ".join(t["scopes"]), _when(t["expires_ms"]), t["parent"] or "-",
        t["label"] or "-"))


@token.command("revoke")
@click.argument("accessor")
@click.pass_context
def token_revoke(ctx, accessor) -> None:
    """Revoke a token and every token minted under it."""
    with client_from(ctx) as c:
        r = run_call(lambda: c.revoke_token(accessor))
    late = f"; not yet confirmed by {', '.join(r['nodes_not_confirmed'])}" if r.get("nodes_not_confirmed") else ""
    click.echo(f"revoked {r['revoked']} token(s){late}")


@token.command("whoami")
@click.pass_context
def token_whoami(ctx) -> None:
    """The principal and token you are using."""
    with client_from(ctx) as c:
        print_json(run_call(c.whoami))


@click.group()
def tls() -> None:
    """Certificates for HTTPS between clients and nodes."""


@tls.command("init")
@click.option("--nodes", required=True, help="Node ids, comma-separated (one certificate and key each).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for ca.crt, ca.key and NODE.crt/NODE.key.")
@click.option("--host", "hosts", multiple=True, help="A host name or IP address the nodes are reached at, besides localhost and 127.0.0.1 (repeatable).")
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True, help="Validity of the node certificates.")
def tls_init(nodes, out, hosts, days) -> None:
    """Make a cluster CA (kept if OUT already has one) and a certificate per node."""
    from synapse.config import ConfigError, check_node_id
    from synapse.security.tls import CA_CERT, CA_KEY, init_certificates

    try:
        ids = [check_node_id("--nodes", n.strip()) for n in nodes.split(",") if n.strip()]
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if not ids:
        raise click.UsageError("--nodes: give at least one node id, e.g. --nodes n1,n2,n3")
    init_certificates(out, ids, list(hosts), days)
    click.echo(f"CA: {out / CA_CERT} (its key {out / CA_KEY} signs node certificates: keep it off the nodes)")
    for n in ids:
        click.echo(f"{n}: --tls-cert {out / f'{n}.crt'} --tls-key {out / f'{n}.key'}")
    click.echo(f"every node and client: --tls-ca {out / CA_CERT}  (and --tls-client-ca {out / CA_CERT} on "
               "the nodes to require client certificates)")
