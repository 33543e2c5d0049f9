"""The worker's last delivery (real RabbitMQ, Redis, Postgres): a transient failure that outlasts every delivery
ends the request failed with its cause, the quota conserved, the message dead-lettered; never a silent DLQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from events.model import InferenceFailed, InferenceRequested, InferenceStarted
from events.topology import DELIVERY_LIMIT, requests_queue
from ml_worker import handler
from mlp.backoff import Backoff
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.cache import create_redis
from mlp.db import create_pool, ensure_database
from mlp.settings import Settings
from quota.service import QuotaService, QuotaSettings
from tests.integration.test_worker_harness import (
    free_port,
    observed,
    queue_depth,
    requested,
    running_worker,
    wait_queue_depth,
)
from tests.support.isolation import Namespace, isolated_namespace

pytestmark = pytest.mark.integration

QUEUE = requests_queue("basic-model").name
DLQ = QUEUE + ".dlq"


@pytest.fixture
async def namespace_of_test() -> AsyncIterator[Namespace]:
    with isolated_namespace("last") as ns:
        yield ns


@pytest.fixture
async def good(migrated: Settings, namespace_of_test: Namespace) -> Settings:
    """The test's vhost and Redis prefix on the session's migrated database, its topology declared."""
    settings = migrated.model_copy(
        update={
            "rabbitmq_url": namespace_of_test.rabbitmq_url,
            "redis_prefix": namespace_of_test.redis_prefix,
            "models": ("basic-model",),
        }
    )
    broker = make_broker(settings)
    await broker.connect()
    try:
        await declare_topology(broker, settings.models)
    finally:
        await broker.stop()
    return settings


@pytest.fixture
async def quota(good: Settings) -> AsyncIterator[QuotaService]:
    pool = await create_pool(good)
    client = create_redis(good)
    try:
        service = QuotaService(pool, client, QuotaSettings.of(good))
        await service.view("warm-up")  # the counters are built (from the good ledger) before the test
        yield service
    finally:
        await client.aclose()
        await pool.close()


async def test_a_transient_failure_outlasting_every_delivery_ends_failed_with_the_quota_conserved(
    good: Settings, namespace_of_test: Namespace, quota: QuotaService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real outage of one dependency, for this worker only: its database exists but has no quota tables,
    # so every plan lookup fails (QuotaUnavailable, a transient error: waited out, then requeued).
    await ensure_database(namespace_of_test.postgres_dsn)
    broken = good.model_copy(
        update={
            "postgres_dsn": namespace_of_test.postgres_dsn,
            "triton_url": f"127.0.0.1:{free_port()}",  # never reached: the reservation fails first
            "worker_health_port": free_port(),
        }
    )
    # The in-process retries, shortened (the deliveries are the broker's: DELIVERY_LIMIT + 1 of them).
    monkeypatch.setattr(handler, "TRANSIENT_MAX_TRIES", 2)
    monkeypatch.setattr(handler, "TRANSIENT_BACKOFF", Backoff(base_s=0.01, cap_s=0.01))
    request = requested(user_id="outage-user")
    dlq_before = await queue_depth(good, DLQ)
    async with observed(good) as log, running_worker(broken):
        await publish(good, request)
        events = await log.terminal(request.request_id)
        await wait_queue_depth(good, DLQ, dlq_before + 1)  # dead-lettered, with its outcome published
    failed = events[-1]
    assert isinstance(failed, InferenceFailed)
    assert failed.error_code == "transient_exhausted"
    assert "QuotaUnavailable" in failed.error_message
    assert f"{DELIVERY_LIMIT + 1} deliveries" in failed.error_message
    assert not any(isinstance(e, InferenceStarted) for e in events)  # never reached Triton
    assert sum(isinstance(e, InferenceFailed) for e in log.by_request[request.request_id]) == 1
    assert await queue_depth(good, QUEUE) == 0
    view = await quota.view("outage-user")
    assert (view.day.used, view.day.reserved) == (0, 0)


async def publish(settings: Settings, *events: InferenceRequested) -> None:
    broker = make_broker(settings)
    await broker.connect()
    try:
        await EventPublisher(broker, timeout_s=10).publish_many(events)
    finally:
        await broker.stop()
