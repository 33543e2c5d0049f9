"""RabbitMQ adapter: broker factory, topology declaration, the confirmed event publisher and the direct consume.

FastStream 0.7.8 defaults work against reliability (``persist=False``, returned messages
ignored, unbounded prefetch), so every broker and publish here sets them explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.exceptions
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitMessage, RabbitQueue
from faststream.rabbit.schemas.queue import QueueType
from faststream.rabbit.subscriber import RabbitSubscriber
from opentelemetry.trace import Span, SpanKind

from events.model import Event, encode_event
from events.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    QueueSpec,
    all_queues,
    dead_letter_queue,
    routing_key,
)
from mlp import telemetry
from mlp.settings import Settings
from mlp.telemetry.bus_metrics import BusMetrics, bounded_routing_key
from mlp.trace_context import within_trace_of


class PublishError(RuntimeError):
    """The broker did not confirm a publish (down, nacked, returned as unroutable, or timed out)."""


class PublishRefused(PublishError):
    """The broker refused the publish (``basic.nack``): a queue it routes to is at its bound.

    RabbitMQ's nack carries no reason. In this topology a queue nacks when its ``max-length`` is reached
    (``overflow: reject-publish``, the requests queues' bound: events.topology.requests_bound_policy), or, far
    rarer, when a quorum queue has lost its majority and cannot take writes; "retry later" is the answer to
    both. The message still reached every other queue it was routed to (the projections queue among them).
    A timeout or a lost connection is not a refusal: the broker may have taken the message (PublishError).
    """


class TopologyMissingError(RuntimeError):
    """An exchange or queue of the topology does not exist (``declare_topology(verify_only=True)``)."""


EVENTS = RabbitExchange(EVENTS_EXCHANGE, type=ExchangeType.TOPIC, durable=True)
DEAD_LETTERS = RabbitExchange(DEAD_LETTER_EXCHANGE, type=ExchangeType.DIRECT, durable=True)


def rabbit_queue(spec: QueueSpec, binding_key: str | None = None, *, declare: bool = True) -> RabbitQueue:
    """The FastStream queue object for a topology entry (same arguments everywhere, or RabbitMQ refuses).

    ``declare=False``: a passive declare, which only checks that the queue exists.
    """
    # QuorumQueueArgs (a TypedDict) lacks x-dead-letter-strategy; RabbitMQ takes any x- argument.
    arguments: Any = dict(spec.arguments)
    return RabbitQueue(
        spec.name,
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments=arguments,
        routing_key=binding_key if binding_key is not None else (spec.binding_keys[0] if spec.binding_keys else ""),
        declare=declare,
    )


def consumer_channel(prefetch: int) -> Channel:
    return Channel(prefetch_count=prefetch, publisher_confirms=True, on_return_raises=True)


def make_broker(
    settings: Settings,
    *,
    prefetch: int | None = None,
    middlewares: Sequence[Any] = (),
    app_id: str = "mlp",
    fail_fast: bool = True,
    log_level: int = logging.DEBUG,
) -> RabbitBroker:
    return RabbitBroker(
        _named(settings.rabbitmq_url, connection_name(app_id)),
        default_channel=consumer_channel(prefetch or settings.prefetch),
        graceful_timeout=settings.graceful_timeout_s,
        reconnect_interval=1.0,
        fail_fast=fail_fast,
        app_id=app_id,
        middlewares=tuple(middlewares),
        timeout=5.0,
        # Subscribers decode with msgspec themselves; no FastDepends validation on the hot path.
        apply_types=False,
        # The level FastStream logs its two per-message lines at. DEBUG: filtered out at the usual INFO,
        # as they were the largest CPU cost of a busy consumer.
        log_level=log_level,
    )


def connection_name(app_id: str) -> str:
    """The name a process's broker connection shows in RabbitMQ (the management UI; ``rabbitmqctl
    list_connections pid client_properties``): which service, on which host, in which process."""
    return f"{app_id} {socket.gethostname()}:{os.getpid()}"


def _named(url: str, name: str) -> str:
    """``url`` with aiormq's ``name`` query parameter (the ``connection_name`` client property), unless it has one."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "name" for key, _ in query):
        return url
    return urlunsplit(parts._replace(query=urlencode([*query, ("name", name)])))


async def declare_topology(broker: RabbitBroker, models: Sequence[str], *, verify_only: bool = False) -> None:
    """Declare exchanges, work queues, DLQs and bindings (idempotent).

    Publishers call this at start-up too: a publish to a routing key with no bound queue
    would be returned, so the queues must exist before the first request is accepted.

    ``verify_only`` (``MLP_TOPOLOGY=verify``): declare nothing, only check that the exchanges and
    queues exist, with passive declares, which need no RabbitMQ permission: a service whose user may
    not configure (the gateway's, in Kubernetes) starts once a service that declares has started.
    Raises TopologyMissingError otherwise.
    """
    if verify_only:
        await _verify_topology(broker, models)
        return
    events = await broker.declare_exchange(EVENTS)
    dead_letters = await broker.declare_exchange(DEAD_LETTERS)
    for spec in all_queues(tuple(models)):
        queue = await broker.declare_queue(rabbit_queue(spec))
        if spec.consumer_binds:
            continue  # its consumer binds it (declare_own_queue)
        exchange = events if spec.exchange == EVENTS_EXCHANGE else dead_letters
        for key in spec.binding_keys:
            await queue.bind(exchange, routing_key=key)


async def declare_own_queue(broker: RabbitBroker, spec: QueueSpec) -> None:
    """A consumer's start-up for a queue it alone binds (``QueueSpec.consumer_binds``): the exchanges, the
    queue with every binding, its DLQ. Nothing else of the topology (the other services declare that)."""
    events = await broker.declare_exchange(EVENTS)
    dead_letters = await broker.declare_exchange(DEAD_LETTERS)
    queue = await broker.declare_queue(rabbit_queue(spec))
    for key in spec.binding_keys:
        await queue.bind(events if spec.exchange == EVENTS_EXCHANGE else dead_letters, routing_key=key)
    if spec.dead_letter_queue is not None:
        dlq = dead_letter_queue(spec)
        dead = await broker.declare_queue(rabbit_queue(dlq))
        for key in dlq.binding_keys:
            await dead.bind(dead_letters, routing_key=key)


async def bind_keys(broker: RabbitBroker, spec: QueueSpec, keys: Sequence[str], *, bind: bool = True) -> None:
    """Bind (``bind=False``: unbind) ``spec``'s queue to ``keys`` on its exchange; both are idempotent. The queue
    is the broker's robust one: a binding made here is restored after a reconnect, one removed here is not."""
    exchange = await broker.declare_exchange(EVENTS if spec.exchange == EVENTS_EXCHANGE else DEAD_LETTERS)
    queue = await broker.declare_queue(rabbit_queue(spec))
    for key in keys:
        if bind:
            await queue.bind(exchange, routing_key=key)
        else:
            await queue.unbind(exchange, routing_key=key)


async def _verify_topology(broker: RabbitBroker, models: Sequence[str]) -> None:
    passive_exchanges = [
        RabbitExchange(e.name, type=e.type, durable=e.durable, declare=False) for e in (EVENTS, DEAD_LETTERS)
    ]
    for exchange in passive_exchanges:
        try:
            await broker.declare_exchange(exchange)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMissingError(f"exchange {exchange.name} does not exist: {exc}") from exc
    for spec in all_queues(tuple(models)):
        try:
            await broker.declare_queue(rabbit_queue(spec, declare=False))
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMissingError(f"queue {spec.name} does not exist: {exc}") from exc


def is_nack(exc: BaseException) -> bool:
    """True when ``exc`` is the broker's ``basic.nack`` of a confirmed publish (aiormq raises it as a
    DeliveryError carrying the Nack frame; a returned, unroutable message is another error)."""
    return isinstance(exc, aiormq.exceptions.DeliveryError) and isinstance(
        getattr(exc, "frame", None), aiormq.spec.Basic.Nack
    )


# Events are published on a channel of their own, not on the subscribers' default channel (where
# FastStream's producer publishes), so publishes and acks do not take turns on one channel's lock.
# Opened through FastStream's channel manager: it is closed with the broker, restored with its connection.
PUBLISH_CHANNEL = Channel(publisher_confirms=True, on_return_raises=True)


class EventPublisher:
    """Publishes domain events persistent, mandatory and confirmed; anything less raises PublishError.

    It publishes through aiormq on :data:`PUBLISH_CHANNEL`, past FastStream's publish. That path (its
    middlewares, aio-pika's Message, and a wait for each frame's write while holding the channel lock)
    cost 206-244 us of CPU per confirmed publish against 137-162 us this way (scripts/publish_paths_ab.py;
    docs/benchmarks.md, "Against the plain Celery pipeline, round 6"). So this class does the two things
    those middlewares did: it records the ``faststream_published_*`` metrics (``BusMetrics.record_publish``),
    and, with tracing on, it opens the PRODUCER span whose context the AMQP headers carry.
    """

    def __init__(self, broker: RabbitBroker, timeout_s: float) -> None:
        self._broker = broker
        self._timeout_s = timeout_s
        self._app_id = broker.config.app_id
        self._metrics = next((m for m in broker.middlewares if isinstance(m, BusMetrics)), None)
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._opening = asyncio.Lock()

    async def publish(self, event: Event, headers: dict[str, Any] | None = None) -> None:
        """Publish ``event``; its ``traceparent`` also travels in the AMQP headers (W3C, messaging conventions).

        With tracing on, the headers carry the publish span's context instead (a child of the current
        span); a caller without a span publishes within the event's trace.
        """
        if event.traceparent:
            headers = {"traceparent": event.traceparent, **(headers or {})}
        key = routing_key(event)
        if not telemetry.installed().enabled:
            await self._measured(event, key, headers)
            return
        with within_trace_of(event.traceparent), _publish_span(event, key) as span:
            carrier: dict[str, Any] = dict(headers or {})
            telemetry.inject_headers(carrier)  # the publish span's traceparent replaces the event's
            try:
                await self._measured(event, key, carrier)
            except PublishError as exc:
                telemetry.set_error("publish_failed", str(exc), span)
                raise

    async def _measured(self, event: Event, key: str, headers: dict[str, Any] | None) -> None:
        if self._metrics is None:
            await self._publish(event, key, headers)
            return
        error: Exception | None = None
        start = time.perf_counter()
        try:
            await self._publish(event, key, headers)
        except Exception as exc:
            error = exc
            raise
        finally:
            self._metrics.record_publish(EVENTS_EXCHANGE, key, time.perf_counter() - start, error)

    async def _publish(self, event: Event, key: str, headers: dict[str, Any] | None) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=event.correlation_id or event.request_id,
            message_id=event.event_id,
            timestamp=datetime.now(UTC),
            message_type=type(event).__name__,
            app_id=self._app_id,
        )
        try:
            # asyncio.timeout, not wait_for: the same deadline without a task per publish. wait=False: the
            # channel lock is let go once the frame is queued, so the publishes of one loop turn go out
            # together; the confirm is still awaited.
            async with asyncio.timeout(self._timeout_s):
                channel = await self._underlay()
                confirmation = await channel.basic_publish(
                    encode_event(event),
                    exchange=EVENTS_EXCHANGE,
                    routing_key=key,
                    properties=properties,
                    mandatory=True,
                    wait=False,
                )
        except Exception as exc:  # DeliveryError, PublishError (returned), ChannelClosed, AMQPError, timeouts
            what = f"{type(event).__name__} {event.request_id}"
            if is_nack(exc):
                raise PublishRefused(f"{what}: the broker refused it (basic.nack: a queue is full)") from exc
            raise PublishError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise PublishError(f"{type(event).__name__} {event.request_id}: broker answered {confirmation!r}")

    async def _underlay(self) -> aiormq.Channel:
        """The publishing channel's aiormq channel; it waits while the connection is being restored."""
        if self._channel is None or self._channel.is_closed:
            async with self._opening:  # concurrent first publishes open one channel, not one each
                if self._channel is None or self._channel.is_closed:
                    self._channel = await self._broker.config.channel_manager.get_channel(PUBLISH_CHANNEL)
        underlay = await self._channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # the concrete one: its basic_publish takes wait
        return underlay

    async def publish_many(self, events: Sequence[Event]) -> None:
        """Publish concurrently; confirms are awaited together (pipelined, not one round trip each)."""
        await asyncio.gather(*(self.publish(e) for e in events))


@contextlib.contextmanager
def _publish_span(event: Event, key: str) -> Iterator[Span]:
    """The PRODUCER span of one publish, named as FastStream's tracing middleware names its publish spans
    (``<destination> publish``) with the routing key cut to its kind: no user id in a span name."""
    destination = f"{EVENTS_EXCHANGE}.{bounded_routing_key(key)}"
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation": "publish",
        "messaging.destination.name": EVENTS_EXCHANGE,
        "messaging.rabbitmq.destination.routing_key": key,
        "messaging.message.id": event.event_id,
        "messaging.message.conversation_id": event.correlation_id or event.request_id,
    }
    with telemetry.installed().tracer.start_as_current_span(
        f"{destination} publish", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield span


MessageHandler = Callable[[RabbitMessage], Awaitable[None]]
log = logging.getLogger(__name__)


def subscribe(broker: RabbitBroker, subscriber: RabbitSubscriber, handler: MessageHandler) -> None:
    """Register ``handler`` on ``subscriber``; with tracing off, its messages go past FastStream's middlewares.

    The subscriber stays FastStream's: it declares, binds, consumes and re-consumes after a reconnect
    (aio-pika's robust queue), stops (``running``, its lock, the cancel) and is in the AsyncAPI document.
    Only what runs per message changes (:class:`DirectConsume`). With tracing on, FastStream's path stays,
    for its CONSUMER span of each message.
    """
    subscriber(handler)
    if telemetry.installed().enabled:
        return
    metrics = next((m for m in broker.middlewares if isinstance(m, BusMetrics)), None)
    # The one seam: the callback the subscriber's start() hands to aio-pika's queue.consume.
    subscriber.consume = DirectConsume(subscriber, handler, metrics)  # type: ignore[method-assign,assignment]


class DirectConsume:
    """One subscriber's per-message path without FastStream's: build the ``RabbitMessage``, record the
    ``faststream_received_*`` metrics (``BusMetrics.measure_consume``), call the handler.

    FastStream's path (a context scope, an exit stack, five middlewares and a parser/decoder round per
    message) cost 73-150 us of CPU per consumed message more than this (docs/benchmarks.md, round 8).
    What it did that the handlers rely on is kept: no message is taken once the subscriber stops
    (``running``), each one holds the subscriber's lock (its stop waits for them), and a handler's
    exception is logged, not raised into aio-pika. Acks stay the handler's (manual ack policy).
    """

    __slots__ = ("_handler", "_metrics", "_subscriber")

    def __init__(self, subscriber: RabbitSubscriber, handler: MessageHandler, metrics: BusMetrics | None) -> None:
        self._subscriber = subscriber
        self._handler = handler
        self._metrics = metrics

    async def __call__(self, raw: aio_pika.IncomingMessage) -> None:
        subscriber = self._subscriber
        if not subscriber.running:
            return  # left unacked, as FastStream leaves it: the channel's close returns it to the queue
        message = RabbitMessage(
            raw,
            raw.body,
            headers=raw.headers,
            reply_to=raw.reply_to or "",
            content_type=raw.content_type,
            correlation_id=raw.correlation_id,
            message_id=raw.message_id,
        )
        with subscriber.lock:
            try:
                if self._metrics is None:
                    await self._handler(message)
                else:
                    await self._metrics.measure_consume(self._handler, message)
            except Exception:
                log.exception("%s: the handler failed on message %s", subscriber.queue.name, message.message_id)
