"""Client and server spans against the real services, exported over OTLP/HTTP to the test receiver.

FastAPI (server span, health excluded), Redis (real server), asyncpg (real PostgreSQL, through the
pool ``init`` hook) and a gRPC aio client call (to an in-process gRPC server, which must receive the
caller's ``traceparent`` in its metadata, as Triton does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc  # type: ignore[import-untyped]
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from mlp.cache import create_redis
from mlp.db import admin_dsn
from mlp.settings import Settings
from mlp.telemetry import (
    Telemetry,
    asyncpg_init_for,
    current_trace_id,
    current_traceparent,
    instrument_clients,
    instrument_fastapi,
    span,
    uninstrument_clients,
)
from projections.status_cache import StatusKeys
from tests.support.otlp import CollectedSpan, OtlpReceiver, one

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def telemetry(receiver: OtlpReceiver) -> Iterator[Telemetry]:
    """A provider exporting synchronously (SimpleSpanProcessor): each span is at the receiver when it ends."""
    provider = TracerProvider(resource=Resource.create({"service.name": "clients-test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")))
    yield Telemetry(service_name="clients-test", provider=provider)
    provider.shutdown()


@pytest.fixture
def instrumented(telemetry: Telemetry) -> Iterator[Telemetry]:
    instrument_clients(telemetry)
    yield telemetry
    uninstrument_clients()


def _children(spans: list[CollectedSpan], parent: CollectedSpan) -> list[CollectedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


async def test_fastapi_server_spans_skip_health(telemetry: Telemetry, receiver: OtlpReceiver) -> None:
    app = FastAPI()
    seen: dict[str, str | None] = {}

    @app.get("/api/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        seen["trace_id"] = current_trace_id()
        return {"id": thing_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def scrape() -> str:
        return ""

    @app.get("/api/v1/metrics/token-rate")
    async def token_rate() -> dict[str, int]:
        return {"tokens_per_minute": 0}

    instrument_fastapi(app, telemetry)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/api/v1/metrics/token-rate")).status_code == 200
        response = await client.get(
            "/api/v1/things/42", headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
        )
    assert response.status_code == 200
    assert seen["trace_id"] == caller_trace  # the caller's context was continued
    spans = receiver.wait_for_trace(caller_trace, names={"GET /api/v1/things/{thing_id}"})
    server = one(spans, "GET /api/v1/things/{thing_id}")
    assert server.kind == "SERVER"
    assert server.parent_span_id == "00f067aa0ba902b7"
    # Probes and scrapes are not traced; an API route under /api/v1/metrics/ is.
    receiver.wait_for(lambda all_spans: any(s.name == "GET /api/v1/metrics/token-rate" for s in all_spans))
    assert not [s for s in receiver.spans() if s.name in ("GET /healthz", "GET /metrics")]


async def test_redis_commands_are_client_spans(
    instrumented: Telemetry, receiver: OtlpReceiver, settings: Settings
) -> None:
    client = create_redis(settings)  # created after instrument_clients, as a service does
    key = StatusKeys(settings.redis_prefix).status("otel-test")
    try:
        with span("parent", tracer=instrumented.tracer):
            trace_id = current_trace_id()
            await client.set(key, "queued", ex=60)
            assert await client.get(key) == "queued"
    finally:
        await client.delete(key)
        await client.aclose()
    assert trace_id is not None
    spans = receiver.wait_for_trace(trace_id, names={"parent", "SET", "GET"})
    parent = one(spans, "parent")
    commands = {s.name: s for s in _children(spans, parent)}
    assert {"SET", "GET"} <= set(commands)
    assert commands["SET"].kind == "CLIENT"
    assert commands["SET"].attributes["db.system"] == "redis"


async def test_asyncpg_queries_are_client_spans_on_every_pooled_connection_use(
    telemetry: Telemetry, receiver: OtlpReceiver, settings: Settings
) -> None:
    pool = await asyncpg.create_pool(
        admin_dsn(settings.postgres_dsn), min_size=1, max_size=1, init=asyncpg_init_for(telemetry)
    )
    try:
        with span("parent", tracer=telemetry.tracer):
            trace_id = current_trace_id()
            assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
            # The same connection again after release: its query logger must survive the reset.
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 2") == 2
            with pytest.raises(asyncpg.UndefinedTableError):
                await pool.fetch("SELECT * FROM table_that_does_not_exist")
    finally:
        await pool.close()
    assert trace_id is not None
    spans = receiver.wait_for(
        lambda all_spans: len([s for s in all_spans if s.trace_id == trace_id and s.name == "SELECT postgres"]) >= 3
    )
    parent = one([s for s in spans if s.trace_id == trace_id], "parent")
    queries = [s for s in _children(spans, parent) if s.name == "SELECT postgres"]
    assert [s.attributes["db.query.text"] for s in queries] == [
        "SELECT $1::int + 1",
        "SELECT 2",
        "SELECT * FROM table_that_does_not_exist",
    ]
    assert all(s.kind == "CLIENT" and s.attributes["db.system.name"] == "postgresql" for s in queries)
    assert [s.status for s in queries] == ["UNSET", "UNSET", "ERROR"]
    assert queries[2].attributes["error.code"] == "UndefinedTableError"


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    """A real gRPC aio server answering /test.Echo/Metadata with the traceparent it received."""

    async def metadata(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        received = dict(context.invocation_metadata() or ())
        return str(received.get("traceparent", "")).encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Metadata": grpc.unary_unary_rpc_method_handler(metadata)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


async def test_grpc_aio_client_span_passes_the_trace_context_on_the_call(
    instrumented: Telemetry, receiver: OtlpReceiver, echo_server: str
) -> None:
    async with grpc.aio.insecure_channel(echo_server) as channel:  # created after instrument_clients
        call = channel.unary_unary("/test.Echo/Metadata")
        with span("infer", tracer=instrumented.tracer):
            trace_id = current_trace_id()
            caller = current_traceparent()
            received = (await call(b"")).decode()
    assert trace_id is not None
    assert caller is not None
    spans = receiver.wait_for_trace(trace_id, names={"infer", "/test.Echo/Metadata"})
    client_span = one(spans, "/test.Echo/Metadata")
    assert client_span.kind == "CLIENT"
    assert client_span.parent_span_id == one(spans, "infer").span_id
    # The server got the client span's context: its own spans (Triton's tracing) join this trace.
    assert received.split("-")[1:3] == [trace_id, client_span.span_id]
