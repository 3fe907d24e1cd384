"""Plain records shared by the processor, storage and the API (no behaviour, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KvRecord:
    """A key's current value as the state holds it; ``value`` is JSON text (bytes)."""

    key: str
    value: bytes
    version: int
    create_index: int
    mod_index: int


@dataclass(frozen=True, slots=True)
class KvChange:
    """One applied change to a key, for materializing into SQLite/PostgreSQL.

    ``value`` is None for a delete (then version/create_index/mod_index are 0). ``index`` is
    the log index of the entry that made the change."""

    key: str
    value: bytes | None
    version: int
    create_index: int
    mod_index: int
    index: int
