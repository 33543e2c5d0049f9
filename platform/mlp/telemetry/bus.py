"""FastStream middlewares of a broker: publish/process spans and Prometheus metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlp.telemetry.sdk import Telemetry

if TYPE_CHECKING:
    from faststream.prometheus import ConsumeAttrs
    from faststream.rabbit.response import RabbitPublishCommand


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


def _bounded_rabbit_prometheus(registry: Any, app_name: str) -> Any:
    """FastStream's RabbitMQ Prometheus middleware, with destinations cut by ``bounded_routing_key``.

    The middleware takes no provider of ours, so its factory (a slot of the pinned FastStream 0.7.8)
    is replaced; tests/unit/test_telemetry.py checks the labels it then produces.
    """
    from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
    from faststream.rabbit.prometheus.provider import RabbitMetricsSettingsProvider

    class BoundedDestinations(RabbitMetricsSettingsProvider):
        def get_consume_attrs_from_message(self, msg: Any) -> ConsumeAttrs:
            attrs = super().get_consume_attrs_from_message(msg)
            raw = msg.raw_message
            attrs["destination_name"] = f"{raw.exchange or 'default'}.{bounded_routing_key(raw.routing_key or '')}"
            return attrs

        def get_publish_destination_name_from_cmd(self, cmd: RabbitPublishCommand) -> str:
            return f"{cmd.exchange.name or 'default'}.{bounded_routing_key(cmd.destination)}"

    middleware = RabbitPrometheusMiddleware(registry=registry, app_name=app_name)
    middleware._settings_provider_factory = lambda _: BoundedDestinations()
    return middleware


def broker_middlewares(telemetry: Telemetry) -> list[Any]:
    """Middlewares for ``make_broker``: publish/process spans (context in AMQP headers) and Prometheus.

    The tracing middleware is left out when tracing is off; the Prometheus one is always there and
    registers its ``faststream_*`` metrics once in the default registry (re-used by later brokers).
    """
    from prometheus_client import REGISTRY

    middlewares: list[Any] = []
    if telemetry.enabled:
        from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware

        middlewares.append(RabbitTelemetryMiddleware(tracer_provider=telemetry.provider))
    middlewares.append(_bounded_rabbit_prometheus(REGISTRY, telemetry.service_name))
    return middlewares
