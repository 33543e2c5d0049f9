"""Trace context and error helpers: the current ids, W3C ``traceparent`` in and out, spans that record errors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from mlp.telemetry.sdk import INSTRUMENTATION_NAME

# W3C tracecontext only, explicitly: event fields and AMQP headers carry exactly a `traceparent`.
_W3C: Final = TraceContextTextMapPropagator()
# A proxy: resolves to whatever provider is installed.
default_tracer: Final = trace.get_tracer(INSTRUMENTATION_NAME)


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


def mark_error(span: Span, exc: BaseException | None, code: str | None, message: str = "") -> None:
    """Set ERROR status, ``error.code`` and ``error.type`` on ``span`` (and record ``exc`` when given)."""
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
    mark_error(span or trace.get_current_span(), None, code, message)


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
    with (tracer or default_tracer).start_as_current_span(
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
            mark_error(current, exc, None)
            raise
