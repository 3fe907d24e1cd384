"""What the client commands share: the connection options, the client they make, printing,
and turning API errors into clean command-line errors."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click

from synapse.client import Client, ConflictError, SynapseError


_GIVEN = "synapse.client_options"  # ctx.meta key (meta is shared by a command's contexts)


def option_value(ctx: click.Context, name: str):
    """The value of a client option, given on the command (``synapse kv get K --url ...``)
    or on its group (``synapse kv --url ... get K``)."""
    given = ctx.meta.get(_GIVEN, {}).get(name)
    if given is not None:
        return given
    while ctx is not None:
        if ctx.params.get(name) is not None:
            return ctx.params[name]
        ctx = ctx.parent
    return None


def client_from(ctx: click.Context) -> Client:
    url = option_value(ctx, "url") or os.environ.get("SYNAPSE_URL") or "http://127.0.0.1:7070"
    token = option_value(ctx, "token") or os.environ.get("SYNAPSE_TOKEN")
    if not token:
        token_file = Path(option_value(ctx, "token_file") or os.environ.get("SYNAPSE_TOKEN_FILE") or "synapse-data/root.token")
        try:
            token = token_file.read_text().strip()
        except OSError:
            raise click.UsageError(
                f"no token: pass --token, set SYNAPSE_TOKEN, or --token-file (tried {token_file})"
            ) from None
    tls = {name: option_value(ctx, name) or os.environ.get("SYNAPSE_" + name.upper())
           for name in ("tls_ca", "tls_cert", "tls_key")}
    try:
        return Client(url, token, **tls)
    except ValueError as e:  # TlsError: a missing or unusable TLS file, named
        raise click.UsageError(str(e)) from None


_CLIENT_OPTIONS = (
    ("--token-file", "File holding the API token (default ./synapse-data/root.token)."),
    ("--token", "API token (default $SYNAPSE_TOKEN)."),
    ("--url", "A node's API URL (default $SYNAPSE_URL or http://127.0.0.1:7070)."),
    ("--tls-ca", "Verify https:// nodes against this CA certificate (default $SYNAPSE_TLS_CA)."),
    ("--tls-cert", "Client certificate for nodes that require one (default $SYNAPSE_TLS_CERT)."),
    ("--tls-key", "The key of --tls-cert (default $SYNAPSE_TLS_KEY)."),
)


def client_options(f):
    """The connection options, on a group of commands that talk to a node."""
    for flag, text in reversed(_CLIENT_OPTIONS):
        f = click.option(flag, help=text)(f)
    return f


def _given(ctx: click.Context, param: click.Parameter, value):
    if value is not None:
        ctx.meta.setdefault(_GIVEN, {})[param.name] = value
    return value


class LocalCommand(click.Command):
    """A command of a ClientGroup that works on local files only: no connection options."""


class ClientGroup(click.Group):
    """A group whose commands talk to a node: the connection options work before the
    subcommand (on the group, ``client_options``) and after it (added to each command here,
    but a LocalCommand)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if isinstance(cmd, LocalCommand):
            return super().add_command(cmd, name)
        names = {p.name for p in cmd.params}
        for flag, text in _CLIENT_OPTIONS:
            option = click.Option([flag], help=text, expose_value=False, callback=_given)
            if option.name not in names:
                cmd.params.append(option)
        super().add_command(cmd, name)


def run_call(fn):
    try:
        return fn()
    except ConflictError as e:
        raise click.ClickException(f"conflict: {e.body.get('message')} (current version {e.current_version})") from None
    except SynapseError as e:
        raise click.ClickException(str(e)) from None


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def output_option(f):
    """``--output table|json`` (``-o``; ``--json`` is short for ``--output json``): a table for
    people by default, JSON for scripts. The command gets ``as_json``."""
    @functools.wraps(f)
    def command(*args, output: str, json_flag: bool, **kwargs):
        return f(*args, as_json=output == "json" or json_flag, **kwargs)

    command = click.option("--json", "json_flag", is_flag=True, help="Short for --output json.")(command)
    return click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True,
                        help="table for people, json for scripts.")(command)


def listing(rows: list[dict], as_json: bool, header: tuple[str, ...], row) -> None:
    """A list command's output: the rows as JSON, or a table of ``row(item)`` under ``header``."""
    if as_json:
        print_json(rows)
    else:
        table([header] + [row(item) for item in rows])
