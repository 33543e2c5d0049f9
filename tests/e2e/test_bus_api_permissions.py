"""The external-publisher RabbitMQ user, with the permissions of examples/rabbitmq/, against the real RabbitMQ.

The user is created in this run's vhost (``add_user/set_permissions/set_topic_permissions``, by rabbitmqctl
or the management API: tests.support.rabbitmq_admin) from the definitions file users deploy (names
substituted), and deleted afterwards. It needs only RabbitMQ, hence the ``integration`` marker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest

from events.model import InferenceCompleted, InferenceRequested, decode_event, encode_event, new_event_id, utc_now
from events.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    projections_queue,
    requested_routing_key,
    requests_queue,
)
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from tests.support.isolation import Namespace
from tests.support.rabbitmq_users import BrokerUser, load_definitions, user_like

pytestmark = pytest.mark.integration

DEFINITIONS = "external-publisher.definitions.json"
TEMPLATE_USER = "mlp-external"
MODEL = "basic-model"


@pytest.fixture(scope="module")
async def topology(settings: Settings) -> Settings:
    broker = make_broker(settings)
    await broker.connect()
    try:
        await declare_topology(broker, (MODEL,))
    finally:
        await broker.stop()
    return settings


@pytest.fixture(scope="module")
def external_user(namespace: Namespace, topology: Settings) -> Iterator[BrokerUser]:
    definitions = load_definitions(DEFINITIONS)
    assert [u["name"] for u in definitions["users"]] == [TEMPLATE_USER]
    assert definitions["users"][0]["password_hash"] == ""  # no credential in the repository
    with user_like(definitions, TEMPLATE_USER, namespace.rabbitmq_url, "ext-test") as user:
        yield user


@pytest.fixture
async def connection(external_user: BrokerUser) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    conn = await aio_pika.connect(external_user.url)
    async with conn:
        yield conn


def _request(user_id: str) -> InferenceRequested:
    return InferenceRequested(
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=utc_now(),
        user_id=user_id,
        model=MODEL,
        prompt="hello",
        max_tokens=4,
        source="bus",
    )


def _message(event: InferenceRequested) -> aio_pika.Message:
    return aio_pika.Message(
        encode_event(event),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.event_id,
        correlation_id=event.request_id,
    )


async def _exchange(channel: aio_pika.abc.AbstractChannel, name: str) -> aio_pika.abc.AbstractExchange:
    return await channel.get_exchange(name, ensure=False)


async def test_external_user_submits_and_receives_its_own_outcomes(
    connection: aio_pika.abc.AbstractConnection, external_user: BrokerUser, settings: Settings
) -> None:
    channel = await connection.channel(on_return_raises=True)
    queue = await channel.declare_queue(f"ext.{external_user.name}.outcomes", exclusive=True, auto_delete=True)
    events = await _exchange(channel, EVENTS_EXCHANGE)
    await queue.bind(events, routing_key=f"inference.*.*.{external_user.name}")

    request = _request(external_user.name)
    confirmation = await events.publish(
        _message(request), routing_key=requested_routing_key(MODEL, external_user.name), mandatory=True
    )
    assert isinstance(confirmation, aiormq.spec.Basic.Ack)

    # The platform answers on the same exchange (here: the platform's own user stands in for the worker).
    completed = InferenceCompleted(
        event_id=new_event_id(),
        request_id=request.request_id,
        occurred_at=utc_now(),
        user_id=external_user.name,
        model=MODEL,
        completion="done",
        prompt_tokens=1,
        completion_tokens=1,
        latency_ms=1.0,
    )
    broker = make_broker(settings)
    await broker.connect()
    try:
        await EventPublisher(broker, timeout_s=5).publish(completed)
    finally:
        await broker.stop()

    received = []
    async with queue.iterator(timeout=10) as messages:
        async for message in messages:
            async with message.process():
                received.append(decode_event(message.body))
            if len(received) == 2:
                break
    assert [type(e).__name__ for e in received] == ["InferenceRequested", "InferenceCompleted"]
    assert {e.request_id for e in received} == {request.request_id}


async def _refused(connection: aio_pika.abc.AbstractConnection, action: Callable[[Any], Awaitable[Any]]) -> None:
    channel = await connection.channel(on_return_raises=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await action(channel)


async def test_external_user_cannot_publish_for_another_user_or_forge_outcomes(
    connection: aio_pika.abc.AbstractConnection, external_user: BrokerUser
) -> None:
    other = _request("someone-else")

    async def for_another_user(channel: aio_pika.abc.AbstractChannel) -> None:
        events = await _exchange(channel, EVENTS_EXCHANGE)
        await events.publish(_message(other), routing_key=requested_routing_key(MODEL, "someone-else"))

    async def forged_outcome(channel: aio_pika.abc.AbstractChannel) -> None:
        events = await _exchange(channel, EVENTS_EXCHANGE)
        key = f"inference.completed.{MODEL}.{external_user.name}"
        await events.publish(_message(_request(external_user.name)), routing_key=key)

    async def to_the_dead_letter_exchange(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await _exchange(channel, DEAD_LETTER_EXCHANGE)
        await exchange.publish(_message(other), routing_key=requests_queue(MODEL).name)

    async def straight_into_a_queue(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.default_exchange.publish(_message(other), routing_key=requests_queue(MODEL).name)

    for action in (for_another_user, forged_outcome, to_the_dead_letter_exchange, straight_into_a_queue):
        await _refused(connection, action)


async def test_external_user_reads_and_configures_only_its_own_queues(
    connection: aio_pika.abc.AbstractConnection, external_user: BrokerUser
) -> None:
    own = f"ext.{external_user.name}.refusals"  # a fresh channel per action: a refusal closes it

    async def someone_elses_queue(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue("ext.someone-else.outcomes", auto_delete=True)

    async def a_server_named_queue(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(exclusive=True)

    async def a_platform_exchange(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_exchange("mlp.events.copy", aio_pika.ExchangeType.TOPIC)

    async def everything_through_an_exchange(channel: aio_pika.abc.AbstractChannel) -> None:
        # The configure pattern cannot tell exchanges from queues: an own exchange may be declared,
        # but binding it to the platform's events is subject to the same topic check as a queue.
        own_exchange = await channel.declare_exchange(own, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        await own_exchange.bind(await _exchange(channel, EVENTS_EXCHANGE), routing_key="#")

    async def everything(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(own, auto_delete=True)
        await queue.bind(await _exchange(channel, EVENTS_EXCHANGE), routing_key="inference.#")

    async def another_users_outcomes(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(own, auto_delete=True)
        await queue.bind(await _exchange(channel, EVENTS_EXCHANGE), routing_key="inference.completed.*.someone-else")

    def consume(name: str) -> Callable[[Any], Awaitable[Any]]:
        async def action(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.get_queue(name, ensure=False)
            await queue.get(fail=False)

        action.__name__ = f"consume {name}"
        return action

    platform_queues = (projections_queue().name, requests_queue(MODEL).name, requests_queue(MODEL).name + ".dlq")
    actions = [
        someone_elses_queue,
        a_server_named_queue,
        a_platform_exchange,
        everything_through_an_exchange,
        everything,
        another_users_outcomes,
    ]
    for action in [*actions, *(consume(q) for q in platform_queues)]:
        await _refused(connection, action)
