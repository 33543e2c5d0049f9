"""One lifecycle for the services that consume from RabbitMQ (worker, collector; a webhook dispatcher next).

The counterpart of ``mlp.http.run_service`` for the FastStream services: a composition root builds
the broker with :func:`consumer_broker`, registers its subscribers, and hands the rest to a
:class:`Consumer`: what to create (``resources``) and how to let go of in-flight work (``drain``)::

    broker, tel = consumer_broker(SERVICE, settings, app_id="mlp-worker")
    broker.subscriber(...)(handle)
    consumer = Consumer(SERVICE, broker, tel, models, health, resources=resources, drain=drain)
    return run_consumer(consumer)                 # until SIGTERM/SIGINT, then a drained stop, exit 0

A run, in order:

1. ``resources()`` is entered: pools, clients and the handler are created; it yields the service's
   readiness checks (RabbitMQ's is added here, for the consumer's own broker);
2. the health side server starts (``/healthz`` ``/readyz`` ``/metrics``);
3. the broker connects and declares the topology (the queues exist before anything is consumed);
4. the broker starts its subscribers; the consumer runs until stopped (SIGTERM/SIGINT, :meth:`Consumer.exit`,
   or the ``stop`` event given to :meth:`Consumer.serve`);
5. ``drain()``: the service stops taking deliveries and finishes or requeues what it holds (never rejects);
6. the broker stops, the health server stops, ``resources()`` is left, and pending spans are flushed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from faststream.rabbit import RabbitBroker
from faststream.rabbit.subscriber import RabbitSubscriber

from mlp import heap
from mlp.bus import declare_topology, make_broker
from mlp.health import ReadinessCheck, dependency_checks, health_server
from mlp.settings import Settings
from mlp.telemetry import Telemetry, broker_middlewares, instrument_clients, setup_telemetry

log = logging.getLogger(__name__)

# What a service creates for a run (entered once per run); it yields its readiness checks.
Resources = Callable[[], AbstractAsyncContextManager[Mapping[str, ReadinessCheck]]]
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def consumer_broker(service: str, settings: Settings, *, app_id: str) -> tuple[RabbitBroker, Telemetry]:
    """The service's telemetry and its broker, with client spans on before any Redis or gRPC client exists."""
    tel = setup_telemetry(service, settings)
    instrument_clients(tel)
    return make_broker(settings, app_id=app_id, middlewares=broker_middlewares(tel)), tel


@dataclass(frozen=True, slots=True)
class HealthAddress:
    """Where the health side server listens."""

    host: str
    port: int


@dataclass
class Consumer:
    """A consumer service's lifecycle (see the module docstring for the order of a run)."""

    service: str
    broker: RabbitBroker
    telemetry: Telemetry
    models: Sequence[str]  # the served models, whose queues the topology declares
    health: HealthAddress
    resources: Resources
    drain: Callable[[], Awaitable[None]]
    # What the service declares before it consumes; None: the whole topology (mlp.bus.declare_topology).
    # The webhook dispatcher declares only its own queue (mlp.bus.declare_own_queue).
    declare: Callable[[RabbitBroker], Awaitable[None]] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain and close; no signal handlers (the caller owns the signals)."""
        try:
            async with self.resources() as checks:
                all_checks = {**dependency_checks(broker=self.broker), **checks}
                async with health_server(self.health.host, self.health.port, all_checks):
                    try:
                        await self.broker.connect()
                        if self.declare is None:
                            await declare_topology(self.broker, self.models)
                        else:
                            await self.declare(self.broker)
                        await self.broker.start()
                        log.info("%s %s consuming %s", self.service, _instance(), ", ".join(self._queues()))
                        try:
                            await stop.wait()
                        finally:
                            await self.drain()
                    finally:
                        await self.broker.stop()
        finally:
            self.telemetry.shutdown()  # flushes the last spans (bounded)

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT (a pod's stop, Ctrl-C) or :meth:`exit`."""
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.serve(self._stop)
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    def exit(self) -> None:
        """Stop a :meth:`run` as SIGTERM would."""
        self._stop.set()

    def _queues(self) -> list[str]:
        return [s.queue.name for s in self.broker.subscribers if isinstance(s, RabbitSubscriber)]


def run_consumer(consumer: Consumer) -> int:
    """The ``main`` of a consumer service once its settings and logging are set up: a drained stop exits 0."""
    heap.settle_after_start()
    asyncio.run(consumer.run())
    return 0


def _instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
