"""Exceptions of the reference implementation.

The class names and the hierarchy are those of ``synapse._core`` (see ``synapse/_core.pyi``),
so one test can assert the same failure of both implementations by name. They are distinct
classes from the core's: the reference is the test oracle, never a runtime fallback, and
nothing should catch a reference error while meaning a core error.
"""

from __future__ import annotations

__all__ = [
    "CoreError",
    "SnapshotError",
    "CorruptSnapshotError",
    "TruncatedSnapshotError",
    "UnsupportedFormatError",
    "DigestMismatchError",
]


class CoreError(ValueError):
    """Base class of every error raised by the reference implementation."""


class SnapshotError(CoreError):
    """A snapshot or diff file (or buffer) is unusable; the message names the source and offset."""


class CorruptSnapshotError(SnapshotError):
    """A checksum, length, key order, entry count or final digest does not match."""


class TruncatedSnapshotError(SnapshotError):
    """The data ends before the end chunk."""


class UnsupportedFormatError(SnapshotError):
    """Wrong magic bytes, or a format version (or flags) that format 1 readers do not read."""


class DigestMismatchError(CoreError):
    """A diff does not apply to this state, or does not reach the digest it promises."""
