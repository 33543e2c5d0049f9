"""Composition root of the results collector (``mlp collector``): a consumer of ``mlp.projections`` on the
shared consumer lifecycle (``mlp.consumer``: broker, resources, health side server, drain on SIGTERM).

The Postgres pool, the Redis client, the status cache sync and the batcher are created in the
consumer's resources and injected; ``/healthz`` ``/readyz`` ``/metrics`` run on the health side port
for the lifetime of the run. On SIGTERM the consumer stops, the batch in flight and the waiting
events are written (for up to three quarters of the graceful timeout) and whatever was not written
is nack-requeued, never rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import RabbitMessage

from events.topology import projections_queue
from mlp import logs
from mlp.bus import EVENTS, EventPublisher, rabbit_queue, subscribe
from mlp.cache import create_redis
from mlp.consumer import Consumer, HealthAddress, consumer_broker, run_consumer
from mlp.db import create_pool
from mlp.health import ReadinessCheck, dependency_checks
from mlp.settings import Settings, get_settings
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from results_collector.cache_sync import CacheSync, PostgresBackfill
from results_collector.follow_up import FollowUp
from results_collector.service import Collector

log = logging.getLogger("results_collector")

SERVICE = "results-collector"


async def _message_itself(message: StreamMessage[object]) -> StreamMessage[object]:
    # The handler decodes the raw body with msgspec itself (and needs the message to ack/reject).
    return message


def build_app(settings: Settings) -> Consumer:
    broker, tel = consumer_broker(SERVICE, settings, app_id="mlp-collector")
    collector: Collector | None = None  # created with the resources, before the broker starts
    drain_timeout_s = settings.graceful_timeout_s * 0.75

    subscriber = broker.subscriber(
        rabbit_queue(projections_queue()),
        EVENTS,
        ack_policy=AckPolicy.MANUAL,
        decoder=_message_itself,
    )

    async def on_event(message: RabbitMessage) -> None:
        assert collector is not None, "the resources start the collector before the broker"
        await collector.handle(message)

    subscribe(broker, subscriber, on_event)

    @asynccontextmanager
    async def resources() -> AsyncIterator[Mapping[str, ReadinessCheck]]:
        nonlocal collector
        pool = await create_pool(settings, min_size=1, max_size=4)
        redis_client = create_redis(settings)
        try:
            cache = StatusCache(redis_client, StatusKeys(settings.redis_prefix))
            quota = QuotaService(pool, redis_client, QuotaSettings.of(settings))
            follow_up = FollowUp(
                EventPublisher(broker, settings.publish_timeout_s),
                quota,
                settings.models,
                max_bytes=settings.collector_follow_up_max_bytes,
            )
            collector = Collector(
                pool,
                CacheSync(cache, PostgresBackfill(pool, cache), max_bytes=settings.collector_backlog_max_bytes),
                limits=settings.request_limits(),
                follow_up=follow_up,
                claims=quota,
                status_keys=StatusKeys(settings.redis_prefix),
                # A batch never outgrows the prefetch window: with all deliveries in hand, write at once.
                batch_size=min(settings.collector_batch_size, settings.prefetch),
                batch_wait_s=settings.collector_batch_wait_ms / 1000,
            )
            collector.start()
            try:
                yield dependency_checks(pool=pool, redis_client=redis_client)
            finally:
                await collector.close(drain_timeout_s)  # a no-op after the drain
        finally:
            await redis_client.aclose()
            await pool.close()

    async def drain() -> None:
        # Stop consuming and, at the same time, write or requeue what the handlers hold: the
        # subscriber's stop waits for those handlers, which the collector's close releases.
        if collector is not None:
            await asyncio.gather(subscriber.stop(), collector.close(drain_timeout_s))

    health = HealthAddress(settings.health_host, settings.collector_health_port)
    return Consumer(SERVICE, broker, tel, settings.models, health, resources=resources, drain=drain)


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
    return run_consumer(build_app(settings))
