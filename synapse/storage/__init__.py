"""Materializing the applied key-value state into SQLite or PostgreSQL (see DESIGN.md).

The database is a view people read with ``sqlite3``/``psql``; the Raft log and snapshots are
the source of truth. ``Materializer`` carries applied changes from the Raft apply thread to a
``KvStorage`` without ever making that thread wait.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

from .base import KvStorage
from .materializer import Materializer
from .postgres import PostgresStorage
from .sqlite import SQLiteStorage

__all__ = [
    "KvStorage",
    "Materializer",
    "PostgresStorage",
    "SQLiteStorage",
    "open_storage",
    "schema_for_node",
]

SQLITE_FILE = "state.sqlite3"


def open_storage(spec: str, data_dir: pathlib.Path, node_id: str) -> KvStorage:
    """The backend named by the ``--storage`` setting (not yet opened: call ``open()``).

    ``"sqlite"`` → ``<data_dir>/state.sqlite3``; a ``postgresql://`` or ``postgres://`` DSN
    → that database, in the schema ``synapse_<node_id>``."""
    value = spec.strip()
    if value == "sqlite":
        return SQLiteStorage(pathlib.Path(data_dir) / SQLITE_FILE)
    if value.startswith(("postgresql://", "postgres://")):
        return PostgresStorage(value, schema=schema_for_node(node_id))
    raise ValueError(
        f"--storage {spec!r} is not supported: use 'sqlite' (a file in the data directory) "
        "or a PostgreSQL DSN such as 'postgresql://user@host:5432/dbname' "
        "(postgres:// also accepted)"
    )


def schema_for_node(node_id: str) -> str:
    """``synapse_<node_id>`` as a PostgreSQL identifier: lower case, every character outside
    a-z, 0-9 and _ replaced by _. A name over 63 characters is cut and given a hash of the
    full node id, so two long ids that share a start still get different schemas."""
    name = "synapse_" + re.sub(r"[^a-z0-9_]", "_", node_id.lower())
    if len(name) > 63:
        digest = hashlib.blake2b(node_id.encode("utf-8"), digest_size=4).hexdigest()
        name = f"{name[:54]}_{digest}"
    return name
