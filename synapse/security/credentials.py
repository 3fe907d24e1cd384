"""A node's own credentials: the root token it bootstraps, and the tokens it and its embedded
worker use (never the root token) — each a record in the replicated state like every other
token (synapse/security/DESIGN.md).

- The root token: from ``--root-token-file``; else, in a cluster, derived from the cluster
  secret (every node derives the same one); else generated once and kept in the data dir.
  The first start proposes ``security_bootstrap`` with its hash; once any node's lands, the
  others' change nothing.
- The node's token (principal ``node:<id>``, role ``node``: the node-to-node routes of repair
  and catch-up) and the embedded worker's (principal ``worker:<id>``, role ``worker``): made
  once, kept in the data dir (``node.token``, ``worker.token``), their records proposed by the
  node itself at start — again whenever the record is missing or holds another secret (a data
  dir restored from elsewhere).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from synapse.security import tokens
from synapse.security.tokens import TokenString
from synapse.state import keys
from synapse.state.security import ROOT, principal_key, role_key, token_key

ROOT_TOKEN_FILE = "root.token"
NODE_TOKEN_FILE = "node.token"
WORKER_TOKEN_FILE = "worker.token"
MIN_ROOT_SECRET = 16


class CredentialError(ValueError):
    """A token file cannot be used; the message names it and the fix."""


def root_token(data_dir: Path, cluster_secret: str | None, token_file: Path | None,
               multi_node: bool) -> tuple[TokenString, bool]:
    """(the root token, whether it was just created and should be shown once)."""
    if token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as e:
            raise CredentialError(f"--root-token-file: cannot read {token_file}: {e.strerror}") from e
        token = tokens.parse(text)
        if token is None or token.accessor != tokens.ROOT or len(token.secret) < MIN_ROOT_SECRET:
            raise CredentialError(f"--root-token-file: {token_file} must hold a root token (its secret alone, or "
                                  f"root.<secret>) with a secret of at least {MIN_ROOT_SECRET} characters")
        return token, False
    path = data_dir / ROOT_TOKEN_FILE
    if cluster_secret is not None:
        token = tokens.derived_root(cluster_secret)
        created = not path.exists()
        if created:
            write_private(path, f"{token}\n")
        return token, created
    if multi_node:
        raise CredentialError("a cluster without a secret needs --root-token-file (the same file on every node)")
    if path.exists():
        token = tokens.parse(path.read_text())
        if token is None:
            raise CredentialError(f"{path} does not hold a token; remove it to make a new root token")
        return token, False
    token = tokens.mint(tokens.ROOT)
    write_private(path, f"{token}\n")
    return token, True


def own_token(data_dir: Path, file_name: str, accessor: str) -> TokenString:
    """A token of this node's kept in its data dir, made the first time."""
    path = data_dir / file_name
    if path.exists():
        token = tokens.parse(path.read_text())
        if token is not None and token.accessor == accessor:
            return token
    token = tokens.mint(accessor)
    write_private(path, f"{token}\n")
    return token


def node_accessor(node_id: str) -> str:
    return f"node-{node_id}"


def worker_accessor(node_id: str) -> str:
    return f"worker-{node_id}"


Propose = Callable[[dict, int], Awaitable[dict]]
Read = Callable[[Callable[[Any], Any]], Any]


async def ensure(propose: Propose, read: Read, root: TokenString, node_id: str,
                 own: list[tuple[str, TokenString]]) -> None:
    """Bootstraps the root principal if no node has yet, then makes sure each of this node's
    own tokens — ``(role, token)``: the role is both the token's scope and its principal's
    role — has its record. Proposed as the node itself (no token): these are its own commands.
    Call after a read barrier."""
    now = int(time.time() * 1000)

    async def run(command: dict, size_hint: int) -> None:
        result = await propose(command, size_hint)
        if not result.get("ok"):
            raise CredentialError(f"{command['op']} for node {node_id} was refused: {result.get('message')}")

    # Each change only when missing: a restarted node must leave the state (and its hash) as
    # it found it. The ops are idempotent, so a retry after an unknown outcome is safe too.
    if read(lambda p: p.store.get(principal_key(ROOT))) is None:
        await run({"op": "security_bootstrap", "secret_hash": root.secret_hash, "now_ms": now}, 128)
    for role, token in own:
        principal = f"{role}:{node_id}"
        have = read(lambda p: (p.store.get(role_key(role)), p.store.get(principal_key(principal)),
                               p.store.get(token_key(token.accessor))))
        if have[0] is None:
            await run({"op": "role_put", "name": role, "allow": [role], "deny": []}, 128)
        if have[1] is None:
            await run({"op": "principal_put", "name": principal, "kind": role, "roles": [role],
                           "now_ms": now}, 128)
        if have[2] is not None and tokens.matches(token, keys.unpack(have[2])["hash"]):
            continue
        if have[2] is not None:
            await run({"op": "token_revoke", "accessor": token.accessor}, 128)
        await run({"op": "token_create", "accessor": token.accessor, "secret_hash": token.secret_hash,
                       "principal": principal, "allow": [role], "now_ms": now, "label": f"{role} {node_id}"}, 256)


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
