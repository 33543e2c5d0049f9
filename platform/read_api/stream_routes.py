"""``GET /api/v1/inference/{request_id}/stream``: a request's domain events as server-sent events.

The stream replays what the event store holds, then follows live (``read_api.event_feed``: one Postgres
LISTEN per process wakes the streams, each re-reads the store), and ends after the terminal event. A
heartbeat comment (``: ping``) goes out after ``MLP_STREAM_HEARTBEAT_S`` of silence. ``Last-Event-ID`` (or
``?last_event_id=``) resumes after that event (``read_api.sse``), on any replica. A stream resumed after
its terminal event answers 204, which tells an EventSource to stop reconnecting.

Who may see it is decided as for the status: another user's request answers 404 like an unknown one, and a
request just accepted (in the status cache, not yet in the store) streams from its first stored event:
a stream opened right after the 202 never answers 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Final

import asyncpg
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from mlp.http_errors import error_response, error_responses
from projections.event_log import EventHead, payloads_of, stream_heads, stream_owner
from read_api.deps import EventFeedDep, PoolDep, SettingsDep, StatusCacheDep
from read_api.event_feed import EventFeed, TooManyStreams
from read_api.request_events_routes import accepted_owner
from read_api.requests_routes import RequestId
from read_api.sse import HEARTBEAT, ended, format_sse, parse_event_id, sent_through, unsent
from read_api.terminal_waits import wait_key
from tenancy.http import CallerDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["requests"])

# A stream re-reads the store at least this often. Only a safety net: a notification reaches a connected
# listener, and every stream re-reads when the listening connection comes back after losing it.
RECHECK_S: Final = 30.0
# A store error mid-stream is retried at the next re-read (the stream stays open, heartbeats go on).
_READ_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_STREAM_DOC: Final = (
    "One message per domain event of the request, in the event store's order: `id:` the event_id, `event:`"
    " its type, `data:` the event's JSON (as GET .../events answers it). Replays what is stored, then follows"
    " live, and ends after the terminal event; `: ping` comments keep an idle stream open."
)


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator and runs ``on_close`` when the exchange ends,
    however it ends (the terminal event, the client leaving, the server stopping)."""

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None], status_code: int = 200
    ) -> None:
        super().__init__(events, status_code=status_code, headers=_SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()


@router.get(
    "/api/v1/inference/{request_id}/stream",
    # no media type of its own: the 200 is documented as text/event-stream below, the errors as JSON
    response_class=Response,
    responses={
        200: {
            "description": _STREAM_DOC,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {"description": "resumed after the terminal event: nothing more will come (an EventSource stops)"},
        **error_responses(
            401,
            404,
            422,
            429,
            503,
            described={
                404: "no such request, or another user's (the two are not told apart)",
                422: "an invalid request id, or a Last-Event-ID that is not an event id",
                429: "the caller already holds MLP_MAX_STREAMS_PER_CALLER streams; retry after Retry-After",
            },
        ),
    },
)
async def stream_inference(
    request_id: RequestId,
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    pool: PoolDep,
    cache: StatusCacheDep,
    feed: EventFeedDep,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", description="resume after this event (what EventSource sends)")
    ] = None,
    last_event_id: Annotated[
        str | None, Query(max_length=64, description="resume after this event (when a client cannot set headers)")
    ] = None,
) -> Response:
    try:
        resume = parse_event_id(last_event_id_header or last_event_id)
    except ValueError:
        return error_response(422, "invalid_request", "Last-Event-ID must be an event id (a UUID) of this request")
    owner = await stream_owner(pool, request_id) or await accepted_owner(cache, request_id)
    if owner is None or not caller.may_see_user(owner):
        return error_response(404, "not_found", f"no request {request_id}")
    if feed.stopping:
        return error_response(503, "dependency_unavailable", "this replica is shutting down", {"Retry-After": "1"})
    try:
        lease = feed.lease(wait_key(caller, request.client.host if request.client else None))
    except TooManyStreams:
        detail = f"at most {settings.max_streams_per_caller} streams at once per caller"
        return error_response(429, "too_many_streams", detail, {"Retry-After": "1"})
    with contextlib.ExitStack() as stack:
        stack.callback(lease.release)
        woke = stack.enter_context(feed.watching(request_id))  # before the first read: no wake-up is missed
        heads = await stream_heads(pool, request_id)
        sent = sent_through(heads, resume)
        if ended(heads, sent) and not unsent(heads, sent):
            return Response(status_code=204)
        follow = _follow(
            pool,
            request_id,
            heads,
            sent,
            woke,
            feed,
            heartbeat_s=settings.stream_heartbeat_s,
            max_s=settings.max_stream_s,
        )
        response = EventStreamResponse(follow, on_close=stack.pop_all().close)
    return response


async def _follow(
    pool: asyncpg.Pool,
    request_id: str,
    heads: list[EventHead],
    sent: set[str],
    woke: asyncio.Event,
    feed: EventFeed,
    *,
    heartbeat_s: float,
    max_s: float,
) -> AsyncGenerator[bytes, None]:
    """Send what is unsent, wait for a wake-up (a notification, the re-read timer), re-read, and so on,
    until the terminal event went out, ``max_s`` passed or the process shuts down. Memory: the ids sent,
    one event, this frame."""
    deadline = time.monotonic() + max_s
    last_write = time.monotonic()
    while True:
        for chunk in await _unsent_messages(pool, heads, sent):
            yield chunk
            last_write = time.monotonic()
        if ended(heads, sent):
            return
        recheck_at = time.monotonic() + RECHECK_S
        while not woke.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            if now - last_write >= heartbeat_s:
                yield HEARTBEAT
                last_write = now = time.monotonic()
            if now >= recheck_at:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woke.wait(), min(recheck_at, last_write + heartbeat_s, deadline) - now)
        if feed.stopping:
            return
        woke.clear()  # before the re-read: a notification during it sets the event again
        try:
            heads = await stream_heads(pool, request_id)
        except _READ_ERRORS as exc:
            log.warning("stream of %s: the event store did not answer (%r); trying again", request_id, exc)


async def _unsent_messages(pool: asyncpg.Pool, heads: list[EventHead], sent: set[str]) -> list[bytes]:
    """The SSE messages of the events not sent yet, up to the terminal one (marked sent); none when the
    store does not answer now (the next re-read tries again)."""
    todo = unsent(heads, sent)
    if not todo:
        return []
    try:
        payloads = await payloads_of(pool, [head.event_id for head in todo])
    except _READ_ERRORS as exc:
        log.warning("stream: the event store did not answer (%r); trying again", exc)
        return []
    chunks: list[bytes] = []
    for head in todo:
        payload = payloads.get(head.event_id)
        if payload is None:  # the store is append-only: never, but never send a hole either
            continue
        sent.add(head.event_id)
        chunks.append(format_sse(head.event_id, head.type, payload))
        if ended([head], sent):
            break
    return chunks
