"""The baselines ``mlp bench`` measures in the same run: what the broker and Triton cost on their own.

- broker round trip: publish a persistent message with publisher confirms (mandatory) to a
  temporary quorum queue -- the same guarantees as the platform's queues -- and consume it with a
  manual ack; latency runs from the publish call to the delivery.
- direct Triton: ``ml_service.client.TritonClient.infer`` over gRPC, the worker's own client,
  same model, prompt and max_tokens as the load.

Each runs closed-loop: at concurrency 1 (the latency floor) and at the load's concurrency (the
most the component delivers alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from events.model import InferenceRequested, encode_event, new_event_id, utc_now
from ml_service.client import TritonClient, TritonError
from ops.bench.stats import Baseline, per_second, summarize

CALL_TIMEOUT_S: Final = 10.0
RTT_QUEUE_PREFIX: Final = "ops.bench.main.rtt."


async def closed_loop(
    call: Callable[[], Awaitable[None]],
    *,
    concurrency: int,
    requests: int,
    errors: tuple[type[BaseException], ...],
) -> tuple[list[float], int, float]:
    """Run ``call`` ``requests`` times, ``concurrency`` at once; returns (latencies s, errors, elapsed s)."""
    latencies: list[float] = []
    failed = 0
    started = 0

    async def worker() -> None:
        nonlocal started, failed
        while started < requests:
            started += 1
            t0 = time.perf_counter()
            try:
                await call()
            except errors:
                failed += 1
                continue
            latencies.append(time.perf_counter() - t0)

    begin = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return latencies, failed, time.perf_counter() - begin


def sample_event_body(prompt: str, user_id: str, model: str, max_tokens: int) -> bytes:
    """A real InferenceRequested, so the broker baseline moves messages of the platform's size."""
    request_id = new_event_id()
    return encode_event(
        InferenceRequested(
            event_id=new_event_id(),
            request_id=request_id,
            occurred_at=utc_now(),
            correlation_id=request_id,
            user_id=user_id,
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
        )
    )


async def broker_round_trip(
    rabbitmq_url: str, body: bytes, concurrencies: tuple[int, ...], requests: int
) -> list[Baseline]:
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    results: list[Baseline] = []
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=max(200, 2 * max(concurrencies)))
        name = RTT_QUEUE_PREFIX + uuid.uuid4().hex[:12]
        queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        arrivals: dict[str, asyncio.Future[None]] = {}

        async def on_message(message: AbstractIncomingMessage) -> None:
            waiter = arrivals.pop(message.message_id or "", None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            await message.ack()

        tag = await queue.consume(on_message)
        loop = asyncio.get_running_loop()

        async def one() -> None:
            message_id = uuid.uuid4().hex
            arrived = loop.create_future()
            arrivals[message_id] = arrived
            try:
                message = aio_pika.Message(
                    body,
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(
                    message, routing_key=name, mandatory=True, timeout=CALL_TIMEOUT_S
                )
                await asyncio.wait_for(arrived, CALL_TIMEOUT_S)
            finally:
                arrivals.pop(message_id, None)

        try:
            for concurrency in concurrencies:
                count = min(requests, 300) if concurrency == 1 else requests
                latencies, failed, elapsed = await closed_loop(
                    one, concurrency=concurrency, requests=count, errors=(aio_pika.AMQPException, TimeoutError)
                )
                results.append(
                    Baseline(
                        "broker", concurrency, count, failed, per_second(len(latencies), elapsed), summarize(latencies)
                    )
                )
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            with contextlib.suppress(Exception):
                await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return results


async def triton_direct(
    triton_url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    concurrencies: tuple[int, ...],
    requests: int,
) -> list[Baseline]:
    client = TritonClient(triton_url, CALL_TIMEOUT_S)
    results: list[Baseline] = []

    async def one() -> None:
        await client.infer(model, prompt, max_tokens)

    try:
        await one()  # opens the channel; not measured
        for concurrency in concurrencies:
            count = min(requests, 300) if concurrency == 1 else requests
            latencies, failed, elapsed = await closed_loop(
                one, concurrency=concurrency, requests=count, errors=(TritonError,)
            )
            results.append(
                Baseline(
                    "triton", concurrency, count, failed, per_second(len(latencies), elapsed), summarize(latencies)
                )
            )
    finally:
        await client.close()
    return results
