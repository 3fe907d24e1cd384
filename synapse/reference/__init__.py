"""Pure-Python reference implementation of rust/DESIGN.md (version 1).

This package is the test oracle and the benchmark baseline for the Rust core
``synapse._core``: same algorithms, same binary formats, bit-for-bit identical outputs
(digests, tree digests, snapshot bytes, diff bytes, chain digests). It is deliberately simple
and slow, and nothing in Synapse falls back to it at run time.

The module mirrors the surface of ``synapse._core`` (``StateStore``, ``StateDiff``,
``read_snapshot_info``, ``diff_snapshots``, ``chain``, ``chain_many``, ``element_hash``, the
constants and the exception classes), so a test can be written once against either.
"""

from .codec import (
    CHUNK_TARGET,
    SNAPSHOT_FORMAT,
    ReferenceDiff,
    SnapshotInfo,
    decode_diff,
    decode_snapshot,
    diff_snapshots,
    encode_snapshot,
    read_snapshot_info,
)
from .errors import (
    CoreError,
    CorruptSnapshotError,
    DigestMismatchError,
    SnapshotError,
    TruncatedSnapshotError,
    UnsupportedFormatError,
)
from .hashing import (
    BUCKETS,
    DIGEST_SIZE,
    bucket_of,
    chain,
    chain_many,
    element_expansion,
    element_hash,
    empty_state_digest,
)
from .store import ReferenceStore
from .tree import FANOUT, TREE_DEPTH

# The names ``synapse._core`` uses, so the reference can stand wherever the core's module does.
StateStore = ReferenceStore
StateDiff = ReferenceDiff

__all__ = [
    "BUCKETS",
    "FANOUT",
    "TREE_DEPTH",
    "DIGEST_SIZE",
    "SNAPSHOT_FORMAT",
    "CHUNK_TARGET",
    "CoreError",
    "SnapshotError",
    "CorruptSnapshotError",
    "TruncatedSnapshotError",
    "UnsupportedFormatError",
    "DigestMismatchError",
    "SnapshotInfo",
    "ReferenceDiff",
    "ReferenceStore",
    "StateDiff",
    "StateStore",
    "bucket_of",
    "chain",
    "chain_many",
    "decode_diff",
    "decode_snapshot",
    "diff_snapshots",
    "element_expansion",
    "element_hash",
    "empty_state_digest",
    "encode_snapshot",
    "read_snapshot_info",
]
