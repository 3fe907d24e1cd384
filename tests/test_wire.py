"""Raft messages framed as stored deflate blocks: any zlib (so any PySyncObj) reads them."""

from __future__ import annotations

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
