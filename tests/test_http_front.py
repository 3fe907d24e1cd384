"""The HTTP front (rust/front, synapse/api/front.py) on a real node: the plain key-value
requests it answers itself give the same answers as the aiohttp app, every other form is
passed to the app unchanged, and bad input gets the app's errors."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.harness import Cluster


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # Quiet: a test compares the state hash before and after a refused request.
    c = Cluster.quiet(tmp_path_factory.mktemp("front"))
    yield c
    c.close()


def call(node, method: str, target: str, body: bytes | None = None, token: str | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    url = urlsplit(node.nodes[0].url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        h = {"Authorization": f"Bearer {token if token is not None else node.token}", **(headers or {})}
        if body is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, target, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_put_and_a_get_through_the_hot_path(node):
    status, put = call(node, "PUT", "/v1/kv/front/a", b'{"value": {"n": 1}}', headers={"X-Request-Id": "front-1"})
    assert status == 200 and put["key"] == "front/a" and put["version"] == 1
    # A retry with the same request id is the same write (the dedup table answers).
    assert call(node, "PUT", "/v1/kv/front/a", b'{"value": {"n": 1}}', headers={"X-Request-Id": "front-1"}) == (200, put)
    for target in ("/v1/kv/front/a", "/v1/kv/front/a?consistency=stale", "/v1/kv/front/a?consistency=linearizable"):
        status, got = call(node, "GET", target)
        assert status == 200 and got["value"] == {"n": 1} and got["version"] == 1, target


def test_the_hot_path_and_the_app_answer_alike(node):
    # "%2D" is "-": the front passes escaped paths to the app, which decodes them.
    assert call(node, "PUT", "/v1/kv/front/same-key", b'{"value": 7}')[0] == 200
    assert call(node, "GET", "/v1/kv/front/same-key") == call(node, "GET", "/v1/kv/front/same%2Dkey")
    assert call(node, "GET", "/v1/kv/front/none") == call(node, "GET", "/v1/kv/front/n%6Fne")
    assert call(node, "GET", "/v1/kv/front/none")[0] == 404
    # if_version goes in the body on the hot path; a conflict is the app's 409.
    status, conflict = call(node, "PUT", "/v1/kv/front/same-key", b'{"value": 8, "if_version": 5}')
    assert status == 409 and conflict["error"] == "conflict" and conflict["current_version"] == 1
    assert call(node, "GET", "/v1/kv/front/same-key")[1]["value"] == 7


@pytest.mark.parametrize("body, status, error", [
    (b"{not json", 400, "bad_json"),
    (b"[1, 2]", 400, "bad_request"),
    (b'{"value": 1, "colour": "red"}', 400, "bad_request"),
    (b'{"if_version": 1}', 400, "bad_request"),
    (b'{"value": 1, "if_version": -1}', 400, "bad_request"),
])
def test_bad_bodies_are_refused_with_the_apps_errors_and_change_nothing(node, body, status, error):
    before = call(node, "GET", "/v1/cluster/status")[1]["state_hash"]
    got_status, got = call(node, "PUT", "/v1/kv/front/bad", body)
    assert (got_status, got["error"]) == (status, error) and got["message"]
    assert call(node, "GET", "/v1/cluster/status")[1]["state_hash"] == before
    assert call(node, "GET", "/v1/kv/front/bad")[0] == 404


def test_what_the_front_does_not_answer_reaches_the_app(node):
    assert call(node, "GET", "/v1/kv/front/a", token="wrong")[1]["error"] == "unauthorized"
    status, got = call(node, "GET", "/v1/kv/front/a?consistency=sometimes")
    assert status == 400 and "consistency" in got["message"]
    assert call(node, "PUT", "/v1/kv/" + "k" * 5000, b'{"value": 1}')[1]["error"] == "too_large"
    assert call(node, "DELETE", "/v1/kv/front/a")[1]["deleted"] is True
    assert call(node, "GET", "/v1/kv/front/a")[0] == 404
    assert call(node, "GET", "/v1/cluster/status")[0] == 200


def test_hot_path_requests_are_counted_in_the_metrics(node):
    call(node, "GET", "/v1/kv/front/none")
    url = urlsplit(node.nodes[0].url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {node.token}"})
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'synapse_http_requests_total{route="/v1/kv/{key}",status="404"}' in text


def test_a_host_name_is_served_on_every_address_it_resolves_to():
    import socket

    from synapse._core import HttpFront

    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    front = HttpFront("localhost:0", "/nonexistent/app.sock", 1024)  # nothing answers there
    try:
        for address in addresses:
            with socket.create_connection((address, front.port()), timeout=5) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                # The proxy cannot reach the app: a 503 from the front, on every address.
                assert conn.recv(64).startswith(b"HTTP/1.1 503"), address
    finally:
        front.close()


def test_an_address_already_taken_is_an_error_naming_it():
    import socket

    from synapse._core import HttpFront

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            HttpFront(f"127.0.0.1:{port}", "/nonexistent/app.sock", 1024)


# --- the hot path's read order, with the cluster stood in for (no timing to arrange) ---


def test_a_linearizable_read_checks_its_token_again_once_its_barrier_commits(monkeypatch):
    """The token is checked when the read arrives and again after its barrier commits (a
    token revoked meanwhile is refused, as on every node); a stale read waits for nothing."""
    import asyncio
    from types import SimpleNamespace

    from synapse.api import front
    from synapse.api.common import ApiError
    from synapse.api.pipeline import RequestPipeline

    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        barrier = loop.create_future()
        events, revoked = [], []

        def confirm(ctx, identity):
            events.append("confirm")
            if revoked:
                raise ApiError(401, "unauthorized", "token revoked")

        monkeypatch.setattr(front, "confirm", confirm)
        monkeypatch.setattr(front, "read_value", lambda ctx, key: events.append("read") or {"key": key})
        cluster = SimpleNamespace(barrier_future=lambda timeout=None: events.append("barrier") or barrier)
        pipeline = SimpleNamespace(ctx=SimpleNamespace(cluster=cluster), failure=RequestPipeline.failure,
                                   admit=lambda *a: events.append("admit") or "identity",
                                   observe=lambda *a: None)
        sent = []
        hot = front.HotPath(pipeline, SimpleNamespace(notify_fd=lambda: -1, respond=sent.extend))
        hot._get(1, "k", None, "Bearer t", 0.0)
        await asyncio.sleep(0)
        assert events == ["admit", "barrier"] and sent == []  # waiting for the barrier
        revoked.append(True)
        barrier.set_result(None)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert events == ["admit", "barrier", "confirm"]  # refused before anything is read
        hot._get(2, "k", "stale", "Bearer t", 0.0)
        await asyncio.sleep(0)
        return events, [(rid, status) for rid, status, _ in sent]

    events, answers = asyncio.run(scenario())
    assert events == ["admit", "barrier", "confirm", "admit", "read"]
    assert answers == [(1, 401), (2, 200)]


def test_a_request_that_finds_the_cluster_bootstrapping_waits_then_takes_its_path(monkeypatch):
    """A new cluster without its root principal yet: the request waits (admit_waiting) and is
    then answered down its fast path as if it had come later."""
    import asyncio
    from types import SimpleNamespace

    from synapse.api import front
    from synapse.api.pipeline import Bootstrapping, RequestPipeline

    async def scenario() -> list:
        events, sent = [], []
        booted = asyncio.Event()

        def admit(*args):
            events.append("admit")
            if not booted.is_set():
                raise Bootstrapping()
            return "identity"

        async def admit_waiting(*args):
            events.append("wait")
            await booted.wait()
            return admit(*args)

        monkeypatch.setattr(front, "read_value", lambda ctx, key: events.append("read") or {"key": key})
        pipeline = SimpleNamespace(ctx=SimpleNamespace(cluster=None), failure=RequestPipeline.failure,
                                   admit=admit, admit_waiting=admit_waiting, observe=lambda *a: None)
        hot = front.HotPath(pipeline, SimpleNamespace(notify_fd=lambda: -1, respond=sent.extend))
        hot._get(1, "k", "stale", "Bearer t", 0.0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert events == ["admit", "wait"] and sent == []
        booted.set()
        for _ in range(5):
            await asyncio.sleep(0)
        return events, [(rid, status) for rid, status, _ in sent]

    events, answers = asyncio.run(scenario())
    assert events == ["admit", "wait", "admit", "admit", "read"] and answers == [(1, 200)]


def test_a_batch_looks_each_token_up_once_and_authorizes_each_request(monkeypatch):
    """Requests admitted at one instant (one batch of the front) share a token's lookup, never
    its authorization: each request's own scopes are checked, and a refused token is not
    remembered."""
    from types import SimpleNamespace

    from synapse.api.common import ApiError
    from synapse.api.pipeline import RequestPipeline

    looked_up = []

    def authenticate(self, authorization):
        looked_up.append(authorization)
        if authorization != "Bearer good":
            raise ApiError(401, "unauthorized", "no such token")
        grant = SimpleNamespace(missing=lambda scopes: next((s for s in scopes if "secret" in str(s)), None))
        return SimpleNamespace(accessor="acc", principal="app", grant=grant)

    monkeypatch.setattr(RequestPipeline, "authenticate", authenticate)
    pipeline = RequestPipeline(SimpleNamespace(serving=True), SimpleNamespace(denied=lambda error: None))
    known: dict = {}

    def admit(key, authorization, known=known):
        return pipeline.admit("PUT", "/v1/kv/", "/v1/kv/{key}", {"key": key}, {}, authorization, known)

    assert admit("a", "Bearer good") is admit("b", "Bearer good") and looked_up == ["Bearer good"]
    with pytest.raises(ApiError) as refused:
        admit("secret/x", "Bearer good")
    assert refused.value.status == 403  # this request's own scope
    for authorization in ("Bearer bad", "Bearer bad", None):
        with pytest.raises(ApiError) as refused:
            admit("a", authorization)
        assert refused.value.status == 401
    assert looked_up == ["Bearer good", "Bearer bad", "Bearer bad", None]
    admit("a", "Bearer good", known=None)  # outside a batch: looked up every time
    assert looked_up[-1] == "Bearer good" and len(looked_up) == 5


def test_the_hot_path_shares_lookups_within_one_batch_only(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from synapse.api import front
    from synapse.api.pipeline import RequestPipeline

    async def scenario() -> tuple[list, list]:
        batches = [[(1, False, "a", "stale", None, "Bearer t", b""), (2, False, "b", "stale", None, "Bearer t", b"")],
                   [(3, False, "c", "stale", None, "Bearer t", b"")]]
        known_per_request, sent = [], []
        monkeypatch.setattr(front, "read_value", lambda ctx, key: {"key": key})
        pipeline = SimpleNamespace(ctx=SimpleNamespace(cluster=None), failure=RequestPipeline.failure,
                                   admit=lambda *args: known_per_request.append(args[-1]) or "identity",
                                   observe=lambda *a: None)
        hot = front.HotPath(pipeline, SimpleNamespace(notify_fd=lambda: -1, respond=sent.extend,
                                                      take=lambda: batches.pop(0)))
        hot._take()
        hot._take()
        await asyncio.sleep(0)
        return known_per_request, [(rid, status) for rid, status, _ in sent]

    known, answers = asyncio.run(scenario())
    assert known[0] is known[1] and known[2] is not known[0] and answers == [(1, 200), (2, 200), (3, 200)]


def test_a_token_found_live_is_reused_only_with_the_same_state_and_millisecond(monkeypatch):
    """The readers one read index releases check their tokens again at one instant: a token
    found live is looked up once per applied state and millisecond; a refusal is never kept."""
    from types import SimpleNamespace

    from synapse.api import pipeline
    from synapse.api.common import ApiError

    looked_up, state, clock = [], {"applied": (5, b"d5"), "revoked": False}, [1000]

    def authenticate(get, accessor, secret_hash, now):
        looked_up.append((accessor, now, state["applied"][0]))
        return "revoked" if state["revoked"] else SimpleNamespace(principal="app", accessor=accessor)

    monkeypatch.setattr(pipeline.security, "authenticate", authenticate)
    monkeypatch.setattr(pipeline.security, "bootstrapped", lambda get: True)
    monkeypatch.setattr(pipeline, "now_ms", lambda: clock[0])
    cluster = SimpleNamespace(applied=lambda: state["applied"],
                              read=lambda fn: fn(SimpleNamespace(store=SimpleNamespace(get=None))))
    ctx = SimpleNamespace(cluster=cluster, identities={})
    token, other = SimpleNamespace(accessor="acc", secret_hash=b"h"), SimpleNamespace(accessor="acc2", secret_hash=b"h2")

    assert pipeline._identity(ctx, token).grant is pipeline._identity(ctx, token).grant
    pipeline._identity(ctx, other)  # another token: its own lookup
    assert looked_up == [("acc", 1000, 5), ("acc2", 1000, 5)]
    assert pipeline._identity(ctx, SimpleNamespace(accessor="acc", secret_hash=b"wrong")) is not None
    assert looked_up[-1] == ("acc", 1000, 5) and len(looked_up) == 3  # another secret: looked up
    clock[0] = 1001  # a millisecond later: looked up again (a token may expire)
    pipeline._identity(ctx, token)
    assert looked_up[-1] == ("acc", 1001, 5)
    state.update(applied=(6, b"d6"), revoked=True)  # its revocation applied, same millisecond
    for _ in range(2):
        with pytest.raises(ApiError) as refused:
            pipeline._identity(ctx, token)
        assert refused.value.status == 401
    assert looked_up[-2:] == [("acc", 1001, 6), ("acc", 1001, 6)]  # refusals are not kept
