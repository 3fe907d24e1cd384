"""The bucket tree of rust/DESIGN.md, in plain Python (part of the test oracle, not a runtime path).

Level 4 holds the 65,536 bucket digests; each node above is the lane-wise wrapping sum of its
16 children. Because the sums are additive, a mutation updates one bucket and its four
ancestors, and the tree never has to be rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence

from .hashing import (
    BUCKETS,
    DIGEST_SIZE,
    ZERO_LANES,
    Lanes,
    add_lanes,
    hash_lanes,
    lanes_bytes,
    sub_lanes,
)

__all__ = ["FANOUT", "TREE_DEPTH", "LEVEL_SIZES", "BucketTree", "check_level", "check_parents"]

FANOUT = 16
TREE_DEPTH = 4
LEVEL_SIZES = tuple(FANOUT**level for level in range(TREE_DEPTH + 1))
assert LEVEL_SIZES[TREE_DEPTH] == BUCKETS

# Child index c of a level-L parent p is p * 16 + c, so an ancestor index is a right shift.
_BITS_PER_LEVEL = 4


def check_level(level: object, *, parent: bool = False) -> int:
    """``parent=True`` for calls that read the children of ``level``, which must have some."""
    if not isinstance(level, int) or isinstance(level, bool):
        raise TypeError(f"level must be an int, not {type(level).__name__}")
    top = TREE_DEPTH - 1 if parent else TREE_DEPTH
    # Negative numbers fail the unsigned conversion at the core's boundary (OverflowError).
    if level < 0:
        raise OverflowError(f"level {level} is negative")
    if level > top:
        raise ValueError(f"level {level} is outside 0..{top}")
    return level


def check_parents(level: int, parents: Sequence[int]) -> list[int]:
    out = []
    for position, parent in enumerate(parents):
        if not isinstance(parent, int) or isinstance(parent, bool):
            raise TypeError(f"parents[{position}] must be an int, not {type(parent).__name__}")
        if parent < 0:
            raise OverflowError(f"parents[{position}]={parent} is negative")
        if parent >= LEVEL_SIZES[level]:
            raise ValueError(
                f"parents[{position}]={parent} is not a node of level {level} "
                f"(0..{LEVEL_SIZES[level] - 1})"
            )
        out.append(parent)
    return out


class BucketTree:
    __slots__ = ("_levels",)

    def __init__(self) -> None:
        self._levels: list[list[Lanes]] = [[ZERO_LANES] * size for size in LEVEL_SIZES]

    def copy(self) -> BucketTree:
        other = BucketTree.__new__(BucketTree)
        other._levels = [list(level) for level in self._levels]
        return other

    def _update(self, bucket: int, element_hash: bytes, op) -> None:
        delta = hash_lanes(element_hash)
        for level in range(TREE_DEPTH, -1, -1):
            index = bucket >> (_BITS_PER_LEVEL * (TREE_DEPTH - level))
            nodes = self._levels[level]
            nodes[index] = op(nodes[index], delta)

    def add(self, bucket: int, element_hash: bytes) -> None:
        self._update(bucket, element_hash, add_lanes)

    def sub(self, bucket: int, element_hash: bytes) -> None:
        self._update(bucket, element_hash, sub_lanes)

    def node(self, level: int, index: int) -> Lanes:
        return self._levels[level][index]

    def node_digests(self, level: int) -> bytes:
        check_level(level)
        return b"".join(lanes_bytes(lanes) for lanes in self._levels[level])

    def children_digests(self, level: int, parents: Sequence[int]) -> bytes:
        check_level(level, parent=True)
        children = self._levels[level + 1]
        out = []
        for parent in check_parents(level, parents):
            for child in range(parent * FANOUT, parent * FANOUT + FANOUT):
                out.append(lanes_bytes(children[child]))
        return b"".join(out)

    def compare_children(self, level: int, parents: Sequence[int], remote: bytes) -> list[int]:
        check_level(level, parent=True)
        parents = check_parents(level, parents)
        if not isinstance(remote, bytes):
            raise TypeError(f"remote must be bytes, not {type(remote).__name__}")
        expected = len(parents) * FANOUT * DIGEST_SIZE
        if len(remote) != expected:
            raise ValueError(
                f"remote holds {len(remote)} bytes; {len(parents)} parents need {expected}"
            )
        children = self._levels[level + 1]
        differing = set()
        for position, parent in enumerate(parents):
            for offset in range(FANOUT):
                child = parent * FANOUT + offset
                start = (position * FANOUT + offset) * DIGEST_SIZE
                if lanes_bytes(children[child]) != remote[start : start + DIGEST_SIZE]:
                    differing.add(child)
        return sorted(differing)

    def differing_buckets(self, other: BucketTree) -> list[int]:
        """Descend from the root, at each level keeping only the children that differ."""
        if self._levels[0][0] == other._levels[0][0]:
            return []
        frontier = [0]
        for level in range(TREE_DEPTH):
            frontier = self.compare_children(
                level, frontier, other.children_digests(level, frontier)
            )
        return frontier
