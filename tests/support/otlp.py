"""A real OTLP/HTTP trace receiver for tests (the protocol Jaeger and the OTel Collector ingest).

It listens on a free local port, accepts ``POST /v1/traces`` with an ``ExportTraceServiceRequest`` in
protobuf or in OTLP/JSON (what Triton's exporter sends), optionally gzip/deflate encoded, and keeps the
spans in memory::

    with OtlpReceiver() as receiver:
        env = {**os.environ, **receiver.env("gateway")}    # for a service subprocess
        ...
        spans = receiver.wait_for_trace(trace_id, names={"POST /api/v1/inference"}, timeout_s=30)
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

MAX_BODY_BYTES = 32 * 1024 * 1024
_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class CollectedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service_name: str
    status: str
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: tuple[str, ...] = field(default=())
    start_ns: int = 0
    end_ns: int = 0


def any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    return getattr(value, which)


def attributes_dict(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


def spans_of(request: ExportTraceServiceRequest) -> list[CollectedSpan]:
    """Flatten an export request into spans, each with its resource's service.name."""
    out: list[CollectedSpan] = []
    for resource_spans in request.resource_spans:
        resource = attributes_dict(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    CollectedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        kind=_KINDS.get(s.kind, str(s.kind)),
                        service_name=str(resource.get("service.name", "")),
                        status=_STATUS.get(s.status.code, str(s.status.code)),
                        status_message=s.status.message,
                        attributes=attributes_dict(s.attributes),
                        resource=resource,
                        events=tuple(e.name for e in s.events),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                    )
                )
    return out


def _decode_body(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def request_from_json(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/JSON export. OTLP/JSON writes trace and span ids in hex, where protobuf's JSON mapping
    of ``bytes`` reads base64: the ids are converted first."""
    data = json.loads(body)
    for resource_spans in data.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for key in _ID_FIELDS:
                        if item.get(key):
                            item[key] = base64.b64encode(bytes.fromhex(item[key])).decode()
    request = ExportTraceServiceRequest()
    json_format.ParseDict(data, request, ignore_unknown_fields=True)
    return request


class OtlpReceiver:
    """The receiver: start/stop it, or use it as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._spans: list[CollectedSpan] = []
        self._changed = threading.Condition()
        self.requests_received = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != "/v1/traces":
                    self._reply(404, b"")
                    return
                content_type = self.headers.get("Content-Type", "")
                as_json = content_type.startswith("application/json")
                if not as_json and not content_type.startswith("application/x-protobuf"):
                    self._reply(415, b"")  # OTLP/HTTP is protobuf or JSON
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY_BYTES:
                    self._reply(413 if length > 0 else 400, b"")
                    return
                raw = self.rfile.read(length)
                try:
                    body = _decode_body(raw, self.headers.get("Content-Encoding", "").lower())
                    read = request_from_json if as_json else ExportTraceServiceRequest.FromString
                    request = read(body)
                except (DecodeError, json_format.ParseError, ValueError, OSError, zlib.error):
                    self._reply(400, b"")
                    return
                receiver._add(spans_of(request))
                if as_json:
                    self._reply(200, b"{}", "application/json")
                else:
                    self._reply(200, ExportTraceServiceResponse().SerializeToString())

            def _reply(self, status: int, body: bytes, content_type: str = "application/x-protobuf") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends ``/v1/traces``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def env(self, service_name: str | None = None) -> dict[str, str]:
        """Environment for a process exporting here: fast batches, everything sampled."""
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        if service_name is not None:
            env["OTEL_SERVICE_NAME"] = service_name
        return env

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- collected spans -----------------------------------------------------------------------

    def _add(self, spans: list[CollectedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.requests_received += 1
            self._changed.notify_all()

    def spans(self) -> list[CollectedSpan]:
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        return [s for s in self.spans() if s.trace_id == trace_id]

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[CollectedSpan]], bool], timeout_s: float = 30.0
    ) -> list[CollectedSpan]:
        """Block until ``predicate(all spans)`` holds; returns the spans. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({f"{s.service_name}:{s.name}" for s in self._spans})
                    raise TimeoutError(f"spans not received within {timeout_s}s; have {names}")
                self._changed.wait(left)
            return list(self._spans)

    def wait_for_trace(
        self, trace_id: str, names: Iterable[str] = (), min_spans: int = 1, timeout_s: float = 30.0
    ) -> list[CollectedSpan]:
        """Wait until the trace holds at least ``min_spans`` spans and every name in ``names``."""
        wanted = set(names)

        def complete(spans: list[CollectedSpan]) -> bool:
            mine = [s for s in spans if s.trace_id == trace_id]
            return len(mine) >= min_spans and wanted <= {s.name for s in mine}

        return [s for s in self.wait_for(complete, timeout_s) if s.trace_id == trace_id]


def one(spans: Iterable[CollectedSpan], name: str, service: str | None = None) -> CollectedSpan:
    """The single span with this name (and service); fails clearly when there are none or several."""
    found = [s for s in spans if s.name == name and (service is None or s.service_name == service)]
    if len(found) != 1:
        raise AssertionError(f"expected one span {name!r} ({service}), found {len(found)}: {found}")
    return found[0]
