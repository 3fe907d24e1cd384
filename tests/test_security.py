"""Principals, roles and scoped tokens on a real 3-node cluster, through the HTTP API, the
Python client and the CLI: scopes hold on every node, a revocation holds on every node and
every route from the moment the call returns, a write racing a revocation lands or is
refused on every node alike, expired and widened tokens are refused."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from synapse.client import Client, SynapseError
from tests.harness import Cluster, scrape, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("security"), 3).start()
    admin = c.client()
    admin.put_role("a-reader", ["kv:read:a/"])
    admin.put_role("a-writer", ["kv:read:a/", "kv:write:a/"])
    admin.put_principal("alice", "person", ["a-reader"])
    admin.put_principal("bob", "person", ["a-writer"])
    admin.put_principal("bob-agent", "agent", ["a-writer"], owner="bob")
    admin.put("a/x", "hello")
    admin.put("b/x", "secret")
    yield c
    c.close()


def raw(node, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(node.url + path, json.dumps(body).encode() if body is not None else None,
                                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_a_reader_reads_its_prefix_on_every_node_and_nothing_else(cluster):
    token = cluster.client().create_token(["kv:read:a/"], principal="alice")["token"]
    for node in cluster.nodes:
        assert raw(node, "GET", "/v1/kv/a/x", token)[0] == 200
        assert raw(node, "GET", "/v1/kv/a/x?consistency=stale", token)[0] == 200
        status, body = raw(node, "PUT", "/v1/kv/a/x", token, {"value": 1})
        assert (status, body["error"], body["scope"]) == (403, "forbidden", "kv:write:a/x")
        status, body = raw(node, "GET", "/v1/kv/b/x", token)
        assert (status, body["scope"]) == (403, "kv:read:b/x")
        # A transaction is checked per operation when it is applied, the same on every node.
        status, body = raw(node, "POST", "/v1/txn", token, {"then": [{"op": "get", "key": "b/x"}]})
        assert (status, body["error"]) == (403, "forbidden")
        assert raw(node, "GET", "/v1/kv?prefix=", token)[0] == 403  # a scan wider than a/
        assert raw(node, "GET", "/v1/principals", token)[1]["scope"] == "cluster:admin"


def test_a_child_token_cannot_exceed_its_parent(cluster):
    bob = Client(cluster.nodes[0].url, cluster.client().create_token(["kv:read:a/", "kv:write:a/"], principal="bob")["token"])
    with pytest.raises(SynapseError) as e:
        bob.create_token(["kv:write:"], principal="bob-agent")
    assert e.value.status == 403 and "wider" in str(e.value)
    child = bob.create_token(["kv:write:a/agent/"], principal="bob-agent")
    agent = Client(cluster.nodes[1].url, child["token"])
    assert agent.put("a/agent/1", 1)["version"] == 1
    with pytest.raises(SynapseError) as e:
        agent.put("a/other", 1)
    assert e.value.status == 403
    # Only its own agents: bob cannot mint for alice.
    with pytest.raises(SynapseError) as e:
        bob.create_token(["kv:read:a/"], principal="alice")
    assert e.value.body["scope"] == "cluster:admin"
    # Revoking the parent revokes the child.
    assert bob.revoke_token(bob.whoami()["token"]["accessor"])["revoked"] == 2
    with pytest.raises(SynapseError) as e:
        agent.put("a/agent/2", 1)
    assert e.value.status == 401


def test_a_revoked_token_is_refused_by_every_node_on_every_route_once_revoke_returns(cluster):
    admin = cluster.client()
    made = admin.create_token(["kv:read:a/", "kv:write:a/"], principal="bob")
    token = made["token"]
    for node in cluster.nodes:
        assert raw(node, "GET", "/v1/kv/a/x?consistency=stale", token)[0] == 200
    answer = admin.revoke_token(made["accessor"])
    assert answer["revoked"] == 1 and answer["nodes_not_confirmed"] == []
    for node in cluster.nodes:
        for method, path, body in [("GET", "/v1/kv/a/x", None), ("GET", "/v1/kv/a/x?consistency=stale", None),
                                   ("PUT", "/v1/kv/a/y", {"value": 1}), ("GET", "/v1/cluster/status", None),
                                   ("GET", "/v1/whoami", None), ("POST", "/v1/txn", {"then": []})]:
            status, body = raw(node, method, path, token, body)
            assert status == 401, (node.node_id, method, path, status, body)


def test_a_write_racing_a_revocation_lands_or_is_refused_alike_everywhere(cluster):
    admin = cluster.client()
    made = admin.create_token(["kv:write:a/race/"], principal="bob")
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def writer(n: int) -> None:
        node = cluster.nodes[n % 3]
        i = 0
        while not stop.is_set():
            key = f"a/race/{n}-{i}"
            outcomes[key] = raw(node, "PUT", "/v1/kv/" + key, made["token"], {"value": i})[0]
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    admin.revoke_token(made["accessor"])
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert 200 in outcomes.values() and 401 in outcomes.values(), outcomes
    converged = cluster.wait_converged()
    assert len({s["state_hash"] for s in converged.values()}) == 1
    for node in cluster.nodes:
        c = Client(node.url, cluster.token)
        present = {item["key"] for item in c.scan("a/race/", limit=10_000, consistency="stale")["items"]}
        assert present == {k for k, status in outcomes.items() if status == 200}, node.node_id


def test_an_expired_token_is_refused(cluster):
    token = cluster.client().create_token(["kv:read:a/"], principal="alice", ttl_s=1)["token"]
    node = cluster.nodes[2]
    assert raw(node, "GET", "/v1/kv/a/x", token)[0] == 200
    wait_until(lambda: raw(node, "GET", "/v1/kv/a/x", token)[0] == 401, 5, "the token to expire")


def test_a_task_without_task_network_cannot_ask_for_the_network(cluster):
    admin = cluster.client()
    admin.put_role("submitter", ["task:submit"])
    admin.put_principal("carol", "person", ["submitter"])
    carol = Client(cluster.nodes[0].url, admin.create_token(["*"], principal="carol")["token"])
    with pytest.raises(SynapseError) as e:
        carol.submit_task({"command": ["true"], "capabilities": {"network": True}})
    assert (e.value.status, e.value.body["scope"]) == (403, "task:network")


def test_lists_show_accessors_never_secrets(cluster):
    admin = cluster.client()
    made = admin.create_token(["kv:read:a/"], principal="alice", label="listed")
    listed = {t["accessor"]: t for t in admin.tokens()}
    row = listed[made["accessor"]]
    assert row["label"] == "listed" and row["principal"] == "alice"
    assert made["token"].split(".")[-1] not in json.dumps(admin.tokens())
    assert {"node-n1", "node-n2", "node-n3", "root"} <= set(listed)  # the nodes' own tokens


def test_the_cli_manages_principals_roles_and_tokens(cluster):
    import subprocess

    from tests.harness import SYNAPSE

    def cli(*args: str) -> subprocess.CompletedProcess:
        group, *rest = args
        out = subprocess.run(SYNAPSE + [group, "--url", cluster.nodes[1].url, "--token", cluster.token, *rest],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out

    cli("role", "create", "cli-reader", "--allow", "kv:read:cli/", "--deny", "kv:read:cli/secret/")
    cli("principal", "create", "carol", "--kind", "agent", "--role", "cli-reader")
    secret = cli("token", "create", "--principal", "carol", "--scope", "kv:read:cli/", "--ttl", "1h",
                 "--label", "from the cli").stdout.strip()
    accessor = secret.split(".")[0]
    listed = json.loads(cli("token", "list", "--json").stdout)
    mine = next(t for t in listed if t["accessor"] == accessor)
    assert mine["principal"] == "carol" and mine["label"] == "from the cli" and mine["expires_ms"]
    assert secret.split(".")[1] not in cli("token", "list").stdout  # accessors, never secrets
    assert "carol" in cli("principal", "list").stdout and "cli-reader" in cli("role", "list").stdout
    assert raw(cluster.nodes[2], "GET", "/v1/kv/a/x", secret)[0] == 403  # its scope is cli/ only
    assert "revoked 1 token(s)" in cli("token", "revoke", accessor).stdout
    assert raw(cluster.nodes[0], "GET", "/v1/kv/cli/x", secret)[0] == 401
    cli("principal", "delete", "carol")
    assert "carol" not in {p["name"] for p in json.loads(cli("principal", "list", "--json").stdout)}


def test_refused_tokens_are_counted_in_metrics(cluster):
    node = cluster.nodes[0]

    def denials() -> dict[str, float]:
        m = scrape(node, cluster.token)
        return {reason: m.get(f'synapse_auth_denials_total{{reason="{reason}"}}', 0.0)
                for reason in ("unauthorized", "forbidden")}

    token = cluster.client().create_token(["kv:read:a/"], principal="alice")["token"]
    before = denials()
    assert raw(node, "PUT", "/v1/kv/a/x", token, {"value": 1})[0] == 403
    assert raw(node, "GET", "/v1/kv/b/x", token)[0] == 403
    assert raw(node, "GET", "/v1/kv/a/x", "not-a-token")[0] == 401
    after = denials()
    assert (after["forbidden"] - before["forbidden"], after["unauthorized"] - before["unauthorized"]) == (2, 1)
