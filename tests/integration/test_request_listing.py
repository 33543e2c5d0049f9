"""``GET /api/v1/inference`` (listing by cursor) and ``GET /api/v1/inference/{id}/events`` on the read API,
in-process against the real Postgres and Redis; events are written by the collector's own write."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from fastapi import FastAPI

from events.model import Event, InferenceCompleted, InferenceRequested, InferenceStarted, new_event_id
from mlp.settings import Settings
from projections.listing import ListFilters, list_requests_sql
from projections.postgres import store_and_project
from projections.status_cache import StatusCache, StatusKeys
from read_api.main import create_app
from tenancy.caller import Caller
from tenancy.http import current_caller
from tests.support.apps import running

pytestmark = pytest.mark.integration

BASE = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
_clock = itertools.count()


def _user() -> str:
    return f"lister-{uuid.uuid4().hex[:8]}"


def _requested(user: str, at: datetime, model: str = "basic-model") -> InferenceRequested:
    return InferenceRequested(
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=at,
        user_id=user,
        model=model,
        prompt="p",
        max_tokens=4,
    )


def _completed(req: InferenceRequested, after: timedelta = timedelta(seconds=1)) -> InferenceCompleted:
    return InferenceCompleted(
        event_id=new_event_id(),
        request_id=req.request_id,
        occurred_at=req.occurred_at + after,
        user_id=req.user_id,
        model=req.model,
        completion="done",
        prompt_tokens=1,
        completion_tokens=2,
        latency_ms=3.0,
    )


@pytest.fixture(scope="module")
async def db(module_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def app(module_settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(module_settings)
    async with running(application) as client:
        yield application, client


@pytest.fixture
def as_caller(app: tuple[FastAPI, httpx.AsyncClient]) -> Iterator[Any]:
    application, _ = app

    def become(caller: Caller) -> None:
        application.dependency_overrides[current_caller] = lambda: caller

    yield become
    application.dependency_overrides.clear()


async def _store(db: asyncpg.Pool, events: list[Event]) -> None:
    await store_and_project(db, events)  # the collector's own write


async def _all_pages(client: httpx.AsyncClient, params: dict[str, Any], between: Any = None) -> list[str]:
    listed: list[str] = []
    cursor: str | None = None
    while True:
        page = await client.get("/api/v1/inference", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        listed += [item["request_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return listed
        if between is not None:
            await between()


async def test_pages_list_newest_first_without_gaps_or_duplicates_while_requests_arrive(
    db: asyncpg.Pool, app: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    _, client = app
    user = _user()
    # 30 requests; some share a created_at, so the request id decides between them.
    at = [BASE + timedelta(milliseconds=(i // 3)) for i in range(30)]
    requested = [_requested(user, moment) for moment in at]
    await _store(db, [*requested, *(_completed(r) for r in requested[::4])])
    expected = [r.request_id for r in sorted(requested, key=lambda r: (r.occurred_at, r.request_id), reverse=True)]

    arrivals: list[InferenceRequested] = []

    async def new_requests_arrive() -> None:
        newer = [_requested(user, BASE + timedelta(hours=1, milliseconds=next(_clock))) for _ in range(3)]
        await _store(db, list(newer))
        arrivals.extend(newer)

    listed = await _all_pages(client, {"user_id": user, "limit": 7}, between=new_requests_arrive)

    assert listed == expected  # every request once, in order: no gap, no duplicate
    assert arrivals  # requests did arrive between pages
    first = await client.get("/api/v1/inference", params={"user_id": user, "limit": 200})
    newest = [r.request_id for r in sorted(arrivals, key=lambda r: r.occurred_at, reverse=True)]
    assert [i["request_id"] for i in first.json()["items"]] == newest + expected


async def test_items_are_the_request_views_and_filters_narrow_them(
    db: asyncpg.Pool, app: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    _, client = app
    user = _user()
    early = _requested(user, BASE)
    middle = _requested(user, BASE + timedelta(minutes=1), model="other-model")
    late = _requested(user, BASE + timedelta(minutes=2))
    await _store(db, [early, middle, late, _completed(late)])

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/api/v1/inference", params={"user_id": user, **params})
        assert response.status_code == 200, response.text
        return [i["request_id"] for i in response.json()["items"]]

    assert await ids() == [late.request_id, middle.request_id, early.request_id]
    assert await ids(status="completed") == [late.request_id]
    assert await ids(status="queued") == [middle.request_id, early.request_id]
    assert await ids(model="other-model") == [middle.request_id]
    # since is inclusive, until exclusive; any offset.
    assert await ids(since=(BASE + timedelta(minutes=1)).isoformat()) == [late.request_id, middle.request_id]
    assert await ids(until="2031-03-01T12:01:00Z") == [early.request_id]
    assert await ids(until="2031-03-01T13:00:59.5+01:00") == [early.request_id]
    assert await ids(since=(BASE + timedelta(minutes=3)).isoformat(), until=BASE.isoformat()) == []  # an empty range
    page = await client.get("/api/v1/inference", params={"user_id": user, "status": "completed"})
    (item,) = page.json()["items"]
    assert item["status"] == "completed"
    assert item["user_id"] == user
    assert item["result"] == {"completion": "done"}
    assert item["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert page.json()["next_cursor"] is None


async def test_a_user_lists_only_its_own_and_an_admin_lists_anyone(
    db: asyncpg.Pool, app: tuple[FastAPI, httpx.AsyncClient], as_caller: Any
) -> None:
    _, client = app
    alice, bob = _user(), _user()
    alices = [_requested(alice, BASE + timedelta(seconds=i)) for i in range(2)]
    bobs = [_requested(bob, BASE + timedelta(seconds=i)) for i in range(3)]
    await _store(db, [*alices, *bobs])

    as_caller(Caller(user_id=alice, scope="user"))
    own = await client.get("/api/v1/inference")
    own_named = await client.get("/api/v1/inference", params={"user_id": alice})
    other = await client.get("/api/v1/inference", params={"user_id": bob})
    assert {i["request_id"] for i in own.json()["items"]} == {r.request_id for r in alices}
    assert own_named.json() == own.json()
    assert other.status_code == 403
    assert other.json()["error"] == "forbidden"

    as_caller(Caller(user_id=None, scope="admin"))
    bobs_listed = await client.get("/api/v1/inference", params={"user_id": bob})
    everyone = await client.get("/api/v1/inference", params={"limit": 200, "since": BASE.isoformat()})
    assert {i["request_id"] for i in bobs_listed.json()["items"]} == {r.request_id for r in bobs}
    assert {r.request_id for r in [*alices, *bobs]} <= {i["request_id"] for i in everyone.json()["items"]}


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"status": "lost"}, "status"),
        ({"since": "yesterday"}, "since"),
        ({"until": "0.5"}, "RFC 3339"),  # pydantic's datetime would take it as seconds since 1970
        ({"until": "2031-03-01"}, "RFC 3339"),  # a date is not a date-time
        ({"since": "2031-02-30T00:00:00Z"}, "not a real date-time"),
        ({"user_id": "a.b"}, "user_id"),
    ],
)
async def test_bad_parameters_are_refused_with_the_shared_error_body(
    app: tuple[FastAPI, httpx.AsyncClient], params: dict[str, Any], needle: str
) -> None:
    _, client = app
    response = await client.get("/api/v1/inference", params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "invalid_request"
    assert needle in body["detail"]


async def test_any_well_formed_cursor_is_a_position(app: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = app
    for cursor in ("0.a", "-999999999999999999.z", "999999999999999999.0193"):
        response = await client.get("/api/v1/inference", params={"cursor": cursor})
        assert response.status_code == 200, (cursor, response.text)


async def test_the_keyset_page_is_read_from_the_index_in_order(db: asyncpg.Pool) -> None:
    """No sort of the user's rows: the page is a backward scan of (user_id, created_at, request_id)."""
    from projections.listing import Position

    filters = ListFilters(user_id="someone", after=Position(BASE, "0193"))
    sql, args = list_requests_sql(filters, 51)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    assert "Index Scan Backward using inference_requests_user_listing" in plan, plan
    assert "Sort" not in plan, plan


# --- GET /api/v1/inference/{id}/events ------------------------------------------------------------------


async def test_the_events_are_the_event_store_stream_in_order(
    db: asyncpg.Pool, app: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    _, client = app
    req = _requested(_user(), BASE)
    started = InferenceStarted(
        event_id=new_event_id(),
        request_id=req.request_id,
        occurred_at=BASE + timedelta(milliseconds=5),
        user_id=req.user_id,
        model=req.model,
        reserved_tokens=8,
    )
    # Stored out of order, as a collector may receive them: the stream is ordered by occurrence.
    await _store(db, [_completed(req)])
    await _store(db, [started, req])

    response = await client.get(f"/api/v1/inference/{req.request_id}/events")

    assert response.status_code == 200, response.text
    body = response.json()
    rows = await db.fetch(
        "SELECT payload::text FROM event_store WHERE request_id = $1 ORDER BY occurred_at, event_id", req.request_id
    )
    assert body == {"request_id": req.request_id, "events": [msgspec.json.decode(r[0]) for r in rows]}
    assert [e["type"] for e in body["events"]] == ["InferenceRequested", "InferenceStarted", "InferenceCompleted"]
    assert body["events"][2]["prompt_tokens"] == 1


async def test_another_users_events_answer_404_like_an_unknown_request(
    db: asyncpg.Pool, app: tuple[FastAPI, httpx.AsyncClient], as_caller: Any
) -> None:
    _, client = app
    owner, stranger = _user(), _user()
    req = _requested(owner, BASE)
    await _store(db, [req])

    as_caller(Caller(user_id=stranger, scope="user"))
    theirs = await client.get(f"/api/v1/inference/{req.request_id}/events")
    unknown_id = new_event_id()
    unknown = await client.get(f"/api/v1/inference/{unknown_id}/events")
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"] == unknown.json()["error"] == "not_found"
    assert theirs.json()["detail"].replace(req.request_id, "ID") == unknown.json()["detail"].replace(unknown_id, "ID")

    as_caller(Caller(user_id=owner, scope="user"))
    assert (await client.get(f"/api/v1/inference/{req.request_id}/events")).status_code == 200
    as_caller(Caller(user_id=None, scope="admin"))
    assert (await client.get(f"/api/v1/inference/{req.request_id}/events")).status_code == 200


async def test_a_request_just_accepted_has_an_empty_trail_not_a_404(
    module_settings: Settings, app: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    _, client = app
    request_id = new_event_id()
    client_redis = redis.Redis.from_url(module_settings.redis_url, decode_responses=True)
    try:
        cache = StatusCache(client_redis, StatusKeys(module_settings.redis_prefix))
        await cache.advance(request_id, "queued", {"user_id": "fresh-user", "model": "basic-model"})
        response = await client.get(f"/api/v1/inference/{request_id}/events")
    finally:
        await client_redis.aclose()
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": request_id, "events": []}
