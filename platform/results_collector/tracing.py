"""The collector's spans: one per projection batch, linked to every request it wrote, and a short span
per newly stored event inside that event's own trace (so a request's trace shows its projection).

A batch serves many requests, so it cannot be a child of any one of them: it is a root span with span
links (its Postgres query spans are its children). Nothing is created when tracing is off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext

from events.model import Event
from mlp import telemetry
from mlp.trace_context import parent_for

log = logging.getLogger(__name__)

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
    # One link per distinct span (SpanContext holds a TraceState, which is unhashable: key by ids).
    distinct = {(p.trace_id, p.span_id): p for p in parents if p is not None}
    links = [Link(p) for p in distinct.values()]
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
    try:
        _record_stored(batch, stored)
    except Exception:  # telemetry must never fail a projection that has already committed
        log.warning("could not record projection spans", exc_info=True)


def _record_stored(batch: BatchTrace, stored: Sequence[tuple[Event, SpanContext | None]]) -> None:
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
