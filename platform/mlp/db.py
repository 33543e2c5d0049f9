"""PostgreSQL adapter: pool factory and database creation."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg

from mlp.settings import Settings
from mlp.telemetry import asyncpg_init_for


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    # Query spans on every connection when tracing is on (init is None, and costs nothing, when off).
    pool = await asyncpg.create_pool(
        settings.postgres_dsn, min_size=min_size, max_size=max_size, timeout=10, init=asyncpg_init_for()
    )
    assert pool is not None
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
