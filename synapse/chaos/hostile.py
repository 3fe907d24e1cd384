"""Hostile traffic for a node's Raft port: random bytes, frames whose length prefix lies,
frames sealed with a wrong secret, plain pickles, and genuine frames (sealed with the cluster
secret) replayed on new connections and out of place. Used by tests/test_raft_hostile.py and
scripts/hostile-input; what a node does with each: synapse/security/DESIGN.md, "Hostile
input".

The frame format is PySyncObj's TcpConnection's: a native 4-byte length, then the zlib'd
pickle, Fernet-sealed when the cluster has a secret; the first message of an encrypted
connection is the sender's random connection key, and every later one carries the receiver's.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
import struct
import time
import zlib

from synapse.cluster.wire import FernetCodec


def frame(data: bytes) -> bytes:
    return struct.pack("i", len(data)) + data


def sealed(message, secret: str, rand_key: bytes | None = None) -> bytes:
    """A frame as PySyncObj's TcpConnection.send makes it, sealed with ``secret``."""
    body = zlib.compress(pickle.dumps((rand_key, message) if rand_key else message), 3)
    return frame(FernetCodec(secret).encrypt_at_time(body, int(time.monotonic())))


def send(addr: str, payload: bytes, read: bool = False) -> bytes:
    """Connects to a Raft port, sends ``payload`` and, with ``read``, reads what comes back
    until the node closes the connection or 1 s of silence."""
    host, port = addr.rsplit(":", 1)
    got = b""
    with socket.create_connection((host, int(port)), timeout=5) as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return got
        if read:
            s.settimeout(1.0)
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except (socket.timeout, ConnectionResetError):
                pass
    return got


def attack(addr: str, secret: str, seed: int = 15) -> int:
    """Sends every kind of hostile frame to the Raft port at ``addr`` (the cluster's secret is
    needed only to make the genuine frames that are replayed). Returns the connections made."""
    rng = random.Random(seed)
    payloads: list[tuple[bytes, bool]] = [(rng.randbytes(size), False) for size in (1, 3, 4, 5, 64, 4096, 100_000)]
    payloads += [
        (struct.pack("i", -1) + rng.randbytes(64), False),  # a negative length
        (struct.pack("i", 2**31 - 1) + rng.randbytes(1 << 20), False),  # a 2 GiB claim, 1 MiB sent
        (frame(b"gAAAAA" + rng.randbytes(200)), False),  # looks like Fernet, is not
        # Plain pickles: a cluster without a secret would unpickle them; one with must not.
        (frame(zlib.compress(pickle.dumps({"type": "request_vote", "term": 10**9}))), False),
    ]
    # Sealed with a wrong secret: a plausible handshake and a plausible Raft message.
    wrong = "not-the-cluster-secret-" + os.urandom(8).hex()
    payloads.append((sealed(os.urandom(32), wrong) + sealed({"type": "append_entries", "term": 10**9}, wrong, b"k" * 32),
                     False))
    # Genuine frames replayed: a recorded handshake followed by a message bound to another
    # connection's key, the same handshake twice in a row, and the bound message alone.
    handshake = sealed(os.urandom(32), secret)
    foreign = sealed({"type": "append_entries", "term": 10**9, "entries": []}, secret, os.urandom(32))
    payloads += [(handshake + foreign, True), (handshake + handshake, True), (foreign, True)]
    for payload, read in payloads:
        send(addr, payload, read)
    return len(payloads)
