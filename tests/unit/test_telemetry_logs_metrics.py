"""Structured logs (JSON / text, trace and request ids on every line) and the platform's metrics."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, generate_latest

from mlp import metrics
from mlp.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    bind_request_id,
    request_id_var,
    setup_logging,
    use_json,
)
from mlp.settings import Settings
from mlp.telemetry import span


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state: put the root and library loggers back afterwards."""
    names = ("", "faststream", "faststream.access.rabbit", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    level = logging.getLogger().level
    yield
    for n, (handlers, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:] = handlers
        logger.propagate = propagate
    logging.getLogger().setLevel(level)


def _record(message: str = "hello", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("mlp.test", logging.INFO, __file__, 1, message, (), None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def _format(formatter: logging.Formatter, record: logging.LogRecord, service: str = "gateway") -> str:
    ContextFilter(service).filter(record)
    return formatter.format(record)


def test_json_line_carries_service_trace_span_and_request_id() -> None:
    tracer = TracerProvider().get_tracer("test")
    with bind_request_id("req-1"), span("handle", tracer=tracer) as current:
        line = _format(JsonFormatter(), _record(user="alice"))
    entry = json.loads(line)
    ctx = current.get_span_context()
    assert entry["service"] == "gateway"
    assert entry["trace_id"] == f"{ctx.trace_id:032x}"
    assert entry["span_id"] == f"{ctx.span_id:016x}"
    assert entry["request_id"] == "req-1"
    assert entry["message"] == "hello"
    assert entry["level"] == "info"
    assert entry["user"] == "alice"  # extra= fields are kept
    assert request_id_var.get() is None  # the binding ended with the block


def test_json_line_outside_a_trace_has_no_trace_keys_and_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("mlp.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(_format(JsonFormatter(), record))
    assert "trace_id" not in entry
    assert "request_id" not in entry
    assert "ValueError: boom" in entry["exception"]


def test_explicit_request_id_wins_over_the_contextvar() -> None:
    with bind_request_id("from-context"):
        entry = json.loads(_format(JsonFormatter(), _record(request_id="explicit")))
    assert entry["request_id"] == "explicit"


def test_text_line_is_readable_with_the_ids_at_the_end() -> None:
    with bind_request_id("req-7"):
        line = _format(TextFormatter(), _record("accepted", model="basic-model"), service="gateway")
    assert " INFO  gateway mlp.test: accepted  request_id=req-7 model=basic-model" in line


@pytest.mark.parametrize(
    ("log_format", "stream", "expected"),
    [("auto", io.StringIO(), True), ("auto", _Tty(), False), ("json", _Tty(), True), ("text", io.StringIO(), False)],
)
def test_json_when_not_a_terminal_or_asked(log_format: str, stream: io.StringIO, expected: bool) -> None:
    assert use_json(log_format, stream) is expected


@pytest.mark.usefixtures("restore_logging")
def test_setup_logging_is_idempotent_and_routes_library_loggers() -> None:
    out = io.StringIO()
    setup_logging("worker", Settings(log_format="json"), stream=out)
    handler = setup_logging("worker", Settings(log_format="json"), stream=out)
    ours = [h for h in logging.getLogger().handlers if type(h) is type(handler)]
    assert ours == [handler]
    logging.getLogger("faststream").info("broker started")
    logging.getLogger("uvicorn.error").warning("server says")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["logger"], e["message"], e["service"]) for e in lines] == [
        ("faststream", "broker started", "worker"),
        ("uvicorn.error", "server says", "worker"),
    ]


# --- metrics ------------------------------------------------------------------------------------


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_projection_lag_and_projected_events() -> None:
    now = datetime(2025, 1, 1, 12, 0, 5, tzinfo=UTC)
    before = _value("mlp_events_projected_total", {"type": "InferenceCompleted"})
    metrics.record_projected("InferenceCompleted", now - timedelta(seconds=2.5), now)
    assert _value("mlp_events_projected_total", {"type": "InferenceCompleted"}) == before + 1
    assert _value("mlp_projection_lag_seconds") == 2.5
    assert metrics.lag_seconds(now + timedelta(seconds=1), now) == 0.0  # another host's clock ahead


def test_tokens_and_outcomes_are_counted_by_bounded_labels() -> None:
    prompt = _value("mlp_tokens_processed_total", {"model": "m-test", "type": "prompt"})
    completion = _value("mlp_tokens_processed_total", {"model": "m-test", "type": "completion"})
    metrics.record_tokens("m-test", 7, 11)
    assert _value("mlp_tokens_processed_total", {"model": "m-test", "type": "prompt"}) == prompt + 7
    assert _value("mlp_tokens_processed_total", {"model": "m-test", "type": "completion"}) == completion + 11
    failed = _value("mlp_outcomes_total", {"status": "failed", "error_code": "triton_timeout"})
    metrics.record_outcome("failed", "triton_timeout")
    assert _value("mlp_outcomes_total", {"status": "failed", "error_code": "triton_timeout"}) == failed + 1


def test_every_platform_metric_is_exposed_with_the_mlp_prefix() -> None:
    exposed = generate_latest(REGISTRY).decode()
    for name in (
        "mlp_requests_accepted_total",
        "mlp_requests_rejected_total",
        "mlp_inference_latency_seconds",
        "mlp_batch_size",
        "mlp_tokens_processed_total",
        "mlp_quota_rejections_total",
        "mlp_outcomes_total",
        "mlp_events_projected_total",
        "mlp_projection_lag_seconds",
    ):
        assert f"# TYPE {name} " in exposed
