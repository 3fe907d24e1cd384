"""Reading PySyncObj's entries without PySyncObj (offline audit): exactly its own encoding of
bytes is accepted; any other global in a pickle is refused, so nothing in a log runs."""

from __future__ import annotations

import pickle

import pysyncobj.pickle as pysyncobj_pickle
import pytest

from synapse.cluster.entries import EntryDecodeError, decode_command


@pytest.mark.parametrize("payload", [b"", b"abc", bytes(range(256)), b"\xff" * 1000])
def test_pysyncobj_regular_entries_decode_to_their_payload(payload):
    command = b"\x00" + pysyncobj_pickle.dumps((0, (payload,)))
    decoded = decode_command(command)
    assert decoded.kind == "regular" and decoded.payload == payload


def test_other_kinds():
    assert decode_command(b"\x01").kind == "no-op"
    assert decode_command(b"\x02" + pysyncobj_pickle.dumps(["add", "127.0.0.1:1"])).detail == ["add", "127.0.0.1:1"]


@pytest.mark.parametrize("evil", [
    pickle.dumps((0, (print,))),
    b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x04\x00\x00\x00zlibq\x01\x86R.",  # codec other than latin1
    b"cos\nsystem\n(S'true'\ntR.",
])
def test_anything_else_is_refused_without_running_it(evil):
    with pytest.raises(EntryDecodeError):
        decode_command(b"\x00" + evil)
