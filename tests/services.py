"""Where the suite's servers are: ``./scripts/test`` starts a PostgreSQL and a Redis server of
its own for each run and exports their addresses (scripts/lib/services.sh). Run by hand, a
test falls back to a PostgreSQL on 127.0.0.1:5432 (database ``test``) if one answers.

A test that needs a server it cannot reach skips, saying why — unless
``SYNAPSE_REQUIRE_POSTGRES=1`` (set by ``./scripts/test`` once it started its server, and by
CI), when it fails: a CI run can never pass by skipping them."""

from __future__ import annotations

import asyncio
import functools
import os

import pytest

FALLBACK_POSTGRES_DSNS = [
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
]


@functools.cache
def _find_postgres() -> tuple[str | None, str]:
    import asyncpg

    dsn = os.environ.get("SYNAPSE_TEST_POSTGRES_DSN")
    candidates = [dsn] if dsn else FALLBACK_POSTGRES_DSNS

    async def probe(dsn: str) -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    errors = []
    for dsn in candidates:
        try:
            asyncio.run(probe(dsn))
            return dsn, ""
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            errors.append(f"{dsn}: {exc!r}")
    return None, "PostgreSQL is unreachable (" + "; ".join(errors) + "); ./scripts/test starts one"


def postgres_dsn() -> str | None:
    """The DSN of a reachable PostgreSQL, or None (then ``postgres_unavailable`` says why)."""
    return _find_postgres()[0]


def postgres_unavailable() -> str:
    """Why no PostgreSQL is reachable; raises instead when the run requires one."""
    reason = _find_postgres()[1]
    if reason and os.environ.get("SYNAPSE_REQUIRE_POSTGRES") == "1":
        raise RuntimeError(f"SYNAPSE_REQUIRE_POSTGRES=1 but {reason}")
    return reason


def require_postgres() -> str:
    """The DSN, or the test skips (fails when the run requires PostgreSQL)."""
    dsn = postgres_dsn()
    if dsn is None:
        pytest.skip(postgres_unavailable())
    return dsn
