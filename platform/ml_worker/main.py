"""Composition root of the ML worker (``mlp worker``): one FastStream app, one subscriber per served model.

Pools and clients are created in the lifespan and injected into the handler; the topology is
declared at start-up; a health side server answers /healthz, /readyz and /metrics.

Concurrency: aiormq runs every delivery in its own task, and FastStream 0.7.8 does not
serialize a subscriber's handler calls, so up to ``prefetch`` messages are handled at once;
``TritonCaller`` keeps ``worker_concurrency`` Triton calls in flight per model and sends the
requests that arrive meanwhile together as the next call's batch (up to ``triton_max_batch`` rows).

Shutdown (SIGTERM/SIGINT): stop taking deliveries, finish in-flight messages within
``graceful_timeout_s``, nack-requeue whatever is left (never reject), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from faststream import AckPolicy, FastStream
from faststream.rabbit import RabbitBroker, RabbitMessage
from faststream.rabbit.subscriber import RabbitSubscriber

from events.topology import requests_queue
from ml_service.client import TritonClient
from ml_worker.handler import RequestHandler, WorkerDeps
from ml_worker.inference import TritonCaller
from mlp import logs, telemetry
from mlp.bus import EVENTS, EventPublisher, consumer_channel, declare_topology, make_broker, rabbit_queue
from mlp.cache import Keys, create_redis
from mlp.db import create_pool
from mlp.health import ReadinessCheck, dependency_checks, health_server
from mlp.settings import Settings, get_settings
from quota.service import QuotaService

log = logging.getLogger("ml_worker")

SERVICE = "ml-worker"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Worker:
    """The assembled worker: its broker, its app, and (once the lifespan ran) its handler."""

    settings: Settings
    models: tuple[str, ...]
    broker: RabbitBroker
    app: FastStream = field(init=False, repr=False)
    subscribers: list[RabbitSubscriber] = field(default_factory=list)
    handler: RequestHandler | None = None

    async def on_request(self, message: RabbitMessage) -> None:
        assert self.handler is not None, "the lifespan creates the handler before the broker starts"
        await self.handler.handle(message)

    async def drain(self) -> None:
        """Stop taking work, let in-flight messages finish, requeue what does not finish in time."""
        for subscriber in self.subscribers:
            # New deliveries are left unacked; closing the channel returns them to the queue.
            subscriber.running = False
        handler = self.handler
        if handler is None:
            return
        handler.draining.set()
        pending = set(handler.in_flight)
        if pending:
            log.info("draining %d in-flight messages (up to %.0fs)", len(pending), self.settings.graceful_timeout_s)
            await asyncio.wait(pending, timeout=self.settings.graceful_timeout_s)
        leftovers = dict(handler.in_flight)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        # Cancel the consumers before requeueing: a requeued message would otherwise be
        # delivered straight back to this (stopping) consumer and spend another delivery.
        for subscriber in self.subscribers:
            await subscriber.stop()
        for message in leftovers.values():
            with contextlib.suppress(Exception):  # a closed channel requeues them anyway
                await message.nack(requeue=True)
        if leftovers:
            log.warning("requeued %d messages not finished within the graceful timeout", len(leftovers))


async def _message_itself(message: RabbitMessage) -> RabbitMessage:
    """The subscriber's decoder: hand the handler the message, not a JSON body.

    FastStream's own decoder raises on a body that is not JSON, and with manual acks the
    message would then stay unacked; the handler decodes (strictly, then leniently) itself.
    """
    return message


def build_worker(settings: Settings, models: Sequence[str] | None = None) -> Worker:
    served = tuple(models or settings.models)
    tel = telemetry.setup_telemetry(SERVICE, settings)
    telemetry.instrument_clients(tel)  # before the Redis client and the gRPC channel exist
    broker = make_broker(settings, app_id="mlp-worker", middlewares=telemetry.broker_middlewares(tel))
    worker = Worker(settings=settings, models=served, broker=broker)

    async def handle_request(message: RabbitMessage) -> None:
        await worker.on_request(message)

    for model in served:
        spec = requests_queue(model)
        subscriber = broker.subscriber(
            rabbit_queue(spec),
            EVENTS,
            channel=consumer_channel(settings.prefetch),
            ack_policy=AckPolicy.MANUAL,
            decoder=_message_itself,
            title=f"{spec.name}:InferenceRequested",
            description=f"Inference requests for {model} (routing key inference.requested.{model}.<user_id>).",
        )
        subscriber(handle_request)
        worker.subscribers.append(subscriber)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        pool = await create_pool(settings)
        redis = create_redis(settings)
        triton = TritonClient(settings.triton_url, settings.triton_timeout_s)
        try:
            caller = TritonCaller(
                triton,
                concurrency=settings.worker_concurrency,
                retries=settings.triton_retries,
                backoff_s=settings.triton_backoff_s,
                max_batch=settings.triton_max_batch,
            )
            deps = WorkerDeps(
                publisher=EventPublisher(broker, settings.publish_timeout_s),
                quota=QuotaService(pool, redis, settings),
                keys=Keys(settings.redis_prefix),
                triton=caller,
            )
            worker.handler = RequestHandler(
                deps,
                settings.request_limits(served),
                worker_id(),
                started_after_s=settings.started_event_after_ms / 1000,
            )

            async def triton_ready() -> bool:
                return all([await triton.is_ready(m) for m in served])

            checks: Mapping[str, ReadinessCheck] = {
                **dependency_checks(broker=broker, pool=pool, redis_client=redis),
                "triton": triton_ready,
            }
            async with health_server(settings.health_host, settings.worker_health_port, checks):
                yield
        finally:
            await triton.close()
            await redis.aclose()
            await pool.close()
            tel.shutdown()  # flushes the last spans (bounded)

    async def declare() -> None:
        await broker.connect()
        await declare_topology(broker, served)

    worker.app = FastStream(broker, lifespan=lifespan, on_startup=[declare], on_shutdown=[worker.drain])
    return worker


async def serve(worker: Worker, stop: asyncio.Event) -> None:
    """Run the app until ``stop`` is set: FastStream's lifecycle, without its signal handlers."""
    app = worker.app
    async with app.lifespan_context():
        await app.start()
        log.info("worker %s consuming %s", worker_id(), ", ".join(worker.models))
        try:
            await stop.wait()
        finally:
            await app.stop()


def _parse(argv: Sequence[str], settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlp worker", description="Run an ML worker (consumes requests).")
    parser.add_argument(
        "--models",
        default=",".join(settings.models),
        help="comma-separated models to serve (default: MLP_MODELS, %(default)s)",
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    settings = get_settings()
    args = _parse(argv or [], settings)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models:
        print("mlp worker: --models names no model")
        return 2
    logs.setup_logging(SERVICE, settings)
    worker = build_worker(settings, models)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(worker, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
