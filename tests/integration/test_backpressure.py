"""The requests queues' bound (MLP_MAX_QUEUED_PER_MODEL) on the real RabbitMQ: a policy applied to queues that
already exist, a refused publish answered 503 queue_full, nothing half-accepted, everything accepted ending
once a worker runs (real collector, worker and Triton)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from api_gateway.main import create_app
from events.model import InferenceRejected, InferenceRequested
from events.topology import REQUESTS_BOUND_POLICY, dead_letter_queue, projections_queue, requests_queue
from mlp.bus import EventPublisher, PublishRefused, declare_topology, make_broker
from mlp.settings import Settings
from ops.rabbitmq_policy import apply_requests_bound, vhost_of
from projections.queries import get_request
from projections.status_cache import StatusKeys
from results_collector.main import build_app
from tests.integration.test_worker_harness import observed, queue_depth, requested, running_worker
from tests.support.apps import running
from tests.support.isolation import Namespace, broker_admin, isolated_namespace
from tests.support.rabbitmq_admin import MANAGEMENT_URL_VARIABLE
from tests.support.services import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BOUND = 5
QUEUE = requests_queue("basic-model").name
SEED = {"prompt": "test prompt", "user_id": "bp-user", "model": "basic-model"}
WAIT_S = 30.0


@pytest.fixture
def bp_namespace() -> Iterator[Namespace]:
    with isolated_namespace("bp") as ns:
        yield ns


@pytest.fixture
def bounded(migrated: Settings, bp_namespace: Namespace) -> Settings:
    """The session's database, a vhost and Redis prefix of the test's own, a bound of BOUND per model."""
    import os

    return migrated.model_copy(
        update={
            "rabbitmq_url": bp_namespace.rabbitmq_url,
            "redis_prefix": bp_namespace.redis_prefix,
            "max_queued_per_model": BOUND,
            "models": ("basic-model",),
            # the tests' broker in a container is administered over its management API, as ops would be
            "rabbitmq_management_url": os.environ.get(MANAGEMENT_URL_VARIABLE, ""),
        }
    )


async def _declared(settings: Settings) -> None:
    broker = make_broker(settings)
    await broker.connect()
    try:
        await declare_topology(broker, settings.models)
    finally:
        await broker.stop()


async def _bound_applied(settings: Settings) -> None:
    """Until the broker shows the policy in effect on the requests queue (applied to a live queue)."""
    admin = broker_admin()
    async with asyncio.timeout(WAIT_S):
        while await asyncio.to_thread(admin.queue_policy, vhost_of(settings.rabbitmq_url), QUEUE) != (
            REQUESTS_BOUND_POLICY
        ):
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_collector(settings: Settings) -> AsyncIterator[None]:
    """The results collector in process (its own health port), until the block ends."""
    settings = settings.model_copy(update={"collector_health_port": free_port()})
    app = build_app(settings)
    task = asyncio.create_task(app.run())
    url = f"http://{settings.health_host}:{settings.collector_health_port}/readyz"

    async def ready() -> bool:
        if task.done():
            task.result()  # surfaces a start-up failure
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url, timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        await eventually(ready, "collector ready")
        yield
    finally:
        app.exit()
        await task
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # app.run() installed them on the loop
            loop.remove_signal_handler(sig)


@pytest.fixture
async def gateway(bounded: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(bounded)) as client:  # declares the topology: the queues exist, unbounded
        apply_requests_bound(bounded)
        await _bound_applied(bounded)
        yield client


async def test_the_policy_bounds_queues_already_declared_and_a_redeclare_still_succeeds(bounded: Settings) -> None:
    await _declared(bounded)
    apply_requests_bound(bounded)
    await _bound_applied(bounded)
    await _declared(bounded)  # the same arguments as before: no PRECONDITION_FAILED, the bound stays
    admin = broker_admin()
    vhost = vhost_of(bounded.rabbitmq_url)
    assert admin.queue_policy(vhost, QUEUE) == REQUESTS_BOUND_POLICY
    # only the requests queues: the projections and every DLQ stay unbounded
    for other in (projections_queue().name, dead_letter_queue(requests_queue("basic-model")).name):
        assert admin.queue_policy(vhost, other) is None


async def test_a_publish_past_the_bound_is_refused_by_a_nack(bounded: Settings) -> None:
    await _declared(bounded)
    apply_requests_bound(bounded)
    await _bound_applied(bounded)
    broker = make_broker(bounded)
    await broker.connect()
    try:
        publisher = EventPublisher(broker, timeout_s=10)
        taken = 0
        while taken <= BOUND + 1:  # a quorum queue refuses once it holds more than its bound (docs/bus.md)
            try:
                await publisher.publish(requested(user_id="bus-user"))
            except PublishRefused:
                break
            taken += 1
        assert BOUND <= taken <= BOUND + 1
        with pytest.raises(PublishRefused):  # and keeps refusing while full
            await publisher.publish(requested(user_id="bus-user"))
    finally:
        await broker.stop()
    assert await queue_depth(bounded, QUEUE) == taken


async def test_submits_past_the_bound_answer_503_queue_full_and_nothing_of_them_is_accepted(
    gateway: httpx.AsyncClient, bounded: Settings, triton_grpc_url: str
) -> None:
    async with observed(bounded) as log:
        accepted: list[str] = []
        response = await gateway.post("/api/v1/inference", json=SEED)
        while response.status_code == 202 and len(accepted) <= BOUND + 1:
            accepted.append(response.json()["request_id"])
            response = await gateway.post("/api/v1/inference", json=SEED)
        # The broker's bound is soft by one: a quorum queue refuses once it holds more than it.
        assert BOUND <= len(accepted) <= BOUND + 1, response.text
        refused = [response, *[await gateway.post("/api/v1/inference", json=SEED) for _ in range(2)]]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "queue_full"
            assert "not accepted" in response.json()["detail"]
            assert int(response.headers["Retry-After"]) >= 1
        # Each refused request reached the projections (a nack does not undo other queues' copies): its
        # rejection (queue_full) ends it there, so no read model keeps it queued.
        async with asyncio.timeout(WAIT_S):
            rejections = await log.matching(lambda e: isinstance(e, InferenceRejected), count=len(refused))
        requests = [e for e in log.arrivals if isinstance(e, InferenceRequested)]
    assert [r.reason for r in rejections if isinstance(r, InferenceRejected)] == ["queue_full"] * len(refused)
    refused_ids = {r.request_id for r in rejections}
    assert refused_ids.isdisjoint(accepted)
    assert {r.request_id for r in requests} == set(accepted) | refused_ids
    # Everything accepted is in the queue; nothing refused is.
    assert await queue_depth(bounded, QUEUE) == len(accepted)
    # The first status exists for the accepted requests only (the refused ones' were removed before the 503).
    cache = redis.Redis.from_url(bounded.redis_url, decode_responses=True)
    try:
        keys = StatusKeys(bounded.redis_prefix)
        for request_id in refused_ids:
            assert not await cache.exists(keys.status(request_id))
        for request_id in accepted:
            assert await cache.hget(keys.status(request_id), "status") == "queued"
    finally:
        await cache.aclose()
    # The read model (the collector projecting the same events): the accepted requests queued, the refused
    # ones rejected (queue_full), none left queued forever.
    pool = await asyncpg.create_pool(bounded.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        async with running_collector(bounded):

            async def projected() -> bool:
                views = [await get_request(pool, rid) for rid in [*accepted, *refused_ids]]
                return all(v is not None for v in views) and all(
                    v is not None and v.status == "rejected" for v in views[len(accepted) :]
                )

            await eventually(projected, "every request projected")
            for request_id in accepted:
                view = await get_request(pool, request_id)
                assert view is not None
                assert view.status == "queued"
            # Everything accepted ends once a worker runs.
            async with running_worker(bounded.model_copy(update={"triton_url": triton_grpc_url})):

                async def completed() -> bool:
                    views = [await get_request(pool, rid) for rid in accepted]
                    return all(v is not None and v.status == "completed" for v in views)

                await eventually(completed, "every accepted request completed", deadline_s=WAIT_S * 2)
    finally:
        await pool.close()
    metrics = (await gateway.get("/metrics")).text
    assert 'mlp_queue_max_length{model="basic-model"} 5.0' in metrics
    assert 'mlp_requests_rejected_total{reason="queue_full"}' in metrics
