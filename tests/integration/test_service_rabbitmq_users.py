"""The platform services' RabbitMQ users (examples/rabbitmq/platform-services.definitions.json, the kind
overlay's users) against the real RabbitMQ: each one starts as its service does (the worker and the
collector declare the topology, the gateway only verifies it: MLP_TOPOLOGY=verify), does its own job
through the platform's own code, and is refused everything else.

The users are created in a vhost of this module's own with broker_admin(), and deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest

from api_gateway.main import create_app
from events.model import (
    Event,
    InferenceCompleted,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
    decode_event,
    new_event_id,
    utc_now,
)
from events.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    dead_letter_queue,
    projections_queue,
    requests_queue,
    webhook_binding_keys,
    webhooks_queue,
)
from mlp.bus import (
    EventPublisher,
    PublishError,
    TopologyMissingError,
    bind_keys,
    declare_own_queue,
    declare_topology,
    make_broker,
)
from mlp.settings import Settings
from tests.support.apps import running
from tests.support.postgres_roles import login_users
from tests.support.rabbitmq_users import BrokerUser, load_definitions, user_like

pytestmark = pytest.mark.integration

DEFINITIONS = "platform-services.definitions.json"
SERVICES = ("mlp-gateway", "mlp-worker", "mlp-collector", "mlp-dispatcher")
MODEL = "basic-model"
USER = "alice"

Action = Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]


@pytest.fixture(scope="module")
def users(module_settings: Settings) -> Iterator[dict[str, Settings]]:
    """Per service, Settings that connect as a fresh user with that service's permissions."""
    definitions = load_definitions(DEFINITIONS)
    assert {u["name"] for u in definitions["users"]} == set(SERVICES)
    assert all(u["password_hash"] == "" for u in definitions["users"])  # no credential in the repository
    made: dict[str, BrokerUser] = {}
    with (
        user_like(definitions, "mlp-gateway", module_settings.rabbitmq_url, "svc-gateway") as made["mlp-gateway"],
        user_like(definitions, "mlp-worker", module_settings.rabbitmq_url, "svc-worker") as made["mlp-worker"],
        user_like(definitions, "mlp-collector", module_settings.rabbitmq_url, "svc-collector") as made["mlp-collector"],
        user_like(definitions, "mlp-dispatcher", module_settings.rabbitmq_url, "svc-dispatcher") as made[
            "mlp-dispatcher"
        ],
    ):
        yield {service: module_settings.model_copy(update={"rabbitmq_url": u.url}) for service, u in made.items()}


async def _publish(settings: Settings, event: Event) -> None:
    """The services' publish: persistent, mandatory, confirmed (mlp.bus.EventPublisher)."""
    broker = make_broker(settings)
    await broker.connect()
    try:
        await EventPublisher(broker, settings.publish_timeout_s).publish(event)
    finally:
        await broker.stop()


async def _refused(settings: Settings, action: Action) -> None:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel(on_return_raises=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await action(channel)


async def _get(settings: Settings, queue_name: str) -> list[Event]:
    """Take what a queue holds (basic.get, acked), as a consumer of it does."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    taken: list[Event] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            async with message.process():
                taken.append(decode_event(message.body))
    return taken


def _requested() -> InferenceRequested:
    return InferenceRequested(
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=utc_now(),
        user_id=USER,
        model=MODEL,
        prompt="hello",
        max_tokens=4,
    )


def _completed(request: InferenceRequested) -> InferenceCompleted:
    return InferenceCompleted(
        event_id=new_event_id(),
        request_id=request.request_id,
        occurred_at=utc_now(),
        user_id=request.user_id,
        model=request.model,
        completion="done",
        prompt_tokens=1,
        completion_tokens=1,
        latency_ms=1.0,
    )


def _rejected(request: InferenceRequested) -> InferenceRejected:
    return InferenceRejected(
        event_id=new_event_id(),
        request_id=request.request_id,
        occurred_at=utc_now(),
        user_id=request.user_id,
        model=request.model,
        reason="unknown_model",
        detail="test",
    )


async def _start_topology(settings: Settings, *, verify_only: bool) -> None:
    broker = make_broker(settings)
    await broker.connect()
    try:
        await declare_topology(broker, (MODEL,), verify_only=verify_only)
    finally:
        await broker.stop()


@pytest.fixture(scope="module")
async def declared(users: dict[str, Settings]) -> dict[str, Settings]:
    """The services' start-up: the gateway's user may not declare, so it waits for a service that does."""
    with pytest.raises(TopologyMissingError, match=EVENTS_EXCHANGE):
        await _start_topology(users["mlp-gateway"], verify_only=True)
    # The webhook dispatcher declares and binds its own queue only; it may start before the others.
    dispatcher = make_broker(users["mlp-dispatcher"])
    await dispatcher.connect()
    try:
        await declare_own_queue(dispatcher, webhooks_queue())
        # USER has a webhook: the dispatcher binds their outcome keys (webhook_dispatcher.bindings).
        await bind_keys(dispatcher, webhooks_queue(), webhook_binding_keys(USER))
    finally:
        await dispatcher.stop()
    for service in ("mlp-worker", "mlp-collector"):  # either may start first: both declare everything
        await _start_topology(users[service], verify_only=False)
    await _start_topology(users["mlp-gateway"], verify_only=True)
    return users


async def test_the_gateway_cannot_declare_the_topology(users: dict[str, Settings]) -> None:
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await _start_topology(users["mlp-gateway"], verify_only=False)


async def test_the_gateway_runs_with_its_own_rabbitmq_user_and_postgres_role(
    declared: dict[str, Settings], module_settings: Settings
) -> None:
    """The gateway app, started as in Kubernetes: its RabbitMQ user, its Postgres role, MLP_TOPOLOGY=verify."""
    await _get(declared["mlp-worker"], requests_queue(MODEL).name)  # start from an empty queue
    async with login_users(module_settings.postgres_dsn, ["mlp_gateway"]) as dsns:
        settings = declared["mlp-gateway"].model_copy(
            update={"postgres_dsn": dsns["mlp_gateway"], "topology": "verify"}
        )
        async with running(create_app(settings)) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            response = await client.post(
                "/api/v1/inference", json={"prompt": "hello", "user_id": USER, "model": MODEL, "max_tokens": 4}
            )
            assert response.status_code == 202, response.text
    queued = await _get(declared["mlp-worker"], requests_queue(MODEL).name)
    assert [e.request_id for e in queued] == [response.json()["request_id"]]


async def test_a_request_flows_through_the_services_own_users(declared: dict[str, Settings]) -> None:
    gateway, worker, collector, dispatcher = (declared[s] for s in SERVICES)
    await _get(worker, requests_queue(MODEL).name)  # start from empty queues
    await _get(collector, projections_queue().name)
    await _get(dispatcher, webhooks_queue().name)

    request = _requested()
    await _publish(gateway, request)
    assert [e.event_id for e in await _get(worker, requests_queue(MODEL).name)] == [request.event_id]
    started = InferenceStarted(
        event_id=new_event_id(),
        request_id=request.request_id,
        occurred_at=utc_now(),
        user_id=USER,
        model=MODEL,
        attempt=1,
    )
    completed = _completed(request)
    for event in (started, completed, _rejected(request)):
        await _publish(worker, event)
    follow_up = _rejected(_requested())
    await _publish(collector, follow_up)  # the collector's own rejection (a model nobody serves)

    stored = await _get(collector, projections_queue().name)
    assert [type(e).__name__ for e in stored] == [
        "InferenceRequested",
        "InferenceStarted",
        "InferenceCompleted",
        "InferenceRejected",
        "InferenceRejected",
    ]
    outcomes = await _get(dispatcher, webhooks_queue().name)  # the webhook dispatcher: the outcomes only
    assert [type(e).__name__ for e in outcomes] == ["InferenceCompleted", "InferenceRejected", "InferenceRejected"]


@pytest.mark.parametrize(
    ("service", "forged"),
    [
        ("mlp-gateway", "completed"),
        ("mlp-gateway", "rejected"),
        ("mlp-worker", "requested"),
        ("mlp-collector", "requested"),
        ("mlp-collector", "completed"),
        ("mlp-dispatcher", "completed"),
        ("mlp-dispatcher", "requested"),
    ],
)
async def test_a_service_cannot_publish_another_services_events(
    declared: dict[str, Settings], service: str, forged: str
) -> None:
    request = _requested()
    event: Event = {"requested": request, "completed": _completed(request), "rejected": _rejected(request)}[forged]
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        await _publish(declared[service], event)


def _consume(name: str) -> Action:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(name, ensure=False)
        await queue.get(fail=False)

    return action


def _into_queue(name: str) -> Action:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=name)

    return action


async def _to_dead_letters(channel: aio_pika.abc.AbstractChannel) -> None:
    exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
    await exchange.publish(aio_pika.Message(b"{}"), routing_key=requests_queue(MODEL).name)


async def _own_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    await channel.declare_queue("ext.snoop", auto_delete=True)


async def _server_named_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    await channel.declare_queue(exclusive=True)


async def _everything_into_a_work_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    queue = await channel.get_queue(requests_queue(MODEL).name, ensure=False)
    await queue.bind(await channel.get_exchange(EVENTS_EXCHANGE, ensure=False), routing_key="inference.completed.#")


def _bind_outcomes_into(name: str) -> Action:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(name, ensure=False)
        await queue.bind(await channel.get_exchange(EVENTS_EXCHANGE, ensure=False), routing_key="inference.#")

    return action


REQUESTS = requests_queue(MODEL)
PROJECTIONS = projections_queue()
WEBHOOKS = webhooks_queue()
# What each service's user must not do, beyond publishing other services' events.
# The worker and the collector declare every queue at start-up, and RabbitMQ lets a user declare a queue
# with a dead-letter exchange only with read on the queue and write on that exchange: so each of them
# can read the other's work queue and publish to mlp.dead-letter (docs/kubernetes.md). Their DLQs stay out of reach.
REFUSED: dict[str, list[Action]] = {
    "mlp-gateway": [
        _consume(REQUESTS.name),
        _consume(PROJECTIONS.name),
        _consume(dead_letter_queue(REQUESTS).name),
        _to_dead_letters,
    ],
    "mlp-worker": [_consume(dead_letter_queue(REQUESTS).name), _consume(dead_letter_queue(PROJECTIONS).name)],
    "mlp-collector": [_consume(dead_letter_queue(REQUESTS).name), _consume(dead_letter_queue(PROJECTIONS).name)],
    # The webhook dispatcher: its own queue only (it declares nothing else, so it needs nothing else).
    "mlp-dispatcher": [
        _consume(REQUESTS.name),
        _consume(PROJECTIONS.name),
        _consume(dead_letter_queue(WEBHOOKS).name),
        _into_queue(WEBHOOKS.name),
    ],
}
# Only the dispatcher binds its queue: the other services cannot route events into it.
for _service in ("mlp-worker", "mlp-collector"):
    REFUSED[_service] += [_bind_outcomes_into(WEBHOOKS.name), _consume(dead_letter_queue(WEBHOOKS).name)]
EVERY_SERVICE: list[Action] = [
    _into_queue(REQUESTS.name),
    _into_queue(PROJECTIONS.name),
    _own_queue,
    _server_named_queue,
    _everything_into_a_work_queue,
]


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_reads_and_configures_nothing_beyond_its_own_job(
    declared: dict[str, Settings], service: str
) -> None:
    for action in [*REFUSED[service], *EVERY_SERVICE]:
        await _refused(declared[service], action)
