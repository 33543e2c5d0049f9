"""The read API in-process against real Redis and Postgres: status, long-poll, 404."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as redis

from events.model import InferenceRequested, new_event_id, utc_now
from mlp.settings import Settings
from projections.postgres import store_and_project
from projections.status_cache import StatusCache, StatusCacheUnavailable, StatusKeys
from read_api.main import create_app
from read_api.requests_routes import load_view
from tests.support.apps import running

pytestmark = pytest.mark.integration

QUEUED = {"user_id": "reader", "model": "basic-model", "created_at": "2026-11-26T10:00:00+00:00"}
COMPLETED = {
    "finished_at": "2026-11-26T10:00:01+00:00",
    "completion": "test prompt",
    "prompt_tokens": "2",
    "completion_tokens": "2",
    "total_tokens": "4",
}


@pytest.fixture
async def cache(module_settings: Settings) -> StatusCache:
    client = redis.Redis.from_url(module_settings.redis_url, decode_responses=True)
    return StatusCache(client, StatusKeys(module_settings.redis_prefix))


async def test_unknown_request_is_404_and_a_bad_id_is_422(module_settings: Settings) -> None:
    async with running(create_app(module_settings)) as client:
        missing = await client.get(f"/api/v1/inference/{new_event_id()}")
        bad = await client.get("/api/v1/inference/not*a*valid*id")
        # A namespaced request id (<user>.<suffix>, docs/bus.md) is a valid id: unknown here, 404.
        namespaced = await client.get("/api/v1/inference/alice.job-1")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"
        assert bad.status_code == 422
        assert namespaced.status_code == 404


async def test_a_waiting_get_returns_the_terminal_state_once_it_is_reached(
    module_settings: Settings, cache: StatusCache
) -> None:
    request_id = new_event_id()
    await cache.advance(request_id, "queued", QUEUED)
    async with running(create_app(module_settings)) as client:
        now = await client.get(f"/api/v1/inference/{request_id}")
        assert now.json()["status"] == "queued"
        waiting = asyncio.create_task(client.get(f"/api/v1/inference/{request_id}", params={"wait": 20}))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # still queued: the GET waits
        await cache.advance(request_id, "completed", COMPLETED)
        answer = await waiting
    body = answer.json()
    assert answer.status_code == 200
    assert body["status"] == "completed"
    assert body["result"] == {"completion": "test prompt"}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


async def test_waiters_are_woken_by_the_terminal_notification(module_settings: Settings, cache: StatusCache) -> None:
    """The wake-up comes from the status cache's publish, not from a timer (only the listener sets the event)."""
    from read_api.terminal_waits import TerminalWaits

    client = redis.Redis.from_url(module_settings.redis_url, decode_responses=True)
    waits = TerminalWaits(client, cache)
    waits.start()
    try:
        request_id = new_event_id()
        await cache.advance(request_id, "queued", QUEUED)
        with waits.watching(request_id) as turned_terminal:
            await asyncio.sleep(0.2)  # let the subscription settle
            await cache.advance(request_id, "running", {})
            assert not turned_terminal.is_set()  # running is not terminal
            await cache.advance(request_id, "completed", COMPLETED)
            await asyncio.wait_for(turned_terminal.wait(), 10)
    finally:
        await waits.close()
        await client.aclose()


async def test_wait_is_bounded_by_the_configured_maximum(module_settings: Settings, cache: StatusCache) -> None:
    request_id = new_event_id()
    await cache.advance(request_id, "queued", QUEUED)
    bounded = module_settings.model_copy(update={"max_wait_s": 0.3})
    async with running(create_app(bounded)) as client:
        answer = await client.get(f"/api/v1/inference/{request_id}", params={"wait": 3600})
    assert answer.status_code == 200
    assert answer.json()["status"] == "queued"


async def test_negative_wait_is_refused(module_settings: Settings) -> None:
    async with running(create_app(module_settings)) as client:
        answer = await client.get(f"/api/v1/inference/{new_event_id()}", params={"wait": -1})
    assert answer.status_code == 422


async def test_with_redis_down_postgres_answers_the_status(module_settings: Settings) -> None:
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    cache = StatusCache(dead, StatusKeys(module_settings.redis_prefix))
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=1)
    assert pool is not None
    request_id = new_event_id()
    stored = InferenceRequested(
        event_id=new_event_id(), request_id=request_id, occurred_at=utc_now(), user_id="reader",
        model="basic-model", prompt="test prompt", max_tokens=4,
    )  # fmt: skip
    try:
        await store_and_project(pool, [stored])
        with pytest.raises(StatusCacheUnavailable):
            await cache.get(request_id)
        view = await load_view(cache, pool, request_id)
        assert view is not None
        assert (view.request_id, view.status) == (request_id, "queued")
    finally:
        await pool.close()
        await dead.aclose()
