"""Log entries of 64 KiB and more, which PySyncObj 0.3.17 sends in chunks — and labels the
last one too early when the entry's pickle passes a multiple of 64 KiB that its command does
not (synapse/cluster/transmission.py). Without our receiver a follower raised on every such
entry, fell behind, and cut entries it had already applied.

Chunking as PySyncObj does it is checked against ``receive_chunk`` directly; then a real
3-node cluster takes writes whose entries are computed to fall in the bad band (and just
outside it), checked afterwards against the entries as the leader logged them. ~5 s."""

from __future__ import annotations

import http.client
import json
import uuid
from types import SimpleNamespace

import pytest
from pysyncobj import SyncObj, SyncObjConf, pickle

from synapse.api.kv import put_command
from synapse.cluster import transmission
from synapse.cluster.entries import decode_command
from synapse.cluster.journal import SegmentedJournal
from synapse.cluster.raft import Voter
from synapse.security import tokens
from synapse.state.commands import decode_entry, encode_entry
from tests.harness import Cluster, wait_until

BATCH = SyncObjConf().appendEntriesBatchSizeBytes  # 64 KiB


def _chunks(entry: tuple) -> list[tuple[str, bytes]]:
    """PySyncObj 0.3.17's chunks of one large entry, labelled as ``SyncObj.__sendAppendEntries``
    labels them: 'finish' once ``pos + batch >= len(command)``."""
    data = pickle.dumps(entry)
    return [("start" if pos == 0 else "finish" if pos + BATCH >= len(entry[0]) else "process", data[pos:pos + BATCH])
            for pos in range(0, len(data), BATCH)]


def _premature(command_len: int, pickle_len: int) -> int:
    """How many chunks before the last one PySyncObj labels 'finish': the multiples of the
    batch size (from the second) in [command length, pickle length)."""
    return sum(1 for k in range(2, (pickle_len - 1) // BATCH + 1) if command_len <= k * BATCH)


def _message(kind: str, data: bytes, prev: int = 45, term: int = 5) -> dict:
    return {"type": "append_entries", "transmission": kind, "data": data, "term": term, "commit_index": prev,
            "prevLogIdx": prev, "prevLogTerm": term}


def _receiver():
    """A follower's transmission state, and what PySyncObj does with 'start' and 'process'."""
    me = SimpleNamespace(raftCurrentTerm=5, _SyncObj__recvTransmission="")

    def pysyncobj(message: dict) -> None:
        if message.get("transmission") == "start":
            me._SyncObj__recvTransmission = message["data"]
        elif message.get("transmission") == "process":
            me._SyncObj__recvTransmission += message["data"]

    return me, pysyncobj


def _command(length: int, high_every: int) -> bytes:
    """A command of ``length`` bytes, one in ``high_every`` of them >= 0x80 (each takes two bytes
    in the pickle, as in our msgpack payloads)."""
    return bytes(0xC3 if i % high_every == 0 else 0x61 for i in range(length))


@pytest.mark.parametrize("high_every", [2, 400, 10**9])
def test_each_large_entry_is_handed_on_once_complete_however_its_chunks_are_labelled(high_every):
    premature = 0
    for length in [*range(2 * BATCH - 400, 2 * BATCH + 40, 7), 3 * BATCH - 100, 5 * BATCH]:
        entry = (_command(length, high_every), 46, 5)
        me, pysyncobj = _receiver()
        handed = []
        for kind, data in _chunks(entry):
            message = _message(kind, data)
            out = transmission.receive_chunk(me, message)
            handed.append(out)
            if out is not None:
                pysyncobj(out)
        *middle, last = handed
        assert middle[0] is not None and middle[0]["transmission"] == "start"
        assert all(m["transmission"] == "process" for m in middle[1:]), length  # 'finish' too early: a middle chunk
        assert "transmission" not in last and "data" not in last
        assert last["entries"] == [entry] and (last["prevLogIdx"], last["prevLogTerm"], last["term"]) == (45, 5, 5)
        assert me._SyncObj__recvTransmission == ""
        premature += sum(1 for kind, _ in _chunks(entry)[:-1] if kind == "finish")
    assert premature > 0  # the sizes cover the defect


def test_start_and_middle_chunks_and_other_terms_are_left_to_pysyncobj():
    me, _ = _receiver()
    start = _message("start", b"\x80\x02")
    assert transmission.receive_chunk(me, start) is start
    me._SyncObj__recvTransmission = b"\x80\x02"
    middle = _message("process", b"x" * 10)
    assert transmission.receive_chunk(me, middle) is middle
    old = _message("finish", b"x", term=4)  # a deposed leader's: PySyncObj ignores it
    assert transmission.receive_chunk(me, old) is old


def test_a_chunk_with_no_transmission_open_is_dropped_instead_of_raising():
    me, _ = _receiver()  # PySyncObj's buffer is '' (a str) until a 'start'
    assert transmission.receive_chunk(me, _message("process", b"x")) is None
    assert transmission.receive_chunk(me, _message("finish", b"x")) is None


def test_a_resent_large_entry_never_cuts_entries_the_follower_already_has(monkeypatch):
    """Through Voter's guard: the completed entry is checked like any batch (raft.py,
    _cut_only_on_conflict) instead of PySyncObj deleting the follower's log after it."""
    log = [(b"c%d" % i, i, 5) for i in range(40, 61)]
    log[6] = (_command(2 * BATCH - 60, 400), 46, 5)  # in the band: its pickle passes 128 KiB
    assert _premature(len(log[6][0]), len(pickle.dumps(log[6]))) == 1
    seen, replies = [], []
    me = SimpleNamespace(raftCommitIndex=58, raftCurrentTerm=5, _isLeader=lambda: False, otherNodes={"peer"},
                         _SyncObj__recvTransmission="",
                         _SyncObj__getEntries=lambda first, count: log[first - 40:][:count],
                         _SyncObj__sendNextNodeIdx=lambda node, **kw: replies.append(kw))

    def handler(self, node, message):
        seen.append(message)
        if message.get("transmission") == "start":
            self._SyncObj__recvTransmission = message["data"]
        elif message.get("transmission") == "process":
            self._SyncObj__recvTransmission += message["data"]

    monkeypatch.setattr(SyncObj, "_SyncObj__onMessageReceived", handler)
    for kind, data in _chunks(log[6]):
        Voter._guarded_message(me, "peer", dict(_message(kind, data), commit_index=58))
    assert [m.get("transmission") for m in seen] == ["start", "process", None]
    assert "prevLogIdx" not in seen[-1] and "entries" not in seen[-1]  # PySyncObj cuts nothing
    assert replies == [{"nextNodeIdx": 47, "success": True}]


# --- a real cluster ---


def _bounds(key: str, value: str, rid: str, accessor: str) -> tuple[int, int, int, int]:
    """(min, max) command length and (min, max) pickled-entry length of the PUT the API builds,
    over what the request does not fix: the proposer's clock (``auth_ms``: its low four bytes
    >= 0x80 or not) and the entry's index and term (1-byte to 4-byte ints in the pickle)."""
    command, _ = put_command(key, {"value": value}, rid, SimpleNamespace(accessor=accessor))
    now = command["auth_ms"]
    lengths = []
    for auth_ms in (now >> 32 << 32, (now >> 32 << 32) | 0x80808080):
        # What PySyncObj logs for apply_entry(payload): any method id < 256 pickles alike.
        raft_command = bytes([0]) + pickle.dumps((0, (encode_entry([dict(command, auth_ms=auth_ms)]),)))
        lengths.append((len(raft_command), len(pickle.dumps((raft_command, 0, 0))),
                        len(pickle.dumps((raft_command, 1 << 30, 1 << 30)))))
    (c_lo, p_lo, _), (c_hi, _, p_hi) = lengths
    return c_lo, c_hi, p_lo, p_hi


def _plan(accessor: str) -> list[tuple[str, str, bool]]:
    """(key, value, whether PySyncObj labels a chunk before the last 'finish') for each write:
    per multiple of 64 KiB (2 and 3), the first, a middle and the last size surely in the
    band and the nearest sizes surely outside it; then two non-ASCII values, in the band at
    any size once their command reaches 64 KiB (each byte >= 0x80 doubles in both encodings)."""
    rid = "0" * 32  # the writes' ids are uuid4 hex: as long, as ASCII
    plan = []
    for k in (2, 3):
        key = f"large/{k}"
        sure_in, sure_out = [], []
        for n in range(k * BATCH - 420, k * BATCH - 160):
            c_lo, c_hi, p_lo, p_hi = _bounds(key, "x" * n, rid, accessor)
            if c_hi <= k * BATCH < p_lo:
                sure_in.append(n)
            elif _premature(c_lo, p_hi) == 0:
                sure_out.append(n)
        assert len(sure_in) >= 3, f"no value size puts the command just below {k} x 64 KiB and its pickle past it"
        below = max(n for n in sure_out if n < sure_in[0])
        above = min(n for n in sure_out if n > sure_in[-1])
        for n, expected in ((below, False), (sure_in[0], True), (sure_in[len(sure_in) // 2], True),
                            (sure_in[-1], True), (above, False)):
            plan.append((key, "x" * n, expected))
    for key, value in (("large/accents", "é" * 20_000), ("large/cjk", "日" * 45_000)):
        c_lo, c_hi, p_lo, p_hi = _bounds(key, value, rid, accessor)
        assert c_lo >= BATCH and _premature(c_hi, p_lo) >= 1, (key, c_hi, p_lo)
        plan.append((key, value, True))
    return plan


def _put(node, token: str, key: str, value, rid: str) -> tuple[int, dict]:
    """One PUT, no retries."""
    host, port = node.api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        conn.request("PUT", f"/v1/kv/{key}", json.dumps({"value": value}).encode(),
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "X-Request-Id": rid})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_entries_in_the_band_are_acknowledged_and_applied_everywhere(tmp_path):
    # Quiet nodes (no worker, no periodic checkpoint): nothing but these writes joins an entry.
    cluster = Cluster.create(tmp_path, 3, extra=["--worker-slots", "0", "--checkpoint-interval", "0"]).start()
    try:
        wait_until(lambda: all(len(s["members"]) == 3 and all(m["api"] for m in s["members"])
                               for s in cluster.statuses().values()), 15, "every node to register itself")
        leader = cluster.leader()
        plan = _plan(tokens.parse(cluster.token).accessor)
        written = []
        for key, value, expected in plan:
            status, answer = _put(leader, cluster.token, key, value, uuid.uuid4().hex)
            assert status == 200, (key, len(value), answer)
            written.append(answer["index"])
        converged = cluster.wait_converged()
        assert all(s["applied_index"] >= written[-1] for s in converged.values()), converged
        assert len({s["state_hash"] for s in converged.values()}) == 1
        status, answer = _put(leader, cluster.token, "after", "small", uuid.uuid4().hex)
        assert status == 200, answer
        converged = cluster.wait_converged()
        assert all(s["applied_index"] >= answer["index"] for s in converged.values()), converged
    finally:
        cluster.close()
    # Each write was one entry of its own, of the length planned: in the band or just outside.
    journal = SegmentedJournal(leader.data_dir / "raft-log", read_only=True)
    first = journal[0][1]
    for (key, value, expected), index in zip(plan, written):
        entry = journal[index - first]
        (command,) = decode_entry(decode_command(entry[0]).payload)
        assert (command["key"], json.loads(command["value"])) == (key, value)
        assert (_premature(len(entry[0]), len(pickle.dumps(entry))) > 0) is expected, (key, len(value), len(entry[0]))
    for node in cluster.nodes:
        text = node.log()
        assert "failed _onTick" not in text, (node.node_id, text[-3000:])  # a chunk raised on its tick thread
        assert "truncating already-applied" not in text, node.node_id
