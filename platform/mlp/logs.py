"""Structured logging (stdlib only): JSON lines in containers, readable text in a terminal.

Every line carries ``service``, ``trace_id``/``span_id`` (of the current span, when there is one) and
``request_id`` (from :data:`request_id_var`, which handlers set with :func:`bind_request_id`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from opentelemetry import trace

from mlp.settings import Settings

request_id_var: ContextVar[str | None] = ContextVar("mlp_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is worth keeping.
_RECORD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_CONTEXT_ATTRS: Final = ("service", "trace_id", "span_id", "request_id")
# Loggers that libraries configure with their own handlers (and propagate=False): routed to ours.
# FastStream creates `faststream.access.rabbit` lazily and adds its own handler only when none
# writing to stdout exists, so ours is attached there in advance.
_LIBRARY_LOGGERS: Final = ("faststream", "faststream.access.rabbit")
_MAX_MESSAGE_CHARS: Final = 16_384  # one runaway message must not flood the log pipeline


@contextlib.contextmanager
def bind_request_id(request_id: str | None) -> Iterator[None]:
    """Set the request id for every log line written inside the block (this task and its children)."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


class ContextFilter(logging.Filter):
    """Puts service, trace_id, span_id and request_id on every record passing the handler."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.service = self.service
        record.trace_id = trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None
        record.span_id = trace.format_span_id(ctx.span_id) if ctx.is_valid else None
        if getattr(record, "request_id", None) is None:  # an explicit extra={"request_id": ...} wins
            record.request_id = request_id_var.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(record).items()
        if k not in _RECORD_ATTRS and k not in _CONTEXT_ATTRS and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line; keys that are None are left out."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage()[:_MAX_MESSAGE_CHARS],
        }
        for key in _CONTEXT_ATTRS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``12:00:00.123 INFO  gateway api_gateway.app: message  request_id=.. trace_id=..``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-5s %(service)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tail = {k: getattr(record, k, None) for k in ("request_id", "trace_id")} | _extras(record)
        pairs = " ".join(f"{k}={v}" for k, v in tail.items() if v not in (None, ""))
        if not pairs:
            return line
        first, sep, rest = line.partition("\n")  # keep a traceback below the key=value pairs
        return f"{first}  {pairs}{sep}{rest}"


def use_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "json":
        return True
    if log_format == "text":
        return False
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


class _MlpHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second setup replaces it instead of adding one."""


def setup_logging(service_name: str, settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger for this process (idempotent); returns the installed handler.

    Pass ``log_config=None`` to uvicorn so it keeps this configuration.
    """
    out = stream if stream is not None else sys.stdout
    handler = _MlpHandler(out)
    handler.setFormatter(JsonFormatter() if use_json(settings.log_format, out) else TextFormatter())
    handler.addFilter(ContextFilter(service_name))

    root = logging.getLogger()
    for ours in [h for h in root.handlers if isinstance(h, _MlpHandler)]:
        root.removeHandler(ours)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())

    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for old in list(library.handlers):
            library.removeHandler(old)
        library.addHandler(handler)
        library.propagate = False  # it has our handler itself; propagating would print twice
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    return handler
