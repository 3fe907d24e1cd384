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

Encryption: with a cluster secret PySyncObj seals every message as a Fernet token
(``cryptography.fernet``, key from PBKDF2 of the secret). That implementation builds cipher,
padder and HMAC objects per call and base64-decodes each received token twice (PySyncObj
asks for its timestamp, then decrypts it): ~40 µs to open a 3 KB AppendEntries, ~130 µs at
12 KB. ``FernetCodec`` produces and opens the same tokens (same key, same format, so peers
running plain PySyncObj read them and vice versa) with one decode per token.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import struct
import zlib

from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

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


# What PySyncObj derives its Fernet key with (pysyncobj/encryptor.py); the same key is the
# wire format's other half.
_PYSYNCOBJ_SALT = b"\x15%q\xe6\xbb\x02\xa6\xf8\x13q\x90\xcf6+\x1e\xeb"
_VERSION = 0x80
_HEADER_BYTES = 1 + 8 + 16  # version, timestamp, IV
_MAC_BYTES = 32
_BLOCK_BYTES = 16
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


class FernetCodec:
    """Fernet tokens (spec: version 0x80 ‖ timestamp ‖ IV ‖ AES-128-CBC/PKCS7 ‖ HMAC-SHA256,
    base64url) with the interface PySyncObj's connections call: ``encrypt_at_time``,
    ``extract_timestamp`` (checks the MAC) and ``decrypt``. Used on one thread (the tick
    thread), so the token just opened by ``extract_timestamp`` is kept for ``decrypt``."""

    def __init__(self, password: str | bytes) -> None:
        secret = password if isinstance(password, bytes) else password.encode()
        key = hashlib.pbkdf2_hmac("sha256", secret, _PYSYNCOBJ_SALT, 100_000, 32)
        self._signing, self._aes = key[:16], algorithms.AES(key[16:])
        self._opened: tuple[bytes, int, bytes] | None = None  # (token, timestamp, plaintext)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        iv = os.urandom(16)
        pad = _BLOCK_BYTES - len(data) % _BLOCK_BYTES
        encryptor = Cipher(self._aes, modes.CBC(iv)).encryptor()
        body = encryptor.update(data + bytes((pad,)) * pad) + encryptor.finalize()
        signed = bytes((_VERSION,)) + current_time.to_bytes(8, "big") + iv + body
        token = signed + hmac.new(self._signing, signed, hashlib.sha256).digest()
        return binascii.b2a_base64(token, newline=False).translate(_TO_URLSAFE)

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
            raw = binascii.a2b_base64(bytes(token).translate(_FROM_URLSAFE), strict_mode=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidToken from None
        body_bytes = len(raw) - _HEADER_BYTES - _MAC_BYTES
        if body_bytes <= 0 or body_bytes % _BLOCK_BYTES or raw[0] != _VERSION:
            raise InvalidToken
        signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(hmac.new(self._signing, signed, hashlib.sha256).digest(), mac):
            raise InvalidToken
        decryptor = Cipher(self._aes, modes.CBC(raw[9:_HEADER_BYTES])).decryptor()
        padded = decryptor.update(signed[_HEADER_BYTES:]) + decryptor.finalize()
        pad = padded[-1]
        if not 1 <= pad <= _BLOCK_BYTES or padded[-pad:] != bytes((pad,)) * pad:
            raise InvalidToken
        opened = self._opened = (token, int.from_bytes(raw[1:9], "big"), padded[:-pad])
        return opened


def install() -> None:
    import pysyncobj.syncobj
    import pysyncobj.tcp_connection

    pysyncobj.tcp_connection.zlib = _StoredZlib
    pysyncobj.syncobj.getEncryptor = FernetCodec
