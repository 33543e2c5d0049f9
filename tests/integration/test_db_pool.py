"""The services' Postgres pool against the real Postgres: acquire and command timeouts, and the 503 an HTTP
service answers when its pool cannot serve a query in time."""

from __future__ import annotations

import time

import pytest

from mlp.db import create_pool
from mlp.settings import Settings
from read_api.deps import pool_of
from read_api.main import create_app
from tests.support.apps import running

pytestmark = pytest.mark.integration


async def test_an_acquire_waits_at_most_the_acquire_timeout(migrated: Settings) -> None:
    pool = await create_pool(migrated, max_size=1, acquire_timeout_s=0.3)
    try:
        async with pool.acquire():
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await pool.fetchval("SELECT 1")  # fetchval acquires through the bounded acquire too
            assert 0.25 < time.monotonic() - started < 2.0
        assert await pool.fetchval("SELECT 1") == 1  # released: the pool serves again
    finally:
        await pool.close()


async def test_a_statement_runs_at_most_the_command_timeout(migrated: Settings) -> None:
    pool = await create_pool(migrated, max_size=1, command_timeout_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.fetchval("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 2.0
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_the_timeouts_default_to_the_settings(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"postgres_acquire_timeout_s": 0.2, "postgres_command_timeout_s": 0.2})
    pool = await create_pool(settings, max_size=1)
    try:
        with pytest.raises(TimeoutError):
            await pool.fetchval("SELECT pg_sleep(5)")
        async with pool.acquire():
            with pytest.raises(TimeoutError):
                await pool.fetchval("SELECT 1")
    finally:
        await pool.close()


async def test_an_exhausted_pool_answers_503_with_the_shared_error_body(migrated: Settings) -> None:
    app = create_app(migrated)
    small = await create_pool(migrated, max_size=1, acquire_timeout_s=0.3)
    app.dependency_overrides[pool_of] = lambda: small
    try:
        async with running(app) as client, small.acquire():  # the only connection is taken
            response = await client.get("/api/v1/metrics/token-rate")
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "dependency_unavailable"
        assert set(response.json()) == {"error", "detail"}
        assert response.headers["Retry-After"] == "1"
    finally:
        await small.close()
