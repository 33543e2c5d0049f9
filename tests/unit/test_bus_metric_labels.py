"""FastStream's bus metrics are labelled by event kind, never by the user a routing key names."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.testing import TestRabbitBroker
from prometheus_client import CollectorRegistry

from mlp.telemetry.bus import BusMetrics, bounded_routing_key


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
    broker = RabbitBroker(middlewares=[BusMetrics(registry, "labels-test")])
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


async def _traffic(middleware: Any) -> None:
    """Published and consumed messages, one handler failing for one of them, through ``middleware``."""
    broker = RabbitBroker(middlewares=[middleware])
    exchange = RabbitExchange("mlp.events", type=ExchangeType.TOPIC)

    @broker.subscriber(RabbitQueue("same-test", routing_key="mlp.#"), exchange)
    async def handle(body: str) -> None:
        if body == "boom":
            raise ValueError(body)

    async with TestRabbitBroker(broker) as test_broker:
        for body in ("a", "bb", "boom", "cccc"):
            with contextlib.suppress(ValueError):
                await test_broker.publish(body, exchange=exchange, routing_key="mlp.requests.basic-model")


def _deterministic_samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    # Durations differ run to run; counts, sizes, statuses and exception types must not.
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
        and not ("duration" in sample.name and not sample.name.endswith("_count"))
    }


async def test_the_same_samples_as_faststreams_own_middleware() -> None:
    """BusMetrics keeps FastStream's families, labels and values (the dashboards and rules read them)."""
    from faststream.rabbit.prometheus import RabbitPrometheusMiddleware

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    await _traffic(BusMetrics(ours, "same-test"))
    await _traffic(RabbitPrometheusMiddleware(registry=theirs, app_name="same-test"))
    samples = _deterministic_samples(ours)
    assert samples == _deterministic_samples(theirs)
    assert (
        "faststream_received_processed_messages_exceptions_total",
        (
            ("app_name", "same-test"),
            ("broker", "rabbitmq"),
            ("exception_type", "ValueError"),
            ("handler", "mlp.events.mlp.requests.basic-model"),
        ),
        1.0,
    ) in samples
