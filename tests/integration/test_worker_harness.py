"""Harness of the worker and DLQ integration tests (no tests here): run the worker in process,
observe the events it publishes, publish raw messages, read Triton's inference counts.

Everything is real: the session's RabbitMQ vhost, Postgres database, Redis prefix and Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractIncomingMessage

from events.model import (
    TERMINAL_EVENTS,
    AnyEvent,
    EventDecodeError,
    InferenceRequested,
    decode_event,
    new_event_id,
    utc_now,
)
from events.topology import EVENTS_EXCHANGE
from ml_worker.main import Worker, build_worker
from mlp.settings import Settings

# Safety bound of every wait (never an assertion on speed): the shared 2-core machine can be slow.
WAIT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requested(model: str = "basic-model", user_id: str = "alice", **changes: Any) -> InferenceRequested:
    fields: dict[str, Any] = {
        "event_id": new_event_id(),
        "request_id": new_event_id(),
        "occurred_at": utc_now(),
        "user_id": user_id,
        "model": model,
        "prompt": "the quick brown fox jumps over the lazy dog",
        "max_tokens": 8,
        "source": "bus",
    }
    fields.update(changes)
    return InferenceRequested(**fields)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, models: tuple[str, ...] = ("basic-model",)) -> AsyncIterator[Worker]:
    """The worker, in process, until the block ends (then a graceful stop)."""
    worker = build_worker(settings.model_copy(update={"worker_health_port": free_port()}), models)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.consumer.serve(stop))
    try:
        async with asyncio.timeout(WAIT_S):
            while not (worker.handler is not None and all(s.running for s in worker.subscribers)):
                if task.done():
                    task.result()  # raises the start-up error
                await asyncio.sleep(0.05)
        yield worker
    finally:
        stop.set()
        await task


class EventLog:
    """Every event on ``mlp.events`` (a test queue bound to ``inference.#``), by request_id."""

    def __init__(self) -> None:
        self.by_request: dict[str, list[AnyEvent]] = defaultdict(list)
        self.arrivals: list[AnyEvent] = []  # every event, in arrival order
        self._changed = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            try:
                event = decode_event(message.body)
            except EventDecodeError:
                return  # the raw invalid messages the tests publish themselves
            async with self._changed:
                self.by_request[event.request_id].append(event)
                self.arrivals.append(event)
                self._changed.notify_all()

    async def matching(self, predicate: Callable[[AnyEvent], bool], count: int = 1) -> list[AnyEvent]:
        """The events that match, once at least ``count`` of them arrived."""
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: sum(map(predicate, self.arrivals)) >= count)
            return [e for e in self.arrivals if predicate(e)]

    async def terminal(self, request_id: str) -> list[AnyEvent]:
        """The request's events once its terminal event arrived."""
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(
                lambda: any(isinstance(e, TERMINAL_EVENTS) for e in self.by_request[request_id])
            )
            return list(self.by_request[request_id])


@contextlib.asynccontextmanager
async def observed(settings: Settings) -> AsyncIterator[EventLog]:
    log = EventLog()
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "inference.#")
        await queue.consume(log.on_message)
        yield log


async def publish_raw(settings: Settings, body: bytes, routing_key: str, *, correlation_id: str | None = None) -> None:
    """A bus publisher's message, as anyone could send it (confirmed, mandatory)."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        message = aio_pika.Message(
            body, content_type="application/json", correlation_id=correlation_id, delivery_mode=2
        )
        await exchange.publish(message, routing_key=routing_key, mandatory=True)


async def queue_depth(settings: Settings, name: str) -> int:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def wait_queue_depth(settings: Settings, name: str, depth: int) -> None:
    async with asyncio.timeout(WAIT_S):
        while await queue_depth(settings, name) != depth:
            await asyncio.sleep(0.1)


async def wait_idle(worker: Worker, settings: Settings, queue: str) -> None:
    """Until the queue has nothing ready and the worker holds nothing."""
    assert worker.handler is not None
    async with asyncio.timeout(WAIT_S):
        while await queue_depth(settings, queue) or worker.handler.in_flight:
            await asyncio.sleep(0.1)


async def triton_inference_count(http_url: str, model: str) -> int:
    """Inferences Triton ran for ``model``, each row of a batch counted (its statistics API)."""
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
        reply = await client.get(f"/v2/models/{model}/stats")
        reply.raise_for_status()
        return int(reply.json()["model_stats"][0].get("inference_count", 0))


async def triton_inferences(http_url: str, model: str) -> int:
    """Successful plus failed inference requests Triton executed for ``model`` (its statistics API)."""
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
        reply = await client.get(f"/v2/models/{model}/stats")
        reply.raise_for_status()
        stats = reply.json()["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"]) + int(stats["fail"]["count"])
