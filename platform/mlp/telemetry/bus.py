"""FastStream middlewares of a broker: publish/process spans and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from mlp.telemetry.bus_metrics import BusMetrics
from mlp.telemetry.sdk import Telemetry


def broker_middlewares(telemetry: Telemetry) -> list[Any]:
    """Middlewares for ``make_broker``: publish/process spans (context in AMQP headers) and Prometheus.

    The tracing middleware is left out when tracing is off; the metrics one (``BusMetrics``: FastStream's
    ``faststream_*`` families, children bound once) is always there, registered once in the default
    registry (re-used by later brokers).
    """
    from prometheus_client import REGISTRY

    middlewares: list[Any] = []
    if telemetry.enabled:
        from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware

        middlewares.append(RabbitTelemetryMiddleware(tracer_provider=telemetry.provider))
    middlewares.append(BusMetrics(REGISTRY, telemetry.service_name))
    return middlewares
