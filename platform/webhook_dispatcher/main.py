"""Composition root of the webhook dispatcher (``mlp dispatcher``): a consumer of ``mlp.webhooks`` on the
shared consumer lifecycle (``mlp.consumer``), with its delivery loop over Postgres, the per-user bindings of
its queue (``webhook_dispatcher.bindings``: synced before it consumes, then on change notifications and
every ``MLP_WEBHOOK_RESYNC_S``) and the scan of one-off targets.

The pool, the HTTP client, the SSRF guard and the dispatcher are created in the consumer's resources;
``/healthz`` ``/readyz`` ``/metrics`` run on the health side port (``MLP_DISPATCHER_HEALTH_PORT``). On
SIGTERM the subscriber stops (an enqueue in progress finishes or is requeued), the delivery loop stops
claiming and the attempts in flight get the rest of the graceful timeout; an unfinished one stays pending.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta

from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker, RabbitMessage

from events.topology import OUTCOME_KINDS, webhooks_queue
from mlp import logs
from mlp.backoff import Backoff
from mlp.bus import bind_keys, declare_own_queue, rabbit_queue, subscribe
from mlp.consumer import Consumer, HealthAddress, consumer_broker, run_consumer
from mlp.db import create_pool, listen_connector
from mlp.health import ReadinessCheck, dependency_checks
from mlp.settings import Settings, get_settings
from webhook_dispatcher.bindings import Bindings
from webhook_dispatcher.sender import Sender, http_client
from webhook_dispatcher.service import Dispatcher
from webhooks.rules import RetryPolicy
from webhooks.ssrf import TargetGuard

log = logging.getLogger("webhook_dispatcher")

SERVICE = "webhook-dispatcher"
# Before the per-user bindings, mlp.webhooks was bound to every outcome: removed at start.
LEGACY_BINDING_KEYS = tuple(f"inference.{kind}.#" for kind in OUTCOME_KINDS)


async def _message_itself(message: StreamMessage[object]) -> StreamMessage[object]:
    return message  # the handler decodes the raw body with msgspec itself (and acks it)


def retry_policy(settings: Settings) -> RetryPolicy:
    backoff = Backoff(
        base_s=settings.webhook_backoff_base_s,
        cap_s=max(settings.webhook_backoff_base_s, settings.webhook_backoff_cap_s),
        jitter=0.5,
    )
    return RetryPolicy(backoff, timedelta(seconds=settings.webhook_retry_window_s))


def build_app(settings: Settings) -> Consumer:
    broker, tel = consumer_broker(SERVICE, settings, app_id="mlp-dispatcher")
    dispatcher: Dispatcher | None = None
    bindings: Bindings | None = None
    synced = False  # the bindings were synced once: the outcomes of every user with a webhook reach the queue
    drain_timeout_s = settings.graceful_timeout_s * 0.75

    # No exchange: FastStream binds nothing; the bindings are per user (Bindings).
    subscriber = broker.subscriber(rabbit_queue(webhooks_queue()), ack_policy=AckPolicy.MANUAL, decoder=_message_itself)

    async def bind(keys: tuple[str, ...], on: bool) -> None:
        await bind_keys(broker, webhooks_queue(), keys, bind=on)

    async def bindings_synced() -> bool:
        return synced

    async def on_outcome(message: RabbitMessage) -> None:
        assert dispatcher is not None, "the resources create the dispatcher before the broker starts"
        await dispatcher.handle(message)

    subscribe(broker, subscriber, on_outcome)

    @asynccontextmanager
    async def resources() -> AsyncIterator[Mapping[str, ReadinessCheck]]:
        nonlocal dispatcher, bindings
        pool = await create_pool(settings, min_size=1, max_size=4)
        client = http_client(settings.webhook_timeout_s)
        try:
            sender = Sender(
                client,
                TargetGuard(allow_private=settings.webhook_allow_private),
                timeout_s=settings.webhook_timeout_s,
                max_response_bytes=settings.webhook_max_response_bytes,
            )
            dispatcher = Dispatcher(
                pool,
                sender,
                retry_policy(settings),
                concurrency=settings.webhook_concurrency,
                poll_interval_s=settings.webhook_poll_interval_s,
                # past the attempt's own bound (DNS + the HTTP timeout), so a live attempt is never retried twice
                lease_s=settings.webhook_timeout_s * 2 + 5,
                target_scan_s=settings.webhook_target_scan_s,
            )
            bindings = Bindings(
                pool,
                bind,
                listen_connector(settings.postgres_dsn),
                resync_s=settings.webhook_resync_s,
                on_enqueued=dispatcher.wake,
            )
            dispatcher.start()
            try:
                yield {**dependency_checks(pool=pool), "bindings": bindings_synced}
            finally:
                await bindings.close()
                await dispatcher.close(drain_timeout_s)
        finally:
            await client.aclose()
            await pool.close()

    async def drain() -> None:
        if bindings is not None:
            await bindings.close()
        if dispatcher is not None:
            await asyncio.gather(subscriber.stop(), dispatcher.close(drain_timeout_s))

    health = HealthAddress(settings.health_host, settings.dispatcher_health_port)

    async def declare(broker: RabbitBroker) -> None:
        nonlocal synced
        # Its own queue only, bound per user to the outcome keys: its RabbitMQ user may bind nothing else.
        await declare_own_queue(broker, webhooks_queue())
        # The bindings to every outcome of an earlier version, if still there (unbinding none is no error).
        await bind(LEGACY_BINDING_KEYS, False)
        assert bindings is not None, "the resources create the bindings before the broker connects"
        await bindings.sync(rebind=True)  # before consuming: every user with a webhook is bound
        synced = True
        bindings.start()

    return Consumer(SERVICE, broker, tel, settings.models, health, resources=resources, drain=drain, declare=declare)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlp dispatcher", description="Run the webhook dispatcher.")
    parser.parse_args(argv)
    settings = get_settings()
    logs.setup_logging(SERVICE, settings)
    log.info(
        "dispatcher: rabbitmq %s, postgres %s, health :%d%s",
        settings.redacted(settings.rabbitmq_url),
        settings.redacted(settings.postgres_dsn),
        settings.dispatcher_health_port,
        ", private targets ALLOWED" if settings.webhook_allow_private else "",
    )
    return run_consumer(build_app(settings))
