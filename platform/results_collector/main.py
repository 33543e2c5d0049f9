"""Composition root of the results collector (``mlp collector``): a FastStream app on ``mlp.projections``.

The Postgres pool, the Redis client, the status cache sync and the batcher are created in the
lifespan and injected; ``/healthz`` ``/readyz`` ``/metrics`` run on the health side port for the
lifetime of the app. On SIGTERM the consumer stops, the batch in flight and the waiting events are
written (for up to three quarters of the graceful timeout) and whatever was not written is
nack-requeued, never rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from faststream import AckPolicy, FastStream
from faststream.message import StreamMessage
from faststream.rabbit import RabbitMessage

from events.topology import projections_queue
from mlp import logs, telemetry
from mlp.bus import EVENTS, EventPublisher, declare_topology, make_broker, rabbit_queue
from mlp.cache import Keys, create_redis
from mlp.db import create_pool
from mlp.health import dependency_checks, health_server
from mlp.settings import Settings, get_settings
from projections.status_cache import StatusCache
from quota.service import QuotaService
from results_collector.cache_sync import CacheSync
from results_collector.follow_up import FollowUp
from results_collector.service import Collector

log = logging.getLogger("results_collector")

SERVICE = "results-collector"


async def _message_itself(message: StreamMessage[object]) -> StreamMessage[object]:
    # The handler decodes the raw body with msgspec itself (and needs the message to ack/reject).
    return message


@dataclass
class _Running:
    """What the lifespan created, for the handler and the shutdown hook."""

    collector: Collector | None = None


def build_app(settings: Settings) -> FastStream:
    tel = telemetry.setup_telemetry(SERVICE, settings)
    telemetry.instrument_clients(tel)  # before the Redis client exists
    broker = make_broker(settings, app_id="mlp-collector", middlewares=telemetry.broker_middlewares(tel))
    running = _Running()
    drain_timeout_s = settings.graceful_timeout_s * 0.75

    subscriber = broker.subscriber(
        rabbit_queue(projections_queue()),
        EVENTS,
        ack_policy=AckPolicy.MANUAL,
        decoder=_message_itself,
    )

    @subscriber
    async def on_event(message: RabbitMessage) -> None:
        assert running.collector is not None, "the lifespan starts the collector before the broker"
        await running.collector.handle(message)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        pool = await create_pool(settings, min_size=1, max_size=4)
        redis_client = create_redis(settings)
        try:
            cache = StatusCache(redis_client, Keys(settings.redis_prefix))
            follow_up = FollowUp(
                EventPublisher(broker, settings.publish_timeout_s),
                QuotaService(pool, redis_client, settings),
                settings.models,
            )
            collector = Collector(
                pool,
                CacheSync(cache),
                follow_up=follow_up,
                # A batch never outgrows the prefetch window: with all deliveries in hand, write at once.
                batch_size=min(settings.collector_batch_size, settings.prefetch),
                batch_wait_s=settings.collector_batch_wait_ms / 1000,
            )
            running.collector = collector
            await broker.connect()
            await declare_topology(broker, settings.models)
            checks = dependency_checks(broker=broker, pool=pool, redis_client=redis_client)
            async with health_server(settings.health_host, settings.collector_health_port, checks):
                collector.start()
                try:
                    yield
                finally:
                    await collector.close(drain_timeout_s)  # a no-op after on_shutdown drained it
        finally:
            await redis_client.aclose()
            await pool.close()
            tel.shutdown()  # flushes the last spans (bounded)

    async def drain() -> None:
        # Stop consuming and, at the same time, write or requeue what the handlers hold: the
        # subscriber's stop waits for those handlers, which the collector's close releases.
        if running.collector is not None:
            await asyncio.gather(subscriber.stop(), running.collector.close(drain_timeout_s))

    return FastStream(broker, lifespan=lifespan, on_shutdown=[drain])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlp collector", description="Run the results collector (projections).")
    parser.parse_args(argv)
    settings = get_settings()
    logs.setup_logging(SERVICE, settings)
    log.info(
        "collector: rabbitmq %s, postgres %s, health :%d",
        settings.redacted(settings.rabbitmq_url),
        settings.redacted(settings.postgres_dsn),
        settings.collector_health_port,
    )
    asyncio.run(build_app(settings).run())
    return 0
