"""OpenTelemetry tracing, set up once per service process, configured by the standard ``OTEL_*`` variables.

One module per job, all re-exported here (``from mlp import telemetry; telemetry.span(...)``):

- :mod:`~mlp.telemetry.sdk`: the on/off decision, the resource, the tracer provider (:func:`setup_telemetry`);
- :mod:`~mlp.telemetry.clients`: FastAPI server spans, redis and gRPC client spans;
- :mod:`~mlp.telemetry.asyncpg_spans`: asyncpg client spans from the pool's query loggers;
- :mod:`~mlp.telemetry.bus`: the FastStream middlewares (tracing, Prometheus);
- :mod:`~mlp.telemetry.context`: current ids, W3C ``traceparent`` in and out, spans that record errors.

Off costs nothing: with ``OTEL_SDK_DISABLED=true`` or no OTLP endpoint configured, no SDK provider is
installed (the API's no-op tracer answers), no instrumentation is applied and no tracing middleware is
put on the broker.

A service needs a few lines::

    telemetry = setup_telemetry("ml-worker", settings)
    instrument_clients(telemetry)                 # before creating Redis / gRPC clients
    broker = make_broker(settings, middlewares=broker_middlewares(telemetry))
    ...
    telemetry.shutdown()                          # on exit: flushes pending spans (bounded)
"""

from mlp.telemetry.asyncpg_spans import (
    ConnectionInit,
    asyncpg_init_for,
    asyncpg_query_span,
    is_pool_housekeeping,
    statement_operation,
)
from mlp.telemetry.bus import broker_middlewares
from mlp.telemetry.clients import EXCLUDED_URLS, instrument_clients, instrument_fastapi, uninstrument_clients
from mlp.telemetry.context import (
    context_from_traceparent,
    current_span_id,
    current_trace_id,
    current_traceparent,
    error_code_of,
    extract_context,
    inject_headers,
    set_error,
    span,
)
from mlp.telemetry.sdk import (
    INSTRUMENTATION_NAME,
    Telemetry,
    installed,
    package_version,
    resource_attributes,
    setup_telemetry,
    tracing_enabled,
)

__all__ = [
    "EXCLUDED_URLS",
    "INSTRUMENTATION_NAME",
    "ConnectionInit",
    "Telemetry",
    "asyncpg_init_for",
    "asyncpg_query_span",
    "broker_middlewares",
    "context_from_traceparent",
    "current_span_id",
    "current_trace_id",
    "current_traceparent",
    "error_code_of",
    "extract_context",
    "inject_headers",
    "installed",
    "instrument_clients",
    "instrument_fastapi",
    "is_pool_housekeeping",
    "package_version",
    "resource_attributes",
    "set_error",
    "setup_telemetry",
    "span",
    "statement_operation",
    "tracing_enabled",
    "uninstrument_clients",
]
