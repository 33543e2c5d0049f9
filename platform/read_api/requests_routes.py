"""Request status and result: ``GET /api/v1/inference/{request_id}`` (with ``?wait=`` long-poll).

The Redis status cache answers first (the gateway writes ``queued`` there before its 202, so a
GET right after a submit never answers 404); Postgres, the truth, answers when Redis has nothing
(expired, or after a Redis restart). Both give the same view.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response
from msgspec import json as msgspec_json

from events.request_rules import REQUEST_ID_PATTERN
from events.status import TERMINAL_STATUSES
from projections.queries import RequestView, get_request
from projections.status_cache import StatusCache, StatusCacheUnavailable
from read_api.deps import PoolDep, SettingsDep, StatusCacheDep, TerminalWaitsDep
from tenancy.http import CallerDep

router = APIRouter()
_encoder = msgspec_json.Encoder()
RequestId = Annotated[str, Path(pattern=REQUEST_ID_PATTERN)]


async def load_view(cache: StatusCache, pool: asyncpg.Pool, request_id: str) -> RequestView | None:
    try:
        cached = await cache.get(request_id)
    except StatusCacheUnavailable:  # Redis down or restarting: Postgres, the truth, answers (fault test 4)
        cached = None
    if cached is not None:
        return RequestView.from_cache(request_id, cached)
    return await get_request(pool, request_id)


# While waiting, re-read at least this often: pub/sub wake-ups are best effort.
_RECHECK_S = 0.5


@router.get("/api/v1/inference/{request_id}")
async def get_inference(
    request_id: RequestId,
    settings: SettingsDep,
    pool: PoolDep,
    cache: StatusCacheDep,
    waits: TerminalWaitsDep,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, description="seconds to wait for a terminal state")] = 0.0,
) -> Response:
    deadline = time.monotonic() + min(wait, settings.max_wait_s)
    with waits.watching(request_id) as turned_terminal:
        while True:
            view = await load_view(cache, pool, request_id)
            if view is not None and not caller.may_see_user(view.user_id or ""):
                view = None  # another user's request is answered as an unknown one, also in timing
            left = deadline - time.monotonic()
            if view is not None and (view.status in TERMINAL_STATUSES or left <= 0):
                break
            if view is None and left <= 0:
                return JSONResponse({"error": "not_found", "detail": f"no request {request_id}"}, status_code=404)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turned_terminal.wait(), min(left, _RECHECK_S))
            turned_terminal.clear()
    return Response(_encoder.encode(view), media_type="application/json")
