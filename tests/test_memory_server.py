"""Agent memory with a Chroma *server* (docker and distributed modes: `--memory-index
chroma+http://HOST:PORT`): a real 3-node cluster sharing one real `chroma run` server, one
database per node; a lost Chroma server makes recall answer 503 naming the index (never a
wrong answer), and a server that comes back empty is rebuilt from the replicated records."""

from __future__ import annotations

import shutil

import pytest

from synapse.client import Client
from tests.harness import Cluster, post_json, wait_until
from tests.services import ChromaServer


@pytest.fixture
def chroma(tmp_path):
    server = ChromaServer(tmp_path / "chroma")
    yield server
    server.stop()


def test_nodes_sharing_a_chroma_server_keep_their_own_databases_and_survive_losing_it(tmp_path, chroma):
    cluster = Cluster.create(tmp_path / "cluster", 3, extra=["--memory-index", chroma.url]).start()
    try:
        ns = "acme/shared-server"
        c = cluster.client()
        c.remember_many(ns, [{"id": "tea", "text": "The user drinks green tea every morning"},
                             {"id": "car", "text": "The user drives an old red Volvo"}])
        for node in cluster.nodes:
            found = Client(node.url, cluster.token).recall(ns, "what does the user drink?", k=1)
            assert [r["id"] for r in found] == ["tea"]
        import chromadb

        admin = chromadb.AdminClient(chromadb.Settings(chroma_api_impl="chromadb.api.fastapi.FastAPI",
                                                       chroma_server_host="127.0.0.1",
                                                       chroma_server_http_port=chroma.port, anonymized_telemetry=False))
        for node in cluster.nodes:  # one database per node: the views never mix
            db = admin.get_database(f"synapse-{node.node_id}")
            client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port, database=db["name"])
            (col,) = client.list_collections()
            assert col.count() == 2

        chroma.stop()
        code, answer = post_json(cluster.nodes[0], "/v1/memory/acme%2Fshared-server/recall", {"query": "drink"},
                                 cluster.token)
        assert code == 503 and "memory index" in answer["message"] and answer["retry"]
        c.remember(ns, "The user's sister lives in Oslo", id="sister")  # the records need no index

        shutil.rmtree(chroma.path)  # the server comes back with nothing
        restarted = ChromaServer(chroma.path, port=chroma.port)
        try:
            for node in cluster.nodes:
                one = Client(node.url, cluster.token, timeout=20)
                wait_until(lambda: [r["id"] for r in one.recall(ns, "where does the sister live?", k=1)] == ["sister"],
                           30, f"{node.node_id}'s database rebuilt from the state")
                assert len(one.recall(ns, "anything about the user", k=10)) == 3
        finally:
            restarted.stop()
    finally:
        cluster.close()
