"""`synapse.Node` inside the test process: blocking and asyncio use, single-node (local)
mode with SQLite, and PostgreSQL storage against the machine's real server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

import synapse
from tests.harness import free_ports
from tests.services import require_postgres


def _config(tmp_path, **overrides):
    api, raft = free_ports(2)
    return synapse.NodeConfig(data_dir=tmp_path, api=f"127.0.0.1:{api}", raft=f"127.0.0.1:{raft}", **overrides)


def _wait_leader(client, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.status()["leader"] is not None:
                return
        except synapse.SynapseError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no leader")
        time.sleep(0.05)


def test_blocking_node_in_a_background_thread(tmp_path):
    with synapse.Node(_config(tmp_path)) as node:
        assert node.token_was_created and len(node.root_token) >= 32
        with synapse.Client(node.api_url, node.root_token) as c:
            _wait_leader(c)
            assert c.put("emb/k", [1, 2, 3])["version"] == 1
            assert c.get("emb/k")["value"] == [1, 2, 3]
            status = c.status()
            assert status["applied_index"] == status["commit_index"]
    # The token persists; a second start reuses it and the data.
    with synapse.Node(_config(tmp_path)) as node:
        assert not node.token_was_created
        with synapse.Client(node.api_url, node.root_token) as c:
            _wait_leader(c)
            assert c.get("emb/k")["value"] == [1, 2, 3]
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    assert json.loads(db.execute("select value from kv where key='emb/k'").fetchone()[0]) == [1, 2, 3]


def test_asyncio_node_and_async_client(tmp_path):
    async def main():
        async with synapse.Node(_config(tmp_path)) as node:
            async with synapse.AsyncClient(node.api_url, node.root_token) as c:
                deadline = time.monotonic() + 10
                while (await c.status())["leader"] is None:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                results = await asyncio.gather(*(c.put(f"async/{i}", i) for i in range(100)))
                assert all(r["version"] == 1 for r in results)
                # Concurrent writes were group-committed: fewer entries than commands.
                assert node.cluster.entries_proposed < node.cluster.commands_proposed
                page = await c.scan("async/", limit=1000)
                assert len(page["items"]) == 100

    asyncio.run(main())


def test_postgresql_storage_materializes_the_state(tmp_path):
    import asyncpg

    dsn = require_postgres()
    cfg = _config(tmp_path, node_id="pgnode", storage=dsn)
    with synapse.Node(cfg) as node:
        with synapse.Client(node.api_url, node.root_token) as c:
            _wait_leader(c)
            c.put("pg/a", {"x": 1})
            c.put("pg/b", "two")
            c.delete("pg/b")
            deadline = time.monotonic() + 10

            async def rows():
                conn = await asyncpg.connect(dsn)
                try:
                    return await conn.fetch("select key, value, version from synapse_pgnode.kv where key like 'pg/%' order by key")
                finally:
                    await conn.close()

            while True:
                got = asyncio.run(rows())
                if [r["key"] for r in got] == ["pg/a"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert [(r["key"], json.loads(r["value"]), r["version"]) for r in got] == [("pg/a", {"x": 1}, 1)]

    async def drop():
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("drop schema if exists synapse_pgnode cascade")
        finally:
            await conn.close()

    asyncio.run(drop())


def test_a_taken_port_is_reported_and_nothing_is_left_running(tmp_path):
    import socket
    import threading

    cfg = _config(tmp_path)
    host, port = cfg.api_host_port()
    busy = socket.socket()
    busy.bind((host, port))
    busy.listen()
    try:
        before = threading.active_count()
        with pytest.raises(synapse.NodeError, match="API address"):
            synapse.Node(cfg).run_in_background()
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
    finally:
        busy.close()


def test_a_write_sent_before_the_first_election_waits_for_it(tmp_path):
    """One raw request (no client retries) sent before any leader exists succeeds: the
    committer proposes again once one is elected, instead of answering 503."""
    import http.client

    with synapse.Node(_config(tmp_path)) as node:
        assert node.cluster.status()["leader_raft_addr"] is None
        host, port = node.config.api_host_port()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("PUT", "/v1/kv/early", b'{"value": "bird"}', {"Authorization": f"Bearer {node.root_token}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert json.loads(resp.read())["version"] == 1


def test_a_command_that_cannot_be_encoded_fails_alone_and_the_committer_goes_on(tmp_path):
    """The API validates every command, so only a bug could hand the group committer one that
    msgpack cannot encode (an integer past 64 bits) — but then the encoding error ended the
    committer's task and every later write on the node timed out. Now that command fails
    alone (not an unknown outcome), the commands coalesced with it are proposed, and the
    node goes on committing."""
    from synapse.cluster.committer import ProposalError

    async def main():
        async with synapse.Node(_config(tmp_path, worker_slots=0)) as node:
            async with synapse.AsyncClient(node.api_url, node.root_token) as c:
                deadline = time.monotonic() + 10
                while (await c.status())["leader"] is None:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            bad = node.cluster.proposal({"op": "put", "key": "enc/bad", "value": b"1", "if_version": 1 << 70}, 64)
            good = node.cluster.proposal({"op": "put", "key": "enc/good", "value": b"2"}, 64)  # same entry
            with pytest.raises(ProposalError) as e:
                await bad
            assert e.value.reason == "bad_command" and not e.value.outcome_unknown
            assert (await good)["ok"]
            assert (await node.cluster.propose({"op": "put", "key": "enc/later", "value": b"3"}, 64))["ok"]

    asyncio.run(main())
