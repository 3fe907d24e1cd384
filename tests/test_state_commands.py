"""The schema-1 command encoding and validation (``synapse.state.commands``), and the store
key layout (``synapse.state.keys``), against synapse/state/DESIGN.md."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse.state import keys
from synapse.state.commands import (
    MAX_KEY_BYTES,
    MAX_RID_CHARS,
    MAX_TXN_CONDS,
    MAX_TXN_OPS,
    MAX_VALUE_BYTES,
    SCHEMA_VERSION,
    CommandError,
    EntryError,
    decode_entry,
    encode_entry,
    validate_command,
)


def put(key="k", value=b"1", **extra):
    return {"op": "put", "key": key, "value": value, **extra}


def error_of(command, **kwargs) -> CommandError:
    with pytest.raises(CommandError) as info:
        validate_command(command, **kwargs)
    assert str(info.value) == info.value.message
    assert info.value.message.startswith(info.value.field + ":"), info.value.message
    return info.value


# --- entry encoding -----------------------------------------------------------------------------


def test_limits_are_the_documented_ones():
    assert (SCHEMA_VERSION, MAX_KEY_BYTES, MAX_VALUE_BYTES) == (1, 1024, 1 << 20)
    assert (MAX_TXN_OPS, MAX_TXN_CONDS, MAX_RID_CHARS) == (128, 64, 128)


def test_entry_is_the_documented_msgpack_document():
    commands = [put(rid="r1"), {"op": "noop"}]
    payload = encode_entry(commands)
    assert payload == msgpack.packb([1, commands], use_bin_type=True)
    assert decode_entry(payload) == commands
    assert decode_entry(encode_entry([])) == []


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"", "not a msgpack document"),
        (b"\xc1", "not a msgpack document"),
        (msgpack.packb([1, []]) + b"\x00", "not a msgpack document"),
        (msgpack.packb({"op": "put"}), "2-element array"),
        (msgpack.packb([1, [], 3]), "2-element array"),
        (msgpack.packb([2, []]), "schema version 2 is not supported"),
        (msgpack.packb([True, []]), "schema version True is not supported"),
        (msgpack.packb([1, {"op": "noop"}]), "expected an array of commands"),
    ],
)
def test_bad_entries_raise_entry_error(payload, words):
    with pytest.raises(EntryError, match=words):
        decode_entry(payload)


def test_bytes_stay_bytes_and_text_stays_text():
    (command,) = decode_entry(encode_entry([put("ключ", b'"v"')]))
    assert command == {"op": "put", "key": "ключ", "value": b'"v"'}
    assert type(command["key"]) is str and type(command["value"]) is bytes


# --- validation: valid commands -----------------------------------------------------------------

VALID = [
    put(),
    put(if_version=0, rid="r"),
    put(if_version=(1 << 64) - 1),
    {"op": "delete", "key": "k"},
    {"op": "delete", "key": "k", "if_version": 3, "rid": "r"},
    {"op": "txn"},
    {
        "op": "txn",
        "if": [{"key": "a", "version": 0}, {"key": "b", "value": b"[1]"}, {"key": "c", "exists": False}],
        "then": [{"op": "put", "key": "a", "value": b"{}"}, {"op": "get", "key": "b"}],
        "else": [{"op": "delete", "key": "c"}],
        "rid": "x" * MAX_RID_CHARS,
    },
    {"op": "noop"},
    {"op": "noop", "rid": "r"},
    {"op": "register_node", "node_id": "n1", "api": "10.0.0.5:7400", "raft": "[::1]:7401"},
    {"op": "unregister_node", "node_id": "n1", "rid": "r"},
]


@pytest.mark.parametrize("command", VALID)
def test_valid_commands_pass(command):
    validate_command(command)
    validate_command(command, check_json=False)
    (decoded,) = decode_entry(encode_entry([command]))
    validate_command(decoded)


def test_limits_are_inclusive():
    """Commands exactly at every limit are accepted (validate_command raises otherwise)."""
    assert validate_command(put("k" * MAX_KEY_BYTES, b'"' + b"v" * (MAX_VALUE_BYTES - 2) + b'"')) is None
    assert validate_command(put("é" * (MAX_KEY_BYTES // 2))) is None
    assert validate_command(
        {
            "op": "txn",
            "if": [{"key": "a", "exists": True}] * MAX_TXN_CONDS,
            "then": [{"op": "get", "key": "a"}] * MAX_TXN_OPS,
            "else": [{"op": "get", "key": "a"}] * MAX_TXN_OPS,
        }
    ) is None


# --- validation: every error names its field and the fix ----------------------------------------


@pytest.mark.parametrize(
    "command, field, words",
    [
        ([1, 2], "command", "expected a map"),
        ({"key": "k"}, "op", "missing"),
        ({"op": "get"}, "op", "unknown op 'get'"),
        ({"op": b"put"}, "op", "unknown op"),
        (put(extra=1), "extra", 'unknown field for "put"'),
        ({"op": "put", "key": "k"}, "value", 'missing; "put" requires key, value'),
        ({"op": "noop", "key": "k"}, "key", 'unknown field for "noop"'),
        (put(1), "key", "expected a string, got an integer"),
        (put(""), "key", "empty"),
        (
            put("k" * (MAX_KEY_BYTES + 6)),
            "key",
            "key: 1030 bytes exceeds the 1024-byte limit; use a shorter key",
        ),
        (put("é" * 513), "key", "1026 bytes exceeds"),
        (put("a\x00b"), "key", "NUL"),
        (put("\ud800"), "key", "UTF-8"),
        (put(value="1"), "value", "expected bytes holding JSON text, got a string"),
        (
            put(value=b"x" * (MAX_VALUE_BYTES + 1)),
            "value",
            "1048577 bytes exceeds the 1048576-byte (1 MiB) limit",
        ),
        (put(if_version=-1), "if_version", "expected an integer >= 0, got -1"),
        (put(if_version=True), "if_version", "got True"),
        (put(if_version=1.0), "if_version", "got 1.0"),
        (put(if_version=1 << 64), "if_version", "expected an integer >= 0"),
        (put(rid=""), "rid", "0 characters is outside 1 to 128"),
        (put(rid="r" * (MAX_RID_CHARS + 1)), "rid", "129 characters"),
        (put(rid=5), "rid", "expected a string"),
        ({"op": "txn", "if": {"key": "a"}}, "if", "expected a list of conditions, got a map"),
        (
            {"op": "txn", "if": [{"key": "a", "exists": 1}] * (MAX_TXN_CONDS + 1)},
            "if",
            "65 conditions exceeds the 64-condition limit",
        ),
        (
            {"op": "txn", "then": [{"op": "get", "key": "a"}] * (MAX_TXN_OPS + 1)},
            "then",
            "129 operations exceeds the 128-operation limit",
        ),
        ({"op": "txn", "else": [{"op": "get", "key": "a"}] * (MAX_TXN_OPS + 1)}, "else", "129 operations"),
        ({"op": "txn", "if": ["a"]}, "if[0]", "expected a map"),
        ({"op": "txn", "if": [{"key": "a"}]}, "if[0]", 'exactly one of "version", "value" or "exists"'),
        ({"op": "txn", "if": [{"key": "a", "version": 1, "exists": True}]}, "if[0]", "has 2 tests"),
        ({"op": "txn", "if": [{"key": "a", "exists": True, "op": "get"}]}, "if[0].op", "unknown field"),
        ({"op": "txn", "if": [{"exists": True}]}, "if[0].key", "missing"),
        ({"op": "txn", "if": [{"key": "", "exists": True}]}, "if[0].key", "empty"),
        ({"op": "txn", "if": [{"key": "a", "exists": 1}]}, "if[0].exists", "expected true or false"),
        ({"op": "txn", "if": [{"key": "a", "version": -2}]}, "if[0].version", "got -2"),
        ({"op": "txn", "if": [{"key": "a", "value": "1"}]}, "if[0].value", "expected bytes"),
        ({"op": "txn", "then": [{"op": "txn", "key": "a"}]}, "then[0].op", "unknown transaction op 'txn'"),
        ({"op": "txn", "then": [{"op": "put", "key": "a"}]}, "then[0].value", "missing"),
        ({"op": "txn", "then": [{"op": "get", "key": "a", "value": b"1"}]}, "then[0].value", "unknown field"),
        ({"op": "txn", "else": [{"op": "delete", "key": "x" * 2000}]}, "else[0].key", "2000 bytes exceeds"),
        (
            {"op": "txn", "then": [{"op": "put", "key": "a", "value": b"{"}]},
            "then[0].value",
            "not valid JSON",
        ),
        ({"op": "register_node", "node_id": "n", "api": "host", "raft": "h:1"}, "api", "is not host:port"),
        ({"op": "register_node", "node_id": "n", "api": "h:1", "raft": "h:0"}, "raft", "is not host:port"),
        ({"op": "register_node", "node_id": "n", "api": "h:1", "raft": ":1"}, "raft", "is not host:port"),
        ({"op": "register_node", "node_id": "n", "api": 7, "raft": "h:1"}, "api", "expected a string"),
        ({"op": "register_node", "node_id": "", "api": "h:1", "raft": "h:1"}, "node_id", "0 characters"),
        ({"op": "unregister_node"}, "node_id", "missing"),
    ],
)
def test_errors_name_the_field_and_the_fix(command, field, words):
    error = error_of(command)
    assert error.field == field
    assert words in error.message, error.message
    assert "; " in error.message  # the fix follows the problem


@pytest.mark.parametrize("text", [b"{", b"nope", b"NaN", b"[Infinity]", b"\xff", b""])
def test_values_must_be_json_text(text):
    assert error_of(put(value=text)).field == "value"
    validate_command(put(value=text), check_json=False)  # the processor's mode: sizes and types only


def test_deeply_nested_json_is_an_error_not_a_crash():
    error = error_of(put(value=b"[" * 100_000 + b"]" * 100_000))
    assert error.field == "value"


def test_huge_inputs_give_short_messages():
    error = error_of({"op": "x" * 1_000_000})
    assert len(error.message) < 500  # the op's 60-character excerpt and the list of the ops
    error = error_of(put(**{"f" * 1_000_000: 1}))
    assert len(error.message) < 300


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    anything=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4) | st.binary(max_size=4),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["op", "key", "value", "rid", "if", "then", "x"]) | st.text(max_size=3),
                inner,
                max_size=5,
            )
        ),
        max_leaves=12,
    )
)
def test_validation_only_ever_raises_command_error(anything):
    try:
        validate_command(anything)
    except CommandError as error:
        assert error.message.startswith(error.field + ":")


# --- store key layout -----------------------------------------------------------------------------


def test_store_keys_follow_the_documented_layout():
    assert keys.kv_key("a/é") == b"kv/a/\xc3\xa9" and keys.kv_name(b"kv/a/\xc3\xa9") == "a/é"
    assert keys.node_key("n1") == b"node/n1" and keys.node_name(b"node/n1") == "n1"
    assert keys.rid_key("r") == b"rid/r"
    assert keys.ridx_key(258, "r") == b"ridx/" + (258).to_bytes(8, "big") + b"r"
    assert keys.split_ridx(keys.ridx_key(258, "r/é")) == (258, "r/é")
    assert keys.RID_COUNT == b"meta/rid_count"


@given(
    a=st.integers(0, (1 << 64) - 1),
    b=st.integers(0, (1 << 64) - 1),
    ra=st.text(min_size=1),
    rb=st.text(min_size=1),
)
@settings(max_examples=100, deadline=None)
def test_ridx_key_order_is_log_index_order(a, b, ra, rb):
    ra, rb = ra.encode("utf-8", "replace").decode(), rb.encode("utf-8", "replace").decode()
    if a < b:
        assert keys.ridx_key(a, ra) < keys.ridx_key(b, rb)


def test_prefix_end():
    assert keys.prefix_end(b"kv/") == b"kv0"
    assert keys.prefix_end(b"kv/a\xff\xff") == b"kv/b"
    assert keys.prefix_end(b"\xff") is None


def test_values_follow_the_documented_layout():
    assert msgpack.unpackb(keys.encode_kv(b"1", 2, 3, 4)) == [b"1", 2, 3, 4]
    record = keys.decode_kv("k", keys.encode_kv(b"1", 2, 3, 4))
    assert (record.key, record.value, record.version, record.create_index, record.mod_index) == (
        "k",
        b"1",
        2,
        3,
        4,
    )
    assert msgpack.unpackb(keys.encode_node("h:1", "h:2", 9)) == {"api": "h:1", "raft": "h:2", "index": 9}
    assert keys.decode_rid(keys.encode_rid(5, {"ok": True, "v": b"x"})) == (5, {"ok": True, "v": b"x"})
    assert keys.decode_count(None) == 0 and keys.decode_count(keys.encode_count(7)) == 7
    for bad in (
        msgpack.packb([b"1", 2, 3]),
        msgpack.packb(["1", 2, 3, 4]),
        msgpack.packb([b"1", 2, 3, True]),
    ):
        with pytest.raises(ValueError, match="kv/k"):
            keys.decode_kv("k", bad)
