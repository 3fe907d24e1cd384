"""Principals, roles and tokens in the replicated state (synapse/state/security.py), through the
real command processor on the real Rust store: who may do what is decided at apply time from
the records, identically on every node — default deny, deny wins, a child token never wider
than its parent, revocation and expiry as of the entry that meets them."""

from __future__ import annotations

import hashlib

import pytest

from synapse._core import StateStore
from synapse.state import keys
from synapse.state.commands import CommandError, encode_entry, validate_command
from synapse.state.processor import CommandProcessor
from synapse.state.security import parse_scope


class Cluster:
    """One processor, an index counter, and the proposer's clock."""

    def __init__(self) -> None:
        self.p = CommandProcessor(StateStore())
        self.index = 0
        self.now = 1_000
        assert self.apply({"op": "security_bootstrap", "secret_hash": _hash("root-secret"), "now_ms": self.now})["created"]

    def apply(self, command: dict, token: str | None = None) -> dict:
        if token is not None:
            command = dict(command, auth=token, auth_ms=self.now)
        self.index += 1
        return self.p.apply_entry(self.index, encode_entry([command])).results[0]

    def role(self, name: str, allow: list[str], deny: list[str] = ()) -> None:
        assert self.apply({"op": "role_put", "name": name, "allow": allow, "deny": list(deny)}, "root")["ok"]

    def principal(self, name: str, roles: list[str], kind: str = "person", owner: str | None = None) -> None:
        command = {"op": "principal_put", "name": name, "kind": kind, "roles": roles, "now_ms": self.now}
        if owner is not None:
            command["owner"] = owner
        assert self.apply(command, "root")["ok"]

    def token(self, accessor: str, principal: str, allow: list[str], by: str = "root", **extra) -> dict:
        return self.apply({"op": "token_create", "accessor": accessor, "secret_hash": _hash(accessor),
                           "principal": principal, "allow": allow, "now_ms": self.now, **extra}, by)


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def put(key: str) -> dict:
    return {"op": "put", "key": key, "value": b"1"}


def get(key: str) -> dict:
    return {"op": "txn", "then": [{"op": "get", "key": key}]}


@pytest.fixture
def c() -> Cluster:
    return Cluster()


def test_bootstrap_once_and_root_may_do_everything(c):
    assert not c.apply({"op": "security_bootstrap", "secret_hash": _hash("other"), "now_ms": 2})["created"]
    assert keys.unpack(c.p.store.get(b"sec/t/root"))["hash"] == _hash("root-secret")
    assert c.apply(put("any/key"), "root")["ok"]
    assert c.apply({"op": "checkpoint"}, "root")["ok"]


def test_a_reader_reads_its_prefix_and_nothing_else(c):
    c.role("a-reader", ["kv:read:a/"])
    c.principal("alice", ["a-reader"])
    assert c.token("alice-1", "alice", ["kv:read:a/"])["ok"]
    assert c.apply(get("a/x"), "alice-1")["ok"]
    refused = c.apply(put("a/x"), "alice-1")
    assert (refused["error"], refused["scope"]) == ("forbidden", "kv:write:a/x")
    assert c.apply(get("b/x"), "alice-1")["scope"] == "kv:read:b/x"
    assert c.p.get("a/x") is None  # nothing was written


def test_both_the_token_and_the_role_must_allow(c):
    c.role("writer", ["kv:write:"])
    c.principal("bob", ["writer"])
    assert c.token("bob-1", "bob", ["kv:write:logs/"])["ok"]
    assert c.apply(put("logs/1"), "bob-1")["ok"]
    assert c.apply(put("other/1"), "bob-1")["error"] == "forbidden"  # the token narrows the role


def test_deny_wins(c):
    c.role("writer", ["kv:write:", "kv:read:"], deny=["kv:write:secret/", "kv:read:secret/"])
    c.principal("carol", ["writer"])
    c.token("carol-1", "carol", ["*"])
    assert c.apply(put("public/1"), "carol-1")["ok"]
    assert c.apply(put("secret/1"), "carol-1")["scope"] == "kv:write:secret/1"
    # A read of a range that reaches into a denied one is refused as a whole.
    from synapse.state.security import Scope, grant_of

    grant = grant_of(c.p.store.get, "carol-1", c.now)
    assert grant.missing([Scope("kv:read", "", range=True)]) is not None
    assert grant.missing([Scope("kv:read", "public/", range=True)]) is None


def test_a_child_token_is_never_wider_than_its_parent_and_dies_with_it(c):
    c.role("a-all", ["kv:read:a/", "kv:write:a/"])
    c.principal("dave", ["a-all"])
    c.principal("dave-agent", ["a-all"], kind="agent", owner="dave")
    assert c.token("dave-1", "dave", ["kv:read:a/", "kv:write:a/"])["ok"]
    wider = c.token("agent-wide", "dave-agent", ["kv:write:"], by="dave-1")
    assert wider["error"] == "forbidden" and wider["scope"] == "kv:write:"
    assert c.token("agent-1", "dave-agent", ["kv:write:a/tmp/"], by="dave-1")["parent"] == "dave-1"
    assert c.apply(put("a/tmp/x"), "agent-1")["ok"]
    assert c.apply(put("a/other"), "agent-1")["error"] == "forbidden"
    # Not an agent of dave's: only an administrator mints tokens for it.
    c.principal("erin", ["a-all"])
    assert c.token("erin-1", "erin", ["kv:read:a/"], by="dave-1")["scope"] == "cluster:admin"
    revoked = c.apply({"op": "token_revoke", "accessor": "dave-1"}, "root")
    assert revoked["revoked"] == 2  # the parent and its child
    assert c.apply(put("a/tmp/y"), "agent-1")["error"] == "unauthorized"


def test_expiry_is_the_proposers_clock_at_apply(c):
    c.role("w", ["kv:write:"])
    c.principal("fay", ["w"])
    c.token("fay-1", "fay", ["kv:write:"], expires_ms=c.now + 10)
    c.now += 9
    assert c.apply(put("k"), "fay-1")["ok"]
    c.now += 1
    refused = c.apply(put("k"), "fay-1")
    assert refused["error"] == "unauthorized" and "expired" in refused["message"]


def _one_entry(c: Cluster, *sent: tuple[dict, str, int]) -> list[dict]:
    """(command, token, the proposer's clock) in one entry: its commands share one run of the
    processor (txn and security ops keep it off the all-puts fast path)."""
    c.index += 1
    commands = [dict(command, auth=token, auth_ms=at) for command, token, at in sent]
    return c.p.apply_entry(c.index, encode_entry(commands)).results


def test_a_grant_found_by_one_command_of_an_entry_holds_for_the_next_only_while_it_is_true(c):
    # The processor remembers each token's grant for the rest of the entry: what the entry
    # itself changes, and the clock of each command, must still decide.
    c.role("rw", ["kv:read:", "kv:write:"])
    c.principal("hal", ["rw"])
    c.token("hal-1", "hal", ["kv:read:", "kv:write:"], expires_ms=c.now + 10)
    c.token("hal-2", "hal", ["kv:read:", "kv:write:"])
    t = c.now
    revoked = _one_entry(c, (put("a"), "hal-2", t), ({"op": "token_revoke", "accessor": "hal-2"}, "root", t),
                         (put("b"), "hal-2", t), (get("a"), "hal-1", t))
    assert [r.get("error") for r in revoked] == [None, None, "unauthorized", None]
    narrowed = _one_entry(c, (put("c"), "hal-1", t), ({"op": "role_put", "name": "rw", "allow": ["kv:read:"]}, "root", t),
                          (put("d"), "hal-1", t), (get("c"), "hal-1", t))
    assert [r.get("error") for r in narrowed] == [None, None, "forbidden", None]
    # A later command's clock past the token's expiry, an earlier one's before it, one entry.
    expired = _one_entry(c, (get("c"), "hal-1", t + 9), (get("c"), "hal-1", t + 10), (get("c"), "hal-1", t + 5))
    assert [r.get("error") for r in expired] == [None, "unauthorized", None]
    assert "expired" in expired[1]["message"]
    gone = _one_entry(c, (get("c"), "hal-1", t), ({"op": "principal_delete", "name": "hal"}, "root", t),
                      (get("c"), "hal-1", t))
    assert [r.get("error") for r in gone] == [None, None, "unauthorized"]
    assert c.p.get("b") is None and c.p.get("d") is None


def test_a_revoked_or_unknown_token_and_a_deleted_principal_are_refused(c):
    c.role("w", ["kv:write:"])
    c.principal("gus", ["w"])
    c.token("gus-1", "gus", ["kv:write:"])
    c.token("gus-2", "gus", ["kv:write:"])
    assert c.apply({"op": "token_revoke", "accessor": "gus-1"}, "gus-1")["ok"]  # its own
    assert c.apply(put("k"), "gus-1")["error"] == "unauthorized"
    assert c.apply(put("k"), "nobody")["error"] == "unauthorized"
    assert c.apply({"op": "principal_delete", "name": "gus"}, "root")["tokens_revoked"] == 1
    assert c.apply(put("k"), "gus-2")["error"] == "unauthorized"


def test_only_an_administrator_changes_principals_and_roles(c):
    c.role("w", ["kv:write:"])
    c.principal("hal", ["w"])
    c.token("hal-1", "hal", ["kv:write:"])
    assert c.apply({"op": "role_put", "name": "w", "allow": ["*"]}, "hal-1")["scope"] == "cluster:admin"
    assert c.apply({"op": "principal_put", "name": "hal", "kind": "person", "roles": ["root"],
                    "now_ms": 1}, "hal-1")["scope"] == "cluster:admin"
    assert c.apply({"op": "principal_delete", "name": "root"}, "root")["error"] == "refused"


def test_a_task_runs_with_at_most_its_submitters_capabilities(c):
    c.role("tasks", ["task:submit", "task:fs:/data/in"])
    c.principal("ivy", ["tasks"])
    c.token("ivy-1", "ivy", ["*"])

    def submit(task_id, capabilities):
        spec = {"command": ["true"], "capabilities": capabilities}
        return c.apply({"op": "task_submit", "task_id": task_id, "spec": spec, "now_ms": c.now}, "ivy-1")

    assert submit("t1", {"read_paths": ["/data/in/x"]})["ok"]
    assert submit("t2", {"network": True})["scope"] == "task:network"
    assert submit("t3", {"write_paths": ["/etc"]})["scope"] == "task:fs:/etc"


def test_the_records_survive_a_rollback(c):
    """A rollback undoes writes, never a revocation: principals, roles and tokens are carried
    over from the state the rollback met."""
    c.role("w", ["kv:write:"])
    c.principal("jo", ["w"])
    c.token("jo-1", "jo", ["kv:write:"])
    checkpoint = c.p.store.clone()
    c.apply({"op": "token_revoke", "accessor": "jo-1"}, "root")
    before = c.p.store
    rolled = CommandProcessor(checkpoint)
    rolled.finish_rollback(c.index + 1, bytes(32), 0, [bytes(32), bytes(32)], before)
    assert rolled.store.get(b"sec/t/jo-1") is None


def test_bad_security_commands_name_the_field():
    for command, field in [
        ({"op": "role_put", "name": "r", "allow": ["kv:lol"]}, "allow[0]"),
        ({"op": "role_put", "name": "r", "allow": ["task:fs:relative"]}, "allow[0]"),
        ({"op": "principal_put", "name": "p", "kind": "root", "roles": [], "now_ms": 1}, "kind"),
        ({"op": "token_create", "accessor": "a", "secret_hash": b"short", "principal": "p", "allow": [], "now_ms": 1}, "secret_hash"),
        ({"op": "put", "key": "k", "value": b"1", "auth": "a"}, "auth"),
    ]:
        with pytest.raises(CommandError) as e:
            validate_command(command)
        assert e.value.field == field, (command, e.value)
    assert str(parse_scope("kv:read")) == "kv:read:"
