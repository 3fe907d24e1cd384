"""Offline audit of a real node's data dir: `synapse audit verify` replays the retained log
from the dump through the command processor and names the first entry that fails; `synapse
audit tail` shows recent entries. Tampering is done the way an attacker would: with the
record's checksum fixed, so only the chain can tell."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import synapse
from synapse.config import NodeConfig
from synapse.integrity.audit import verify
from tests.harness import free_ports

_RECORD = struct.Struct("<IIQQ")


def _wait(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A node that wrote, checkpointed, compacted its log into a dump, and wrote again."""
    root = tmp_path_factory.mktemp("audit")
    api, raft = free_ports(2)
    cfg = NodeConfig(data_dir=root, api=f"127.0.0.1:{api}", raft=f"127.0.0.1:{raft}", checkpoint_interval=15)
    with synapse.Node(cfg) as node, synapse.Client(node.api_url, node.root_token) as c:
        _wait(lambda: c.status()["leader"] is not None)
        for i in range(20):
            c.put(f"before/{i}", {"i": i})
        before = (root / "raft.dump").stat().st_mtime_ns if (root / "raft.dump").exists() else 0
        node.cluster.compact()
        _wait(lambda: (root / "raft.dump").exists() and (root / "raft.dump").stat().st_mtime_ns != before)
        for i in range(40):
            c.put(f"after/{i}", "x" * 40)
        c.txn(then=[{"op": "put", "key": "t/a", "value": 1}, {"op": "delete", "key": "before/0"}])
        c.checkpoint(label="audited", wait=True)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _records(data_dir: Path):
    """(segment path, offset, length, index, term, command) of every journal record."""
    for seg in sorted((data_dir / "raft-log").glob("*.log")):
        data = seg.read_bytes()
        off = 8
        while off + _RECORD.size <= len(data):
            length, _crc, index, term = _RECORD.unpack_from(data, off)
            yield seg, off, length, index, term, data[off + _RECORD.size : off + _RECORD.size + length]
            off += _RECORD.size + length


def _tamper(data_dir: Path, fix_crc: bool) -> int:
    """Changes one character of a stored value ("xxx..." -> "xxy...") in the journal."""
    for seg, off, length, index, term, command in _records(data_dir):
        at = command.find(b'"xxxx')
        if at < 0:
            continue
        changed = command[: at + 3] + b"y" + command[at + 4 :]
        data = bytearray(seg.read_bytes())
        data[off + _RECORD.size : off + _RECORD.size + length] = changed
        if fix_crc:
            crc = zlib.crc32(changed, zlib.crc32(struct.pack("<QQ", index, term)))
            struct.pack_into("<I", data, off + 4, crc)
        seg.write_bytes(bytes(data))
        return index
    raise AssertionError("no record with a value to tamper with")


def _fingerprint(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_real_data_dir_verifies_and_verifying_changes_nothing(data_dir):
    before = _fingerprint(data_dir)
    result = verify(data_dir)
    assert result.ok, result.failure
    assert result.base_source.startswith("raft.dump at index") and result.base_index > 0
    assert result.entries_replayed >= 40 and result.entries_checked_against_trail == result.entries_replayed
    assert result.checkpoints_verified  # at least the labelled one, replayed and matched
    assert _fingerprint(data_dir) == before


def test_cli_verify_and_tail(data_dir):
    run = [sys.executable, "-m", "synapse.cli.main", "audit"]
    ok = subprocess.run(run + ["verify", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "audit: OK" in ok.stdout, ok.stderr
    tail = subprocess.run(run + ["tail", "8", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert len(lines) == 8 and any("checkpoint" in line for line in lines)
    assert any("txn" in line for line in subprocess.run(
        run + ["tail", "30", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60).stdout.splitlines())


def test_a_changed_entry_with_a_valid_checksum_is_named(data_dir, tmp_path):
    copy = _copy(data_dir, tmp_path / "d")
    index = _tamper(copy, fix_crc=True)
    result = verify(copy)
    assert not result.ok and result.failure["index"] == index
    assert "not the entry this node applied" in result.failure["reason"]
    r = subprocess.run([sys.executable, "-m", "synapse.cli.main", "audit", "verify", "--data-dir", str(copy)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"FAILED at entry {index}" in r.stderr


def test_a_damaged_record_is_named(data_dir, tmp_path):
    copy = _copy(data_dir, tmp_path / "d")
    index = _tamper(copy, fix_crc=False)
    result = verify(copy)
    assert not result.ok and result.failure["index"] == index and "checksum mismatch" in result.failure["reason"]


def test_a_damaged_dump_is_refused(data_dir, tmp_path):
    copy = _copy(data_dir, tmp_path / "d")
    dump = bytearray((copy / "raft.dump").read_bytes())
    dump[len(dump) // 2] ^= 0x01
    (copy / "raft.dump").write_bytes(bytes(dump))
    result = verify(copy)
    assert not result.ok and "dump" in result.failure["reason"]


def test_a_changed_state_record_is_named(data_dir, tmp_path):
    """The trail says what state the node had after each entry: a digest that the replay does
    not reproduce names the entry (here the trail itself is altered, standing for a node
    whose state was damaged at that entry)."""
    copy = _copy(data_dir, tmp_path / "d")
    trail = bytearray((copy / "audit.log").read_bytes())
    size = 8 + 32 + 32 + 4
    last = len(trail) // size - 3
    index = struct.unpack_from("<Q", trail, last * size)[0]
    trail[last * size + 8 + 32] ^= 0xFF  # the digest's first byte
    body = bytes(trail[last * size : last * size + size - 4])
    struct.pack_into("<I", trail, last * size + size - 4, zlib.crc32(body))
    (copy / "audit.log").write_bytes(bytes(trail))
    result = verify(copy)
    assert not result.ok and result.failure["index"] == index and "differs from what this node had" in result.failure["reason"]
