"""Idempotency-Key on the real gateway (RabbitMQ, Redis, Postgres): namespacing, header bounds, and the
window between a confirmed publish and a Redis failure."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from api_gateway.idempotency import PENDING, IdempotencyRecords
from api_gateway.main import create_app
from api_gateway.submit import SubmitService, SubmitSettings
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.cache import Keys
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from tests.support.apps import running
from tests.support.queues import drain_requests
from tests.support.services import free_port

pytestmark = pytest.mark.integration

SEED = {"prompt": "test prompt", "user_id": "test-user", "model": "basic-model"}


@pytest.fixture
async def gateway(module_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(module_settings)) as client:
        await drain_requests(module_settings)
        yield client


async def test_user_ids_holding_colons_never_share_a_record(
    gateway: httpx.AsyncClient, module_settings: Settings
) -> None:
    """("a:b", "c") and ("a", "b:c") once named the same Redis key: the second submit replayed the first."""
    first = await gateway.post("/api/v1/inference", json={**SEED, "user_id": "a:b"}, headers={"Idempotency-Key": "c"})
    second = await gateway.post("/api/v1/inference", json={**SEED, "user_id": "a"}, headers={"Idempotency-Key": "b:c"})
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json()["request_id"] != second.json()["request_id"]
    published = await drain_requests(module_settings)
    assert sorted(e.user_id for e in published) == ["a", "a:b"]
    # Each pair still replays its own request.
    again = await gateway.post("/api/v1/inference", json={**SEED, "user_id": "a"}, headers={"Idempotency-Key": "b:c"})
    assert again.json()["request_id"] == second.json()["request_id"]
    assert await drain_requests(module_settings) == []


@pytest.mark.parametrize(
    "key",
    ["x" * 129, "has space", "semi;colon", 'quote"d', "tab\there"],
)
async def test_an_idempotency_key_out_of_bounds_is_refused_with_a_clear_422(
    gateway: httpx.AsyncClient, module_settings: Settings, key: str
) -> None:
    response = await gateway.post("/api/v1/inference", json=SEED, headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert "idempotency-key" in body["detail"].lower()
    assert await drain_requests(module_settings) == []


@pytest.mark.parametrize("key", ["0193a5b2-7c3e-7d4f-8a9b-0c1d2e3f4a5b", "k" * 128, "order:42/try=1", "YWJj+/=="])
async def test_keys_within_bounds_are_accepted(gateway: httpx.AsyncClient, module_settings: Settings, key: str) -> None:
    response = await gateway.post("/api/v1/inference", json=SEED, headers={"Idempotency-Key": key})
    assert response.status_code == 202, response.text
    assert len(await drain_requests(module_settings)) == 1


class RedisGoneAfterPublish(IdempotencyRecords):
    """The claim reaches the real Redis; the record after the confirmed publish goes to a Redis port where
    nothing listens (a real connection failure, at exactly that step)."""

    def __init__(self, live: IdempotencyRecords, unreachable: IdempotencyRecords) -> None:
        self._live = live
        self._unreachable = unreachable

    async def claim(self, user_id: str, key: str) -> str | None:
        return await self._live.claim(user_id, key)

    async def record(self, user_id: str, key: str, request_id: str) -> bool:
        return await self._unreachable.record(user_id, key, request_id)

    async def release(self, user_id: str, key: str) -> None:
        await self._live.release(user_id, key)


async def test_redis_lost_after_the_confirmed_publish_answers_202_and_leaves_no_24h_pending_key(
    module_settings: Settings,
) -> None:
    settings = module_settings
    keys = Keys(settings.redis_prefix)
    live_redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    dead_redis = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    pending_ttl_s = 2
    records = RedisGoneAfterPublish(
        IdempotencyRecords(live_redis, keys, pending_ttl_s=pending_ttl_s),
        IdempotencyRecords(dead_redis, keys, pending_ttl_s=pending_ttl_s, retry_delays_s=(0.01, 0.01)),
    )
    broker = make_broker(settings, app_id="test-idempotency")
    await broker.connect()
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await declare_topology(broker, settings.models)
        service = SubmitService(
            SubmitSettings.of(settings),
            EventPublisher(broker, settings.publish_timeout_s),
            QuotaService(pool, live_redis, QuotaSettings.of(settings)),
            live_redis,
            StatusCache(live_redis, StatusKeys(settings.redis_prefix)),
            idempotency=records,
        )
        app = create_app(settings)
        async with running(app) as client:
            app.state.deps = dataclasses.replace(app.state.deps, submit=service)  # the lifespan's, but this service
            await drain_requests(settings)
            response = await client.post("/api/v1/inference", json=SEED, headers={"Idempotency-Key": "window-1"})
            # Queued: the answer is the 202, not a 503 that would make the client submit it again.
            assert response.status_code == 202, response.text
            request_id = response.json()["request_id"]
            assert [e.request_id for e in await drain_requests(settings)] == [request_id]
            assert (await live_redis.hget(StatusKeys(settings.redis_prefix).status(request_id), "status")) == "queued"
            # The claim that could not be completed is pending for seconds, not 24 h ...
            record = keys.idempotency(SEED["user_id"], "window-1")
            assert await live_redis.get(record) == PENDING
            assert 0 < await live_redis.ttl(record) <= pending_ttl_s
            # ... then it is gone: the record ends consistent (absent), and the key is usable again.
            await asyncio.sleep(pending_ttl_s + 0.5)
            assert await live_redis.exists(record) == 0
    finally:
        await broker.stop()
        await pool.close()
        await live_redis.aclose()
        await dead_redis.aclose()


async def test_a_completed_record_keeps_the_request_id_for_a_day(
    gateway: httpx.AsyncClient, module_settings: Settings
) -> None:
    response = await gateway.post("/api/v1/inference", json=SEED, headers={"Idempotency-Key": "kept"})
    assert response.status_code == 202
    keys = Keys(module_settings.redis_prefix)
    live_redis = redis.Redis.from_url(module_settings.redis_url, decode_responses=True)
    try:
        record = keys.idempotency(SEED["user_id"], "kept")
        assert await live_redis.get(record) == response.json()["request_id"]
        assert await live_redis.ttl(record) > 86_000
    finally:
        await live_redis.aclose()
    await drain_requests(module_settings)
