"""Request status and result: ``GET /api/v1/inference/{request_id}`` (with ``?wait=`` long-poll).

The Redis status cache answers first (the gateway writes ``queued`` there before its 202, so a
GET right after a submit never answers 404); Postgres, the truth, answers when Redis has nothing
(expired, or after a Redis restart). Both give the same view.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from msgspec import json as msgspec_json
from redis.exceptions import RedisError

from events.status import TERMINAL_STATUSES
from projections.queries import RequestView, get_request
from projections.status_cache import StatusCache

router = APIRouter()
_encoder = msgspec_json.Encoder()
RequestId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_\-:@]{1,128}$")]


async def load_view(cache: StatusCache, pool: asyncpg.Pool, request_id: str) -> RequestView | None:
    try:
        cached = await cache.get(request_id)
    except RedisError:  # Redis down or restarting: Postgres, the truth, answers (fault test 4)
        cached = None
    if cached is not None:
        return RequestView.from_cache(request_id, cached)
    return await get_request(pool, request_id)


@router.get("/api/v1/inference/{request_id}")
async def get_inference(
    request: Request,
    request_id: RequestId,
    wait: Annotated[float, Query(ge=0, description="seconds to wait for a terminal state")] = 0.0,
) -> Response:
    state = request.app.state
    deadline = time.monotonic() + min(wait, state.settings.max_wait_s)
    delay = 0.02
    while True:
        view = await load_view(state.status_cache, state.pool, request_id)
        if view is not None and (view.status in TERMINAL_STATUSES or time.monotonic() >= deadline):
            break
        if view is None and time.monotonic() >= deadline:
            return JSONResponse({"error": "not_found", "detail": f"no request {request_id}"}, status_code=404)
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)
    return Response(_encoder.encode(view), media_type="application/json")
