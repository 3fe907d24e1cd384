"""Raft message framing without deflate, still readable by any PySyncObj.

PySyncObj's TCP connection zlib-compresses every message it sends (``zlib.compress(pickle,
3)``) and decompresses every one it receives. ``zlib.compress`` sets up a fresh deflate state
per call: ~50 µs even for a 64-byte vote answer, ~75 µs for an AppendEntries batch (measured
on the development machine), and the leader sends one per follower per entry, the followers
one answer each. For small messages between nodes on one LAN that buys nothing.

``install()`` replaces the ``zlib`` that module sees with one whose ``compress`` emits the
same format with *stored* (uncompressed) deflate blocks — header, blocks of up to 65,535
bytes, Adler-32 — in a few µs. It is the zlib format (RFC 1950/1951), so every receiver,
patched or not, decompresses it unchanged; mixed-version clusters keep working.
"""

from __future__ import annotations

import struct
import zlib

_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no dictionary, "fastest" level; header check ok
_BLOCK = 0xFFFF


def stored(data: bytes) -> bytes:
    """``data`` as a zlib stream of stored deflate blocks (byte-for-byte ``zlib.decompress``-able)."""
    view = memoryview(data)
    parts = [_HEADER]
    size = len(data)
    offset = 0
    while True:
        chunk = view[offset : offset + _BLOCK]
        offset += len(chunk)
        final = 1 if offset >= size else 0
        parts.append(struct.pack("<BHH", final, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(chunk)
        if final:
            break
    parts.append(struct.pack(">I", zlib.adler32(data)))
    return b"".join(parts)


class _StoredZlib:
    """What pysyncobj.tcp_connection calls ``zlib``: stored-block compress, real decompress."""

    decompress = staticmethod(zlib.decompress)

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        return stored(data)


def install() -> None:
    import pysyncobj.tcp_connection

    pysyncobj.tcp_connection.zlib = _StoredZlib
