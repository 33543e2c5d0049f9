"""``mlp dlq list|replay`` round trip on the real RabbitMQ: list loses nothing, replay re-drives confirmed."""

from __future__ import annotations

import asyncio
import io

import aio_pika
import pytest

from events.model import InferenceRequested, decode_event
from events.topology import requests_queue
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from ops import dlq
from tests.integration.test_worker_harness import queue_depth, requested, wait_queue_depth

pytestmark = pytest.mark.integration

# A model of its own: no worker consumes it, and no other test's dead letters share its DLQ.
MODEL = "dlq-roundtrip-model"
QUEUE = requests_queue(MODEL).name
DLQ = QUEUE + ".dlq"


async def _dead_letter(settings: Settings) -> InferenceRequested:
    """A valid request that died in its work queue (rejected without requeue, as a worker would)."""
    broker = make_broker(settings)
    await broker.connect()
    try:
        await declare_topology(broker, (*settings.models, MODEL))
        request = requested(model=MODEL, user_id="dlq-user")
        await EventPublisher(broker, timeout_s=10).publish(request)
    finally:
        await broker.stop()
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(QUEUE, passive=True)
        message = await queue.get(no_ack=False, timeout=10)
        assert message is not None
        await message.reject(requeue=False)
    return request


async def _run(argv: list[str], settings: Settings) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(dlq.main, argv, settings=settings, out=out)
    return code, out.getvalue()


async def test_list_shows_dead_letters_without_losing_them_and_replay_redrives_them(migrated: Settings) -> None:
    request = await _dead_letter(migrated)
    await wait_queue_depth(migrated, DLQ, 1)

    for _ in range(2):  # listing twice shows the same letter: nothing was consumed
        code, listing = await _run(["list", "--queue", DLQ], migrated)
        assert code == 0
        assert request.request_id in listing
        assert f"inference.requested.{MODEL}.dlq-user" in listing
        assert "reason=rejected" in listing
        assert "type=InferenceRequested" in listing
        assert await queue_depth(migrated, DLQ) == 1

    code, report = await _run(["replay", "--queue", DLQ], migrated)
    assert code == 0, report
    assert "1 replayed" in report
    assert await queue_depth(migrated, DLQ) == 0
    await wait_queue_depth(migrated, QUEUE, 1)

    connection = await aio_pika.connect(migrated.rabbitmq_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(QUEUE, passive=True)
        message = await queue.get(no_ack=False, timeout=10)
        assert message is not None
        assert decode_event(message.body) == request
        assert message.message_id == request.event_id
        assert message.routing_key == f"inference.requested.{MODEL}.dlq-user"
        assert message.headers[dlq.REPLAY_HEADER] == 1
        assert "x-death" not in message.headers
        await message.ack()


async def test_the_default_list_covers_every_dead_letter_queue_and_limits_are_checked(migrated: Settings) -> None:
    code, listing = await _run(["list"], migrated)
    assert code == 0
    assert "dead letter(s) shown" in listing
    code, _ = await _run(["list", "--limit", "0"], migrated)
    assert code == 2
