"""The results collector's FastStream app, in-process, against the test vhost, Postgres and Redis."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import aio_pika
import asyncpg
import httpx
import msgspec
import pytest
from faststream.rabbit import RabbitBroker

from events.identity import claim_of
from events.model import AnyEvent, InferenceRequested, encode_event, new_event_id, utc_now
from events.topology import DLQ_SUFFIX, PROJECTIONS_QUEUE
from mlp.bus import EVENTS, EventPublisher, declare_topology, make_broker
from mlp.cache import create_redis
from mlp.settings import Settings
from projections.projector import UpsertRequest, plan_events
from projections.queries import RequestView, get_request
from projections.sample_events import Outcome, request_stream
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from results_collector.main import build_app
from tests.support.services import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@dataclass
class Running:
    settings: Settings
    pool: asyncpg.Pool
    broker: RabbitBroker
    publisher: EventPublisher
    cache: StatusCache


@pytest.fixture(scope="module")
async def collector(migrated: Settings) -> AsyncIterator[Running]:
    settings = migrated.model_copy(
        update={"collector_health_port": free_port(), "collector_batch_size": 50, "collector_batch_wait_ms": 10}
    )
    app = build_app(settings)
    task = asyncio.create_task(app.run())
    ready_url = f"http://{settings.health_host}:{settings.collector_health_port}/readyz"

    async def ready() -> bool:
        if task.done():
            task.result()  # surfaces a start-up failure
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(ready_url, timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    broker = make_broker(settings, app_id="test-publisher")
    redis_client = create_redis(settings)
    try:
        await eventually(ready, "collector ready")
        await broker.connect()
        await declare_topology(broker, settings.models)
        yield Running(
            settings,
            pool,
            broker,
            EventPublisher(broker, timeout_s=5),
            StatusCache(redis_client, StatusKeys(settings.redis_prefix)),
        )
    finally:
        app.exit()
        await task
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # app.run() installed them on the session loop
            loop.remove_signal_handler(sig)
        await broker.stop()
        await redis_client.aclose()
        await pool.close()


async def _stored_count(pool: asyncpg.Pool, request_ids: list[str]) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM event_store WHERE request_id = ANY($1::text[])", request_ids)
    return count


async def test_a_reordered_stream_with_duplicates_is_projected_once_and_right(collector: Running) -> None:
    rng = random.Random(42)
    outcomes: list[Outcome] = ["completed", "completed", "failed", "rejected", "running", "queued"]
    # Request ids in their users' namespaces (<user>.<suffix>): ids the publisher may name (docs/bus.md).
    streams = {f"u{n % 7}.col-{n}-{uuid.uuid4().hex[:8]}": outcomes[n % len(outcomes)] for n in range(120)}
    events_by_request = {
        rid: request_stream(rid, user_id=f"u{n % 7}", outcome=o, attempts=1 + n % 2)
        for n, (rid, o) in enumerate(streams.items())
    }
    unique: list[AnyEvent] = [e for s in events_by_request.values() for e in s]
    wire = unique + rng.sample(unique, len(unique) // 4)  # redeliveries
    rng.shuffle(wire)  # Completed before Requested, etc.
    for i in range(0, len(wire), 100):
        await collector.publisher.publish_many(wire[i : i + 100])

    rids = list(events_by_request)
    await eventually(lambda: _eq(_stored_count(collector.pool, rids), len(unique)), "every event stored")

    stored = await collector.pool.fetch(
        "SELECT event_id::text AS id, count(*) AS n FROM event_store WHERE request_id = ANY($1::text[]) GROUP BY 1",
        rids,
    )
    assert {r["id"] for r in stored} == {e.event_id for e in unique}
    assert {r["n"] for r in stored} == {1}  # each event stored once
    for rid, stream in events_by_request.items():
        (expected,) = plan_events(stream).requests
        row = await collector.pool.fetchrow("SELECT * FROM inference_requests WHERE request_id = $1", rid)
        assert row is not None
        assert {f: row[f] for f in UpsertRequest.__struct_fields__} == msgspec.structs.asdict(expected)
    charged = await collector.pool.fetch(
        "SELECT request_id, total_tokens FROM token_usage WHERE request_id = ANY($1::text[])", rids
    )
    assert {r["request_id"]: r["total_tokens"] for r in charged} == {
        rid: 19 for rid, o in streams.items() if o == "completed"
    }

    # The status cache follows Postgres (asynchronously): both answer the same view.
    async def cache_matches() -> bool:
        for rid in rids:
            cached = await collector.cache.get(rid)
            if cached is None or RequestView.from_cache(rid, cached) != await get_request(collector.pool, rid):
                return False
        return True

    await eventually(cache_matches, "status cache equals Postgres")
    await eventually(lambda: _eq(_ready_messages(collector, PROJECTIONS_QUEUE), 0), "queue drained (all acked)")


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _ready_messages(collector: Running, queue: str) -> int:
    connection = await aio_pika.connect(collector.settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def test_poison_messages_land_in_the_dlq_and_the_consumer_keeps_going(collector: Running) -> None:
    dlq = PROJECTIONS_QUEUE + DLQ_SUFFIX
    before = await _ready_messages(collector, dlq)
    valid = request_stream(f"alice.after-poison-{uuid.uuid4().hex[:8]}")[0]
    invalid = msgspec.json.decode(encode_event(valid))
    invalid["user_id"] = "has.a.dot"  # valid JSON, a known type, fails validation
    not_a_uuid = {**msgspec.json.decode(encode_event(valid)), "event_id": "not-a-uuid"}
    bodies = [b"\x00\xffgarbage", msgspec.json.encode(invalid), msgspec.json.encode(not_a_uuid)]
    for body in bodies:
        await collector.broker.publish(
            body, exchange=EVENTS, routing_key="inference.requested.basic-model.poison", persist=True, mandatory=True
        )
    await collector.publisher.publish(valid)

    await eventually(lambda: _eq(_stored_count(collector.pool, [valid.request_id]), 1), "the valid event after poison")
    await eventually(lambda: _eq(_ready_messages(collector, dlq), before + len(bodies)), "poison in the DLQ")
    connection = await aio_pika.connect(collector.settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(dlq, passive=True)
        seen = []
        for _ in range(before + len(bodies)):
            message = await queue.get(no_ack=False, fail=True, timeout=5)
            assert message is not None
            seen.append(message.body)  # unacked: back in the DLQ when the connection closes
    assert set(bodies) <= set(seen)
    assert await _stored_count(collector.pool, ["has.a.dot"]) == 0


def _requested(request_id: str, user_id: str, **changes: object) -> InferenceRequested:
    fields: dict[str, object] = {
        "event_id": new_event_id(),
        "request_id": request_id,
        "occurred_at": utc_now(),
        "user_id": user_id,
        "model": "basic-model",
        "prompt": "a prompt",
        "max_tokens": 8,
        "source": "bus",
    }
    fields.update(changes)
    return InferenceRequested(**fields)  # type: ignore[arg-type]


async def _stream(pool: asyncpg.Pool, request_id: str) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT type, payload::text AS payload FROM event_store WHERE request_id = $1 ORDER BY position", request_id
    )
    return [(r["type"], r["payload"]) for r in rows]


async def test_an_untrusted_request_is_stored_only_within_the_limits_and_under_an_id_its_user_may_name(
    collector: Running,
) -> None:
    tag = uuid.uuid4().hex[:8]
    oversize = _requested(f"alice-c.big-{tag}", "alice-c", prompt="x" * (collector.settings.max_prompt_chars + 1))
    # bob, on his own routing key, under an id in alice's namespace (it would take her request's read model).
    foreign = _requested(f"alice-c.job-{tag}", "bob-c")
    mine = _requested(f"alice-c.job-{tag}", "alice-c")
    for event in (oversize, foreign, mine):
        await collector.publisher.publish(event)
    await eventually(lambda: _eq(_stored_count(collector.pool, [mine.request_id]), 1), "alice's request stored")
    await eventually(lambda: _eq(_ready_messages(collector, PROJECTIONS_QUEUE), 0), "every message acked")

    # Never stored: the oversized one (its rejection is the worker's to publish; none runs here) ...
    assert await _stream(collector.pool, oversize.request_id) == []
    # ... nor bob's: alice's id holds alice's request alone.
    [(kind, payload)] = await _stream(collector.pool, mine.request_id)
    assert (kind, msgspec.json.decode(payload)["user_id"]) == ("InferenceRequested", "alice-c")
    row = await get_request(collector.pool, mine.request_id)
    assert row is not None
    assert row.user_id == "alice-c"


async def test_a_request_no_worker_serves_is_answered_through_its_claim_and_never_stored(
    collector: Running,
) -> None:
    settings = collector.settings
    redis_client = create_redis(settings)
    quota = QuotaService(collector.pool, redis_client, QuotaSettings.of(settings))
    try:
        tag = uuid.uuid4().hex[:8]
        unserved = _requested(f"carol-c.job-{tag}", "carol-c", model="nobody-serves")
        big = _requested(new_event_id(), "carol-c", model="nobody-serves", prompt="y" * (settings.max_prompt_chars + 1))
        # A request id alice's (served) request holds, as the worker's reservation claimed it.
        alices = _requested(new_event_id(), "alice-c")
        await quota.reserve(alices.request_id, "alice-c", 10, claim=claim_of(alices))
        intruder = _requested(alices.request_id, "bob-c", model="nobody-serves")
        for event in (unserved, big, intruder):
            await collector.publisher.publish(event)

        async def answered(request_id: str) -> bool:
            return any(kind == "InferenceRejected" for kind, _ in await _stream(collector.pool, request_id))

        await eventually(lambda: answered(unserved.request_id), "the unserved request answered")
        await eventually(lambda: answered(big.request_id), "the oversized unserved request answered")
        bobs = f"bob-c.rejected-{intruder.event_id}"
        await eventually(lambda: answered(bobs), "bob answered on his own stream")

        for request in (unserved, big):
            [(kind, payload)] = await _stream(collector.pool, request.request_id)  # its rejection, alone
            assert kind == "InferenceRejected"
            assert msgspec.json.decode(payload)["reason"] == "unknown_model"
            row = await get_request(collector.pool, request.request_id)
            assert row is not None
            assert (row.status, row.user_id) == ("rejected", "carol-c")
        assert "y" * 100 not in "".join(p for _, p in await _stream(collector.pool, big.request_id))
        [(_, payload)] = await _stream(collector.pool, bobs)
        rejection = msgspec.json.decode(payload)
        assert (rejection["reason"], rejection["user_id"], rejection["correlation_id"]) == (
            "duplicate_request_id",
            "bob-c",
            alices.request_id,
        )
        assert await _stream(collector.pool, alices.request_id) == []  # alice's stream untouched
    finally:
        await redis_client.aclose()


async def test_the_stream_of_a_claimed_id_holds_the_claims_request_whichever_arrives_first(
    collector: Running,
) -> None:
    settings = collector.settings
    redis_client = create_redis(settings)
    quota = QuotaService(collector.pool, redis_client, QuotaSettings.of(settings))
    try:
        # Alice's request holds the UUID (the worker reserved it); bob's request under the same id reaches
        # the collector first. The event store and read model must follow the claim, not the arrival order.
        alices = _requested(new_event_id(), "alice-c")
        await quota.reserve(alices.request_id, "alice-c", 10, claim=claim_of(alices))
        bobs = _requested(alices.request_id, "bob-c")
        await collector.publisher.publish(bobs)
        await eventually(lambda: _eq(_ready_messages(collector, PROJECTIONS_QUEUE), 0), "bob's request acked")
        assert await _stream(collector.pool, alices.request_id) == []  # bob's was not stored
        await collector.publisher.publish(alices)
        await eventually(lambda: _eq(_stored_count(collector.pool, [alices.request_id]), 1), "alice's stored")
        [(kind, payload)] = await _stream(collector.pool, alices.request_id)
        assert (kind, msgspec.json.decode(payload)["user_id"]) == ("InferenceRequested", "alice-c")

        # An unclaimed UUID: the collector's claim decides, and the worker's reservation then agrees.
        carols = _requested(new_event_id(), "carol-c")
        await collector.publisher.publish(carols)
        await eventually(lambda: _eq(_stored_count(collector.pool, [carols.request_id]), 1), "carol's stored")
        daves = _requested(carols.request_id, "dave-c")
        assert (await quota.reserve(daves.request_id, "dave-c", 10, claim=claim_of(daves))).answer == "conflict"
        assert (await quota.reserve(carols.request_id, "carol-c", 10, claim=claim_of(carols))).answer == "run"
    finally:
        await redis_client.aclose()
