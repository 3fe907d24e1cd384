"""Backups (synapse/integrity/backup.py): `synapse snapshot save` from a running cluster holds
every acknowledged write and agrees by hash with the cluster at its index; `inspect` reads it
back; `restore` makes a new 3-node cluster on other ports from it, which serves the same
state (kv, memories, principals — the old root token works), agrees by hash and takes writes.
Bad input is refused by name and writes nothing."""

from __future__ import annotations

import json
import subprocess

import pytest

from synapse.client import Client, SynapseError
from tests.harness import SYNAPSE, Cluster


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*SYNAPSE, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_save_inspect_and_restore_into_a_new_cluster(tmp_path):
    old = Cluster.create(tmp_path / "old", 3, extra=["--worker-slots", "0"]).start()
    try:
        c = old.client()
        for i in range(200):
            c.put(f"backup/{i:03d}", {"i": i})
        c.remember_many("acme/backup", [{"id": "tea", "text": "The user drinks green tea"},
                                        {"id": "car", "text": "The user drives an old red Volvo"}])
        c.put_role("backup-readers", ["kv:read:backup/"])
        c.put_principal("reader", "person", roles=["backup-readers"])
        reader = c.create_token(["kv:read:backup/"], principal="reader")["token"]
        c.put("backup/last", "acknowledged just before the save")
        file = tmp_path / "cluster.snap"
        out = _cli("snapshot", "save", str(file), "--url", old.nodes[1].url, "--token", old.token).stdout
        assert "saved" in out and file.stat().st_size > 0
        info = json.loads(_cli("snapshot", "inspect", str(file), "--json").stdout)
        assert f"log index {info['index']}, state {info['state_hash'][:16]}" in out  # what the node sent
        assert info["counts"]["kv"] >= 201 and info["counts"]["memories"] == 2 and info["counts"]["tokens"] >= 2
        token = old.token
    finally:
        old.close()

    new = Cluster.create(tmp_path / "new", 3, extra=["--worker-slots", "0"])
    for n in new.nodes:  # every voter from the same file, with the same voters
        peers = ",".join(f"{m.node_id}={m.raft}" for m in new.nodes if m is not n)
        done = _cli("snapshot", "restore", str(file), "--data-dir", str(n.data_dir), "--raft", n.raft, "--peers", peers)
        assert f"restored log index {info['index']} (state {info['state_hash'][:16]})" in done.stdout
    for n in new.nodes:
        n.start()
    try:
        new.token = token  # no new root token: the principals came with the state
        new.wait_ready(60)
        c = new.client()
        assert c.get("backup/last")["value"] == "acknowledged just before the save"
        assert all(c.get(f"backup/{i:03d}")["value"] == {"i": i} for i in range(0, 200, 13))
        assert [r["id"] for r in c.recall("acme/backup", "what does the user drink?", k=1)] == ["tea"]
        status = c.status()
        assert status["applied_index"] >= info["index"]
        c.put("backup/after-restore", 1)  # the new cluster takes writes
        scoped = Client(new.nodes[2].url, reader)  # a scoped token of the old cluster: valid, still scoped
        assert scoped.get("backup/000")["value"] == {"i": 0}
        with pytest.raises(SynapseError) as refused:
            scoped.put("backup/000", "overwritten")
        assert refused.value.status == 403
        states = new.wait_converged()
        assert len({s["state_hash"] for s in states.values()}) == 1
    finally:
        new.close()


def test_restore_refuses_bad_input_and_writes_nothing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("data")
    (tmp_path / "junk.snap").write_bytes(b"not a snapshot at all")
    cases = [
        (["restore", str(tmp_path / "junk.snap"), "--data-dir", str(tmp_path / "a"), "--raft", "127.0.0.1:7071"],
         "not a readable Synapse snapshot", tmp_path / "a"),
        (["restore", str(tmp_path / "missing.snap"), "--data-dir", str(tmp_path / "b"), "--raft", "127.0.0.1:7071"],
         "no such file", tmp_path / "b"),
        (["restore", str(tmp_path / "junk.snap"), "--data-dir", str(tmp_path / "c"), "--raft", "nowhere"],
         "raft", tmp_path / "c"),
    ]
    for args, message, data_dir in cases:
        done = _cli("snapshot", *args, check=False)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert not data_dir.exists()
    done = _cli("snapshot", "inspect", str(tmp_path / "junk.snap"), check=False)
    assert done.returncode != 0 and "not a readable Synapse snapshot" in done.stderr
