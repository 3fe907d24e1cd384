"""Log compaction through our dump file: a node restarts from it, and a node that missed the
compacted entries catches up by receiving it from the leader (cluster/DESIGN.md: raw 64 KiB chunks).

Single nodes here run without the embedded execution node (``worker_slots=0``): its
registration at every start is a write, and these tests compare the exact state across
restarts."""

from __future__ import annotations

import time
from pathlib import Path

import synapse
from synapse.cluster.dump import read_dump
from synapse.config import NodeConfig
from synapse.state import keys
from tests.harness import SECRET, free_ports


def _wait(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _contents(node: synapse.Node) -> list[tuple[bytes, bytes]]:
    """The replicated state but the audit chain head (every entry since extends that)."""
    return node.cluster.read(lambda p: [(k, v) for k, v in p.store.scan() if k != keys.CHAIN])


def _compact(node: synapse.Node, dump: Path) -> None:
    before = dump.stat().st_mtime_ns if dump.exists() else 0
    node.cluster.compact()
    _wait(lambda: dump.exists() and dump.stat().st_mtime_ns != before, what=f"a new {dump}")


def test_restart_from_the_dump_keeps_state_and_hash(tmp_path):
    api, raft = free_ports(2)
    cfg = NodeConfig(data_dir=tmp_path, api=f"127.0.0.1:{api}", raft=f"127.0.0.1:{raft}", worker_slots=0)
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["leader"] is not None, what="a leader")
        for i in range(50):
            c.put(f"d/{i}", i)
        _compact(node, tmp_path / "raft.dump")
        c.put("d/after-dump", "journal only")
        status = c.status()
        contents = _contents(node)
    dump = read_dump(tmp_path / "raft.dump")
    assert dump.store.scan_prefix(b"kv/d/")  # the state is in the dump, checked on load
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["applied_index"] >= status["applied_index"], what="replay")
        assert c.get("d/49")["value"] == 49 and c.get("d/after-dump")["value"] == "journal only"
        assert _contents(node) == contents


def test_a_node_that_missed_compacted_entries_catches_up_from_the_dump(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    ports = free_ports(6)
    raft = {f"n{i}": f"127.0.0.1:{ports[2 * i - 1]}" for i in (1, 2, 3)}

    def config(node_id: str) -> NodeConfig:
        i = int(node_id[1])
        return NodeConfig(
            node_id=node_id, data_dir=tmp_path / node_id, api=f"127.0.0.1:{ports[2 * i - 2]}",
            raft=raft[node_id], peers={k: v for k, v in raft.items() if k != node_id}, secret_file=secret,
        )

    nodes = {n: synapse.Node(config(n)).run_in_background() for n in ("n1", "n2", "n3")}
    try:
        c = synapse.Client([n.api_url for n in nodes.values()], nodes["n1"].root_token)
        _wait(lambda: c.status()["leader"] is not None, what="a leader")
        lagging = next(n for n, node in nodes.items() if not node.cluster.status()["is_leader"])
        nodes.pop(lagging).close()
        for i in range(200):
            c.put(f"lag/{i}", {"i": i})
        for node_id, node in nodes.items():
            _compact(node, tmp_path / node_id / "raft.dump")
        nodes[lagging] = synapse.Node(config(lagging)).run_in_background()
        target = c.status()
        back = synapse.Client(nodes[lagging].api_url, nodes[lagging].root_token)
        _wait(lambda: back.status()["applied_index"] >= target["applied_index"], timeout=30, what="catch-up")
        assert back.get("lag/199", consistency="stale")["value"] == {"i": 199}
        _wait(lambda: len({(n.cluster.applied()[1]) for n in nodes.values()}) == 1, what="equal hashes")
    finally:
        for node in nodes.values():
            node.close()


def test_writes_go_on_while_a_dump_is_written_and_all_survive_a_restart(tmp_path):
    """The dump is written from a frozen view on its own thread: writes proposed meanwhile are
    acknowledged, land after the dump's index, and are replayed from the log on restart."""
    api, raft = free_ports(2)
    cfg = NodeConfig(data_dir=tmp_path, api=f"127.0.0.1:{api}", raft=f"127.0.0.1:{raft}", worker_slots=0)
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["leader"] is not None, what="a leader")
        c.txn(then=[{"op": "put", "key": f"big/{i}", "value": "x" * 100} for i in range(128)])
        for batch in range(40):  # ~5,000 keys, so the dump takes a while to write
            c.txn(then=[{"op": "put", "key": f"big/{batch}/{i}", "value": "y" * 100} for i in range(128)])
        dump = tmp_path / "raft.dump"
        node.cluster.compact()
        for i in range(100):  # proposed while the dump is (very likely) being written
            c.put(f"during/{i}", i)
        _wait(lambda: dump.exists(), what="the dump")
        status = c.status()
        contents = _contents(node)
    info = read_dump(tmp_path / "raft.dump").info
    assert 0 < info.log_index <= status["applied_index"]
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["applied_index"] >= status["applied_index"], what="replay")
        assert [c.get(f"during/{i}")["value"] for i in range(100)] == list(range(100))
        assert _contents(node) == contents


def test_a_kill_between_the_dump_rename_and_the_log_cut_loses_nothing(tmp_path, monkeypatch):
    """PySyncObj cuts the log a tick after the new dump is in place, and on loading a dump it
    clears a log that does not start at the dump — entries after the dump included. Freeze
    the log at the moment between the two (no cut), restart, and check nothing is lost."""
    from synapse.cluster.journal import SegmentedJournal

    api, raft = free_ports(2)
    cfg = NodeConfig(data_dir=tmp_path, api=f"127.0.0.1:{api}", raft=f"127.0.0.1:{raft}", worker_slots=0)
    monkeypatch.setattr(SegmentedJournal, "deleteEntriesTo", lambda self, n: None)
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["leader"] is not None, what="a leader")
        for i in range(30):
            c.put(f"before/{i}", i)
        _compact(node, tmp_path / "raft.dump")
        for i in range(30):
            c.put(f"after/{i}", i)
        status = c.status()
        contents = _contents(node)
        assert node.cluster.replica.journal[0][1] == 1  # the log was not cut
    monkeypatch.undo()
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["applied_index"] >= status["applied_index"], what="replay")
        assert [c.get(f"after/{i}")["value"] for i in range(30)] == list(range(30))
        assert _contents(node) == contents


def test_a_cancelled_dump_job_never_replaces_the_dump(tmp_path):
    """A dump received from the leader cancels the one being written (under the job lock)."""
    import threading

    from synapse import _core
    from synapse.cluster.dump import DumpJob

    store = _core.StateStore()
    store.apply([(b"k%d" % i, b"v") for i in range(1000)])
    path = tmp_path / "raft.dump"
    path.write_bytes(b"the newer dump received from the leader")
    lock = threading.Lock()
    raft_tuple = ((b"last", 10, 1), (b"prev", 9, 1), ["127.0.0.1:1"])
    with lock:  # the job cannot rename before we cancel it
        job = DumpJob(path, store.freeze(), raft_tuple, lock)
        job.cancel()
    job.join()
    assert job.done() and job.cancelled and job.error is None
    assert path.read_bytes() == b"the newer dump received from the leader"
    assert not (tmp_path / "raft.dump.next").exists()
    job = DumpJob(path, store.freeze(), raft_tuple, lock)
    job.join()
    assert read_dump(path).info.log_index == 10
