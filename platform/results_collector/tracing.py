"""The collector's spans: one per projection batch, linked to every request it wrote, and a short span
per newly stored event inside that event's own trace (so a request's trace shows its projection).

A batch serves many requests, so it cannot be a child of any one of them: it is a root span with span
links (its Postgres query spans are its children). Nothing is created when tracing is off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext

from events.model import Event
from mlp import telemetry
from mlp.trace_context import parent_for

BATCH_SPAN = "project batch"
EVENT_SPAN_PREFIX = "project "


def consumer_parent(event: Event) -> SpanContext | None:
    """Where this event's projection span belongs (captured while handling its message).

    The consumer's process span when it is in the event's trace, else the event's traceparent;
    None when tracing is off or the event belongs to no trace.
    """
    if not telemetry.installed().enabled:
        return None
    ctx = trace.get_current_span(parent_for(event.traceparent)).get_span_context()
    return ctx if ctx.is_valid else None


@dataclass(frozen=True)
class BatchTrace:
    span: Span
    started_ns: int


@contextlib.contextmanager
def batch_span(parents: Sequence[SpanContext | None]) -> Iterator[BatchTrace | None]:
    """The batch's span: a new root (never a child of one request), linked to each request's trace."""
    tel = telemetry.installed()
    if not tel.enabled:
        yield None
        return
    started_ns = time.time_ns()
    links = [Link(p) for p in dict.fromkeys(p for p in parents if p is not None)]
    with tel.tracer.start_as_current_span(
        BATCH_SPAN,
        context=otel_context.Context(),
        links=links,
        start_time=started_ns,
        attributes={"mlp.batch_size": len(parents), "db.system.name": "postgresql"},
        record_exception=True,
        set_status_on_exception=True,
    ) as span:
        yield BatchTrace(span, started_ns)


def record_stored(batch: BatchTrace | None, stored: Sequence[tuple[Event, SpanContext | None]]) -> None:
    """One span per newly stored event, in the event's trace, from the batch's start to its commit."""
    if batch is None:
        return
    tracer = telemetry.installed().tracer
    batch_link = [Link(batch.span.get_span_context())]
    end_ns = time.time_ns()
    for event, parent in stored:
        if parent is None:
            continue
        span = tracer.start_span(
            EVENT_SPAN_PREFIX + type(event).__name__,
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            links=batch_link,
            start_time=batch.started_ns,
            attributes={
                "mlp.request_id": event.request_id,
                "mlp.event_id": event.event_id,
                "mlp.event_type": type(event).__name__,
                "db.system.name": "postgresql",
                "db.operation.name": "store_and_project",
            },
        )
        span.end(end_time=end_ns)
