"""Bulk acks on a real RabbitMQ quorum queue: one multiple ack per run of finished deliveries, never one
that covers a delivery still in hand (closing the consumer returns exactly those to the queue)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from faststream import AckPolicy
from faststream.rabbit import QueueType, RabbitBroker, RabbitMessage, RabbitQueue
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


BUSY_COUNT = 2000
BUSY_PUBLISHES = 4  # per delivery, on the consumer's connection: its frame queue is full most of the time


async def test_acks_keep_their_order_while_the_connection_is_busy(namespace: Namespace) -> None:
    """The worker's shape: many deliveries in hand, finishing out of order, each publishing on the same
    connection before it is done. aiormq's bounded frame queue lets a later ack overtake an earlier one
    that is still on its way, so a channel's acks must go one at a time: an overtaken ack is unknown to
    the broker, which closes the channel, and every delivery it held comes back. How often the queue
    reorders depends on the load, so the test checks the order's guarantee itself (never two acks of a
    channel on their way at once) as well as its effect."""
    url = namespace.rabbitmq_url
    await _publish(url, BUSY_COUNT)
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=200))
    acker, seen, redelivered, rng = BulkAcker(max_delay_s=0.05), set[int](), list[int](), random.Random(3)
    on_their_way, most_on_their_way = [0], [0]

    def count_acks_on_their_way(channel: Any) -> None:
        send = channel.basic_ack

        async def counted(*args: Any, **kwargs: Any) -> None:
            on_their_way[0] += 1
            most_on_their_way[0] = max(most_on_their_way[0], on_their_way[0])
            try:
                await send(*args, **kwargs)
            finally:
                on_their_way[0] -= 1

        channel.basic_ack = counted
        channel.acks_counted = True

    sink = RabbitQueue("bulk-acks-sink", durable=True, queue_type=QueueType.QUORUM)
    publisher = broker.publisher(sink)

    @broker.subscriber(RabbitQueue(QUEUE, durable=True, declare=False), ack_policy=AckPolicy.MANUAL)
    async def handle(message: RabbitMessage) -> None:
        number = int(message.body)
        if message.raw_message.redelivered:
            redelivered.append(number)
        if not getattr(message.raw_message.channel, "acks_counted", False):
            count_acks_on_their_way(message.raw_message.channel)
        await asyncio.sleep(rng.random() * 0.02)  # finish out of order: gaps, runs and stragglers
        for _ in range(BUSY_PUBLISHES):
            await publisher.publish(b"x", mandatory=False)
        seen.add(number)
        acker.done(message)

    await broker.start()
    try:
        await eventually(lambda: _true(len(seen) == BUSY_COUNT), "every message handled", deadline_s=120)
        await asyncio.sleep(0.3)  # the last stragglers' delay
    finally:
        await acker.close()
        await broker.stop()
    assert most_on_their_way[0] == 1  # a channel's acks went one at a time
    assert redelivered == []  # the channel was never closed under the consumer
    assert await _ready(url) == 0  # every delivery acked: none came back to the queue
