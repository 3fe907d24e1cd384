"""Raft messages framed as stored deflate blocks: any zlib (so any PySyncObj) reads them."""

from __future__ import annotations

import base64
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

import pysyncobj.tcp_connection
import synapse.cluster.raft  # noqa: F401  (installs the framing)
from synapse.cluster.wire import stored


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200_000))
def test_zlib_reads_every_stored_stream(data):
    assert zlib.decompress(stored(data)) == data


def test_blocks_split_at_the_deflate_limit():
    for size in (0, 65_534, 65_535, 65_536, 131_070, 131_071):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert zlib.decompress(stored(data)) == data


def test_pysyncobj_connections_send_stored_blocks():
    framed = pysyncobj.tcp_connection.zlib.compress(b"hello" * 100, 3)
    assert framed == stored(b"hello" * 100)  # not deflated: 500 bytes stay 500 bytes plus framing
    assert pysyncobj.tcp_connection.zlib.decompress(zlib.compress(b"from an unpatched node")) == b"from an unpatched node"


def test_pysyncobj_connections_pickle_messages_with_protocol_5():
    import pickle

    from pysyncobj import pickle as pysyncobj_pickle

    message = {"type": "append_entries", "term": 3, "entries": [(b"\x00\xff" * 40, 7, 3)], "prevLogIdx": 6}
    sent = pysyncobj.tcp_connection.pickle.dumps(message)
    assert sent[:2] == b"\x80\x05" and pickle.loads(sent) == message  # any Python 3.8+ peer reads it
    # and a peer still on protocol 2 is read, as before
    assert pysyncobj.tcp_connection.pickle.loads(pysyncobj_pickle.dumps(message)) == message
    assert pysyncobj_pickle.dumps(message)[:2] == b"\x80\x02"  # log entries keep PySyncObj's protocol


def test_a_message_naming_a_global_is_refused_not_run(tmp_path):
    """No frame runs code, secret or not: PySyncObj drops a connection whose frame fails to
    load."""
    import os
    import pickle

    import pytest

    from synapse.cluster.entries import EntryDecodeError

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for protocol in (2, 5):
        with pytest.raises(EntryDecodeError, match="not plain data"):
            pysyncobj.tcp_connection.pickle.loads(pickle.dumps({"type": "append_entries", "x": Exploit()}, protocol))
    assert not marker.exists()


# --- encryption: Fernet tokens, readable both ways with PySyncObj's own ---


def _pair():
    from pysyncobj.encryptor import getEncryptor as pysyncobj_encryptor

    from synapse.cluster.wire import FernetCodec

    return pysyncobj_encryptor("the cluster secret"), FernetCodec("the cluster secret")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40_000), st.integers(0, 2**40))
def test_tokens_are_read_by_pysyncobj_and_pysyncobj_tokens_by_us(data, at):
    theirs, ours = _pair()
    token = ours.encrypt_at_time(data, at)
    assert theirs.extract_timestamp(token) == at and theirs.decrypt(token) == data
    token = theirs.encrypt_at_time(data, at)
    assert ours.extract_timestamp(token) == at and ours.decrypt(token) == data


def test_a_changed_or_foreign_token_is_refused():
    import pytest
    from cryptography.fernet import InvalidToken

    from synapse.cluster.wire import FernetCodec

    _, ours = _pair()
    token = ours.encrypt_at_time(b"append entries", 7)
    raw = bytearray(base64.urlsafe_b64decode(token))
    for position in (0, 5, 30, len(raw) - 40, len(raw) - 1):  # version, time, IV, body, MAC
        bad = bytearray(raw)
        bad[position] ^= 0x01
        with pytest.raises(InvalidToken):
            ours.decrypt(base64.urlsafe_b64encode(bytes(bad)))
    for garbage in (b"", b"not base64 !", base64.urlsafe_b64encode(bytes(raw[:-1]))):
        with pytest.raises(InvalidToken):
            ours.decrypt(garbage)
    with pytest.raises(InvalidToken):
        FernetCodec("another secret").decrypt(token)


def test_the_token_opened_for_its_timestamp_is_the_one_decrypted():
    _, ours = _pair()
    first, second = ours.encrypt_at_time(b"one", 1), ours.encrypt_at_time(b"two", 2)
    assert ours.extract_timestamp(first) == 1
    assert ours.decrypt(second) == b"two" and ours.decrypt(first) == b"one"


def test_pysyncobj_nodes_seal_messages_with_the_codec():
    import pysyncobj.syncobj

    from synapse.cluster.wire import FernetCodec

    assert pysyncobj.syncobj.getEncryptor is FernetCodec
