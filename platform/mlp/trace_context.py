"""Joining a request's trace from an event: which parent a span gets, and which context a publish runs in.

An event reaches a process two ways: with FastStream's tracing middleware (the process span is
current, its parent came from the AMQP headers) and as data (the event's ``traceparent`` field,
which survives a publisher without tracing, a replay or a batch). These helpers pick the one that
keeps the request in ONE trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from mlp import telemetry


def span_context_of(traceparent: str | None) -> SpanContext | None:
    """The span context a W3C traceparent names, or None when it is missing or invalid."""
    ctx = trace.get_current_span(telemetry.context_from_traceparent(traceparent)).get_span_context()
    return ctx if ctx.is_valid else None


def parent_for(traceparent: str | None) -> otel_context.Context | None:
    """The parent of a span doing work for an event (``None``: the current context).

    The current span wins when it belongs to the event's trace (the process span under the
    publisher's create span) or when the event carries none; otherwise -- a message without
    trace headers whose body names the trace -- the event's traceparent.
    """
    current = trace.get_current_span().get_span_context()
    carried = span_context_of(traceparent)
    if carried is None or (current.is_valid and current.trace_id == carried.trace_id):
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(carried))


@contextlib.contextmanager
def within_trace_of(traceparent: str | None) -> Iterator[None]:
    """Run the block in the event's trace when the caller has no span of its own (background publishers).

    FastStream's publish middleware parents its create span on the current context; without this, a
    publish from a background task would start a new trace instead of joining the request's.
    """
    if trace.get_current_span().get_span_context().is_valid or span_context_of(traceparent) is None:
        yield
        return
    token = otel_context.attach(telemetry.context_from_traceparent(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)
