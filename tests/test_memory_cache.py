"""The shared Redis cache of query embeddings (synapse/memory/cache.py), with a real Redis: a
query recalled again comes from the cache with identical results; nodes share it; a cache
that is down is bypassed, never an error."""

from __future__ import annotations

import asyncio

from synapse.config import load_config
from synapse.node import Node
from tests.harness import free_ports
from tests.services import require_redis


def _node(tmp_path, name: str, cache: str) -> Node:
    api, raft = free_ports(2)
    return Node(load_config({"node_id": name, "data_dir": tmp_path / name, "api": f"127.0.0.1:{api}",
                             "raft": f"127.0.0.1:{raft}", "worker_slots": 0, "embedding_cache": cache}, {}))


def test_a_recalled_query_comes_from_the_cache_with_identical_results(tmp_path):
    url = require_redis()
    import redis

    r = redis.Redis.from_url(url)
    r.flushdb()

    async def scenario() -> None:
        node = _node(tmp_path, "n1", url)
        await node.start()
        try:
            m = node.memory
            await m.remember("acme/cache", [{"id": "a", "text": "The office opens at nine"},
                                            {"id": "b", "text": "Parking is behind the building"}])
            first = await m.recall("acme/cache", query="when does the office open?", k=2)
            assert m.cache.misses == 1 and m.cache.hits == 0
            again = await m.recall("acme/cache", query="when does the office open?", k=2)
            assert m.cache.hits == 1
            assert again == first and first["results"][0]["id"] == "a"
            keys = r.keys("synapse:emb:*")
            assert len(keys) == 1 and node.memory.embedder.model_id in keys[0].decode()
            assert r.get(keys[0]) == m.embedder.embed(["when does the office open?"])[0]
        finally:
            await node.stop()

    asyncio.run(scenario())


def test_a_cache_that_is_down_is_bypassed(tmp_path):
    dead = f"redis://127.0.0.1:{free_ports(1)[0]}/0"

    async def scenario() -> None:
        node = _node(tmp_path, "n1", dead)
        await node.start()
        try:
            m = node.memory
            await m.remember("acme/nocache", [{"id": "a", "text": "The wifi password is on the fridge"}])
            for _ in range(2):
                found = await m.recall("acme/nocache", query="wifi password", k=1)
                assert found["results"][0]["id"] == "a"
            assert m.cache.errors == 1 and m.cache.hits == 0  # tried once, then bypassed for a while
        finally:
            await node.stop()

    asyncio.run(scenario())
