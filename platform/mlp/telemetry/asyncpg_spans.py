"""asyncpg client spans, made by hand from asyncpg's query loggers.

The upstream opentelemetry-instrumentation-asyncpg has no release matching opentelemetry 1.45.2 /
0.66b2, so the pool's ``init`` adds a query logger that records each finished query as a span.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

from mlp.telemetry.context import default_tracer, mark_error
from mlp.telemetry.sdk import Telemetry, installed

if TYPE_CHECKING:
    import asyncpg


def statement_operation(query: str) -> str:
    """The SQL verb of a statement (``SELECT``, ``INSERT``, ...), for a low-cardinality span name."""
    words = query.lstrip("( \n\t").split(None, 1)
    return words[0].upper()[:32] if words else "QUERY"


# What asyncpg's pool sends on release (the subset depends on the server's capabilities).
_POOL_RESET_STATEMENTS: Final = frozenset(
    {"SELECT pg_advisory_unlock_all()", "CLOSE ALL", "UNLISTEN *", "RESET ALL", ""}
)


def is_pool_housekeeping(query: str) -> bool:
    return all(part.strip() in _POOL_RESET_STATEMENTS for part in query.split(";"))


def asyncpg_query_span(record: asyncpg.connection.LoggedQuery, tracer: Tracer | None = None) -> None:
    """Record one finished asyncpg query as a client span under the caller's current span.

    asyncpg calls query loggers via ``loop.call_soon`` with a copy of the caller's context, so the
    current span here is the one active when the query ran. Arguments are never recorded.
    """
    if not trace.get_current_span().get_span_context().is_valid:
        return  # a query outside any trace (pool warm-up, background jobs) is noise
    if is_pool_housekeeping(record.query):
        return  # the reset asyncpg runs on every release, in the releasing caller's context
    end_ns = time.time_ns()
    operation = statement_operation(record.query)
    database = str(getattr(record.conn_params, "database", "") or "")
    host, port = record.conn_addr if isinstance(record.conn_addr, tuple) else (str(record.conn_addr), None)
    attributes: dict[str, AttributeValue] = {
        "db.system.name": "postgresql",
        "db.system": "postgresql",
        "db.operation.name": operation,
        "db.query.text": record.query[:2048],
        "db.namespace": database,
        "server.address": str(host),
    }
    if port is not None:
        attributes["server.port"] = int(port)
    span = (tracer or default_tracer).start_span(
        f"{operation} {database}".strip(),
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=end_ns - int(record.elapsed * 1e9),
    )
    if record.exception is not None:
        mark_error(span, record.exception, None)
    span.end(end_time=end_ns)


class ConnectionInit(Protocol):
    """asyncpg's pool ``init`` callback."""

    async def __call__(self, connection: asyncpg.Connection[Any], /) -> None: ...


def asyncpg_init_for(telemetry: Telemetry | None = None) -> ConnectionInit | None:
    """A pool ``init`` callback adding query spans to each connection (``None`` when tracing is off)::

    asyncpg.create_pool(dsn, init=asyncpg_init_for(telemetry))
    """
    telemetry = telemetry or installed()
    if not telemetry.enabled:
        return None
    logger = functools.partial(asyncpg_query_span, tracer=telemetry.tracer)

    async def init(connection: asyncpg.Connection[Any], /) -> None:
        connection.add_query_logger(logger)

    return init
