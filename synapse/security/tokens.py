"""Token strings: ``<accessor>.<secret>``. The accessor is public (it names the token in
lists, logs and revocations); only a SHA-256 of the secret is stored, in the replicated
state (synapse/state/security.py). Secrets carry 256 random bits, so a plain hash is enough
— there is nothing to guess that a slow hash would protect."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

ROOT = "root"


@dataclass(frozen=True)
class TokenString:
    accessor: str
    secret: str

    def __str__(self) -> str:
        return f"{self.accessor}.{self.secret}"

    @property
    def secret_hash(self) -> bytes:
        return secret_hash(self.secret)


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def mint(accessor: str | None = None) -> TokenString:
    """A new token: a random accessor (unless given) and a random secret."""
    return TokenString(accessor or secrets.token_hex(8), secrets.token_urlsafe(32))


def parse(value: str) -> TokenString | None:
    """The token in a bearer value, or None if it is not one. A value without a dot is the
    root token's secret alone (the form root tokens had before principals existed)."""
    value = value.strip()
    if not value or len(value) > 512 or not value.isascii():
        return None
    accessor, dot, secret = value.rpartition(".")
    if not dot:
        return TokenString(ROOT, value)
    if not accessor or not secret:
        return None
    return TokenString(accessor, secret)


def matches(token: TokenString, stored_hash: bytes) -> bool:
    return hmac.compare_digest(token.secret_hash, stored_hash)


def derived_root(cluster_secret: str) -> TokenString:
    """The root token of a cluster with a secret: the same on every node, never stored."""
    return TokenString(ROOT, hmac.new(cluster_secret.encode(), b"synapse root token v1", hashlib.sha256).hexdigest())
