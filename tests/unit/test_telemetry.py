"""Telemetry building blocks without the network: on/off decision, resource, spans, context helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mlp.settings import Settings
from mlp.telemetry import (
    Telemetry,
    broker_middlewares,
    context_from_traceparent,
    current_trace_id,
    current_traceparent,
    error_code_of,
    extract_context,
    inject_headers,
    instrument_fastapi,
    is_pool_housekeeping,
    resource_attributes,
    set_error,
    setup_telemetry,
    span,
    statement_operation,
    tracing_enabled,
)

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> Iterator[Telemetry]:
    """An SDK provider local to the test (the process-global one is left alone)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Telemetry(service_name="unit", provider=provider)
    provider.shutdown()


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (found,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return found


# --- on / off -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        (ENDPOINT, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/v1/traces"}, True),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "false"}, True),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ],
)
def test_tracing_is_on_only_with_an_endpoint_and_not_disabled(environ: dict[str, str], expected: bool) -> None:
    assert tracing_enabled(environ) is expected


def test_off_installs_no_sdk_provider_and_adds_no_tracing_middleware() -> None:
    off = setup_telemetry("gateway", Settings(), environ={"OTEL_SDK_DISABLED": "true", **ENDPOINT})
    assert not off.enabled
    assert off.shutdown() is True
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    names = [type(m).__name__ for m in broker_middlewares(off)]
    assert names == ["BusMetrics"]
    app = FastAPI()
    before = list(app.user_middleware)
    instrument_fastapi(app, off)
    assert app.user_middleware == before
    with span("nothing") as s:  # the API's no-op tracer: no trace id, nothing recorded
        assert not s.is_recording()
        assert current_trace_id() is None
        assert current_traceparent() is None


def test_on_adds_the_tracing_middleware_before_prometheus(telemetry: Telemetry) -> None:
    names = [type(m).__name__ for m in broker_middlewares(telemetry)]
    assert names == ["RabbitTelemetryMiddleware", "BusMetrics"]


def test_resource_env_overrides_our_defaults() -> None:
    attrs = resource_attributes("ml-worker", Settings(environment="test"), {})
    assert attrs["service.name"] == "ml-worker"
    assert attrs["deployment.environment"] == "test"
    assert attrs["service.version"]
    assert attrs["host.name"]
    operator = resource_attributes(
        "ml-worker", Settings(environment="test"), {"service.name": "worker-blue", "host.name": "pod-1"}
    )
    assert operator["service.name"] == "worker-blue"
    assert operator["host.name"] == "pod-1"


# --- spans --------------------------------------------------------------------------------------


class QuotaSpent(RuntimeError):
    error_code = "quota_exceeded"


def test_span_records_exception_error_status_and_code(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    with pytest.raises(QuotaSpent), span("reserve", tracer=telemetry.tracer, model="basic-model"):
        raise QuotaSpent("no tokens left")
    recorded = finished(exporter, "reserve")
    assert recorded.status.status_code is StatusCode.ERROR
    assert recorded.attributes is not None
    assert recorded.attributes["error.code"] == "quota_exceeded"
    assert recorded.attributes["error.type"] == "QuotaSpent"
    assert recorded.attributes["model"] == "basic-model"
    assert [e.name for e in recorded.events] == ["exception"]


def test_span_error_code_falls_back_to_the_exception_class(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(KeyError), span("lookup", tracer=telemetry.tracer):
        raise KeyError("x")
    assert finished(exporter, "lookup").attributes == {"error.code": "KeyError", "error.type": "KeyError"}
    assert error_code_of(QuotaSpent()) == "quota_exceeded"


async def test_cancellation_is_not_an_error(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    async def work() -> None:
        with span("long", tracer=telemetry.tracer):
            await asyncio.sleep(3600)

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished(exporter, "long").status.status_code is StatusCode.UNSET


def test_set_error_marks_the_current_span_without_an_exception(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    with span("infer", tracer=telemetry.tracer):
        set_error("triton_timeout", "deadline exceeded")
    recorded = finished(exporter, "infer")
    assert recorded.status.status_code is StatusCode.ERROR
    assert recorded.status.description == "deadline exceeded"
    assert recorded.attributes is not None
    assert recorded.attributes["error.code"] == "triton_timeout"


# --- context helpers ----------------------------------------------------------------------------


def test_trace_context_round_trips_through_headers_and_traceparent(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    assert current_trace_id() is None
    assert inject_headers({}) == {}
    with span("gateway", tracer=telemetry.tracer) as parent:
        ctx = parent.get_span_context()
        trace_id = current_trace_id()
        traceparent = current_traceparent()
        headers = inject_headers({"x-other": "kept"})
    assert trace_id == f"{ctx.trace_id:032x}"
    assert traceparent is not None
    assert traceparent.startswith(f"00-{trace_id}-{ctx.span_id:016x}-")
    assert headers["traceparent"] == traceparent
    assert headers["x-other"] == "kept"

    # A consumer continues the trace from the AMQP headers or from the event's traceparent field.
    for carried in (extract_context(headers), context_from_traceparent(traceparent)):
        with span("worker", tracer=telemetry.tracer, parent=carried):
            assert current_trace_id() == trace_id
    workers = [s for s in exporter.get_finished_spans() if s.name == "worker"]
    assert [s.parent.span_id if s.parent else None for s in workers] == [ctx.span_id, ctx.span_id]


@pytest.mark.parametrize("bad", [None, {}, {"traceparent": "garbage"}, {"traceparent": 42}])
def test_missing_or_invalid_context_starts_a_new_trace(bad: dict[str, object] | None) -> None:
    assert not trace.get_current_span(extract_context(bad)).get_span_context().is_valid


@pytest.mark.parametrize(
    ("query", "operation"),
    [
        ("SELECT 1", "SELECT"),
        ("  insert into t values ($1)", "INSERT"),
        ("(SELECT 1)", "SELECT"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH"),
        ("", "QUERY"),
    ],
)
def test_statement_operation(query: str, operation: str) -> None:
    assert statement_operation(query) == operation


def test_pool_reset_is_housekeeping_but_queries_are_not() -> None:
    assert is_pool_housekeeping("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
    assert is_pool_housekeeping("RESET ALL;")
    assert not is_pool_housekeeping("SELECT 1")
    assert not is_pool_housekeeping("RESET ALL; DELETE FROM requests")


def test_the_sdk_reads_sampler_exporter_and_service_name_from_otel_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlp.telemetry.sdk import _build_provider

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-canary")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=gw-1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    provider = _build_provider("gateway", Settings(environment="production"))
    try:
        assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
        assert provider.resource.attributes["service.name"] == "gateway-canary"
        assert provider.resource.attributes["k8s.pod.name"] == "gw-1"
        assert provider.resource.attributes["deployment.environment"] == "production"
        processor = provider._active_span_processor._span_processors[0]
        assert processor._batch_processor._exporter._endpoint == "http://127.0.0.1:9/v1/traces"  # type: ignore[attr-defined]
    finally:
        provider.shutdown()
