"""OpenTelemetry tracing, set up once per service process, configured by the standard ``OTEL_*`` variables.

Off costs nothing: with ``OTEL_SDK_DISABLED=true`` or no OTLP endpoint configured, no SDK provider is
installed (the API's no-op tracer answers), no instrumentation is applied and no tracing middleware is
put on the broker. On: resource (service.name, version, environment, host), OTLP/HTTP exporter and
batch span processor, sampler from ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (read by the SDK).

A service needs a few lines::

    telemetry = setup_telemetry("ml-worker", settings)
    instrument_clients(telemetry)                 # before creating Redis / gRPC clients
    broker = make_broker(settings, middlewares=broker_middlewares(telemetry))
    ...
    telemetry.shutdown()                          # on exit: flushes pending spans (bounded)
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from mlp.settings import Settings

if TYPE_CHECKING:
    import asyncpg
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME: Final = "mlp"
# Health probes and scrapes would otherwise produce a server span every few seconds.
# Regexes searched in the full URL: anchored, or "/metrics" would also hide /api/v1/metrics/token-rate.
EXCLUDED_URLS: Final = "/healthz$,/readyz$,/metrics$"
_EXCLUDED_URLS_VARS: Final = ("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS")
_TRACES_ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# W3C tracecontext only, explicitly: event fields and AMQP headers carry exactly a `traceparent`.
_W3C: Final = TraceContextTextMapPropagator()
_tracer: Final = trace.get_tracer(INSTRUMENTATION_NAME)  # a proxy: resolves to whatever provider is installed


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Tracing is on only when the SDK is not disabled and an OTLP traces endpoint is configured."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _TRACES_ENDPOINT_VARS)


def package_version() -> str:
    try:
        return metadata.version("inference-platform")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def resource_attributes(
    service_name: str, settings: Settings, env_attributes: Mapping[str, Any]
) -> dict[str, AttributeValue]:
    """Our defaults, overridden by what the operator set (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)."""
    defaults: dict[str, AttributeValue] = {
        "service.name": service_name,
        "service.namespace": "mlp",
        "service.version": package_version(),
        # Both spellings: older backends read `deployment.environment`, current semconv the `.name` one.
        "deployment.environment": settings.environment,
        "deployment.environment.name": settings.environment,
        "host.name": socket.gethostname(),
    }
    return {**defaults, **env_attributes}


@dataclass(frozen=True)
class Telemetry:
    """What a service got from :func:`setup_telemetry`. ``provider`` is None when tracing is off."""

    service_name: str
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @property
    def tracer(self) -> Tracer:
        if self.provider is None:
            return trace.NoOpTracer()
        return self.provider.get_tracer(INSTRUMENTATION_NAME)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Flush pending spans and stop the exporter, in at most about ``timeout_s``. True when flushed."""
        if self.provider is None:
            return True
        provider = self.provider
        done = threading.Event()
        flushed: list[bool] = []

        def flush_and_stop() -> None:
            try:
                flushed.append(provider.force_flush(int(timeout_s * 1000)))
                provider.shutdown()
            except Exception:  # exporting must never crash a stopping service
                log.warning("telemetry shutdown failed", exc_info=True)
            finally:
                done.set()

        # force_flush ignores its timeout in this SDK (opentelemetry-python#4568): bound it from outside.
        threading.Thread(target=flush_and_stop, name="otel-shutdown", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("telemetry shutdown did not finish within %.1fs; pending spans dropped", timeout_s)
            return False
        return bool(flushed and flushed[0])


_installed: Telemetry | None = None
_install_lock = threading.Lock()


def setup_telemetry(service_name: str, settings: Settings, environ: Mapping[str, str] | None = None) -> Telemetry:
    """Install the SDK tracer provider for this process (once; later calls return the first result).

    ``environ`` only feeds the on/off decision (tests); the SDK reads ``os.environ`` itself.
    """
    global _installed
    env = os.environ if environ is None else environ
    if not tracing_enabled(env):
        return Telemetry(service_name=service_name)
    with _install_lock:
        if _installed is not None:
            return _installed
        provider = _build_provider(service_name, settings)
        trace.set_tracer_provider(provider)
        _installed = Telemetry(service_name=service_name, provider=provider)
        log.info("tracing on: service %s exports OTLP/HTTP", provider.resource.attributes.get("service.name"))
        return _installed


def _build_provider(service_name: str, settings: Settings) -> TracerProvider:
    # Imported here: a service with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env_attributes = OTELResourceDetector().detect().attributes
    resource = Resource.create(resource_attributes(service_name, settings, env_attributes))
    # No sampler argument: the SDK then reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself.
    provider = TracerProvider(resource=resource)
    # No exporter/processor arguments: OTEL_EXPORTER_OTLP_* and OTEL_BSP_* apply as documented.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


# --- instrumentation (no-ops when tracing is off) -------------------------------------------------


def installed() -> Telemetry:
    """The process's telemetry (a disabled one when :func:`setup_telemetry` did not turn tracing on)."""
    return _installed or Telemetry(service_name="unknown")


def instrument_fastapi(app: FastAPI, telemetry: Telemetry | None = None) -> None:
    """Server spans for every route except health and metrics."""
    telemetry = telemetry or installed()
    if not telemetry.enabled:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # An operator's OTEL_PYTHON_*_EXCLUDED_URLS wins (None lets the instrumentation read it).
    configured = any(os.environ.get(name) for name in _EXCLUDED_URLS_VARS)
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=telemetry.provider,
        excluded_urls=None if configured else EXCLUDED_URLS,
        # ASGI "http send/receive" spans: ~5 per request and no insight; the server span has the timing.
        exclude_spans=["receive", "send"],
    )


_clients_instrumented = False


def instrument_clients(telemetry: Telemetry | None = None) -> None:
    """Client spans for redis (sync and asyncio) and gRPC aio channels (the Triton client).

    Call it before creating those clients: gRPC channels get their interceptors when created. The
    gRPC interceptor also puts ``traceparent`` into the call metadata, so Triton's own tracing can join.
    asyncpg: pass :func:`asyncpg_init_for` as the pool's ``init`` (its upstream instrumentation does not
    resolve against opentelemetry 1.45.2 / 0.66b2).
    """
    global _clients_instrumented
    telemetry = telemetry or installed()
    if not telemetry.enabled or _clients_instrumented:
        return
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument(tracer_provider=telemetry.provider)
    GrpcAioInstrumentorClient().instrument(tracer_provider=telemetry.provider)  # type: ignore[no-untyped-call]
    _clients_instrumented = True


def uninstrument_clients() -> None:
    """Undo :func:`instrument_clients` (tests; a service keeps it for its lifetime)."""
    global _clients_instrumented
    if not _clients_instrumented:
        return
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().uninstrument()
    GrpcAioInstrumentorClient().uninstrument()  # type: ignore[no-untyped-call]
    _clients_instrumented = False


def statement_operation(query: str) -> str:
    """The SQL verb of a statement (``SELECT``, ``INSERT``, ...), for a low-cardinality span name."""
    words = query.lstrip("( \n\t").split(None, 1)
    return words[0].upper()[:32] if words else "QUERY"


# What asyncpg's pool sends on release (the subset depends on the server's capabilities).
_POOL_RESET_STATEMENTS: Final = frozenset(
    {"SELECT pg_advisory_unlock_all()", "CLOSE ALL", "UNLISTEN *", "RESET ALL", ""}
)


def is_pool_housekeeping(query: str) -> bool:
    return all(part.strip() in _POOL_RESET_STATEMENTS for part in query.split(";"))


def asyncpg_query_span(record: asyncpg.connection.LoggedQuery, tracer: Tracer | None = None) -> None:
    """Record one finished asyncpg query as a client span under the caller's current span.

    asyncpg calls query loggers via ``loop.call_soon`` with a copy of the caller's context, so the
    current span here is the one active when the query ran. Arguments are never recorded.
    """
    if not trace.get_current_span().get_span_context().is_valid:
        return  # a query outside any trace (pool warm-up, background jobs) is noise
    if is_pool_housekeeping(record.query):
        return  # the reset asyncpg runs on every release, in the releasing caller's context
    end_ns = time.time_ns()
    operation = statement_operation(record.query)
    database = str(getattr(record.conn_params, "database", "") or "")
    host, port = record.conn_addr if isinstance(record.conn_addr, tuple) else (str(record.conn_addr), None)
    attributes: dict[str, AttributeValue] = {
        "db.system.name": "postgresql",
        "db.system": "postgresql",
        "db.operation.name": operation,
        "db.query.text": record.query[:2048],
        "db.namespace": database,
        "server.address": str(host),
    }
    if port is not None:
        attributes["server.port"] = int(port)
    span = (tracer or _tracer).start_span(
        f"{operation} {database}".strip(),
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=end_ns - int(record.elapsed * 1e9),
    )
    if record.exception is not None:
        _mark_error(span, record.exception, None)
    span.end(end_time=end_ns)


class ConnectionInit(Protocol):
    """asyncpg's pool ``init`` callback."""

    async def __call__(self, connection: asyncpg.Connection[Any], /) -> None: ...


def asyncpg_init_for(telemetry: Telemetry | None = None) -> ConnectionInit | None:
    """A pool ``init`` callback adding query spans to each connection (``None`` when tracing is off)::

    asyncpg.create_pool(dsn, init=asyncpg_init_for(telemetry))
    """
    telemetry = telemetry or installed()
    if not telemetry.enabled:
        return None
    logger = functools.partial(asyncpg_query_span, tracer=telemetry.tracer)

    async def init(connection: asyncpg.Connection[Any], /) -> None:
        connection.add_query_logger(logger)

    return init


# --- FastStream middlewares ---------------------------------------------------------------------


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


# --- context helpers ----------------------------------------------------------------------------


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits (what Jaeger's search box takes), or None outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None


def current_span_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return trace.format_span_id(ctx.span_id) if ctx.is_valid else None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (to store in an event), or None outside a trace."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def inject_headers(headers: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add ``traceparent`` (and ``tracestate``) of the current span to ``headers``; returns them."""
    _W3C.inject(headers)
    return headers


def extract_context(headers: Mapping[str, Any] | None) -> otel_context.Context:
    """The context carried in headers (or an event's ``{"traceparent": ...}``); empty when none/invalid."""
    if not headers:
        return otel_context.Context()
    carrier = {k: v for k, v in headers.items() if isinstance(v, str)}
    return _W3C.extract(carrier)


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    return extract_context({"traceparent": traceparent} if traceparent else None)


def error_code_of(exc: BaseException) -> str:
    """The platform error code an exception carries (``error_code`` or ``code``), else its class name."""
    for attr in ("error_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(exc).__name__


def _mark_error(span: Span, exc: BaseException | None, code: str | None, message: str = "") -> None:
    error_code = code or (error_code_of(exc) if exc is not None else "error")
    span.set_attribute("error.code", error_code)
    span.set_attribute("error.type", type(exc).__name__ if exc is not None else error_code)
    if exc is not None:
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, message or (f"{type(exc).__name__}: {exc}" if exc else error_code)))


def set_error(code: str, message: str = "", span: Span | None = None) -> None:
    """Mark the current (or given) span failed with a platform error code, without an exception.

    For outcomes that are published rather than raised (e.g. ``InferenceFailed``).
    """
    _mark_error(span or trace.get_current_span(), None, code, message)


@contextmanager
def span(
    name: str,
    *,
    span_kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
    tracer: Tracer | None = None,
    **attributes: AttributeValue,
) -> Iterator[Span]:
    """A current span that records an escaping exception, sets ERROR status and ``error.code``.

    ``attributes`` become span attributes (``span("infer", model=m)``); use ``span.set_attribute``
    for dotted names. ``parent``: a context from :func:`extract_context` (e.g. an event's
    traceparent); default: the current context.
    """
    with (tracer or _tracer).start_as_current_span(
        name,
        context=parent,
        kind=span_kind,
        attributes=attributes or None,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:  # not CancelledError: a cancelled span (shutdown) is not a failure
            _mark_error(current, exc, None)
            raise
