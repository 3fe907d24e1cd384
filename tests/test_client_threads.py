"""One synapse.Client shared by many threads (as users share one): every thread's request
gets its own answer. The client keeps a connection per node per thread; before, the threads
interleaved their requests on one http.client connection and got each other's answers or
ResponseNotReady/CannotSendRequest."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.harness import Cluster


def test_a_client_shared_by_sixteen_threads_gives_each_request_its_own_answer(tmp_path, monkeypatch):
    import synapse.client

    retries = []
    backoff = synapse.client._backoff
    monkeypatch.setattr(synapse.client, "_backoff", lambda *a: retries.append(a) or backoff(*a))
    cluster = Cluster.create(tmp_path, 1, extra=["--worker-slots", "0", "--memory-index", "off"]).start()
    try:
        client = cluster.client()

        def write_then_read(i: int) -> tuple[int, object]:
            client.put(f"threads/{i:04d}", {"i": i})
            return i, client.get(f"threads/{i:04d}")["value"]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(write_then_read, range(400)))
        assert [value for _, value in answers] == [{"i": i} for i, _ in answers]
        assert len(client.scan("threads/", limit=1000)["items"]) == 400
        assert retries == []  # a healthy node: no request failed on a connection another thread used
        client.close()  # every thread's connection
        assert client.get("threads/0007")["value"] == {"i": 7}  # and it still works after
    finally:
        cluster.close()
