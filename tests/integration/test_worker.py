"""The ML worker against the real RabbitMQ, Redis, Postgres and Triton (no collector: events are observed
on a test queue bound to ``inference.#``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import msgspec
import pytest
import redis.asyncio as redis

from events.model import (
    InferenceCompleted,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
    encode_event,
    new_event_id,
)
from events.topology import requested_routing_key, requests_queue
from ml_service.launcher import TritonProcess
from ml_worker.main import Worker
from mlp.bus import EventPublisher, connection_name, declare_topology, make_broker
from mlp.cache import create_redis
from mlp.db import create_pool
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from tests.integration.test_worker_harness import (
    free_port,
    observed,
    publish_raw,
    queue_depth,
    requested,
    running_worker,
    triton_inferences,
    wait_idle,
    wait_queue_depth,
)
from tests.support.isolation import broker_admin
from tests.support.triton import triton_server

pytestmark = pytest.mark.integration
__all__ = ["triton_server"]  # the session fixture, imported for pytest

BASIC_QUEUE = requests_queue("basic-model").name
BASIC_DLQ = BASIC_QUEUE + ".dlq"


@pytest.fixture(scope="module")
async def wsettings(migrated: Settings, triton_server: TritonProcess) -> Settings:
    """Settings of the worker under test: the session's Triton, small retry budgets, small limits."""
    settings = migrated.model_copy(
        update={
            "triton_url": triton_server.grpc_url,
            "triton_timeout_s": 20.0,
            "triton_retries": 2,
            "triton_backoff_s": 0.05,
            "max_prompt_chars": 2_000,
            "max_tokens_limit": 64,
            "models": ("basic-model", "slow-model"),
            "worker_health_port": free_port(),
        }
    )
    broker = make_broker(settings)
    await broker.connect()
    await declare_topology(broker, settings.models)
    await broker.stop()
    return settings


@pytest.fixture(scope="module")
async def quota(wsettings: Settings) -> AsyncIterator[QuotaService]:
    pool = await create_pool(wsettings)
    client = create_redis(wsettings)
    try:
        yield QuotaService(pool, client, QuotaSettings.of(wsettings))
    finally:
        await client.aclose()
        await pool.close()


async def publish(settings: Settings, *events: InferenceRequested) -> None:
    broker = make_broker(settings)
    await broker.connect()
    try:
        await EventPublisher(broker, timeout_s=10).publish_many(events)
    finally:
        await broker.stop()


async def test_a_request_is_started_then_completed_with_its_tokens_charged(
    wsettings: Settings, quota: QuotaService
) -> None:
    request = requested(user_id="happy-user", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    always = wsettings.model_copy(update={"started_event_after_ms": 0})  # InferenceStarted for every request
    async with observed(wsettings) as log, running_worker(always):
        await publish(wsettings, request)
        events = await log.terminal(request.request_id)
    kinds = [type(e) for e in events]
    assert kinds == [type(request), InferenceStarted, InferenceCompleted]
    started, completed = events[1], events[2]
    assert isinstance(started, InferenceStarted)
    assert isinstance(completed, InferenceCompleted)
    assert started.reserved_tokens == len(request.prompt) + request.max_tokens
    assert started.attempt == 1
    assert completed.prompt_tokens > 0
    assert 0 < completed.completion_tokens <= request.max_tokens
    assert completed.completion
    for event in (started, completed):
        assert event.causation_id == request.event_id
        assert event.correlation_id == request.request_id
        assert event.traceparent == request.traceparent
    view = await quota.view("happy-user")
    assert view.day.used == completed.total_tokens
    assert view.day.reserved == 0


async def test_with_a_started_threshold_only_an_inference_slower_than_it_is_seen_running(
    wsettings: Settings, quota: QuotaService
) -> None:
    deferred = wsettings.model_copy(update={"started_event_after_ms": 1_000})  # slow-model takes 5 s
    fast = requested(user_id=f"fast-user-{new_event_id()[-8:]}")
    slow = requested(model="slow-model", user_id=f"patient-user-{new_event_id()[-8:]}")
    async with observed(wsettings) as log, running_worker(deferred, models=("basic-model", "slow-model")):
        await publish(wsettings, fast, slow)
        fast_events = await log.terminal(fast.request_id)
        slow_events = await log.terminal(slow.request_id)
    assert [type(e) for e in fast_events] == [InferenceRequested, InferenceCompleted]
    assert [type(e) for e in slow_events] == [InferenceRequested, InferenceStarted, InferenceCompleted]
    started, completed = slow_events[1], slow_events[2]
    assert isinstance(started, InferenceStarted)
    assert isinstance(completed, InferenceCompleted)
    # Published after the threshold, but it says when the inference started: about 5 s before the answer.
    assert (completed.occurred_at - started.occurred_at).total_seconds() > 4
    assert started.reserved_tokens == len(slow.prompt) + slow.max_tokens
    assert completed.started_at == started.occurred_at  # the outcome says when it started, too
    fast_done = fast_events[-1]
    assert isinstance(fast_done, InferenceCompleted)
    # No InferenceStarted for the fast one: its outcome carries the start.
    assert fast_done.started_at is not None
    assert fast.occurred_at <= fast_done.started_at <= fast_done.occurred_at
    assert (await quota.view(fast.user_id)).day.used == fast_done.total_tokens
    assert (await quota.view(slow.user_id)).day.used == completed.total_tokens


async def test_over_quota_is_rejected_and_triton_is_never_called(
    wsettings: Settings, quota: QuotaService, triton_server: TritonProcess
) -> None:
    conn = await asyncpg.connect(wsettings.postgres_dsn)
    try:
        await conn.execute("INSERT INTO user_quotas (user_id, plan, tokens_per_day) VALUES ('poor-user', 'free', 10)")
    finally:
        await conn.close()
    request = requested(user_id="poor-user")  # estimate: prompt chars + max_tokens > 10
    before = await triton_inferences(triton_server.http_url, "basic-model")
    async with observed(wsettings) as log, running_worker(wsettings):
        await publish(wsettings, request)
        events = await log.terminal(request.request_id)
    assert [type(e) for e in events[1:]] == [InferenceRejected]
    rejected = events[-1]
    assert isinstance(rejected, InferenceRejected)
    assert rejected.reason == "quota_exceeded"
    assert await triton_inferences(triton_server.http_url, "basic-model") == before
    view = await quota.view("poor-user")
    assert (view.day.used, view.day.reserved) == (0, 0)


async def test_invalid_messages_are_rejected_visibly_dead_lettered_and_the_worker_keeps_going(
    wsettings: Settings, triton_server: TritonProcess
) -> None:
    key = requested_routing_key("basic-model", "mallory")
    not_json_id = "mallory.not-json-1"  # in the publisher's namespace: its rejection may name it
    bad_schema = requested(user_id="mallory")
    bad_schema_body = msgspec.json.encode({**msgspec.to_builtins(bad_schema), "max_tokens": "many"})
    too_long = requested(user_id="mallory", prompt="x" * 2_001)
    too_many_tokens = requested(user_id="mallory", max_tokens=65)
    unknown_model = requested(user_id="mallory", model="nobody-serves-this")
    good = requested(user_id="mallory")
    before = await triton_inferences(triton_server.http_url, "basic-model")
    dlq_before = await queue_depth(wsettings, BASIC_DLQ)
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish_raw(wsettings, b"\x00 definitely not json", key, correlation_id=not_json_id)
        await publish_raw(wsettings, bad_schema_body, key)
        for event in (too_long, too_many_tokens):
            await publish_raw(wsettings, encode_event(event), key)
        # A valid event naming a model nobody serves, routed to basic-model's queue by its key: a mismatch.
        await publish_raw(wsettings, encode_event(unknown_model), key)
        reasons = {}
        for request_id in (not_json_id, bad_schema.request_id, too_long.request_id, too_many_tokens.request_id,
                           unknown_model.request_id):  # fmt: skip
            events = await log.terminal(request_id)
            assert not any(isinstance(e, InferenceStarted) for e in events)
            rejection = events[-1]
            assert isinstance(rejection, InferenceRejected)
            assert rejection.user_id == "mallory"
            reasons[request_id] = (rejection.reason, rejection.detail)
        assert await triton_inferences(triton_server.http_url, "basic-model") == before
        await publish(wsettings, good)
        assert isinstance((await log.terminal(good.request_id))[-1], InferenceCompleted)
        await wait_idle(worker, wsettings, BASIC_QUEUE)
    assert reasons[not_json_id][0] == "invalid_request"
    assert reasons[bad_schema.request_id][0] == "invalid_request"
    assert "max_tokens" in reasons[bad_schema.request_id][1]
    assert reasons[too_long.request_id][0] == "prompt_too_large"
    assert reasons[too_many_tokens.request_id][0] == "max_tokens_too_large"
    # A body that disagrees with its routing key is refused (topic permissions check the key, not the body).
    assert reasons[unknown_model.request_id][0] == "invalid_request"
    assert "routing key" in reasons[unknown_model.request_id][1]
    # The undecodable and mismatched ones are dead-lettered (inspectable, replayable); the rest are done.
    await wait_queue_depth(wsettings, BASIC_DLQ, dlq_before + 3)


async def test_triton_down_fails_the_request_after_bounded_retries(wsettings: Settings, quota: QuotaService) -> None:
    nowhere = wsettings.model_copy(update={"triton_url": f"127.0.0.1:{free_port()}", "triton_timeout_s": 2.0})
    request = requested(user_id="down-user")
    async with observed(wsettings) as log, running_worker(nowhere):
        await publish(wsettings, request)
        events = await log.terminal(request.request_id)
    failed = events[-1]
    assert isinstance(failed, InferenceFailed)
    assert failed.error_code == "triton_unavailable"
    assert "3 tries" in failed.error_message  # 1 + triton_retries
    view = await quota.view("down-user")
    assert (view.day.used, view.day.reserved) == (0, 0)  # the reservation was released


async def test_a_model_slower_than_the_timeout_fails_with_triton_timeout(
    wsettings: Settings, quota: QuotaService
) -> None:
    impatient = wsettings.model_copy(update={"triton_timeout_s": 1.0, "triton_retries": 1})
    request = requested(model="slow-model", user_id="slow-user")
    async with observed(wsettings) as log, running_worker(impatient, models=("slow-model",)):
        await publish(wsettings, request)
        events = await log.terminal(request.request_id)
    failed = events[-1]
    assert isinstance(failed, InferenceFailed)
    assert failed.error_code == "triton_timeout"
    view = await quota.view("slow-user")
    assert (view.day.used, view.day.reserved) == (0, 0)


async def test_a_redelivered_request_is_charged_once(wsettings: Settings, quota: QuotaService) -> None:
    request = requested(user_id="twice-user")
    async with observed(wsettings) as log, running_worker(wsettings):
        await publish(wsettings, request)
        first = await log.terminal(request.request_id)
        # The same message again, as after a lost ack (no collector runs, so the status cache is empty).
        await publish(wsettings, request)
        async with asyncio.timeout(120):
            while sum(isinstance(e, InferenceCompleted) for e in log.by_request[request.request_id]) < 2:
                await asyncio.sleep(0.05)
    completed = next(e for e in first if isinstance(e, InferenceCompleted))
    view = await quota.view("twice-user")
    assert view.day.used == completed.total_tokens
    assert view.day.reserved == 0


async def test_a_request_whose_outcome_is_cached_is_acked_without_work(
    wsettings: Settings, quota: QuotaService, triton_server: TritonProcess
) -> None:
    request = requested(user_id="done-user")
    client: redis.Redis = create_redis(wsettings)
    try:
        await StatusCache(client, StatusKeys(wsettings.redis_prefix)).advance(request.request_id, "completed", {})
    finally:
        await client.aclose()
    before = await triton_inferences(triton_server.http_url, "basic-model")
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish(wsettings, request)
        await wait_idle(worker, wsettings, BASIC_QUEUE)
    assert [type(e) for e in log.by_request[request.request_id]] == [type(request)]
    assert await triton_inferences(triton_server.http_url, "basic-model") == before
    view = await quota.view("done-user")
    assert (view.day.used, view.day.reserved) == (0, 0)


async def test_a_failure_on_every_delivery_ends_failed_and_dead_lettered(wsettings: Settings) -> None:
    # A real misconfiguration: the default plan does not exist, so every quota lookup raises.
    broken = wsettings.model_copy(update={"default_plan": "no-such-plan"})
    request = requested(user_id="unlucky-user")
    dlq_before = await queue_depth(wsettings, BASIC_DLQ)
    async with observed(wsettings) as log, running_worker(broken):
        await publish(wsettings, request)
        events = await log.terminal(request.request_id)
        await wait_queue_depth(wsettings, BASIC_DLQ, dlq_before + 1)
    failed = events[-1]
    assert isinstance(failed, InferenceFailed)
    assert failed.error_code == "delivery_limit_exceeded"
    assert "QuotaConfigError" in failed.error_message
    assert sum(isinstance(e, InferenceFailed) for e in log.by_request[request.request_id]) == 1


async def test_one_subscriber_handles_its_messages_concurrently(wsettings: Settings) -> None:
    # slow-model sleeps 5 s per batch: handled one at a time, each Started would follow the previous
    # Completed; handled concurrently, every Started comes before the first Completed (one Triton batch).
    requests = [requested(model="slow-model", user_id=f"batch-user-{i}") for i in range(4)]
    order: list[type] = []
    async with observed(wsettings) as log, running_worker(wsettings, models=("slow-model",)):
        await publish(wsettings, *requests)
        for request in requests:
            await log.terminal(request.request_id)
        wanted = {r.request_id for r in requests}
        order = [type(e) for e in log.arrivals if e.request_id in wanted and not isinstance(e, InferenceRequested)]
    first_completed = order.index(InferenceCompleted)
    assert order[:first_completed] == [InferenceStarted] * len(requests)
    assert order.count(InferenceCompleted) == len(requests)


async def _ends_every_request_across(wsettings: Settings, label: str, cut: Callable[[Worker], Awaitable[None]]) -> None:
    """``cut`` the worker's link to the broker while 120 requests are in hand: every request must end (the
    unacked ones come again) and a later one complete: the worker consumes again, not connected with no consumer."""
    busy = [requested(user_id=f"{label}-user-{i % 8}") for i in range(120)]
    later = requested(user_id=f"{label}-user-later")
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish(wsettings, *busy)
        await log.matching(lambda e: isinstance(e, InferenceCompleted), count=10)
        await cut(worker)
        for request in busy:
            await log.terminal(request.request_id)
        await publish(wsettings, later)
        events = await log.terminal(later.request_id)
    assert isinstance(events[-1], InferenceCompleted), events


async def test_a_worker_whose_consumer_channel_the_broker_closes_consumes_again(wsettings: Settings) -> None:
    # The broker closes a channel that acks a delivery tag it never sent (PRECONDITION_FAILED): what the
    # reordered acks of round 5 did (docs/benchmarks.md), and what its consumer timeout does.
    async def close_consumer_channel(worker: Worker) -> None:
        queue = worker.subscribers[0]._queue_obj
        assert queue is not None
        consumer_channel = await queue.channel.get_underlay_channel()
        await consumer_channel.basic_ack(999_999_999)  # no such delivery: the broker closes the channel
        async with asyncio.timeout(10):
            while not consumer_channel.is_closed:
                await asyncio.sleep(0.01)

    await _ends_every_request_across(wsettings, "channel", close_consumer_channel)


async def test_a_worker_whose_connection_the_broker_closes_reconnects_and_consumes_again(wsettings: Settings) -> None:
    # The broker ends the worker's connection (an operator's close_connection, a connection-level error).
    async def close_connection(worker: Worker) -> None:
        name = connection_name("mlp-worker")
        closed = await asyncio.to_thread(broker_admin().close_connections_named, name, "test: closed by the broker")
        assert closed == 1

    await _ends_every_request_across(wsettings, "reconnect", close_connection)
