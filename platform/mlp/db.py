"""PostgreSQL adapter: pool factory and database creation."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolAcquireContext

from mlp.settings import Settings
from mlp.telemetry import asyncpg_init_for


class BoundedPool(asyncpg.Pool):
    """A pool whose every acquire waits at most ``acquire_timeout_s`` (asyncpg's own waits forever).

    ``pool.fetch``/``fetchval``/``execute`` acquire through ``acquire`` too, so one slow caller (or a
    flood of them) gets a ``TimeoutError`` instead of queueing everyone behind it without bound.
    """

    def __init__(self, *args: Any, acquire_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout_s = acquire_timeout_s

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        return super().acquire(timeout=self.acquire_timeout_s if timeout is None else timeout)


async def create_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout_s: float | None = None,
    acquire_timeout_s: float | None = None,
) -> asyncpg.Pool:
    """The services' pool: connect, acquire and command timeouts from the settings unless given.

    A statement running past the command timeout is cancelled and raises ``TimeoutError``, as does an
    acquire that finds no free connection in time: the HTTP services answer both with 503.
    """
    pool = BoundedPool(
        settings.postgres_dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        # Query spans on every connection when tracing is on (init is None, and costs nothing, when off).
        init=asyncpg_init_for(),
        timeout=10,  # connect
        command_timeout=command_timeout_s or settings.postgres_command_timeout_s,
        acquire_timeout_s=acquire_timeout_s or settings.postgres_acquire_timeout_s,
    )
    await pool
    return pool


def admin_dsn(dsn: str, database: str = "postgres") -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def ensure_database(dsn: str) -> bool:
    """Create the DSN's database when it is missing. Returns True when it was created."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn(dsn), timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await conn.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn(dsn), timeout=10)
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()
