"""Bulk acks on a real RabbitMQ quorum queue: one multiple ack per run of finished deliveries, never one
that covers a delivery still in hand (closing the consumer returns exactly those to the queue)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import pytest
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitMessage, RabbitQueue
from faststream.rabbit.schemas import Channel

from mlp.acks import BulkAcker
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

QUEUE = "bulk-acks"
COUNT = 60
HELD = {10, 30, 50}  # message numbers whose handling is still going on when the consumer stops


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    with isolated_namespace("acks") as ns:
        yield ns


async def _ready(url: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(QUEUE, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def _publish(url: str, count: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        for n in range(count):
            await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), routing_key=QUEUE)


async def _consume(url: str, acker: BulkAcker, hold: set[int], seen: list[int]) -> RabbitBroker:
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=100))
    release = asyncio.Event()

    @broker.subscriber(RabbitQueue(QUEUE, durable=True, declare=False), ack_policy=AckPolicy.MANUAL)
    async def handle(message: RabbitMessage) -> None:
        number = int(message.body)
        seen.append(number)
        if number in hold:
            await release.wait()  # never set: still in hand when the consumer stops
        acker.done(message)

    await broker.start()
    return broker


async def test_runs_are_acked_in_bulk_and_a_delivery_in_hand_is_never_covered(namespace: Namespace) -> None:
    url = namespace.rabbitmq_url
    await _publish(url, COUNT)
    acker, seen = BulkAcker(max_delay_s=0.2), list[int]()
    broker = await _consume(url, acker, HELD, seen)
    try:
        await eventually(lambda: _true(len(seen) == COUNT), "every message delivered")
        await asyncio.sleep(0.5)  # past the straggler delay: the ones behind a held delivery are acked too
    finally:
        await acker.close()
        await broker.stop()  # the channel closes: what was not acked goes back to the queue
    assert await _ready(url) == len(HELD)  # exactly the deliveries still in hand
    assert acker.frames < COUNT - len(HELD)  # fewer ack frames than acked deliveries

    # The rest, finished in full: nothing left.
    again, seen_again = BulkAcker(), list[int]()
    broker = await _consume(url, again, set(), seen_again)
    try:
        await eventually(lambda: _true(len(seen_again) == len(HELD)), "the held messages redelivered")
    finally:
        await again.close()
        await broker.stop()
    assert sorted(seen_again) == sorted(HELD)
    assert await _ready(url) == 0


async def _true(value: bool) -> bool:
    return value
