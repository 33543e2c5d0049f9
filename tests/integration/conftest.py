"""Fixtures shared by the integration tests: a Postgres pool and a Redis client on the session namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as redis

from mlp.settings import Settings


@pytest.fixture(scope="module")
async def pool(migrated: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(migrated.postgres_dsn, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def client(migrated: Settings) -> AsyncIterator[redis.Redis]:
    # A blocking pool: redis-py's default async pool raises MaxConnectionsError past 100
    # concurrent commands instead of waiting for a free connection.
    pool = redis.BlockingConnectionPool.from_url(
        migrated.redis_url, max_connections=32, timeout=10, decode_responses=True
    )
    client = redis.Redis(connection_pool=pool)
    yield client
    await client.aclose()
