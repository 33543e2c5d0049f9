"""``GET /api/v1/inference/{request_id}/events``: a request's audit trail, its domain events as stored.

Another user's request answers 404 exactly like an unknown one, so the answer never tells whether a
request id exists. A request just accepted (in the status cache, not yet in the event store) has an
empty trail rather than a 404: a GET right after the 202 never answers 404.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from msgspec import json as msgspec_json
from redis.exceptions import RedisError

from mlp.http_errors import error_response, error_responses
from projections.event_log import request_events
from projections.status_cache import StatusCache
from read_api.deps import PoolDep, StatusCacheDep
from read_api.requests_routes import RequestId
from read_api.schemas import RequestEventsOut
from tenancy.http import CallerDep

router = APIRouter(tags=["requests"])
_encoder = msgspec_json.Encoder()


@router.get(
    "/api/v1/inference/{request_id}/events",
    response_model=RequestEventsOut,
    responses=error_responses(
        401, 404, 422, 503, described={404: "no such request, or another user's (the two are not told apart)"}
    ),
)
async def get_inference_events(
    request_id: RequestId, caller: CallerDep, pool: PoolDep, cache: StatusCacheDep
) -> Response:
    stored = await request_events(pool, request_id)
    if stored is not None:
        owner: str | None = stored.user_id
        payloads = stored.payloads
    else:
        owner, payloads = await accepted_owner(cache, request_id), []
    if owner is None or not caller.may_see_user(owner):
        return error_response(404, "not_found", f"no request {request_id}")
    # The stored JSON goes out as it is: no decoding and re-encoding of every event.
    body = b'{"request_id":%s,"events":[%s]}' % (_encoder.encode(request_id), ",".join(payloads).encode())
    return Response(body, media_type="application/json")


async def accepted_owner(cache: StatusCache, request_id: str) -> str | None:
    """The user of a request the status cache knows but the event store does not hold yet."""
    try:
        fields = await cache.get(request_id)
    except RedisError:
        return None
    return None if fields is None else fields.get("user_id")
