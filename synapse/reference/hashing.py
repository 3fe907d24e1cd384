"""Hash constructions of rust/DESIGN.md (version 1), in plain Python.

This module is part of the test oracle for ``synapse._core``: every function here must give
bit-for-bit the bytes the Rust core gives. It favours obviously-correct code over speed and is
never used as a runtime fallback.

BLAKE3 comes from the ``blake3`` PyPI package; ``blake3(x).digest(length=n)`` is the XOF, whose
first 32 bytes are the ordinary hash.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Sequence
from sys import byteorder

from blake3 import blake3

__all__ = [
    "DIGEST_SIZE",
    "LANES",
    "EXPANSION_SIZE",
    "BUCKETS",
    "ZERO_DIGEST",
    "ZERO_LANES",
    "Lanes",
    "LtHash16",
    "b3",
    "b3x",
    "require_bytes",
    "u32",
    "u64",
    "element_bytes",
    "element_expansion",
    "element_hash",
    "element_parts",
    "state_digest_of_lattice",
    "empty_state_digest",
    "key_hash",
    "bucket_of",
    "hash_lanes",
    "add_lanes",
    "sub_lanes",
    "lanes_bytes",
    "chain",
    "chain_many",
]

DIGEST_SIZE = 32
LANES = 1024
EXPANSION_SIZE = 2 * LANES
BUCKETS = 65536
ZERO_DIGEST = bytes(DIGEST_SIZE)

TAG_ELEMENT = b"SYNELEM1"
TAG_LANES = b"SYNLANE1"
TAG_STATE = b"SYNSTAT1"
TAG_KEY = b"SYNKEY01"
TAG_CHAIN = b"SYNCHAIN"

_U16 = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

# A bucket-tree digest: four u64 lanes. Tuples are immutable, so a zero digest can be shared.
Lanes = tuple[int, int, int, int]
ZERO_LANES: Lanes = (0, 0, 0, 0)


def b3(data: bytes) -> bytes:
    return blake3(data).digest()


def b3x(data: bytes, length: int) -> bytes:
    return blake3(data).digest(length=length)


def require_bytes(name: str, value: object) -> bytes:
    # Only ``bytes``: the typed API promises bytes, and accepting look-alikes here would let the
    # oracle pass inputs the core is entitled to reject.
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return value


def _require_uint(name: str, value: object, maximum: int) -> int:
    # bool is an int subclass, but a flag passed as an index is a caller bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > maximum:
        # OverflowError is what PyO3 raises for an out-of-range unsigned argument.
        raise OverflowError(f"{name}={value} does not fit in an unsigned {maximum.bit_length()}-bit integer")
    return value


def u32(value: int, name: str = "value") -> bytes:
    return struct.pack("<I", _require_uint(name, value, _U32_MAX))


def u64(value: int, name: str = "value") -> bytes:
    return struct.pack("<Q", _require_uint(name, value, _U64))


def element_bytes(key: bytes, value: bytes) -> bytes:
    """``b"SYNELEM1" ‖ u32(len key) ‖ key ‖ value``: the length prefix keeps (k, v) pairs that
    concatenate to the same bytes apart."""
    require_bytes("key", key)
    require_bytes("value", value)
    return TAG_ELEMENT + u32(len(key), "key length") + key + value


def element_hash(key: bytes, value: bytes) -> bytes:
    """``B3(elem)``: what buckets add up, and the seed of the lattice expansion."""
    return b3(element_bytes(key, value))


def expansion_of(element: bytes) -> bytes:
    """The 2048-byte lattice expansion of an element hash: 1024 little-endian u16 lanes."""
    return b3x(TAG_LANES + element, EXPANSION_SIZE)


def element_expansion(key: bytes, value: bytes) -> bytes:
    return expansion_of(element_hash(key, value))


def element_parts(key: bytes, value: bytes) -> tuple[bytes, bytes]:
    """(expansion, element_hash) of one entry."""
    element = element_hash(key, value)
    return expansion_of(element), element


def _expansion_lanes(expansion: bytes) -> array:
    if len(expansion) != EXPANSION_SIZE:
        raise ValueError(f"an expansion is {EXPANSION_SIZE} bytes, got {len(expansion)}")
    lanes = array("H")
    lanes.frombytes(expansion)
    if byteorder != "little":
        lanes.byteswap()
    return lanes


class LtHash16:
    """The state lattice: 1024 u16 lanes, added and subtracted lane-wise modulo 2^16."""

    __slots__ = ("_lanes",)

    def __init__(self, lanes: Iterable[int] | None = None) -> None:
        self._lanes = array("H", bytes(EXPANSION_SIZE)) if lanes is None else array("H", lanes)
        if len(self._lanes) != LANES:
            raise ValueError(f"a lattice has {LANES} lanes, got {len(self._lanes)}")

    def copy(self) -> LtHash16:
        return LtHash16(self._lanes)

    def add(self, expansion: bytes) -> None:
        other = _expansion_lanes(expansion)
        self._lanes = array("H", [(a + b) & _U16 for a, b in zip(self._lanes, other)])

    def sub(self, expansion: bytes) -> None:
        other = _expansion_lanes(expansion)
        self._lanes = array("H", [(a - b) & _U16 for a, b in zip(self._lanes, other)])

    def lanes(self) -> list[int]:
        return list(self._lanes)

    def to_bytes(self) -> bytes:
        lanes = array("H", self._lanes)
        if byteorder != "little":
            lanes.byteswap()
        return lanes.tobytes()

    def digest(self) -> bytes:
        return state_digest_of_lattice(self.to_bytes())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LtHash16):
            return NotImplemented
        return self._lanes == other._lanes

    __hash__ = None  # type: ignore[assignment]  # mutable


def state_digest_of_lattice(lattice: bytes) -> bytes:
    """``B3(b"SYNSTAT1" ‖ lanes as 2048 bytes)``."""
    if len(lattice) != EXPANSION_SIZE:
        raise ValueError(f"a lattice is {EXPANSION_SIZE} bytes, got {len(lattice)}")
    return b3(TAG_STATE + lattice)


def empty_state_digest() -> bytes:
    return state_digest_of_lattice(bytes(EXPANSION_SIZE))


def key_hash(key: bytes) -> bytes:
    return b3(TAG_KEY + require_bytes("key", key))


def bucket_of(key: bytes) -> int:
    """``u32(key_hash[0:4]) mod 65536``: the little-endian u32 of the first four bytes, so in
    effect its low two bytes."""
    return struct.unpack_from("<I", key_hash(key))[0] % BUCKETS


def hash_lanes(digest: bytes) -> Lanes:
    """A 32-byte hash (or exchanged tree digest) read as four little-endian u64 lanes."""
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a tree digest is {DIGEST_SIZE} bytes, got {len(digest)}")
    return struct.unpack("<4Q", digest)  # type: ignore[return-value]


def add_lanes(a: Lanes, b: Lanes) -> Lanes:
    return ((a[0] + b[0]) & _U64, (a[1] + b[1]) & _U64, (a[2] + b[2]) & _U64, (a[3] + b[3]) & _U64)


def sub_lanes(a: Lanes, b: Lanes) -> Lanes:
    return ((a[0] - b[0]) & _U64, (a[1] - b[1]) & _U64, (a[2] - b[2]) & _U64, (a[3] - b[3]) & _U64)


def lanes_bytes(lanes: Lanes) -> bytes:
    return struct.pack("<4Q", *lanes)


def chain(prev: bytes, index: int, entry: bytes) -> bytes:
    """``B3(b"SYNCHAIN" ‖ prev(32) ‖ u64 index ‖ entry)``; the genesis prev is 32 zero bytes."""
    require_bytes("prev", prev)
    require_bytes("entry", entry)
    if len(prev) != DIGEST_SIZE:
        raise ValueError(f"prev must be {DIGEST_SIZE} bytes, got {len(prev)}")
    return b3(TAG_CHAIN + prev + u64(index, "index") + entry)


def chain_many(prev: bytes, entries: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """The chain digest after each (index, entry), each link's prev being the one before."""
    require_bytes("prev", prev)
    if len(prev) != DIGEST_SIZE:
        raise ValueError(f"prev must be {DIGEST_SIZE} bytes, got {len(prev)}")
    # Validate the whole batch first, like the core, so a bad entry raises before any work.
    pairs = list(entries)
    for position, pair in enumerate(pairs):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"entries[{position}] must be an (index, entry) pair")
        u64(pair[0], f"entries[{position}] index")
        require_bytes(f"entries[{position}] entry", pair[1])
    out = []
    for index, entry in pairs:
        prev = chain(prev, index, entry)
        out.append(prev)
    return out
