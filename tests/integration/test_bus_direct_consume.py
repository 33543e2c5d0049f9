"""The direct consume (``mlp.bus.subscribe`` with tracing off) on a real RabbitMQ: the same metrics as
FastStream's per-message path, the same stop (no message taken once stopped, in-flight handlers waited
for) and a handler's error logged without stopping the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aio_pika import IncomingMessage
from aio_pika.abc import AbstractRobustQueue
from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitMessage, RabbitQueue
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client import CollectorRegistry

from mlp import telemetry
from mlp.bus import DirectConsume, subscribe
from mlp.telemetry.bus_metrics import BusMetrics
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

EXCHANGE = RabbitExchange("mlp.events", type=ExchangeType.TOPIC)
KEY = "inference.completed.basic-model.alice"
Handler = Callable[[RabbitMessage], Awaitable[None]]


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    assert not telemetry.installed().enabled, "these tests are of the path taken with tracing off"
    with isolated_namespace("direct-consume") as ns:
        yield ns


async def _itself(message: StreamMessage[object]) -> StreamMessage[object]:
    return message


def _samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    # Durations differ run to run; counts, sizes, statuses and exception types must not.
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
        and not ("duration" in sample.name and not sample.name.endswith("_count"))
    }


def _processed(registry: CollectorRegistry) -> float:
    name = "faststream_received_processed_messages_total"
    return sum(s.value for family in registry.collect() for s in family.samples if s.name == name)


@contextlib.asynccontextmanager
async def _consuming(
    url: str, queue: str, handler: Handler, *, direct: bool, registry: CollectorRegistry | None = None
) -> AsyncIterator[tuple[RabbitBroker, RabbitSubscriber]]:
    """A broker with BusMetrics and one manual-ack subscriber on ``queue``, through FastStream's path or
    the direct one."""
    metrics = BusMetrics(registry or CollectorRegistry(), "direct-test")
    broker = RabbitBroker(url, middlewares=[metrics], apply_types=False, graceful_timeout=10.0)
    subscriber = broker.subscriber(
        RabbitQueue(queue, routing_key="inference.#"), EXCHANGE, ack_policy=AckPolicy.MANUAL, decoder=_itself
    )
    if direct:
        subscribe(broker, subscriber, handler)
        assert isinstance(subscriber.consume, DirectConsume)  # the direct path is the one under test
    else:
        subscriber(handler)
    await broker.start()
    try:
        yield broker, subscriber
    finally:
        await broker.stop()


async def _settle_by_body(message: RabbitMessage) -> None:
    match message.body:
        case b"ack":
            await message.ack()
        case b"nack":
            await message.nack(requeue=False)
        case b"reject":
            await message.reject()
        case _:
            raise ValueError(message.body)


async def test_the_direct_path_records_the_same_samples_as_faststreams(namespace: Namespace) -> None:
    """The ``faststream_received_*`` families, labels and values the dashboards and rules read: per
    status (acked, nacked, rejected, error) and per exception type."""
    bodies = [b"ack", b"nack", b"boom", b"reject", b"ack", b"ackk"]
    registries = {True: CollectorRegistry(), False: CollectorRegistry()}
    for direct, registry in registries.items():
        queue = f"direct-{direct}"
        async with _consuming(namespace.rabbitmq_url, queue, _settle_by_body, direct=direct, registry=registry) as (
            broker,
            _,
        ):
            for body in bodies:
                await broker.publish(body, exchange=EXCHANGE, routing_key=KEY)

            async def all_processed(registry: CollectorRegistry = registry) -> bool:
                return _processed(registry) == len(bodies)

            await eventually(all_processed, f"{len(bodies)} messages processed")
    direct_samples = _samples(registries[True])
    assert direct_samples == _samples(registries[False])
    handler = ("handler", "mlp.events.inference.completed")
    labels = (("app_name", "direct-test"), ("broker", "rabbitmq"))
    for status, count in (("acked", 2.0), ("nacked", 1.0), ("rejected", 1.0), ("error", 2.0)):
        name = "faststream_received_processed_messages_total"
        assert (name, (*labels, handler, ("status", status)), count) in direct_samples
    exceptions = "faststream_received_processed_messages_exceptions_total"
    assert (exceptions, (*labels, ("exception_type", "ValueError"), handler), 2.0) in direct_samples
    assert ("faststream_received_messages_total", (*labels, handler), float(len(bodies))) in direct_samples


async def test_a_handler_error_is_logged_and_the_next_message_is_handled(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[bytes] = []

    async def handler(message: RabbitMessage) -> None:
        if message.body == b"boom":
            raise RuntimeError("the handler broke")
        handled.append(message.body)
        await message.ack()

    with caplog.at_level(logging.ERROR, logger="mlp.bus"):
        async with _consuming(namespace.rabbitmq_url, "direct-errors", handler, direct=True) as (broker, _):
            await broker.publish(b"boom", exchange=EXCHANGE, routing_key=KEY, message_id="m-boom")
            await broker.publish(b"after", exchange=EXCHANGE, routing_key=KEY)
            await eventually(lambda: _true(handled == [b"after"]), "the message after the failing one handled")
    (record,) = [r for r in caplog.records if "the handler failed" in r.getMessage()]
    assert "m-boom" in record.getMessage()
    assert record.exc_info is not None
    assert "the handler broke" in str(record.exc_info[1])


async def test_stop_waits_for_the_handler_in_flight_and_a_stopped_subscriber_takes_nothing(
    namespace: Namespace,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def handler(message: RabbitMessage) -> None:
        entered.set()
        await release.wait()
        await message.ack()
        handled.append(message.body)

    async with _consuming(namespace.rabbitmq_url, "direct-stop", handler, direct=True) as (broker, subscriber):
        await broker.publish(b"first", exchange=EXCHANGE, routing_key=KEY)
        await asyncio.wait_for(entered.wait(), 10)
        stopping = asyncio.create_task(subscriber.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done(), "stop() returned with a handler still in flight"
        release.set()
        await asyncio.wait_for(stopping, 10)
        assert handled == [b"first"]  # finished (and acked) before the stop returned

        # Stopped: a message delivered now is not handed to the handler.
        raw = subscriber.consume
        assert isinstance(raw, DirectConsume)
        release.clear()
        entered.clear()
        queue = await broker.declare_queue(RabbitQueue("direct-stop", routing_key="inference.#"))
        await broker.publish(b"late", exchange=EXCHANGE, routing_key=KEY)
        incoming = await _get(queue)
        await raw(incoming)
        assert not entered.is_set()
        await incoming.nack(requeue=False)


async def _get(queue: AbstractRobustQueue) -> IncomingMessage:
    for _ in range(100):
        message = await queue.get(fail=False)
        if message is not None:
            assert isinstance(message, IncomingMessage)
            return message
        await asyncio.sleep(0.05)
    raise AssertionError("no message arrived")


async def _true(value: bool) -> bool:
    return value
