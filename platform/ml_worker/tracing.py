"""The worker's spans: one per request (under FastStream's process span), one around the Triton call.

Nothing is created when tracing is off. Outcome events get the traceparent of the worker's span, so
the collector's spans (and anyone replaying the event) join the request's trace below the worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from events.model import (
    Event,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
)
from events.status import status_of
from ml_worker.decide import Succeeded, TritonFailed, TritonOutcome
from mlp import telemetry
from mlp.trace_context import parent_for

E = TypeVar("E", bound=Event)

REQUEST_SPAN = "handle InferenceRequested"
TRITON_SPAN = "triton infer"


@contextlib.contextmanager
def request_span(request: InferenceRequested, *, attempt: int) -> Iterator[Span | None]:
    """The worker's span for one delivery of a request, continuing the request's trace."""
    tel = telemetry.installed()
    if not tel.enabled:
        yield None
        return
    with telemetry.span(REQUEST_SPAN, parent=parent_for(request.traceparent), tracer=tel.tracer) as span:
        span.set_attribute("mlp.request_id", request.request_id)
        span.set_attribute("mlp.model", request.model)
        span.set_attribute("mlp.delivery_attempt", attempt)
        yield span


@contextlib.contextmanager
def triton_span(request: InferenceRequested, server: str) -> Iterator[Span | None]:
    """A client span around the whole Triton call (its tries and backoff); gRPC's own spans are its children."""
    tel = telemetry.installed()
    if not tel.enabled:
        yield None
        return
    with telemetry.span(TRITON_SPAN, span_kind=SpanKind.CLIENT, tracer=tel.tracer) as span:
        span.set_attribute("rpc.system", "grpc")
        span.set_attribute("rpc.service", "inference.GRPCInferenceService")
        span.set_attribute("rpc.method", "ModelInfer")
        span.set_attribute("server.address", server)
        span.set_attribute("mlp.model", request.model)
        span.set_attribute("mlp.request_id", request.request_id)
        yield span


def record_triton_outcome(span: Span | None, outcome: TritonOutcome) -> None:
    if span is None:
        return
    match outcome:
        case Succeeded():
            span.set_attribute("gen_ai.usage.input_tokens", outcome.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", outcome.completion_tokens)
        case TritonFailed():
            telemetry.set_error(outcome.error_code, outcome.message, span=span)


def with_worker_traceparent(event: E) -> E:
    """The event, carrying the current (worker) span's traceparent when tracing is on."""
    traceparent = telemetry.current_traceparent()
    if traceparent is None or traceparent == event.traceparent:
        return event
    return msgspec.structs.replace(event, traceparent=traceparent)


def record_outcome(event: Event) -> None:
    """Mark the current span with the request's end: failed requests get ERROR and ``error.code``."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    match event:
        case InferenceCompleted():
            span.set_attribute("mlp.outcome", "completed")
        case InferenceFailed():
            span.set_attribute("mlp.outcome", "failed")
            telemetry.set_error(event.error_code, event.error_message, span=span)
        case InferenceRejected():
            span.set_attribute("mlp.outcome", "rejected")
            span.set_attribute("mlp.reject_reason", event.reason)
        case InferenceCancelled() | InferenceExpired():
            span.set_attribute("mlp.outcome", status_of(event))
            span.set_attribute("mlp.stage", event.stage)
