"""The API gateway in-process against the real RabbitMQ, Redis and Postgres of the test namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as redis

from api_gateway.main import create_app
from mlp.settings import Settings
from projections.status_cache import StatusKeys
from tests.support.apps import running
from tests.support.isolation import broker_admin, isolated_namespace
from tests.support.queues import drain_requests

pytestmark = pytest.mark.integration

SEED = {"prompt": "test prompt", "user_id": "test-user", "model": "basic-model"}


@pytest.fixture
async def gateway(module_settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    async with running(create_app(module_settings)) as client:
        await drain_requests(module_settings)
        yield client, module_settings


async def test_the_seed_request_is_accepted_published_and_visible(gateway: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = gateway
    response = await client.post("/api/v1/inference", json=SEED)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["status_url"].endswith(f"/api/v1/inference/{body['request_id']}")
    published = await drain_requests(settings)
    assert [e.request_id for e in published] == [body["request_id"]]
    event = published[0]
    assert (event.prompt, event.user_id, event.model, event.max_tokens) == (
        "test prompt",
        "test-user",
        "basic-model",
        settings.default_max_tokens,
    )
    cache = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    status = await cache.hgetall(StatusKeys(settings.redis_prefix).status(body["request_id"]))
    await cache.aclose()
    assert status["status"] == "queued"


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 422, "JSON"),
        ({"prompt": "x", "model": "basic-model"}, 422, "user_id"),
        ({**SEED, "model": "no-such-model"}, 422, "unknown model"),
        ({**SEED, "max_tokens": -1}, 422, "max_tokens"),
        ({**SEED, "max_tokens": 10**6}, 422, "max_tokens"),
        ({**SEED, "prompt": ""}, 422, "prompt"),
        ({**SEED, "prompt": "x" * 40_000}, 422, "limit"),
        ({**SEED, "user_id": "a.b"}, 422, "user_id"),
        ({**SEED, "extra": 1}, 422, "extra"),
        ({**SEED, "prompt": "x" * 300_000}, 413, "payload_too_large"),
    ],
)
async def test_bad_input_is_refused_with_a_clear_message_and_nothing_is_published(
    gateway: tuple[httpx.AsyncClient, Settings], payload: object, status: int, needle: str
) -> None:
    client, settings = gateway
    if isinstance(payload, bytes):
        response = await client.post("/api/v1/inference", content=payload, headers={"content-type": "application/json"})
    else:
        response = await client.post("/api/v1/inference", json=payload)
    assert response.status_code == status, response.text
    assert needle in response.text
    assert await drain_requests(settings) == []


async def test_idempotency_key_returns_the_same_request_and_publishes_once(
    gateway: tuple[httpx.AsyncClient, Settings],
) -> None:
    client, settings = gateway
    headers = {"Idempotency-Key": "retry-42"}
    first = await client.post("/api/v1/inference", json=SEED, headers=headers)
    second = await client.post("/api/v1/inference", json=SEED, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["request_id"] == second.json()["request_id"]
    assert len(await drain_requests(settings)) == 1


async def test_api_key_decides_the_user_not_the_body(module_settings: Settings) -> None:
    keyed = module_settings.model_copy(update={"api_keys": "k-alice=alice"})
    async with running(create_app(keyed)) as client:
        await drain_requests(keyed)
        no_key = await client.post("/api/v1/inference", json={**SEED, "user_id": "alice"})
        other_user = await client.post(
            "/api/v1/inference", json={**SEED, "user_id": "bob"}, headers={"X-API-Key": "k-alice"}
        )
        ok = await client.post(
            "/api/v1/inference", json={**SEED, "user_id": "alice"}, headers={"Authorization": "Bearer k-alice"}
        )
        assert (no_key.status_code, other_user.status_code, ok.status_code) == (401, 403, 202)
        assert [e.user_id for e in await drain_requests(keyed)] == ["alice"]


async def test_broker_gone_at_submit_answers_503_and_records_nothing(module_settings: Settings) -> None:
    with isolated_namespace("gw503") as ns:
        settings = module_settings.model_copy(
            update={"rabbitmq_url": ns.rabbitmq_url, "redis_prefix": ns.redis_prefix, "publish_timeout_s": 2.0}
        )
        async with running(create_app(settings)) as client:
            # Deleting the vhost closes the gateway's connection from the broker side: the publish cannot be confirmed.
            broker_admin().delete_vhost(ns.name)
            response = await client.post("/api/v1/inference", json=SEED)
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"]
            cache = redis.Redis.from_url(settings.redis_url, decode_responses=True)
            leftovers = [k async for k in cache.scan_iter(match=StatusKeys(settings.redis_prefix).pattern())]
            await cache.aclose()
            assert leftovers == []
            broker_admin().add_vhost(ns.name)


async def test_redis_unreachable_at_submit_answers_503_not_500(module_settings: Settings) -> None:
    from tests.support.services import free_port

    no_redis = module_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with running(create_app(no_redis)) as client:
        await drain_requests(no_redis)
        response = await client.post("/api/v1/inference", json=SEED)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "dependency_unavailable"
        assert response.headers["Retry-After"]
        assert await drain_requests(no_redis) == []


async def test_quota_admission_uses_the_same_upper_bound_as_the_worker(module_settings: Settings) -> None:
    """A prompt whose upper-bound estimate does not fit the remaining budget is refused at the edge (429)."""
    import asyncpg

    from quota.plans import Overrides
    from quota.store import set_user_quota

    conn = await asyncpg.connect(module_settings.postgres_dsn)
    try:
        await set_user_quota(
            conn,
            "tight-user",
            plan=None,
            overrides=Overrides(tokens_per_day=200),
            clear_overrides=True,
            default_plan=module_settings.default_plan,
        )
    finally:
        await conn.close()
    async with running(create_app(module_settings)) as client:
        await drain_requests(module_settings)
        fits = await client.post("/api/v1/inference", json={**SEED, "user_id": "tight-user", "max_tokens": 50})
        too_long = {**SEED, "user_id": "tight-user", "prompt": "x" * 190, "max_tokens": 50}
        refused = await client.post("/api/v1/inference", json=too_long)
        assert fits.status_code == 202, fits.text
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "quota_exceeded:tokens_per_day"
        assert int(refused.headers["Retry-After"]) > 0
        assert len(await drain_requests(module_settings)) == 1
