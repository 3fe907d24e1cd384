"""Raft message framing and encryption, cheaper than PySyncObj's and readable by any PySyncObj.

Framing: PySyncObj's TCP connection zlib-compresses every message it sends (``zlib.compress(pickle,
3)``) and decompresses every one it receives. ``zlib.compress`` sets up a fresh deflate state
per call: ~50 µs even for a 64-byte vote answer, ~75 µs for an AppendEntries batch (measured
on the development machine), and the leader sends one per follower per entry, the followers
one answer each. For small messages between nodes on one LAN that buys nothing. ``install()``
replaces the ``zlib`` that module sees with one whose ``compress`` emits the same format with
*stored* (uncompressed) deflate blocks — header, blocks of up to 65,535 bytes, Adler-32 — in a
few µs. It is the zlib format (RFC 1950/1951), so every receiver, patched or not,
decompresses it unchanged; mixed-version clusters keep working.

Pickling: PySyncObj pickles every message with protocol 2, which spells each bytes object as
``_codecs.encode(text, "latin1")`` — the bytes decoded to text, the text written in UTF-8
(every byte >= 0x80 in two), and a global call per bytes object to load it. An AppendEntries
carrying one ~1.7 KB entry: 3.05 µs to dump and 2.7 µs to load with protocol 2, 0.6 and 0.9
µs with protocol 5 (and ~20% fewer bytes). ``install()`` has the connection module pickle its
messages with protocol 5; any Python 3.8+ unpickler (so any PySyncObj on it) reads both, and
ours still reads a peer's protocol 2. Only the message framing changes: log entries (their
commands, and the chunks of a large one — ``transmission.py``) keep PySyncObj's protocol 2.
Messages are read with a data-only unpickler (``_MessagePickle``): no frame runs code.

Encryption: with a cluster secret PySyncObj seals every message as a Fernet token
(``cryptography.fernet``, key from PBKDF2 of the secret). That implementation builds cipher,
padder and HMAC objects per call and base64-decodes each received token twice (PySyncObj
asks for its timestamp, then decrypts it): ~40 µs to open a 3 KB AppendEntries, ~130 µs at
12 KB. ``FernetCodec`` produces and opens the same tokens (same key, same format, so peers
running plain PySyncObj read them and vice versa), each in one call into Rust
(``synapse._core.FernetKey``) and one decode per token.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import zlib

from cryptography.fernet import InvalidToken

from synapse._core import FernetKey
from synapse.cluster.entries import load_data

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


class _MessagePickle:
    """What pysyncobj.tcp_connection calls ``pickle``: protocol 5 out, plain data in.

    PySyncObj's own loads runs whatever global a frame names. A frame reaches it once its
    Fernet MAC checks out — but a node without a cluster secret (a lone node's Raft port, a
    cluster run with ``--insecure-no-cluster-secret``) has no MAC to check, and anyone who
    reached the port could run code with one frame. PySyncObj's messages hold only plain data
    (dicts, lists, tuples, numbers, text, bytes), so they are read with the data-only
    unpickler of the log's entries (entries.py): a frame naming any other global fails to load
    and PySyncObj drops the connection, as for any frame it cannot read. ~0.7 µs more per
    message than PySyncObj's loads."""

    loads = staticmethod(load_data)

    @staticmethod
    def dumps(message, protocol=None) -> bytes:
        return pickle.dumps(message, 5)


# What PySyncObj derives its Fernet key with (pysyncobj/encryptor.py); the same key is the
# wire format's other half.
_PYSYNCOBJ_SALT = b"\x15%q\xe6\xbb\x02\xa6\xf8\x13q\x90\xcf6+\x1e\xeb"


class FernetCodec:
    """Fernet tokens (made and opened by ``synapse._core.FernetKey``, rust/wire) with the
    interface PySyncObj's connections call: ``encrypt_at_time``, ``extract_timestamp`` (checks
    the MAC) and ``decrypt``. Used on one thread (the tick thread), so the token just opened by
    ``extract_timestamp`` is kept for ``decrypt``."""

    def __init__(self, password: str | bytes) -> None:
        secret = password if isinstance(password, bytes) else password.encode()
        self._key = FernetKey(hashlib.pbkdf2_hmac("sha256", secret, _PYSYNCOBJ_SALT, 100_000, 32))
        self._opened: tuple[bytes, int, bytes] | None = None  # (token, timestamp, message)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self._key.seal(data, current_time, os.urandom(16))

    def extract_timestamp(self, token: bytes) -> int:
        return self._open(token)[1]

    def decrypt(self, token: bytes, ttl: int | None = None) -> bytes:
        if ttl is not None:
            raise ValueError("FernetCodec does not check token ages; PySyncObj never asks it to")
        return self._open(token)[2]

    def _open(self, token: bytes) -> tuple[bytes, int, bytes]:
        opened = self._opened
        if opened is not None and opened[0] is token:
            return opened
        try:
            timestamp, message = self._key.open(token)
        except (TypeError, ValueError):
            raise InvalidToken from None
        opened = self._opened = (token, timestamp, message)
        return opened


def install() -> None:
    import pysyncobj.syncobj
    import pysyncobj.tcp_connection

    pysyncobj.tcp_connection.zlib = _StoredZlib
    pysyncobj.tcp_connection.pickle = _MessagePickle
    pysyncobj.syncobj.getEncryptor = FernetCodec
