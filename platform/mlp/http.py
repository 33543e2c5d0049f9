"""Shared HTTP edge pieces of the FastAPI services: the app factory, request-size limit and service runner."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Collection, Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlp import heap
from mlp.health import add_health_routes, lifespan_checks
from mlp.http_errors import install_error_handlers
from mlp.settings import ConfigurationError, Settings, get_settings
from mlp.telemetry import Telemetry, instrument_fastapi


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit():  # the server reads no more than the declared length
            if int(declared) > self.max_bytes:
                await _too_large(send, self.max_bytes)
            else:
                await self.app(scope, receive, send)
            return
        # No length declared (a chunked body): read it here, up to the limit. A limit raised from inside the
        # app's own read would reach FastAPI's body parsing, which answers any error there as 400.
        try:
            body = await read_body(receive, self.max_bytes)
        except BodyTooLarge:
            await _too_large(send, self.max_bytes)
            return
        if body is not None:  # else the client left before its body was in
            await self.app(scope, replay_body(body, receive), send)


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, max_bytes: int | None = None) -> bytes | None:
    """The whole request body from ``receive``; None if the client disconnected first."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        seen += len(chunk)
        if max_bytes is not None and seen > max_bytes:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """``receive`` with a body already read given back first, in one message."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _too_large(send: Send, max_bytes: int) -> None:
    body = f'{{"error":"payload_too_large","detail":"request body over {max_bytes} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process dies by the
    signal (exit -15/143). A drained shutdown is a clean one: let ``serve`` return 0 (fault test 8)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Also tell the app that the graceful shutdown begins: ``app.state.on_exit_signal`` (a callable that
        is safe in a signal handler), so that open-ended responses (the read API's SSE streams) end now
        instead of holding the shutdown for its whole timeout."""
        super().handle_exit(sig, frame)
        on_exit = getattr(getattr(self.config.app, "state", None), "on_exit_signal", None)
        if callable(on_exit):
            on_exit()


def native_telemetry(enabled: bool) -> TelemetryConfig | None:
    """FastAPI's own OpenTelemetry layer: off when ours is off, since it would still look up the global
    providers on every request (about 3% of the gateway's CPU in the profile)."""
    return None if enabled else {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def service_app(
    title: str, lifespan: Callable[[FastAPI], Any], tel: Telemetry, *, degradable: Collection[str] = ()
) -> FastAPI:
    """A FastAPI service with what every HTTP service has: health/readiness/metrics routes (checks from
    ``app.state.readiness``, set by the lifespan; ``degradable``: those it serves without, see mlp.health),
    one error body shape for every refusal (``mlp.http_errors``) and server spans when telemetry is on."""
    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan, telemetry=native_telemetry(tel.enabled))
    add_health_routes(app, lifespan_checks(app), degradable=degradable)
    install_error_handlers(app)
    instrument_fastapi(app, tel)
    return app


def complete_openapi(app: FastAPI, complete: Callable[[dict[str, Any]], None]) -> None:
    """Let ``complete`` add to the generated OpenAPI document what only the settings know (the served
    models, the configured limits), once, before it is first served."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            complete(generate())  # generate() caches the document in app.openapi_schema
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


def run_service(
    argv: list[str],
    *,
    service: str,
    prog: str,
    description: str,
    create_app: Callable[[Settings], Any],
    address: Callable[[Settings], tuple[str, int]],
) -> int:
    """The ``main`` of an HTTP service: flags, settings, logging, the app, uvicorn."""
    from mlp import logs  # imported here: logs imports telemetry, which is heavier than this module

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    settings = get_settings()
    logs.setup_logging(service, settings)
    try:
        app = create_app(settings)
    except ConfigurationError as exc:  # a clear sentence, not a traceback
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return 2
    host, port = address(settings)
    return serve(app, args.host or host, args.port or port, settings.graceful_timeout_s)


def serve(app: Any, host: str, port: int, graceful_timeout_s: float) -> int:
    """Run a FastAPI app with uvicorn (uvloop + httptools when installed); SIGTERM drains in-flight requests."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",
        http="auto",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(graceful_timeout_s),
        proxy_headers=True,
        log_config=None,  # keep mlp.logs' handler (structured lines with trace and request ids)
    )
    heap.settle_after_start()
    _Server(config).run()
    return 0
