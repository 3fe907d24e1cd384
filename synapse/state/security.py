"""Principals, roles and tokens: replicated records, and the one scope check both the API
(on the route) and the command processor (at apply time) run (synapse/security/DESIGN.md).

Pure and deterministic like the rest of ``synapse/state``: no clock (the proposer's time is in
the command, ``auth_ms``), no randomness (token accessors and secret hashes are made by the
proposer), no I/O.

Scopes, default deny, deny wins:

- ``kv:read:<prefix>``, ``kv:write:<prefix>``, ``memory:read:<namespace>``,
  ``memory:write:<namespace>``: a resource prefix (empty: everything of that kind);
- ``task:fs:<path>``: a file-system path and everything below it;
- ``task:submit``, ``task:network``, ``worker``, ``checkpoint``, ``rollback``,
  ``cluster:admin``, ``debug``, ``node`` (node-to-node calls): no resource;
- ``*``: everything (the root role).

A token grants a required scope when its own allow list, the allow list of one of its
principal's roles, and the allow list of every token above it (its parent chain) all cover
it, and no deny of any of them touches it. A token is live until it expires (the proposer's
clock, at apply) or is revoked — revoking a token revokes every token minted under it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Callable

from synapse.state import keys
from synapse.state.validation import CommandError, check_uint, short

# kind -> how its resource is matched: "prefix" (text prefix), "path" (a path and below), None
SCOPE_KINDS: dict[str, str | None] = {
    "kv:read": "prefix", "kv:write": "prefix", "memory:read": "prefix", "memory:write": "prefix",
    "task:fs": "path", "task:submit": None, "task:network": None, "worker": None, "checkpoint": None,
    "rollback": None, "cluster:admin": None, "debug": None, "node": None,
}
ALL = "*"
PRINCIPAL_KINDS = ("person", "agent", "worker", "node", "root")
ROOT = "root"  # the root principal, its role, and its token's accessor
MAX_NAME_CHARS = 128
MAX_SCOPES = 64
MAX_SCOPE_CHARS = 1200
MAX_CHAIN = 8  # tokens above a token, at most
SECRET_HASH_BYTES = 32


@dataclass(frozen=True)
class Scope:
    kind: str  # one of SCOPE_KINDS, or "*"
    resource: str = ""  # the prefix or path of "prefix" and "path" kinds
    range: bool = False  # a required scope over every resource under ``resource`` (a scan)

    def __str__(self) -> str:
        return self.kind if SCOPE_KINDS.get(self.kind) is None else f"{self.kind}:{self.resource}"


def parse_scope(text: Any, field: str = "scope") -> Scope:
    """A granted or denied scope. ``kv:read`` alone means ``kv:read:`` (every key)."""
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_SCOPE_CHARS:
        raise CommandError(field, f"{field}: expected a scope such as 'kv:read:app/' (text of at most "
                           f"{MAX_SCOPE_CHARS} characters), got {short(text)}")
    if text == ALL:
        return Scope(ALL)
    for kind, match in SCOPE_KINDS.items():
        if text == kind:
            return Scope(kind)
        if match is not None and text.startswith(kind + ":"):
            resource = text[len(kind) + 1:]
            if match == "path" and not resource.startswith("/"):
                raise CommandError(field, f"{field}: {text!r}: a task:fs scope names an absolute path, such as 'task:fs:/data/in'")
            return Scope(kind, resource)
    raise CommandError(field, f"{field}: {text!r} is not a scope; use one of {', '.join(_SCOPE_FORMS)}, or '*'")


_SCOPE_FORMS = [k + ":<prefix>" if m == "prefix" else k + ":<path>" if m == "path" else k for k, m in SCOPE_KINDS.items()]


def _covers(granted: Scope, required: Scope) -> bool:
    """Whether a granted scope allows every resource the required one names."""
    if granted.kind == ALL:
        return True
    if granted.kind != required.kind:
        return False
    match = SCOPE_KINDS[granted.kind]
    if match is None:
        return True
    if match == "path":
        base = granted.resource.rstrip("/")
        return required.resource == granted.resource or required.resource.startswith(base + "/") or base == ""
    return required.resource.startswith(granted.resource)


def _touches(denied: Scope, required: Scope) -> bool:
    """Whether a denied scope takes away any resource the required one names."""
    if denied.kind == ALL:
        return True
    if denied.kind != required.kind:
        return False
    if SCOPE_KINDS[denied.kind] is None or _covers(denied, required):
        return True
    # A scan of "a/" reaches "a/secret/...": a deny of "kv:read:a/secret/" takes part of it.
    return required.range and denied.resource.startswith(required.resource)


@dataclass(frozen=True)
class Grant:
    """What one token may do: every layer (the token, its principal's roles, each token above
    it) must allow a scope; a deny in any layer takes it away."""

    principal: str
    accessor: str
    layers: tuple[tuple[Scope, ...], ...]
    denies: tuple[Scope, ...]

    def missing(self, required: list[Scope]) -> Scope | None:
        """The first required scope this grant lacks (None: it has them all)."""
        for scope in required:
            if any(_touches(d, scope) for d in self.denies):
                return scope
            if not all(any(_covers(g, scope) for g in layer) for layer in self.layers):
                return scope
        return None


# --- records ------------------------------------------------------------------------------

def principal_key(name: str) -> bytes:
    return keys.SEC_PRINCIPAL + name.encode()


def role_key(name: str) -> bytes:
    return keys.SEC_ROLE + name.encode()


def token_key(accessor: str) -> bytes:
    return keys.SEC_TOKEN + accessor.encode()


def child_key(parent: str, child: str) -> bytes:
    return keys.SEC_CHILD + parent.encode() + b"\x00" + child.encode()


def _scopes(texts: list[str]) -> tuple[Scope, ...]:
    return tuple(parse_scope(t) for t in texts)


class _Parsed:
    """Records as the scope check needs them, by their exact bytes.

    A grant used to be rebuilt from the records for every command on every node and for
    every request on the route — three store reads, three msgpack decodes, each scope string
    parsed again: ~13 µs, about four times per write (the route, then apply on each of three
    nodes). The views below are pure functions of a record's bytes, so remembering them
    cannot make two nodes disagree and needs no invalidation: a changed record has other
    bytes. Bounded: cleared when full."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._views: dict[bytes, Any] = {}

    def view(self, raw: bytes, make: Callable[[dict[str, Any]], Any]) -> Any:
        found = self._views.get(raw)
        if found is None:
            if len(self._views) >= self.LIMIT:
                self._views.clear()
            found = self._views[raw] = make(keys.unpack(raw))
        return found


_PARSED = _Parsed()


def _token_view(token: dict[str, Any]) -> tuple:
    return (token["expires_ms"], token["principal"], _scopes(token["allow"]), _scopes(token["deny"]),
            token["parent"], token["hash"])


def _role_view(role: dict[str, Any]) -> tuple:
    return _scopes(role["allow"]), _scopes(role["deny"])


def _roles_of(principal: dict[str, Any]) -> tuple[str, ...]:
    return tuple(principal["roles"])


def grant_of(get: Callable[[bytes], bytes | None], accessor: str, now_ms: int) -> Grant | str:
    """The grant of the token ``accessor`` at ``now_ms``, or why it grants nothing (text):
    unknown or revoked, expired, a token above it gone or expired, its principal gone."""
    return _grant_until(get, accessor, now_ms)[0]


def _grant_until(get: Callable[[bytes], bytes | None], accessor: str,
                 now_ms: int) -> tuple[Grant | str, int | None]:
    """``grant_of``, and the first expiry on the token's chain (None: none expires): the
    same records give the same grant at any time before it."""
    layers: list[tuple[Scope, ...]] = []
    denies: list[Scope] = []
    principal = None
    soonest: int | None = None
    current, seen = accessor, 0
    while current is not None:
        raw = get(token_key(current))
        if raw is None:
            return ("unknown or revoked token" if current == accessor else f"token {current} above it was revoked"), None
        expires_ms, owner, allow, deny, parent, _ = _PARSED.view(raw, _token_view)
        if expires_ms is not None and now_ms >= expires_ms:
            return ("the token expired" if current == accessor else f"token {current} above it expired"), None
        if expires_ms is not None and (soonest is None or expires_ms < soonest):
            soonest = expires_ms
        if principal is None:
            principal = owner
        layers.append(allow)
        denies.extend(deny)
        current, seen = parent, seen + 1
        if seen > MAX_CHAIN + 1:
            return "the token's chain is too long", None
    raw = get(principal_key(principal))
    if raw is None:
        return f"its principal {principal!r} was deleted", None
    role_allows: list[Scope] = []
    for role in _PARSED.view(raw, _roles_of):
        raw_role = get(role_key(role))
        if raw_role is not None:
            allow, deny = _PARSED.view(raw_role, _role_view)
            role_allows.extend(allow)
            denies.extend(deny)
    layers.append(tuple(role_allows))
    return Grant(principal, accessor, tuple(layers), tuple(denies)), soonest


def authenticate(get: Callable[[bytes], bytes | None], accessor: str, secret_hash: bytes,
                 now_ms: int) -> Grant | str:
    """The grant of the token ``accessor`` presented with a secret hashing to ``secret_hash``
    at ``now_ms``, or why it is refused (text; the same for a wrong secret as for an unknown
    token, so a caller learns nothing about which accessors exist)."""
    raw = get(token_key(accessor))
    if raw is None or not hmac.compare_digest(_PARSED.view(raw, _token_view)[5], secret_hash):
        return "unknown or revoked token"
    return grant_of(get, accessor, now_ms)


def bootstrapped(get: Callable[[bytes], bytes | None]) -> bool:
    """Whether the root principal exists yet (the first start proposes it)."""
    return get(principal_key(ROOT)) is not None


# --- what a command needs ------------------------------------------------------------------

def _kv(kind: str, key: str, scan: bool = False) -> Scope:
    return Scope(kind, key, scan)


def required_scopes(command: dict[str, Any]) -> list[Scope]:
    """The scopes a (valid) command needs from the token that sent it."""
    op = command["op"]
    if op in ("put", "delete"):
        return [_kv("kv:write", command["key"])]
    if op == "txn":
        out = [_kv("kv:read", c["key"]) for c in command.get("if", [])]
        for branch in ("then", "else"):
            for t in command.get(branch, []):
                out.append(_kv("kv:read" if t["op"] == "get" else "kv:write", t["key"]))
        return out
    if op == "task_submit":
        caps = command["spec"].get("capabilities") or {}
        out = [Scope("task:submit")]
        if caps.get("network"):
            out.append(Scope("task:network"))
        for path in [*caps.get("read_paths", []), *caps.get("write_paths", [])]:
            out.append(Scope("task:fs", path))
        return out
    if op == "task_cancel":
        return [Scope("task:submit")]
    if op in ("worker_register", "task_start", "task_finish", "worker_down"):
        return [Scope("worker")]
    if op in ("checkpoint", "rollback"):
        return [Scope(op)]
    if op in ("mem_put", "mem_delete"):
        return [Scope("memory:write", command["ns"])]
    if op in ("noop",):
        return []
    if op in ("register_node", "unregister_node", *SECURITY_ADMIN_OPS):
        return [Scope("cluster:admin")]
    if op in ("token_create", "token_revoke"):
        return []  # decided by the op itself: its own tokens and its agents', or cluster:admin
    return [Scope("cluster:admin")]  # anything else a token may send: the nodes' own ops


def authorize(get: Callable[[bytes], bytes | None], command: dict[str, Any],
              grants: dict[str, tuple[Grant, int | None]] | None = None) -> dict[str, Any] | None:
    """None if the command may be applied, else its refusal (the same on every node). A
    command without ``auth`` comes from a node itself (checkpoint reports, the scheduler's
    assignments): the API attaches the sender's token to everything it proposes.

    ``grants`` remembers the grants found, with their chains' first expiry, for the commands
    after this one while the records they came from cannot change: the caller empties it
    before anything that may write principals, roles or tokens. Only grants are kept, never
    refusals."""
    accessor = command.get("auth")
    if accessor is None:
        return None
    now_ms = command["auth_ms"]
    known = grants.get(accessor) if grants is not None else None
    if known is not None and (known[1] is None or now_ms < known[1]):
        grant: Grant | str = known[0]
    else:
        grant, until = _grant_until(get, accessor, now_ms)
        if grants is not None and not isinstance(grant, str):
            grants[accessor] = (grant, until)
    if isinstance(grant, str):
        return {"ok": False, "error": "unauthorized", "message": f"token {accessor}: {grant}"}
    missing = grant.missing(required_scopes(command))
    if missing is not None:
        return forbidden(missing)
    return None


def forbidden(scope: Scope) -> dict[str, Any]:
    return {"ok": False, "error": "forbidden", "scope": str(scope),
            "message": f"the token lacks the scope {str(scope)!r}; ask an administrator for a token with it"}


# --- the ops -------------------------------------------------------------------------------

SECURITY_ADMIN_OPS = ("principal_put", "principal_delete", "role_put", "role_delete")
SECURITY_OPS = (*SECURITY_ADMIN_OPS, "token_create", "token_revoke", "security_bootstrap")
_AUTH = ("auth", "auth_ms")
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "principal_put": (("name", "kind", "roles", "now_ms"), ("owner", "rid", *_AUTH)),
    "principal_delete": (("name",), ("rid", *_AUTH)),
    "role_put": (("name", "allow"), ("deny", "rid", *_AUTH)),
    "role_delete": (("name",), ("rid", *_AUTH)),
    "token_create": (("accessor", "secret_hash", "principal", "allow", "now_ms"),
                     ("deny", "expires_ms", "label", "rid", *_AUTH)),
    "token_revoke": (("accessor",), ("rid", *_AUTH)),
    # The first start: the root principal, role and token (idempotent: once only).
    "security_bootstrap": (("secret_hash", "now_ms"), ("rid",)),
}


def check_name(name: Any, field: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable() or "\x00" in name:
        raise CommandError(field, f"{field}: expected a name of 1 to {MAX_NAME_CHARS} printable characters, got {short(name)}")


def _check_scope_list(value: Any, field: str) -> None:
    if not isinstance(value, list) or len(value) > MAX_SCOPES:
        raise CommandError(field, f"{field}: expected a list of at most {MAX_SCOPES} scopes")
    for i, text in enumerate(value):
        parse_scope(text, f"{field}[{i}]")


def check_command(op: str, c: dict[str, Any]) -> None:
    """Field checks of the security ops (``auth`` on any op: ``check_auth``)."""
    if "now_ms" in c:
        check_uint(c["now_ms"], "now_ms", "send milliseconds since the Unix epoch")
    for name in ("name", "principal", "accessor", "owner"):
        if c.get(name) is not None:
            check_name(c[name], name)
    if op == "principal_put":
        if c["kind"] not in PRINCIPAL_KINDS or c["kind"] == ROOT:
            raise CommandError("kind", f"kind: expected one of {', '.join(k for k in PRINCIPAL_KINDS if k != ROOT)}")
        if not isinstance(c["roles"], list) or len(c["roles"]) > MAX_SCOPES:
            raise CommandError("roles", f"roles: expected a list of at most {MAX_SCOPES} role names")
        for i, role in enumerate(c["roles"]):
            check_name(role, f"roles[{i}]")
    if op in ("role_put", "token_create"):
        _check_scope_list(c["allow"], "allow")
        _check_scope_list(c.get("deny", []), "deny")
    if op in ("token_create", "security_bootstrap"):
        if not isinstance(c["secret_hash"], bytes) or len(c["secret_hash"]) != SECRET_HASH_BYTES:
            raise CommandError("secret_hash", f"secret_hash: expected {SECRET_HASH_BYTES} bytes")
    if op == "token_create":
        if c.get("expires_ms") is not None:
            check_uint(c["expires_ms"], "expires_ms", "send milliseconds since the Unix epoch")
        if c.get("label") is not None and not (isinstance(c["label"], str) and len(c["label"]) <= MAX_NAME_CHARS):
            raise CommandError("label", f"label: expected text of at most {MAX_NAME_CHARS} characters")


def check_auth(c: dict[str, Any]) -> None:
    """``auth`` (a token accessor) and ``auth_ms`` (the proposer's clock) come together."""
    if ("auth" in c) != ("auth_ms" in c):
        raise CommandError("auth", "auth: the token accessor and auth_ms (the proposer's clock) come together")
    if "auth" in c:
        check_name(c["auth"], "auth")
        check_uint(c["auth_ms"], "auth_ms", "send milliseconds since the Unix epoch")


class SecurityOps:
    """The security ops of one entry, over its overlay ``w`` (get / set / scan)."""

    def __init__(self, writes, index: int) -> None:
        self.w, self.index = writes, index

    def _get(self, key: bytes) -> Any:
        raw = self.w.get(key)
        return None if raw is None else keys.unpack(raw)

    def bootstrap(self, c: dict) -> dict:
        if self.w.get(principal_key(ROOT)) is not None:
            return {"ok": True, "created": False, "index": self.index}
        self.w.set(role_key(ROOT), keys.pack({"allow": [ALL], "deny": []}))
        self.w.set(principal_key(ROOT), keys.pack({"kind": ROOT, "roles": [ROOT], "owner": None,
                                                   "created_ms": c["now_ms"], "by": None}))
        self.w.set(token_key(ROOT), keys.pack({
            "hash": c["secret_hash"], "principal": ROOT, "allow": [ALL], "deny": [], "expires_ms": None,
            "parent": None, "created_ms": c["now_ms"], "label": "root",
        }))
        return {"ok": True, "created": True, "index": self.index}

    def principal_put(self, c: dict) -> dict:
        name = c["name"]
        if name == ROOT:
            return _refused("name", "the root principal cannot be changed")
        if c.get("owner") is not None and self.w.get(principal_key(c["owner"])) is None:
            return _refused("owner", f"no principal {c['owner']!r}; create it first")
        old = self._get(principal_key(name))
        self.w.set(principal_key(name), keys.pack({
            "kind": c["kind"], "roles": list(dict.fromkeys(c["roles"])), "owner": c.get("owner"),
            "created_ms": old["created_ms"] if old else c["now_ms"], "by": c.get("auth"),
        }))
        return {"ok": True, "name": name, "created": old is None, "index": self.index}

    def principal_delete(self, c: dict) -> dict:
        name = c["name"]
        if name == ROOT:
            return _refused("name", "the root principal cannot be deleted")
        if self.w.get(principal_key(name)) is None:
            return {"ok": False, "error": "unknown_principal", "message": f"name: no principal {name!r}"}
        self.w.set(principal_key(name), None)
        revoked = [a for a, t in self._tokens() if t["principal"] == name]
        count = sum(self._revoke(a) for a in revoked)
        return {"ok": True, "name": name, "tokens_revoked": count, "index": self.index}

    def role_put(self, c: dict) -> dict:
        if c["name"] == ROOT:
            return _refused("name", "the root role cannot be changed")
        created = self.w.get(role_key(c["name"])) is None
        self.w.set(role_key(c["name"]), keys.pack({"allow": list(c["allow"]), "deny": list(c.get("deny", []))}))
        return {"ok": True, "name": c["name"], "created": created, "index": self.index}

    def role_delete(self, c: dict) -> dict:
        if c["name"] == ROOT:
            return _refused("name", "the root role cannot be deleted")
        if self.w.get(role_key(c["name"])) is None:
            return {"ok": False, "error": "unknown_role", "message": f"name: no role {c['name']!r}"}
        self.w.set(role_key(c["name"]), None)
        return {"ok": True, "name": c["name"], "index": self.index}

    def token_create(self, c: dict) -> dict:
        """A token for ``principal``: its own (the sender's principal or one it owns, no wider
        than the sending token — which becomes its parent) or, with cluster:admin, anyone's."""
        accessor, principal = c["accessor"], c["principal"]
        if self.w.get(token_key(accessor)) is not None:
            return _refused("accessor", f"a token {accessor!r} exists already; mint it with a new accessor")
        target = self._get(principal_key(principal))
        if target is None:
            return {"ok": False, "error": "unknown_principal", "message": f"principal: no principal {principal!r}"}
        parent = c.get("auth")
        if parent is not None:
            grant = grant_of(self.w.get, parent, c["auth_ms"])
            if isinstance(grant, str):
                return {"ok": False, "error": "unauthorized", "message": f"token {parent}: {grant}"}
            admin = grant.missing([Scope("cluster:admin")]) is None
            if not admin and principal != grant.principal and target.get("owner") != grant.principal:
                return forbidden(Scope("cluster:admin"))
            # Never wider than the sender: every allowed scope, taken whole, within its grant.
            for text in c["allow"]:
                scope = parse_scope(text)
                wide = Scope(scope.kind, scope.resource, range=True)
                if grant.missing([wide]) is not None:
                    return {"ok": False, "error": "forbidden", "scope": text,
                            "message": f"allow: {text!r} is wider than the token minting it; ask for narrower scopes"}
            if not admin or principal == grant.principal or target.get("owner") == grant.principal:
                self.w.set(child_key(parent, accessor), b"")
            else:
                parent = None  # an administrator's token for someone else: a root of its own
        self.w.set(token_key(accessor), keys.pack({
            "hash": c["secret_hash"], "principal": principal, "allow": list(c["allow"]),
            "deny": list(c.get("deny", [])), "expires_ms": c.get("expires_ms"), "parent": parent,
            "created_ms": c["now_ms"], "label": c.get("label"),
        }))
        return {"ok": True, "accessor": accessor, "principal": principal, "parent": parent, "index": self.index}

    def token_revoke(self, c: dict) -> dict:
        """A token and every token minted under it. The sender may revoke its own token, the
        tokens below it and its agents' tokens; with cluster:admin, any token."""
        accessor = c["accessor"]
        token = self._get(token_key(accessor))
        if token is None:
            return {"ok": False, "error": "unknown_token", "message": f"accessor: no live token {accessor!r}"}
        if accessor == ROOT:
            return _refused("accessor", "the root token cannot be revoked; rotate it with a new --root-token-file")
        sender = c.get("auth")
        if sender is not None:
            grant = grant_of(self.w.get, sender, c["auth_ms"])
            if isinstance(grant, str):
                return {"ok": False, "error": "unauthorized", "message": f"token {sender}: {grant}"}
            owner = self._get(principal_key(token["principal"]))
            mine = token["principal"] == grant.principal or (owner or {}).get("owner") == grant.principal
            if grant.missing([Scope("cluster:admin")]) is not None and not mine and not self._below(accessor, sender):
                return forbidden(Scope("cluster:admin"))
        return {"ok": True, "accessor": accessor, "revoked": self._revoke(accessor), "index": self.index}

    def _below(self, accessor: str, ancestor: str) -> bool:
        current = accessor
        for _ in range(MAX_CHAIN + 2):
            token = self._get(token_key(current))
            if token is None or token["parent"] is None:
                return False
            if token["parent"] == ancestor:
                return True
            current = token["parent"]
        return False

    def _revoke(self, accessor: str) -> int:
        """Deletes the token and, depth first, every token under it; returns how many."""
        count = 0
        stack = [accessor]
        while stack:
            current = stack.pop()
            if self.w.get(token_key(current)) is None:
                continue
            self.w.set(token_key(current), None)
            count += 1
            prefix = keys.SEC_CHILD + current.encode() + b"\x00"
            for key, _ in self.w.scan(prefix):
                self.w.set(key, None)
                stack.append(key[len(prefix):].decode())
        return count

    def _tokens(self) -> list[tuple[str, dict]]:
        return [(k[len(keys.SEC_TOKEN):].decode(), keys.unpack(v)) for k, v in self.w.scan(keys.SEC_TOKEN)]


def _refused(field: str, message: str) -> dict:
    return {"ok": False, "error": "refused", "message": f"{field}: {message}"}


# op -> the SecurityOps method that applies it
OPS: dict[str, Callable[["SecurityOps", dict], dict]] = {
    "security_bootstrap": SecurityOps.bootstrap, "principal_put": SecurityOps.principal_put,
    "principal_delete": SecurityOps.principal_delete, "role_put": SecurityOps.role_put,
    "role_delete": SecurityOps.role_delete, "token_create": SecurityOps.token_create,
    "token_revoke": SecurityOps.token_revoke,
}

