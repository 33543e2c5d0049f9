"""FastStream's ``faststream_*`` bus metrics, recorded with label children bound once per destination.

FastStream's own Prometheus middleware resolves six label sets per consumed message and three per
publish (``labels(**kwargs)``: a lock, a dict and a tuple each), behind a provider object built per
message; that was 8% of the collector's CPU and 7% of the worker's under load (docs/benchmarks.md).
Called directly, one consume plus one publish costs 8 µs here against 33 µs through FastStream's.
This one records the same families, names, labels and values, from the same ``MetricsContainer``
(so they register once per registry, whichever broker comes first): a destination's children are
bound the first time it is seen and kept. Destinations are bounded (``bounded_routing_key``: the
event kind, never the user a routing key names), so the kept children are too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from faststream._internal.middlewares import BaseMiddleware
from faststream.exceptions import IgnoredException
from faststream.message import SourceType
from faststream.prometheus.consts import PROCESSING_STATUS_BY_ACK_STATUS, PROCESSING_STATUS_BY_HANDLER_EXCEPTION_MAP
from faststream.prometheus.container import MetricsContainer
from faststream.prometheus.types import ProcessingStatus, PublishingStatus
from faststream.response import PublishType

if TYPE_CHECKING:
    from faststream._internal.context.repository import ContextRepo
    from faststream.message import StreamMessage
    from faststream.rabbit.response import RabbitPublishCommand
    from prometheus_client import CollectorRegistry

BROKER = "rabbitmq"  # the ``broker`` label FastStream's RabbitMQ provider gives


def bounded_routing_key(routing_key: str) -> str:
    """The part of a routing key that may label a metric: ``inference.<kind>`` of ``inference.<kind>.<model>.<user>``.

    FastStream labels its ``faststream_*`` metrics with the whole routing key, which names the user:
    one time series per user in every process (and in Prometheus). The kind is a bounded set; the
    model is in the ``mlp_*`` metrics already. Other keys (a DLQ's routing key is its queue's name)
    come from the topology and are kept.
    """
    head, _, rest = routing_key.partition(".")
    if head != "inference":
        return routing_key
    return f"inference.{rest.partition('.')[0]}"


V = TypeVar("V")


class _Kept(dict[str, V]):
    """Values made on the first use of their key, then kept. The keys are bounded (a destination cut by
    ``bounded_routing_key``, a status, an exception type), so the kept values are too."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[str], V]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: str) -> V:
        value = self[key] = self._make(key)
        return value


class _Consumed:
    """One handler's children (``handler`` = exchange + bounded routing key)."""

    __slots__ = ("duration", "exceptions", "in_process", "processed", "received", "size")

    def __init__(self, m: MetricsContainer, labels: tuple[str, str, str]) -> None:  # app_name, broker, handler
        self.received = m.received_messages_total.labels(*labels)
        self.size = m.received_messages_size_bytes.labels(*labels)
        self.in_process = m.received_messages_in_process.labels(*labels)
        self.duration = m.received_processed_messages_duration_seconds.labels(*labels)
        # Bound on first use, as FastStream binds them: no zero series for a status or an exception not seen.
        self.processed: _Kept[Any] = _Kept(lambda status: m.received_processed_messages_total.labels(*labels, status))
        self.exceptions: _Kept[Any] = _Kept(
            lambda exc_type: m.received_processed_messages_exceptions_total.labels(*labels, exc_type)
        )


class _Published:
    """One destination's children (exchange + bounded routing key)."""

    __slots__ = ("duration", "exceptions", "statuses")

    def __init__(self, m: MetricsContainer, labels: tuple[str, str, str]) -> None:  # app_name, broker, destination
        self.duration = m.published_messages_duration_seconds.labels(*labels)
        self.statuses: _Kept[Any] = _Kept(lambda status: m.published_messages_total.labels(*labels, status))
        self.exceptions: _Kept[Any] = _Kept(
            lambda exc_type: m.published_messages_exceptions_total.labels(*labels, exc_type)
        )


class BusMetrics:
    """The broker middleware (a factory FastStream calls once per message) and the children it keeps."""

    def __init__(self, registry: CollectorRegistry, app_name: str) -> None:
        m = MetricsContainer(registry, metrics_prefix="faststream", custom_label_names=())
        self.consumed: _Kept[_Consumed] = _Kept(lambda handler: _Consumed(m, (app_name, BROKER, handler)))
        self.published: _Kept[_Published] = _Kept(lambda destination: _Published(m, (app_name, BROKER, destination)))

    def __call__(self, msg: Any, /, *, context: ContextRepo) -> _Scope:
        return _Scope(msg, context=context, metrics=self)

    def record_publish(
        self, exchange: str, routing_key: str, seconds: float, error: Exception | None, count: int = 1
    ) -> None:
        """One publish (``count`` messages) as FastStream records it: duration, status, exception type.

        Called by the publish middleware below and by ``mlp.bus.EventPublisher``, which publishes past
        FastStream's middlewares.
        """
        children = self.published[_destination(exchange, routing_key)]
        children.duration.observe(seconds)
        if error is not None:
            children.exceptions[type(error).__name__].inc()
        status = PublishingStatus.success if error is None else PublishingStatus.error
        children.statuses[status.value].inc(count)

    async def measure_consume(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        """One consumed message as FastStream records it: received, size, in process, duration, status,
        exception type. Called by the consume middleware below and by ``mlp.bus.consume_directly``,
        which consumes past FastStream's middlewares."""
        raw = msg.raw_message
        children = self.consumed[_destination(raw.exchange or "", raw.routing_key or "")]
        children.received.inc()
        children.size.observe(len(msg.body))
        children.in_process.inc()
        err: Exception | None = None
        start = time.perf_counter()
        try:
            return await call_next(msg)
        except Exception as exc:
            err = exc
            if not isinstance(exc, IgnoredException):
                children.exceptions[type(exc).__name__].inc()
            raise
        finally:
            children.duration.observe(time.perf_counter() - start)
            children.in_process.dec()
            status = ProcessingStatus.acked
            if msg.committed or err:
                status = (
                    PROCESSING_STATUS_BY_ACK_STATUS.get(msg.committed)  # type: ignore[arg-type]
                    or PROCESSING_STATUS_BY_HANDLER_EXCEPTION_MAP.get(type(err))
                    or ProcessingStatus.error
                )
            children.processed[status.value].inc()


def _destination(exchange: str, routing_key: str) -> str:
    return f"{exchange or 'default'}.{bounded_routing_key(routing_key)}"


class _Scope(BaseMiddleware[Any, Any]):
    """One message's (or one publish's) pass: FastStream's statuses and timings, from the kept children."""

    __slots__ = ("_metrics",)

    def __init__(self, msg: Any, /, *, context: ContextRepo, metrics: BusMetrics) -> None:
        super().__init__(msg, context=context)
        self._metrics = metrics

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        if msg.source_type is SourceType.RESPONSE:
            return await call_next(msg)
        return await self._metrics.measure_consume(call_next, msg)

    async def publish_scope(
        self, call_next: Callable[[RabbitPublishCommand], Awaitable[Any]], cmd: RabbitPublishCommand
    ) -> Any:
        if cmd.publish_type is PublishType.REPLY:
            return await call_next(cmd)
        error: Exception | None = None
        start = time.perf_counter()
        try:
            return await call_next(cmd)
        except Exception as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - start
            self._metrics.record_publish(cmd.exchange.name, cmd.destination, seconds, error, len(cmd.batch_bodies))
