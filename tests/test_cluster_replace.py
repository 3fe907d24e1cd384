"""A voter that stays dead is reported — by `synapse cluster status` (as the leader sees it) and
by /metrics — and `synapse cluster replace DEAD NEW --raft --api` swaps it for a new node in
one checked step. A real 3-node cluster on loopback (tests/harness.py)."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from click.testing import CliRunner

from synapse.cli.main import main
from synapse.client import SynapseError
from tests.harness import Cluster, free_ports, scrape, wait_until


def _cli(cluster: Cluster, node, *args: str):
    return CliRunner().invoke(main, ["cluster", "--url", node.url, "--token", cluster.token, *args])


def _metrics(cluster: Cluster, node) -> dict[str, float]:
    return scrape(node, cluster.token)


def _gauge(samples: dict[str, float], name: str, node_id: str) -> float | None:
    return samples.get(f'{name}{{node="{node_id}"}}')


def _voters(cluster: Cluster, node) -> list[tuple]:
    return sorted((m["node_id"], m["raft"], m["api"]) for m in cluster.client(node).status()["members"])


@pytest.fixture
def cluster(tmp_path):
    c = Cluster.create(tmp_path, 3, extra=["--memory-index", "off"]).start()
    yield c
    c.close()


def test_a_dead_voter_is_reported_and_replaced_by_a_new_node(cluster):
    c = cluster.client()
    c.put("rp/before", 1)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    dead = next(n for n in cluster.nodes if n is not leader and n is not follower)

    # Everyone registered and up, as every node sees it (the links come up in the first second).
    _all_up(cluster, cluster.nodes)
    for node in cluster.nodes:
        text = _metrics(cluster, node)
        assert [_gauge(text, "synapse_voter_up", n.node_id) for n in cluster.nodes] == [1, 1, 1], text

    # Writes go on throughout, from another thread; each acknowledged one is checked at the end.
    acknowledged: list[int] = []
    stop = threading.Event()

    def write() -> None:
        w = cluster.client(leader, follower, timeout=10)
        i = 0
        while not stop.is_set():
            try:
                w.put(f"rp/w{i}", i)
                acknowledged.append(i)
            except SynapseError:
                pass  # not acknowledged: not counted
            i += 1
            time.sleep(0.01)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        dead.kill()
        killed_at = time.time()

        def reported_down():
            members = {m["node_id"]: m for m in cluster.client(leader).status()["members"]}
            return members[dead.node_id] if not members[dead.node_id]["up"] else None

        down = wait_until(reported_down, 15, f"the leader to report {dead.node_id} down")
        assert killed_at - 1.0 <= down["down_since"] <= time.time(), (killed_at, down)
        assert down["last_contact_s"] > 1.0 and down["connected"] is False

        # The CLI, asked through a follower, shows the leader's view.
        out = _cli(cluster, follower, "status")
        print(out.output)
        assert out.exit_code == 0, out.output
        assert f"(as seen by the leader {leader.node_id})" in out.output
        assert f"DOWN: {dead.node_id}" in out.output
        row = next(line for line in out.output.splitlines() if line.startswith(dead.node_id + " "))
        assert re.search(r"DOWN \d+s \(since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", row), row
        assert all("DOWN" not in line for line in out.output.splitlines()
                   if line.startswith((leader.node_id + " ", follower.node_id + " "))), out.output

        # /metrics on the leader and on the follower, each its own view (the follower's last
        # keep-alive from the dead node may have come a moment after the leader's last answer).
        for node in (leader, follower):
            def reports_down(node=node) -> str | None:
                text = _metrics(cluster, node)
                return text if _gauge(text, "synapse_voter_up", dead.node_id) == 0 else None

            text = wait_until(reports_down, 10, f"{node.node_id}'s /metrics to report {dead.node_id} down")
            assert _gauge(text, "synapse_voter_up", leader.node_id) == 1
            assert _gauge(text, "synapse_voter_up", follower.node_id) == 1
            assert _gauge(text, "synapse_voter_last_contact_seconds", dead.node_id) > 1.0
            assert _gauge(text, "synapse_voter_last_contact_seconds", leader.node_id) < 1.0

        # The new node, started with the voters that are up as its peers.
        cluster.nodes.remove(dead)
        new = cluster.new_node("n4")
        cluster.nodes.append(dead)  # still closed at the end (it is dead already)
        new.start()
        wait_until(lambda: _health(new), 30, "the new node's API")

        out = _cli(cluster, leader, "replace", dead.node_id, new.node_id, "--raft", new.raft, "--api", new.api)
        print(out.output)
        assert out.exit_code == 0, out.output
        assert f"1/2 done: {dead.node_id} is no longer a voter" in out.output
        assert f"2/2 done: {new.node_id} is a voter" in out.output

        live = [leader, follower, new]
        cluster.wait_ready(nodes=live)
        _all_up(cluster, live)
        time.sleep(0.3)  # some writes after the replacement too
    finally:
        stop.set()
        writer.join(30)

    assert 20 < len(acknowledged) < 10_000, len(acknowledged)
    c = cluster.client(*live)
    c.put("rp/after", 2)
    expected = sorted((n.node_id, n.raft, n.api) for n in live)
    for node in live:
        assert _voters(cluster, node) == expected
    # The new node holds the data, every acknowledged write included ...
    on_new = cluster.client(new)
    assert on_new.get("rp/before")["value"] == 1 and on_new.get("rp/after")["value"] == 2
    scanned = {item["key"] for item in on_new.scan("rp/w", limit=10_000)["items"]}
    assert {f"rp/w{i}" for i in acknowledged} <= scanned
    # ... and agrees by hash: a checkpoint's digest, agreed by all three.
    ck = c.checkpoint("after-replace", wait=True)
    statuses = cluster.wait_converged()  # the live nodes: the dead one is not asked
    assert len({s["state_hash"] for s in statuses.values()}) == 1
    latest = wait_until(lambda: _all_reported(cluster, leader, ck["index"], live), 15, "every node's checkpoint report")
    assert {n: r["agrees"] for n, r in latest["nodes"].items()} == {n.node_id: True for n in live}, latest

    # The dead voter is no longer reported; the new one is, up.
    text = _metrics(cluster, leader)
    assert _gauge(text, "synapse_voter_up", dead.node_id) is None
    assert _gauge(text, "synapse_voter_up", new.node_id) == 1
    out = _cli(cluster, follower, "status")
    assert out.exit_code == 0 and "DOWN" not in out.output, out.output


def _all_up(cluster: Cluster, nodes) -> None:
    def every_voter_up():
        for node in nodes:
            members = cluster.client(node).status()["members"]
            if sorted(m["node_id"] or "?" for m in members) != sorted(n.node_id for n in nodes):
                return False  # not registered yet
            if not all(m["up"] and m["down_since"] is None for m in members):
                return False
        return True

    wait_until(every_voter_up, 15, "every voter registered and up, as every node sees it")


def _health(node) -> bool:
    try:
        with urllib.request.urlopen(node.url + "/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _all_reported(cluster: Cluster, leader, index: int, live) -> dict | None:
    latest = cluster.client(leader).status()["checkpoint"]["latest"]
    if latest and latest["index"] >= index and {n.node_id for n in live} <= set(latest["nodes"]):
        return latest
    return None


def test_replace_refuses_bad_input_changing_nothing_and_an_interrupted_one_is_finished(cluster):
    leader = cluster.leader()
    up = next(n for n in cluster.nodes if n is not leader)
    dead = next(n for n in cluster.nodes if n is not leader and n is not up)
    _all_up(cluster, cluster.nodes)
    dead.kill()
    wait_until(lambda: not {m["node_id"]: m for m in cluster.client(leader).status()["members"]}[dead.node_id]["up"],
               15, "the dead voter reported down")
    before = _voters(cluster, leader)
    free_api, free_raft = (f"127.0.0.1:{p}" for p in free_ports(2))
    cases = [
        ((up.node_id, "n9", "--raft", free_raft, "--api", free_api), f"DEAD '{up.node_id}' is up"),
        ((leader.node_id, "n9", "--raft", free_raft, "--api", free_api), "it is the leader"),
        (("nX", "n9", "--raft", free_raft, "--api", free_api), "DEAD 'nX' is not a voter of this cluster"),
        ((dead.node_id, up.node_id, "--raft", free_raft, "--api", free_api), f"NODE_ID '{up.node_id}' is already a voter"),
        ((dead.node_id, "n9", "--raft", up.raft, "--api", free_api), f"--raft {up.raft} is {up.node_id}'s address"),
        ((dead.node_id, "n9", "--raft", free_raft, "--api", up.api), f"--api {up.api} is {up.node_id}'s address"),
        ((dead.node_id, "n9", "--raft", "127.0.0.1", "--api", free_api), "--raft: '127.0.0.1' is not HOST:PORT"),
        ((dead.node_id, "bad id!", "--raft", free_raft, "--api", free_api), "NODE_ID: 'bad id!' is not a valid node id"),
        ((dead.node_id, "n9", "--raft", free_raft, "--api", free_api), f"the new node does not answer at --api {free_api}"),
    ]
    for args, message in cases:
        out = _cli(cluster, leader, "replace", *args)
        assert out.exit_code != 0, (args, out.output)
        assert message in out.output and "nothing was changed" in out.output, (args, out.output)
        assert _voters(cluster, leader) == before, args

    # Interrupted after its first step (DEAD removed, NEW not added yet): run again, it says how
    # to finish, and that command finishes it.
    removed = _cli(cluster, leader, "remove", dead.node_id)
    assert removed.exit_code == 0, removed.output
    cluster.nodes.remove(dead)
    new = cluster.new_node("n4")
    cluster.nodes.append(dead)
    new.start()
    wait_until(lambda: _health(new), 30, "the new node's API")
    again = _cli(cluster, leader, "replace", dead.node_id, new.node_id, "--raft", new.raft, "--api", new.api)
    finish = f"synapse cluster add {new.node_id} --raft {new.raft} --api {new.api}"
    assert again.exit_code != 0 and f"finish with `{finish}`" in again.output, again.output
    out = _cli(cluster, leader, *finish.split()[2:])
    assert out.exit_code == 0, out.output
    live = [leader, up, new]
    _all_up(cluster, live)
    cluster.client(new).put("rp/finished", 1)
    assert _voters(cluster, new) == sorted((n.node_id, n.raft, n.api) for n in live)
