"""Memory records in the replicated state (synapse/state/memory.py) through the pure command
processor: the same entries give the same state hash on every replica; dedup, model binding,
expiry and removal; every malformed command is refused by name and changes nothing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse import _core
from synapse.state.commands import encode_entry
from synapse.state.processor import CommandProcessor

DIM = 4


def vec(*values: float) -> bytes:
    return struct.pack(f"<{DIM}f", *values)


def put(ns="a/b", records=None, model="m", now=1_000, **extra) -> dict:
    records = records if records is not None else [{"id": "r1", "text": "hello", "meta": b"{}", "vec": vec(1, 0, 0, 0)}]
    return {"op": "mem_put", "ns": ns, "model": model, "dim": DIM, "now_ms": now, "records": records, **extra}


def apply(p: CommandProcessor, *commands, index=None) -> list[dict]:
    index = index if index is not None else p.chain()[0] + 1
    return p.apply_entry(index, encode_entry(commands)).results


def fresh() -> CommandProcessor:
    return CommandProcessor(_core.StateStore())


def test_a_record_is_stored_with_its_vector_and_times():
    p = fresh()
    (result,) = apply(p, put(records=[{"id": "r1", "text": "hi", "meta": b'{"k":1}', "vec": vec(0, 1, 0, 0),
                                       "ttl_ms": 500}]))
    assert result == {"ok": True, "index": 1, "records": [{"id": "r1", "duplicate": False, "created": True}]}
    (_, raw), = p.memory_rows("a/b", ["r1"])
    from synapse.state import keys, memory
    record = memory.decode_record("a/b", "r1", raw, keys.unpack)
    assert (record.text, record.meta, record.vec, record.created_ms, record.expires_ms) == ("hi", b'{"k":1}', vec(0, 1, 0, 0), 1000, 1500)
    assert p.memory_namespace("a/b") == {"model": "m", "dim": DIM, "count": 1}


def test_the_same_text_answers_with_the_first_id_unless_dedup_is_off():
    p = fresh()
    apply(p, put())
    (dup,) = apply(p, put(records=[{"id": "r2", "text": "hello", "meta": b"{}", "vec": vec(1, 0, 0, 0)}]))
    assert dup["records"] == [{"id": "r1", "duplicate": True, "created": False}]
    assert p.memory_namespace("a/b")["count"] == 1
    (kept,) = apply(p, put(records=[{"id": "r2", "text": "hello", "meta": b"{}", "vec": vec(1, 0, 0, 0)}], dedup=False))
    assert kept["records"] == [{"id": "r2", "duplicate": False, "created": True}]
    assert p.memory_namespace("a/b")["count"] == 2
    # Inside one batch too: the second record of the same text is the first one.
    (batch,) = apply(p, put(ns="c", records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(1, 1, 0, 0)},
                                             {"id": "y", "text": "t", "meta": b"{}", "vec": vec(1, 1, 0, 0)}]))
    assert [r["id"] for r in batch["records"]] == ["x", "x"]


def test_vectors_of_two_models_are_never_mixed_in_a_namespace():
    p = fresh()
    apply(p, put())
    (refused,) = apply(p, put(model="other", records=[{"id": "r9", "text": "new", "meta": b"{}", "vec": vec(0, 0, 1, 0)}]))
    assert refused["error"] == "model_mismatch" and "'m'" in refused["message"]
    # Once the namespace is empty, its binding goes with its last record.
    apply(p, {"op": "mem_delete", "ns": "a/b", "ids": ["r1"]})
    assert p.memory_namespace("a/b") is None
    (ok,) = apply(p, put(model="other"))
    assert ok["ok"]


def test_expiry_removes_only_what_is_due_as_of_the_proposers_clock():
    p = fresh()
    apply(p, put(records=[{"id": f"r{i}", "text": f"t{i}", "meta": b"{}", "vec": vec(1, i, 0, 0), "ttl_ms": 100 * (i + 1)}
                          for i in range(5)] + [{"id": "forever", "text": "f", "meta": b"{}", "vec": vec(0, 0, 0, 1)}]))
    assert p.memory_next_expiry() == 1_100
    (result,) = apply(p, {"op": "mem_expire", "now_ms": 1_300})
    assert result["expired"] == 3
    assert [memory_id for memory_id, raw in p.memory_rows("a/b", ["r2", "r3", "forever"]) if raw] == ["r3", "forever"]
    assert p.memory_next_expiry() == 1_400
    # Re-putting a record moves its expiry; the old time no longer removes it.
    apply(p, put(now=1_350, records=[{"id": "r3", "text": "t3", "meta": b"{}", "vec": vec(1, 3, 0, 0), "ttl_ms": 10_000}]))
    assert apply(p, {"op": "mem_expire", "now_ms": 1_450})[0]["expired"] == 0
    assert p.memory_rows("a/b", ["r3"])[0][1] is not None


def test_each_change_reaches_the_index_in_apply_order():
    p = fresh()
    outcome = p.apply_entry(1, encode_entry([put(), {"op": "mem_delete", "ns": "a/b", "ids": ["r1", "nope"]}]))
    assert [(c.id, c.record is not None) for c in outcome.memory] == [("r1", True), ("r1", False)]
    assert outcome.results[1]["deleted"] == ["r1"]


@pytest.mark.parametrize("change, field", [
    (dict(ns="bad//ns"), "ns"),
    (dict(ns="/lead"), "ns"),
    (dict(dim=0), "dim"),
    (dict(records=[]), "records"),
    (dict(records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(1, 0, 0, 0)}] * 257), "records"),
    (dict(records=[{"id": "", "text": "t", "meta": b"{}", "vec": vec(1, 0, 0, 0)}]), "records[0].id"),
    (dict(records=[{"id": "x", "text": "", "meta": b"{}", "vec": vec(1, 0, 0, 0)}]), "records[0].text"),
    (dict(records=[{"id": "x", "text": "x" * (32 * 1024 + 1), "meta": b"{}", "vec": vec(1, 0, 0, 0)}]), "records[0].text"),
    (dict(records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(1, 0, 0, 0)[:-1]}]), "records[0].vector"),
    (dict(records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(float("nan"), 0, 0, 0)}]), "records[0].vector"),
    (dict(records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(0, 0, 0, 0)}]), "records[0].vector"),
    (dict(records=[{"id": "x", "text": "t", "meta": "{}", "vec": vec(1, 0, 0, 0)}]), "records[0].metadata"),
    (dict(records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(1, 0, 0, 0), "ttl_ms": 0}]), "records[0].ttl_s"),
    (dict(records=[{"id": "x", "text": "t", "meta": b"{}", "vec": vec(1, 0, 0, 0), "extra": 1}]), "records[0].extra"),
])
def test_a_malformed_command_is_refused_by_name_and_changes_nothing(change, field):
    p = fresh()
    apply(p, put())
    digest_records = p.store.scan_prefix(b"mem")
    (result,) = apply(p, put(**change))
    assert result["error"] == "bad_command" and result["message"].startswith(field), result
    assert p.store.scan_prefix(b"mem") == digest_records


_texts = st.sampled_from(["alpha", "beta", "gamma", "delta"])
_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(["x", "y", "z"]), _texts, st.integers(0, 3), st.booleans()),
    st.tuples(st.just("del"), st.sampled_from(["x", "y", "z"])),
    st.tuples(st.just("expire"), st.integers(0, 5_000)),
), max_size=30)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_replicas_applying_the_same_entries_agree_by_hash_and_links_stay_consistent(ops):
    a, b = fresh(), fresh()
    for i, op in enumerate(ops, 1):
        if op[0] == "put":
            _, record_id, text, ttl, dedup = op
            record = {"id": record_id, "text": text, "meta": b"{}", "vec": vec(1, len(text), 0, 0)}
            if ttl:
                record["ttl_ms"] = ttl * 1_000
            command = put(records=[record], now=i * 100, dedup=dedup)
        elif op[0] == "del":
            command = {"op": "mem_delete", "ns": "a/b", "ids": [op[1]]}
        else:
            command = {"op": "mem_expire", "now_ms": op[1]}
        for p in (a, b):
            assert apply(p, command, index=i)[0]["ok"]
    assert a.store.digest() == b.store.digest()
    live = [k for k, _ in a.store.scan_prefix(b"mem/")]
    space = a.memory_namespace("a/b")
    assert (space["count"] if space else 0) == len(live)
    # Every dedup link points at a live record holding that text.
    from synapse.state import keys, memory
    for key, record_id in a.store.scan_prefix(memory.MEM_HASH):
        raw = a.store.get(memory.record_key("a/b", record_id.decode()))
        assert raw is not None
        assert memory.content_hash(memory.decode_record("a/b", record_id.decode(), raw, keys.unpack).text) == key[-16:]


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.one_of(
    st.binary(min_size=4 * n, max_size=4 * n),
    st.lists(st.sampled_from([0.0, -0.0, 1.0, -2.5, float("nan"), float("inf"), -float("inf"), 1e-45, 3.4e38]),
             min_size=n, max_size=n).map(lambda v: struct.pack(f"<{len(v)}f", *v)))))
def test_the_vector_check_on_whole_integers_agrees_with_testing_each_float(vec):
    import math

    from synapse.state.memory import check_vector_bytes
    from synapse.state.validation import CommandError

    values = struct.unpack(f"<{len(vec) // 4}f", vec)
    want = "finite" if not all(math.isfinite(x) for x in values) else "zeros" if not any(values) else None
    try:
        check_vector_bytes(vec, len(vec) // 4, "v")
        got = None
    except CommandError as e:
        got = "finite" if "NaN" in e.message else "zeros"
    assert got == want
