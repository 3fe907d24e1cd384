"""What the dashboard (/ui) stands on, over plain HTTP against a real 3-node cluster: its files
served without a token (and nothing else), each node's timeline, the whole cluster's overview
with a stopped node, the namespaces a token may read, what a token may do (whoami ?can=), and
the recent-first task page. The browser tests (test_ui_browser.py) drive the page itself."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from synapse import Client
from tests.harness import Cluster, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("dash"), 3, extra=["--memory-index", "off"]).start()
    yield c
    c.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None  # a redirect is an answer to check, not to follow


_OPENER = urllib.request.build_opener(_NoRedirect)


def _get(url: str, token: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_the_dashboard_files_are_served_without_a_token_and_nothing_else_is(cluster):
    node = cluster.nodes[0]
    status, headers, body = _get(node.url + "/ui/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"app.js" in body
    # The page may run only its own script and talk only to the node that served it.
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "connect-src 'self'" in headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("logo.svg", "image/svg+xml")):
        status, headers, _ = _get(f"{node.url}/ui/{name}")
        assert status == 200 and headers["content-type"].startswith(kind), name
    for path in ("/", "/ui"):
        status, headers, _ = _get(node.url + path)
        assert status == 302 and headers["location"] == "/ui/"
    status, _, body = _get(node.url + "/ui/secret.txt")
    assert status == 404 and "no file 'secret.txt'" in json.loads(body)["message"]
    # Nothing outside the dashboard's own routes answers without a token, whatever the path.
    for path in ("/ui/../v1/kv/x", "/ui/%2E%2E/v1/kv", "/v1/cluster/overview", "/v1/cluster/events", "/v1/memory"):
        status, _, _ = _get(node.url + path)
        assert status in (401, 404), path
        status, _, _ = _get(node.url + path, token="root.bad")
        assert status in (401, 404), path


def test_each_node_keeps_a_timeline_of_its_start_and_leader(cluster):
    leader = cluster.leader()
    status, _, body = _get(leader.url + "/v1/cluster/events", cluster.token)
    events = json.loads(body)["events"]
    assert status == 200 and events[0]["kind"] == "started" and events[0]["node"] == leader.node_id
    assert any(e["kind"] == "leader" and e["message"] == "this node leads" for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    status, _, body = _get(leader.url + f"/v1/cluster/events?after={seqs[-1]}", cluster.token)
    assert json.loads(body)["events"] == []
    status, _, body = _get(leader.url + "/v1/cluster/events?after=-1", cluster.token)
    assert status == 400 and "after" in json.loads(body)["message"]


def test_the_overview_shows_every_node_as_it_sees_itself_and_a_stopped_one_as_down(cluster):
    asker = cluster.nodes[0]
    status, _, body = _get(asker.url + "/v1/cluster/overview", cluster.token)
    view = json.loads(body)
    assert status == 200 and [n["node_id"] for n in view["nodes"]] == ["n1", "n2", "n3"]
    assert all(n["reachable"] and n["status"]["checkpoint"]["service"] == "serving" for n in view["nodes"])
    assert sum(n["status"]["role"] == "leader" for n in view["nodes"]) == 1
    assert {e["node"] for e in view["events"]} == {"n1", "n2", "n3"}
    assert [e["at"] for e in view["events"]] == sorted((e["at"] for e in view["events"]), reverse=True)

    victim = cluster.nodes[2]
    victim.kill()
    try:
        status, _, body = _get(asker.url + "/v1/cluster/overview?events=0", cluster.token)
        view = json.loads(body)
        down = next(n for n in view["nodes"] if n["node_id"] == victim.node_id)
        assert status == 200 and not down["reachable"] and down["status"] is None and down["error"]
        assert view["events"] == []
    finally:
        victim.start()
        cluster.wait_ready(nodes=[victim])


def test_memory_namespaces_are_listed_only_where_the_token_may_read(tmp_path):
    c = Cluster.create(tmp_path, 1).start()
    try:
        with Client(c.nodes[0].url, c.token) as root:
            vec = [0.1] * 8
            root.remember("team-a", "alpha", id="a1", vector=vec)
            root.remember("team-b", "beta", id="b1", vector=vec)
            token = root.create_token(principal="root", scopes=["memory:read:team-a"])["token"]
        status, _, body = _get(c.nodes[0].url + "/v1/memory", c.token)
        assert status == 200 and [s["namespace"] for s in json.loads(body)["namespaces"]] == ["team-a", "team-b"]
        assert json.loads(body)["namespaces"][0]["count"] == 1
        status, _, body = _get(c.nodes[0].url + "/v1/memory", token)
        assert status == 200 and [s["namespace"] for s in json.loads(body)["namespaces"]] == ["team-a"]
    finally:
        c.close()


def test_whoami_says_what_the_token_may_do_and_refuses_a_bad_scope_by_name(cluster):
    with Client(cluster.nodes[0].url, cluster.token) as root:
        token = root.create_token(principal="root", scopes=["kv:read", "kv:write:app/"])["token"]
    url = cluster.nodes[0].url + "/v1/whoami?can=kv:write:app/x&can=kv:write:other&can=kv:read:anything"
    status, _, body = _get(url, token)
    assert status == 200 and json.loads(body)["can"] == {"kv:write:app/x": True, "kv:write:other": False,
                                                         "kv:read:anything": True}
    status, _, body = _get(cluster.nodes[0].url + "/v1/whoami?can=kv:frobnicate", token)
    assert status == 400 and "kv:frobnicate" in json.loads(body)["message"]


def test_recent_tasks_list_running_then_queued_then_the_newest_ended(tmp_path):
    c = Cluster.create(tmp_path, 1, extra=["--memory-index", "off"]).start()
    try:
        node = c.nodes[0]
        with Client(node.url, c.token) as client:
            ended = []
            for _ in range(2):  # each ended before the next is submitted: "newest" is unambiguous
                task_id = client.submit_task({"command": ["true"]})["task_id"]
                wait_until(lambda: client.task(task_id, wait=2)["state"] == "succeeded", 30, f"task {task_id}")
                ended.append(task_id)
            first, second = ended
            queued = client.submit_task({"command": ["true"], "labels": {"nowhere": "1"}})["task_id"]  # no worker has it
        status, _, body = _get(node.url + "/v1/tasks?order=recent&limit=10", c.token)
        page = json.loads(body)
        assert status == 200 and [t["task_id"] for t in page["tasks"]] == [queued, second, first]
        assert page["counts"] == {"pending": 1, "leased": 0, "ended": 2}
        status, _, body = _get(node.url + "/v1/tasks?order=recent&limit=2", c.token)
        assert [t["task_id"] for t in json.loads(body)["tasks"]] == [queued, second]
        for bad, word in (("order=newest", "order"), ("order=recent&state=pending", "state")):
            status, _, body = _get(f"{node.url}/v1/tasks?{bad}", c.token)
            assert status == 400 and word in json.loads(body)["message"], bad
    finally:
        c.close()


def test_status_says_each_nodes_role(cluster):
    with Client(cluster.nodes[1].url, cluster.token) as c:
        status = c.status()
    assert status["role"] in ("leader", "follower")
    assert status["checkpoint"]["service"] == "serving"


def test_every_node_records_a_rollback_on_its_timeline(tmp_path):
    c = Cluster.create(tmp_path, 3, extra=["--memory-index", "off", "--checkpoint-interval", "0",
                                           "--checkpoint-retain", "3"]).start()
    try:
        client = c.client()
        client.put("k", "good")
        point = client.checkpoint(label="known good", wait=True)
        client.put("k", "bad")
        client.rollback(point["index"])
        c.wait_converged()
        for node in c.nodes:
            status, _, body = _get(node.url + "/v1/cluster/events", c.token)
            rolled = [e for e in json.loads(body)["events"] if e["kind"] == "rollback"]
            assert status == 200 and len(rolled) == 1, (node.node_id, rolled)
            assert rolled[0]["checkpoint"] == point["index"]
            assert rolled[0]["message"].startswith(f"rolled back to checkpoint {point['index']} at entry ")
    finally:
        c.close()


def test_cluster_events_prints_every_nodes_timeline_newest_first(cluster):
    import subprocess

    from tests.harness import SYNAPSE

    base = SYNAPSE + ["cluster", "events", "--url", cluster.nodes[0].url, "--token", cluster.token]
    out = subprocess.run(base + ["-o", "json", "-n", "20"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["not_answering"] == [] and 0 < len(answer["events"]) <= 20
    assert [e["at"] for e in answer["events"]] == sorted((e["at"] for e in answer["events"]), reverse=True)
    text = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert text.returncode == 0 and text.stdout.splitlines()[0].split() == ["WHEN", "NODE", "KIND", "WHAT"]
    assert "started at entry" in text.stdout
