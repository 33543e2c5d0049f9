"""The bus metrics (``BusMetrics``) on a real RabbitMQ: FastStream's ``faststream_*`` families, labels and
values, labelled by event kind and never by the user a routing key names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from prometheus_client import CollectorRegistry

from mlp.telemetry.bus_metrics import BusMetrics
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

EXCHANGE = RabbitExchange("mlp.events", type=ExchangeType.TOPIC)
Sample = tuple[str, tuple[tuple[str, str], ...], float]


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    with isolated_namespace("bus-metrics") as ns:
        yield ns


def _samples(registry: CollectorRegistry) -> set[Sample]:
    # Durations differ run to run; counts, sizes, statuses and exception types must not.
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
        and not ("duration" in sample.name and not sample.name.endswith("_count"))
    }


def _value(registry: CollectorRegistry, name: str) -> float:
    return sum(s.value for family in registry.collect() for s in family.samples if s.name == name)


async def _traffic(
    url: str, registry: CollectorRegistry, middleware: Any, routing_keys: list[str], bodies: list[str]
) -> None:
    """Each body published with its routing key through ``middleware``, and consumed (``boom`` fails)."""
    broker = RabbitBroker(url, middlewares=[middleware])

    @broker.subscriber(RabbitQueue("bus-metrics", routing_key="#"), EXCHANGE)
    async def handle(body: str) -> None:
        if body == "boom":
            raise ValueError(body)

    await broker.start()
    try:
        for routing_key, body in zip(routing_keys, bodies, strict=True):
            await broker.publish(body, exchange=EXCHANGE, routing_key=routing_key)

        async def all_processed() -> bool:
            return _value(registry, "faststream_received_processed_messages_total") == len(bodies)

        await eventually(all_processed, f"{len(bodies)} messages processed")
    finally:
        await broker.stop()


async def test_published_and_consumed_metrics_carry_no_user_id(namespace: Namespace) -> None:
    registry = CollectorRegistry()
    keys = [f"inference.completed.basic-model.{user}" for user in ("alice", "bob", "carol")]
    await _traffic(namespace.rabbitmq_url, registry, BusMetrics(registry, "labels-test"), keys, ["x"] * 3)
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


async def test_the_same_samples_as_faststreams_own_middleware(namespace: Namespace) -> None:
    """BusMetrics keeps FastStream's families, labels and values (the dashboards and rules read them)."""
    from faststream.rabbit.prometheus import RabbitPrometheusMiddleware

    bodies = ["a", "bb", "boom", "cccc"]
    keys = ["mlp.requests.basic-model"] * len(bodies)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    await _traffic(namespace.rabbitmq_url, ours, BusMetrics(ours, "same-test"), keys, bodies)
    theirs_middleware = RabbitPrometheusMiddleware(registry=theirs, app_name="same-test")
    await _traffic(namespace.rabbitmq_url, theirs, theirs_middleware, keys, bodies)
    samples = _samples(ours)
    assert samples == _samples(theirs)
    handler = ("handler", "mlp.events.mlp.requests.basic-model")
    assert (
        "faststream_received_processed_messages_exceptions_total",
        (("app_name", "same-test"), ("broker", "rabbitmq"), ("exception_type", "ValueError"), handler),
        1.0,
    ) in samples
    assert (
        "faststream_received_processed_messages_total",
        (("app_name", "same-test"), ("broker", "rabbitmq"), handler, ("status", "error")),
        1.0,
    ) in samples
