"""The bus adapter against the real RabbitMQ: topology, confirmed publish, unroutable publish is an error."""

from __future__ import annotations

import aio_pika
import pytest
from faststream.rabbit import RabbitBroker

from events.model import InferenceRequested, new_event_id, utc_now
from events.topology import all_queues, projections_queue, requests_queue
from mlp.bus import EventPublisher, PublishError, declare_topology, make_broker
from mlp.settings import Settings

pytestmark = pytest.mark.integration
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _requested(model: str, traceparent: str | None = None) -> InferenceRequested:
    return InferenceRequested(
        traceparent=traceparent,
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=utc_now(),
        user_id="bus-test",
        model=model,
        prompt="hello",
        max_tokens=4,
    )


async def test_topology_is_declared_idempotently_and_a_confirmed_publish_lands(module_settings: Settings) -> None:
    broker: RabbitBroker = make_broker(module_settings)
    await broker.connect()
    try:
        await declare_topology(broker, module_settings.models)
        await declare_topology(broker, module_settings.models)  # same arguments: RabbitMQ accepts it again
        publisher = EventPublisher(broker, timeout_s=5)
        event = _requested(module_settings.models[0], TRACEPARENT)
        await publisher.publish(event)
        queue = await broker.declare_queue(_passive(requests_queue(module_settings.models[0]).name))
        message = await queue.get(no_ack=False, fail=True, timeout=5)
        assert message is not None
        assert message.message_id == event.event_id
        assert message.delivery_mode == 2  # persistent
        # What consumers, the DLQ tool and the trace read (EventPublisher builds them itself).
        assert message.correlation_id == event.request_id
        assert message.type == "InferenceRequested"
        assert message.content_type == "application/json"
        assert message.app_id == "mlp"
        assert message.timestamp is not None
        assert message.headers["traceparent"] == TRACEPARENT  # tracing off: the event's own
        await message.ack()
        names = {q.name for q in all_queues(module_settings.models)}
        assert "mlp.requests.basic-model.dlq" in names
    finally:
        await broker.stop()


async def test_publish_with_no_bound_queue_raises_instead_of_vanishing(module_settings: Settings) -> None:
    broker = make_broker(module_settings)
    await broker.connect()
    try:
        await declare_topology(broker, module_settings.models)
        # Every event also routes to the projections queue; without it, an unknown model routes nowhere.
        connection = await aio_pika.connect(module_settings.rabbitmq_url)
        async with connection:
            await (await connection.channel()).queue_delete(projections_queue().name)
        try:
            with pytest.raises(PublishError):
                await EventPublisher(broker, timeout_s=5).publish(_requested("model-nobody-serves"))
        finally:
            # A fresh broker: FastStream caches declarations, so this one would not re-declare.
            fresh = make_broker(module_settings)
            await fresh.connect()
            await declare_topology(fresh, module_settings.models)
            await fresh.stop()
    finally:
        await broker.stop()


def _passive(name: str):  # type: ignore[no-untyped-def]
    from faststream.rabbit import RabbitQueue

    return RabbitQueue(name, declare=False)
