"""The quota rebuild's metrics (the QuotaRebuild alerts' inputs) against the real Redis and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from mlp.settings import Settings
from quota.ledger import QuotaUnavailable, RedisLedger
from quota.store import PostgresLedgerSource

pytestmark = pytest.mark.integration

NOW = datetime(2030, 5, 20, 12, 0, tzinfo=UTC)


def rebuilds(outcome: str) -> float:
    value = REGISTRY.get_sample_value("mlp_quota_rebuilds_total", {"outcome": outcome})
    assert value is not None, "the outcome's series exists from the start"
    return value


def in_progress() -> float:
    value = REGISTRY.get_sample_value("mlp_quota_rebuild_in_progress")
    assert value is not None
    return value


@pytest.fixture
async def flushed(client: redis.Redis, migrated: Settings) -> AsyncIterator[None]:
    """No quota keys of this run's prefix: the counters must be rebuilt (what a Redis restart leaves)."""

    async def flush() -> None:
        keys = [k async for k in client.scan_iter(match=f"{migrated.redis_prefix}quota:*", count=1000)]
        if keys:
            await client.delete(*keys)

    await flush()
    yield
    await flush()


async def test_a_rebuild_counts_done_and_clears_its_in_progress_gauge(
    flushed: None, pool: asyncpg.Pool, client: redis.Redis, migrated: Settings
) -> None:
    ledger = RedisLedger(client, migrated.redis_prefix, PostgresLedgerSource(pool), reservation_ttl_s=300)
    done, failed = rebuilds("done"), rebuilds("failed")
    assert await ledger.ensure_built(NOW) is True
    assert (rebuilds("done"), rebuilds("failed"), in_progress()) == (done + 1, failed, 0.0)
    assert await ledger.ensure_built(NOW) is False  # already built: nothing rebuilt, nothing counted
    assert rebuilds("done") == done + 1


async def test_a_rebuild_that_cannot_read_the_ledger_counts_failed(
    flushed: None, client: redis.Redis, migrated: Settings
) -> None:
    # Nothing listens on port 1: the pool (min_size=0) connects only when the rebuild reads the ledger.
    dead = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/mlp", min_size=0, max_size=1)
    assert dead is not None
    try:
        ledger = RedisLedger(client, migrated.redis_prefix, PostgresLedgerSource(dead), reservation_ttl_s=300)
        done, failed = rebuilds("done"), rebuilds("failed")
        with pytest.raises(QuotaUnavailable, match="cannot read the usage ledger"):
            await ledger.ensure_built(NOW)
        assert (rebuilds("done"), rebuilds("failed"), in_progress()) == (done, failed + 1, 0.0)
        assert not await ledger.is_built()
    finally:
        await dead.close()
