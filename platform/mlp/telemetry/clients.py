"""Server and client instrumentation: FastAPI server spans, redis and gRPC aio client spans.

No-ops when tracing is off. asyncpg has its own adapter (:mod:`mlp.telemetry.asyncpg_spans`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from mlp.telemetry.sdk import Telemetry, installed

if TYPE_CHECKING:
    from fastapi import FastAPI

# Health probes and scrapes would otherwise produce a server span every few seconds.
# Regexes searched in the full URL: anchored, or "/metrics" would also hide /api/v1/metrics/token-rate.
EXCLUDED_URLS: Final = "/healthz$,/readyz$,/metrics$"
_EXCLUDED_URLS_VARS: Final = ("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS")


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
    asyncpg: pass :func:`~mlp.telemetry.asyncpg_spans.asyncpg_init_for` as the pool's ``init`` (its
    upstream instrumentation does not resolve against opentelemetry 1.45.2 / 0.66b2).
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
