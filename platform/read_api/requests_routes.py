"""Request status and result: ``GET /api/v1/inference/{request_id}`` (with ``?wait=`` long-poll).

The Redis status cache answers first (the gateway writes ``queued`` there before its 202, so a
GET right after a submit never answers 404); Postgres, the truth, answers when Redis has nothing
(expired, or after a Redis restart). Both give the same view.

A long-poll re-reads Redis on every wake-up and timer tick, but Postgres only every
``POSTGRES_RECHECK_S``, and an id found nowhere is re-read on a backing-off timer: a flood of waits on
ids that exist nowhere would otherwise turn into a flood of Postgres queries and take the pool that
``/readyz`` and the token rate share.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Final

import asyncpg
import msgspec
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from msgspec import json as msgspec_json

from events.request_rules import REQUEST_ID_PATTERN
from events.status import TERMINAL_STATUSES
from mlp.http_errors import error_response, error_responses
from projections.queries import RequestView, get_request
from projections.queue_position import QueuePositions
from projections.status_cache import StatusCache, StatusCacheUnavailable
from read_api.deps import PoolDep, QueuePositionsDep, SettingsDep, StatusCacheDep, TerminalWaitsDep
from read_api.schemas import RequestOut
from read_api.terminal_waits import TerminalWaits, TooManyWaits, wait_key
from tenancy.caller import Caller
from tenancy.http import CallerDep

router = APIRouter(tags=["requests"])
_encoder = msgspec_json.Encoder()
RequestId = Annotated[str, Path(pattern=REQUEST_ID_PATTERN, description="the request id the submit answered with")]

# While waiting, re-read Redis at least this often: pub/sub wake-ups are best effort.
_RECHECK_S: Final = 0.5
# ... and Postgres at most this often (the first read always may).
POSTGRES_RECHECK_S: Final = 5.0


def next_recheck_s(known: bool, previous_s: float) -> float:
    """How long to sleep before the next re-read. Pure.

    A known request: every ``_RECHECK_S``. An id found nowhere: doubling up to ``POSTGRES_RECHECK_S``,
    since its terminal notification still wakes the waiter at once (``watching`` is by id, known or not);
    the timer is only the safety net for a lost notification or an id that appears later.
    """
    if known:
        return _RECHECK_S
    return min(max(previous_s, _RECHECK_S / 2) * 2, POSTGRES_RECHECK_S)


def _visible(view: RequestView | None, caller: Caller) -> RequestView | None:
    """Another user's request is answered as an unknown one (also in a long-poll's timing)."""
    return view if view is not None and caller.may_see_user(view.user_id or "") else None


async def cached_view(cache: StatusCache, request_id: str) -> RequestView | None:
    try:
        cached = await cache.get(request_id)
    except StatusCacheUnavailable:  # Redis down or restarting: Postgres, the truth, answers (fault test 4)
        return None
    return None if cached is None else RequestView.from_cache(request_id, cached)


async def load_view(cache: StatusCache, pool: asyncpg.Pool, request_id: str) -> RequestView | None:
    view = await cached_view(cache, request_id)
    return view if view is not None else await get_request(pool, request_id)


async def with_queue_position(view: RequestView, cache: StatusCache, queue: QueuePositions) -> RequestView:
    """A queued view with its ``queue_position`` and ``eta_s`` (projections.queue_position), when it has a ticket."""
    if view.status != "queued":
        return view
    standing = await queue.standing(cache.status_key(view.request_id))
    if standing is None:
        return view
    position, eta_s = standing
    return msgspec.structs.replace(view, queue_position=position, eta_s=eta_s)


async def wait_for_view(
    cache: StatusCache, pool: asyncpg.Pool, waits: TerminalWaits, request_id: str, budget_s: float, caller: Caller
) -> RequestView | None:
    """The view once terminal, or as it is when ``budget_s`` ran out; None when the request is unknown
    (or the caller's to see)."""
    deadline = time.monotonic() + budget_s
    postgres_due = time.monotonic()
    sleep_s = 0.0
    with waits.watching(request_id) as turned_terminal:
        while True:
            view = _visible(await cached_view(cache, request_id), caller)
            if view is None and time.monotonic() >= postgres_due:
                view = _visible(await get_request(pool, request_id), caller)
                postgres_due = time.monotonic() + POSTGRES_RECHECK_S
            left = deadline - time.monotonic()
            if view is not None and (view.status in TERMINAL_STATUSES or left <= 0):
                return view
            if left <= 0:
                return None
            sleep_s = next_recheck_s(view is not None, sleep_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turned_terminal.wait(), min(left, sleep_s))
            turned_terminal.clear()


@router.get(
    "/api/v1/inference/{request_id}",
    response_model=RequestOut,
    responses=error_responses(
        401,
        404,
        422,
        429,
        503,
        described={
            404: "no such request, or another user's (the two are not told apart)",
            429: "the caller already holds MLP_MAX_WAITS_PER_CALLER long-polls; retry after Retry-After",
        },
    ),
)
async def get_inference(
    request_id: RequestId,
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    pool: PoolDep,
    cache: StatusCacheDep,
    waits: TerminalWaitsDep,
    queue: QueuePositionsDep,
    wait: Annotated[
        float,
        Query(ge=0, description="seconds to wait for a terminal state (capped at the server's MLP_MAX_WAIT_S)"),
    ] = 0.0,
) -> Response:
    budget_s = min(wait, settings.max_wait_s)
    if budget_s <= 0:
        view = _visible(await load_view(cache, pool, request_id), caller)
    else:
        try:
            with waits.slot(wait_key(caller, request.client.host if request.client else None)):
                view = await wait_for_view(cache, pool, waits, request_id, budget_s, caller)
        except TooManyWaits:
            detail = f"at most {settings.max_waits_per_caller} long-polls at once per caller"
            return error_response(429, "too_many_waits", detail, {"Retry-After": "1"})
    if view is None:
        return error_response(404, "not_found", f"no request {request_id}")
    view = await with_queue_position(view, cache, queue)
    return Response(_encoder.encode(view), media_type="application/json")
