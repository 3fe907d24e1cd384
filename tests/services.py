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


def require_redis() -> str:
    """The URL of the run's Redis (``./scripts/test`` starts one), or the test skips — fails
    when the run requires it (``SYNAPSE_REQUIRE_REDIS=1``)."""
    url = os.environ.get("SYNAPSE_TEST_REDIS_URL")
    if url:
        return url
    reason = "no Redis: SYNAPSE_TEST_REDIS_URL is unset (./scripts/test starts one)"
    if os.environ.get("SYNAPSE_REQUIRE_REDIS") == "1":
        raise RuntimeError(f"SYNAPSE_REQUIRE_REDIS=1 but {reason}")
    pytest.skip(reason)


class ChromaServer:
    """A Chroma server of the test's own (``chroma run``, which the chromadb package installs
    in the venv), on a free port, its data in ``path``; stopped by ``stop``."""

    def __init__(self, path, port: int | None = None) -> None:
        import shutil
        import subprocess
        import sys
        from pathlib import Path

        from synapse.chaos.cluster import free_ports

        self.path = Path(path)
        self.port = port or free_ports(1)[0]
        chroma = shutil.which("chroma", path=str(Path(sys.executable).parent))
        if chroma is None:
            raise RuntimeError("the `chroma` command is missing from the venv; pip install chromadb==1.5.9")
        self._log = open(self.path.parent / f"chroma-{self.port}.log", "ab")
        self._proc = subprocess.Popen([chroma, "run", "--path", str(self.path), "--host", "127.0.0.1",
                                       "--port", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"chroma+http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"chroma run exited with {self._proc.returncode}; see {self._log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v2/heartbeat", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chroma run did not answer within {timeout:g} s; see {self._log.name}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except Exception:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
