"""The SSE stream of a request (GET /api/v1/inference/{id}/stream), against the real Postgres and Redis.

Events are stored the collector's way (``store_and_project``: migration 0011's trigger notifies at
commit). The read APIs run in-process under a real uvicorn (a stream is read while it is being written;
httpx's ASGI transport would only answer once it ended), two of them where a stream moves between replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence

import asyncpg
import httpx
import pytest
import redis.asyncio as redis
import uvicorn
from fastapi import FastAPI

from events.model import AnyEvent, new_event_id
from mlp.settings import Settings
from projections.postgres import store_and_project
from projections.sample_events import request_stream
from projections.status_cache import StatusCache, StatusKeys
from read_api.main import create_app
from read_api.sse import HEARTBEAT, TERMINAL_TYPES, format_sse
from tests.support.apps import running
from tests.support.services import free_port
from tests.support.sse import Message, messages

pytestmark = pytest.mark.integration

KEYS = "k-alice=alice,k-bob=bob"
ALICE = {"X-API-Key": "k-alice"}
BOB = {"X-API-Key": "k-bob"}


class Stream:
    """A stream being read over a real connection: its raw text so far, and whether it ended."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.text = ""
        self.ended = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for chunk in self.response.aiter_text():
                self.text += chunk
        finally:
            self.ended.set()

    def messages(self) -> list[Message]:
        return messages(self.text)

    async def until(self, count: int, timeout_s: float = 30.0) -> list[Message]:
        async with asyncio.timeout(timeout_s):
            while len(self.messages()) < count and not self.ended.is_set():
                await asyncio.sleep(0.02)
        return self.messages()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await self._task
        await self.response.aclose()


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app under a real uvicorn on a free port (lifespan included); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                await asyncio.sleep(0.02)
        await app.state.deps.event_feed.listening.wait()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, request_id: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    request = client.build_request("GET", f"/api/v1/inference/{request_id}/stream", headers=headers)
    response = await client.send(request, stream=True)
    assert response.status_code == 200, (await response.aread()).decode()
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = Stream(response)
    try:
        yield stream
    finally:
        await stream.close()


@pytest.fixture
def keyed(module_settings: Settings) -> Settings:
    return module_settings.model_copy(update={"api_keys": KEYS})


@pytest.fixture
async def pool(module_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


async def store(pool: asyncpg.Pool, events: Sequence[AnyEvent]) -> None:
    """Stored as the collector stores them (one transaction each call; the trigger notifies at commit)."""
    await store_and_project(pool, list(events))


async def stored_json(client: httpx.AsyncClient, request_id: str) -> list[dict[str, object]]:
    answer = await client.get(f"/api/v1/inference/{request_id}/events", headers=ALICE)
    assert answer.status_code == 200, answer.text
    events: list[dict[str, object]] = answer.json()["events"]
    return events


def test_an_sse_message_is_one_line_per_field_and_data_keeps_every_character() -> None:
    data = '{"completion":"a\u2028b"}'  # U+2028 is no SSE line break: it must stay inside one data line
    assert format_sse("e1", "InferenceCompleted", data) == (
        b"id: e1\nevent: InferenceCompleted\ndata: " + data.encode() + b"\n\n"
    )
    assert messages(format_sse("e2", "T", "one\ntwo").decode()) == [Message("e2", "T", "one\ntwo")]


async def test_a_completed_request_streams_all_its_events_then_ends(keyed: Settings, pool: asyncpg.Pool) -> None:
    request_id = new_event_id()
    events = request_stream(request_id, user_id="alice")
    await store(pool, events)
    async with running(create_app(keyed)) as client:  # the stream ends by itself: the ASGI transport suffices
        answer = await client.get(f"/api/v1/inference/{request_id}/stream", headers=ALICE)
        stored = await stored_json(client, request_id)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    sent = messages(answer.text)
    assert [m.id for m in sent] == [e.event_id for e in events]
    assert [m.event for m in sent] == ["InferenceRequested", "InferenceStarted", "InferenceCompleted"]
    assert [json.loads(m.data) for m in sent] == stored  # the same JSON as GET .../events
    assert sent[-1].event in TERMINAL_TYPES


async def test_a_live_request_streams_each_event_as_it_is_stored(keyed: Settings, pool: asyncpg.Pool) -> None:
    request_id = new_event_id()
    requested, started, completed = request_stream(request_id, user_id="alice")
    await store(pool, [requested])
    async with (
        serving(create_app(keyed)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        open_stream(client, request_id, ALICE) as stream,
    ):
        assert [m.id for m in await stream.until(1)] == [requested.event_id]
        await store(pool, [started])
        assert [m.event for m in await stream.until(2)] == ["InferenceRequested", "InferenceStarted"]
        assert not stream.ended.is_set()
        await store(pool, [completed])
        async with asyncio.timeout(30):
            await stream.ended.wait()  # the stream ends after the terminal event
        assert [m.id for m in stream.messages()] == [requested.event_id, started.event_id, completed.event_id]


async def test_a_stream_opened_right_after_the_202_waits_for_the_first_event(
    keyed: Settings, pool: asyncpg.Pool
) -> None:
    """The request is only in the status cache (the gateway's first entry): no 404, the stream follows."""
    request_id = new_event_id()
    cache_client = redis.Redis.from_url(keyed.redis_url, decode_responses=True)
    await StatusCache(cache_client, StatusKeys(keyed.redis_prefix)).advance(
        request_id, "queued", {"user_id": "alice", "model": "basic-model"}
    )
    await cache_client.aclose()
    events = request_stream(request_id, user_id="alice")
    async with serving(create_app(keyed)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        other = await client.get(f"/api/v1/inference/{request_id}/stream", headers=BOB)
        assert other.status_code == 404  # another user's request, just accepted: not found either
        async with open_stream(client, request_id, ALICE) as stream:
            await store(pool, events)
            async with asyncio.timeout(30):
                await stream.ended.wait()
            assert [m.id for m in stream.messages()] == [e.event_id for e in events]


async def test_unknown_others_and_bad_resume_ids_are_refused(keyed: Settings, pool: asyncpg.Pool) -> None:
    request_id = new_event_id()
    await store(pool, request_stream(request_id, user_id="alice"))
    async with running(create_app(keyed)) as client:
        unknown = await client.get(f"/api/v1/inference/{new_event_id()}/stream", headers=ALICE)
        others = await client.get(f"/api/v1/inference/{request_id}/stream", headers=BOB)
        no_key = await client.get(f"/api/v1/inference/{request_id}/stream")
        bad = await client.get(
            f"/api/v1/inference/{request_id}/stream", headers={**ALICE, "Last-Event-ID": "not-an-id"}
        )
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "not_found"
    assert others.status_code == 404  # another user's request reads as an unknown one
    assert no_key.status_code == 401
    assert bad.status_code == 422


async def test_last_event_id_resumes_after_that_event_and_after_the_terminal_one_answers_204(
    keyed: Settings, pool: asyncpg.Pool
) -> None:
    request_id = new_event_id()
    events = request_stream(request_id, user_id="alice")
    await store(pool, events)
    async with running(create_app(keyed)) as client:
        path = f"/api/v1/inference/{request_id}/stream"
        after_first = await client.get(path, headers={**ALICE, "Last-Event-ID": events[0].event_id})
        by_query = await client.get(path, params={"last_event_id": events[1].event_id}, headers=ALICE)
        after_last = await client.get(path, headers={**ALICE, "Last-Event-ID": events[-1].event_id})
        foreign = await client.get(path, headers={**ALICE, "Last-Event-ID": new_event_id()})
    assert [m.id for m in messages(after_first.text)] == [e.event_id for e in events[1:]]
    assert [m.id for m in messages(by_query.text)] == [events[2].event_id]
    assert after_last.status_code == 204  # an EventSource stops reconnecting
    assert [m.id for m in messages(foreign.text)] == [e.event_id for e in events]  # not this stream's: from the start


async def test_a_stream_begun_on_one_replica_resumes_on_another(keyed: Settings, pool: asyncpg.Pool) -> None:
    request_id = new_event_id()
    requested, started, completed = request_stream(request_id, user_id="alice")
    await store(pool, [requested])
    async with (
        serving(create_app(keyed)) as url_a,
        serving(create_app(keyed)) as url_b,
        httpx.AsyncClient(base_url=url_a, timeout=30) as a,
        httpx.AsyncClient(base_url=url_b, timeout=30) as b,
    ):
        async with open_stream(a, request_id, ALICE) as first:
            last_seen = (await first.until(1))[-1].id
        assert last_seen == requested.event_id
        await store(pool, [started])  # stored while the client was away
        assert last_seen is not None
        async with open_stream(b, request_id, {**ALICE, "Last-Event-ID": last_seen}) as resumed:
            assert [m.id for m in await resumed.until(1)] == [started.event_id]
            await store(pool, [completed])  # and B follows live from there
            async with asyncio.timeout(30):
                await resumed.ended.wait()
            assert [m.id for m in resumed.messages()] == [started.event_id, completed.event_id]


async def test_streams_beyond_the_callers_cap_answer_429_and_a_closed_one_frees_its_place(
    keyed: Settings, pool: asyncpg.Pool
) -> None:
    settings = keyed.model_copy(update={"max_streams_per_caller": 2})
    ids = [new_event_id() for _ in range(3)]
    for request_id in ids:
        await store(pool, request_stream(request_id, user_id="alice", outcome="queued"))
    app = create_app(settings)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, ids[0], ALICE) as one, open_stream(client, ids[1], ALICE):
            await one.until(1)
            over = await client.get(f"/api/v1/inference/{ids[2]}/stream", headers=ALICE)
            assert over.status_code == 429, over.text
            assert over.json()["error"] == "too_many_streams"
            assert int(over.headers["Retry-After"]) >= 1
            assert app.state.deps.event_feed.open_streams() == 2
        # Both closed by the client: their places are given back.
        async with asyncio.timeout(30):
            while app.state.deps.event_feed.open_streams():
                await asyncio.sleep(0.02)
        async with open_stream(client, ids[2], ALICE) as again:
            assert len(await again.until(1)) == 1


async def test_an_idle_stream_sends_heartbeat_comments(keyed: Settings, pool: asyncpg.Pool) -> None:
    settings = keyed.model_copy(update={"stream_heartbeat_s": 0.2})
    request_id = new_event_id()
    await store(pool, request_stream(request_id, user_id="alice", outcome="queued"))
    async with (
        serving(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        open_stream(client, request_id, ALICE) as stream,
    ):
        async with asyncio.timeout(30):
            while stream.text.count(HEARTBEAT.decode()) < 2:
                await asyncio.sleep(0.02)
        assert len(stream.messages()) == 1  # the heartbeats are comments, not messages
        assert not stream.ended.is_set()


async def test_a_shutting_down_replica_ends_its_streams_at_once_and_opens_no_more(
    keyed: Settings, pool: asyncpg.Pool
) -> None:
    """The server's SIGTERM handler calls ``app.state.on_exit_signal`` (mlp.http): a stream must not hold the
    graceful shutdown up for its whole timeout; its client resumes on another replica with Last-Event-ID."""
    request_id = new_event_id()
    await store(pool, request_stream(request_id, user_id="alice", outcome="queued"))
    app = create_app(keyed)
    async with (
        serving(app) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        open_stream(client, request_id, ALICE) as stream,
    ):
        await stream.until(1)
        app.state.on_exit_signal()
        async with asyncio.timeout(30):
            await stream.ended.wait()
        assert len(stream.messages()) == 1
        refused = await client.get(f"/api/v1/inference/{request_id}/stream", headers=ALICE)
        assert refused.status_code == 503
        assert "Retry-After" in refused.headers
