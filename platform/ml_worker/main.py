"""Composition root of the ML worker (``mlp worker``): one subscriber per served model, on the shared
consumer lifecycle (``mlp.consumer``: broker, resources, health side server, drain on SIGTERM).

Pools and clients are created in the consumer's resources and injected into the handler; the
topology is declared at start-up; a health side server answers /healthz, /readyz and /metrics.

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
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from faststream import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitMessage
from faststream.rabbit.subscriber import RabbitSubscriber

from events.registry import model_specs
from events.topology import requests_queue
from ml_service.client import TritonClient
from ml_service.tokens import TokenCounter
from ml_worker.cancels import CancelListener, CancelWatch
from ml_worker.handler import RequestHandler, WorkerDeps
from ml_worker.inference import TritonCaller
from mlp import logs
from mlp.bus import EVENTS, EventPublisher, consumer_channel, rabbit_queue, subscribe
from mlp.cache import create_redis
from mlp.consumer import Consumer, HealthAddress, consumer_broker, run_consumer
from mlp.db import create_pool
from mlp.health import ReadinessCheck, dependency_checks
from mlp.settings import Settings, get_settings
from projections.status_cache import StatusCache, StatusKeys
from quota.limits_follower import LimitsFollower
from quota.service import QuotaService, QuotaSettings

log = logging.getLogger("ml_worker")

SERVICE = "ml-worker"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Worker:
    """The worker's own parts: its broker and subscribers, and (once its resources exist) its handler.

    ``consumer`` runs it (``mlp.consumer``); ``drain`` is the worker's part of a graceful stop.
    """

    models: tuple[str, ...]
    broker: RabbitBroker
    graceful_timeout_s: float
    consumer: Consumer = field(init=False, repr=False)
    subscribers: list[RabbitSubscriber] = field(default_factory=list)
    handler: RequestHandler | None = None

    async def on_request(self, message: RabbitMessage) -> None:
        assert self.handler is not None, "the resources create the handler before the broker starts"
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
            log.info("draining %d in-flight messages (up to %.0fs)", len(pending), self.graceful_timeout_s)
            await asyncio.wait(pending, timeout=self.graceful_timeout_s)
        leftovers = dict(handler.in_flight)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await handler.acks.close()  # the acks still owed, while the channels are open
        # Cancel the consumers before requeueing: a requeued message would otherwise be
        # delivered straight back to this (stopping) consumer and spend another delivery.
        for subscriber in self.subscribers:
            await subscriber.stop()
        for message in leftovers.values():
            # requeued; a last delivery ends failed instead of falling silently into the DLQ
            await handler.give_back(message)
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
    broker, tel = consumer_broker(SERVICE, settings, app_id="mlp-worker")
    worker = Worker(models=served, broker=broker, graceful_timeout_s=settings.graceful_timeout_s)

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
        subscribe(broker, subscriber, handle_request)
        worker.subscribers.append(subscriber)

    @contextlib.asynccontextmanager
    async def resources() -> AsyncIterator[Mapping[str, ReadinessCheck]]:
        pool = await create_pool(settings)
        redis = create_redis(settings)
        triton = TritonClient(settings.triton_url, settings.triton_timeout_s)
        specs = model_specs(served)
        status_keys = StatusKeys(settings.redis_prefix)
        cancels = CancelWatch()
        # Cancels of running requests arrive on one pub/sub channel (ml_worker.cancels).
        listener = CancelListener(redis, status_keys.cancel_channel, cancels)
        listener.start()
        quota = QuotaService(pool, redis, QuotaSettings.of(settings))
        limits_follower = LimitsFollower.for_dsn(quota, settings.postgres_dsn)
        limits_follower.start()
        try:
            caller = TritonCaller(
                triton,
                concurrency=settings.worker_concurrency,
                retries=settings.triton_retries,
                backoff_s=settings.triton_backoff_s,
                max_batch=settings.triton_max_batch,
                models=specs,
            )
            deps = WorkerDeps(
                publisher=EventPublisher(broker, settings.publish_timeout_s),
                quota=quota,
                status_keys=status_keys,
                triton=caller,
                status=StatusCache(redis, status_keys),
                cancels=cancels,
            )
            worker.handler = RequestHandler(
                deps,
                settings.request_limits(served),
                worker_id(),
                started_after_s=settings.started_event_after_ms / 1000,
                prompt_tokens=TokenCounter(specs),
            )

            async def triton_ready() -> bool:
                return all([await triton.is_ready(m) for m in served])

            yield {**dependency_checks(pool=pool, redis_client=redis), "triton": triton_ready}
        finally:
            await listener.close()
            await limits_follower.close()
            await triton.close()
            await redis.aclose()
            await pool.close()

    worker.consumer = Consumer(
        SERVICE,
        broker,
        tel,
        served,
        HealthAddress(settings.health_host, settings.worker_health_port),
        resources=resources,
        drain=worker.drain,
    )
    return worker


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
    return run_consumer(build_worker(settings, models).consumer)


if __name__ == "__main__":
    raise SystemExit(main())
