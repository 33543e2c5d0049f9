"""FastStream middlewares of a broker: publish/process spans and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from mlp.telemetry.sdk import Telemetry


def broker_middlewares(telemetry: Telemetry) -> list[Any]:
    """Middlewares for ``make_broker``: publish/process spans (context in AMQP headers) and Prometheus.

    The tracing middleware is left out when tracing is off; the Prometheus one is always there and
    registers its ``faststream_*`` metrics once in the default registry (re-used by later brokers).
    """
    from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
    from prometheus_client import REGISTRY

    middlewares: list[Any] = []
    if telemetry.enabled:
        from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware

        middlewares.append(RabbitTelemetryMiddleware(tracer_provider=telemetry.provider))
    middlewares.append(RabbitPrometheusMiddleware(registry=REGISTRY, app_name=telemetry.service_name))
    return middlewares
