"""FastStream's bus metrics are labelled by event kind, never by the user a routing key names."""

from __future__ import annotations

import pytest
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.testing import TestRabbitBroker
from prometheus_client import CollectorRegistry

from mlp.telemetry.bus import _bounded_rabbit_prometheus, bounded_routing_key


@pytest.mark.parametrize(
    ("routing_key", "label"),
    [
        ("inference.completed.basic-model.alice", "inference.completed"),
        ("inference.requested.basic-model.user:42@x", "inference.requested"),
        ("inference.failed", "inference.failed"),
        ("mlp.requests.basic-model", "mlp.requests.basic-model"),  # a dead letter's key: its queue
        ("", ""),
    ],
)
def test_bounded_routing_key(routing_key: str, label: str) -> None:
    assert bounded_routing_key(routing_key) == label


async def test_published_and_consumed_metrics_carry_no_user_id() -> None:
    registry = CollectorRegistry()
    broker = RabbitBroker(middlewares=[_bounded_rabbit_prometheus(registry, "labels-test")])
    exchange = RabbitExchange("mlp.events", type=ExchangeType.TOPIC)
    received: list[str] = []

    @broker.subscriber(RabbitQueue("labels-test", routing_key="inference.#"), exchange)
    async def handle(body: str) -> None:
        received.append(body)

    async with TestRabbitBroker(broker) as test_broker:
        for user in ("alice", "bob", "carol"):
            await test_broker.publish("x", exchange=exchange, routing_key=f"inference.completed.basic-model.{user}")

    assert received == ["x", "x", "x"]
    labels = {
        (sample.name, sample.labels.get("destination") or sample.labels.get("handler"), sample.value)
        for family in registry.collect()
        if family.name in ("faststream_published_messages", "faststream_received_messages")
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert labels == {
        ("faststream_published_messages_total", "mlp.events.inference.completed", 3.0),
        ("faststream_received_messages_total", "mlp.events.inference.completed", 3.0),
    }
