"""The quota/usage HTTP routes and the `mlp quota` command against the real Postgres and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime

import asyncpg
import httpx
import pytest
import redis.asyncio as redis
from fastapi import FastAPI

from mlp.settings import Settings
from ops.quota import main as quota_cli
from quota.limits_follower import LimitsFollower
from quota.service import QuotaService, QuotaSettings
from read_api.deps import pool_of, quota_of
from read_api.quota_routes import router
from tenancy.caller import OPEN
from tenancy.http import add_auth_handlers, current_caller

pytestmark = pytest.mark.integration

NOW = datetime(2030, 5, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def quota(pool: asyncpg.Pool, client: redis.Redis, migrated: Settings) -> QuotaService:
    return QuotaService(pool, client, QuotaSettings.of(migrated), lambda: NOW)


@pytest.fixture
async def http(quota: QuotaService, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(router)
    app.dependency_overrides[quota_of] = lambda: quota
    app.dependency_overrides[pool_of] = lambda: pool
    app.dependency_overrides[current_caller] = lambda: OPEN  # auth itself: tests/integration/test_tenancy.py
    add_auth_handlers(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


# --- GET /quota ------------------------------------------------------------------------------------


async def test_quota_shows_limit_used_reserved_remaining_and_reset_per_window(
    http: httpx.AsyncClient, quota: QuotaService
) -> None:
    who = user()
    await quota.reserve(f"a-{who}", who, 1000)
    await quota.commit(f"a-{who}", 400)
    await quota.reserve(f"b-{who}", who, 250)

    response = await http.get(f"/api/v1/users/{who}/quota")

    assert response.status_code == 200
    body = response.json()
    assert (body["user_id"], body["plan"], body["requests_per_minute"]) == (who, "free", 60)
    day, month = body["windows"]
    assert day == {
        "window": "day",
        "id": "2030-05-20",
        "limit": 100_000,
        "used": 400,
        "reserved": 250,
        "remaining": 100_000 - 650,
        "starts_at": "2030-05-20T00:00:00Z",
        "resets_at": "2030-05-21T00:00:00Z",
    }
    assert (month["window"], month["id"], month["used"], month["resets_at"]) == (
        "month",
        "2030-05",
        400,
        "2030-06-01T00:00:00Z",
    )


async def test_quota_refuses_a_malformed_user_id(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/v1/users/bad%20user/quota")
    assert response.status_code == 422
    assert "pattern" in response.text


# --- GET /usage --------------------------------------------------------------------------------------


async def test_usage_returns_per_day_per_model_totals(http: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    who = user()
    rows = [
        (who, date(2030, 5, 1), "basic-model", 10, 20, 30, 2),
        (who, date(2030, 5, 1), "other-model", 1, 2, 3, 1),
        (who, date(2030, 5, 3), "basic-model", 100, 200, 300, 5),
        (who, date(2030, 4, 30), "basic-model", 7, 7, 14, 1),  # outside the range
    ]
    await pool.executemany(
        "INSERT INTO token_usage_daily (user_id, day, model, prompt_tokens, completion_tokens, total_tokens,"
        " requests) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        rows,
    )

    response = await http.get(f"/api/v1/users/{who}/usage", params={"from": "2030-05-01", "to": "2030-05-31"})

    assert response.status_code == 200
    body = response.json()
    assert (body["from"], body["to"]) == ("2030-05-01", "2030-05-31")
    assert [(d["day"], d["model"], d["total_tokens"], d["requests"]) for d in body["days"]] == [
        ("2030-05-01", "basic-model", 30, 2),
        ("2030-05-01", "other-model", 3, 1),
        ("2030-05-03", "basic-model", 300, 5),
    ]
    assert body["totals"] == {"prompt_tokens": 111, "completion_tokens": 222, "total_tokens": 333, "requests": 8}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"from": "2030-05-02", "to": "2030-05-01"}, "must not be after"),
        ({"from": "2029-01-01", "to": "2030-05-01"}, "at most 366"),
        ({"from": "yesterday"}, "YYYY-MM-DD"),
        ({"to": "2030-02-30"}, "not a real date"),
    ],
)
async def test_usage_refuses_bad_ranges_with_a_clear_422(
    http: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    response = await http.get(f"/api/v1/users/{user()}/usage", params=params)
    assert response.status_code == 422
    assert message in response.json()["detail"]


async def test_usage_is_503_with_retry_after_when_postgres_cannot_answer(
    client: redis.Redis, migrated: Settings
) -> None:
    # Nothing listens on port 1: the pool (min_size=0) connects only when asked, and fails then.
    dead = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/mlp", min_size=0, max_size=1)
    assert dead is not None
    app = FastAPI()
    app.include_router(router)
    dead_quota = QuotaService(dead, client, QuotaSettings.of(migrated), lambda: NOW)
    app.dependency_overrides[quota_of] = lambda: dead_quota
    app.dependency_overrides[current_caller] = lambda: OPEN
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            response = await http.get(f"/api/v1/users/{user()}/usage")
    finally:
        await dead.close()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "quota state unavailable" in response.json()["detail"]


# --- mlp quota ---------------------------------------------------------------------------------------


def test_cli_sets_a_plan_and_overrides_and_shows_them(migrated: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    who = user()
    assert quota_cli(["set", who, "--plan", "pro"], migrated) == 0
    assert quota_cli(["set", who, "--tokens-per-day", "1234", "--requests-per-minute", "0"], migrated) == 0
    capsys.readouterr()

    assert quota_cli(["show", who], migrated) == 0
    out = capsys.readouterr().out
    assert "plan: pro" in out
    assert "overrides: tokens_per_day=1234, requests_per_minute=0" in out
    assert "tokens per day: 1,234" in out
    assert "tokens per month: 40,000,000" in out  # the pro plan's own value

    assert quota_cli(["set", who, "--clear-overrides"], migrated) == 0
    assert "overrides: none" in capsys.readouterr().out


async def test_a_cli_change_reaches_the_service_limits(
    migrated: Settings, quota: QuotaService, capsys: pytest.CaptureFixture[str]
) -> None:
    who = user()
    assert (await quota.limits_for(who)).plan == "free"
    # the CLI runs its own event loop: run it outside this one, as an operator would
    assert await asyncio.to_thread(quota_cli, ["set", who, "--plan", "enterprise"], migrated) == 0
    quota.forget_limits(who)  # services see it after their short cache (a few seconds)
    assert (await quota.limits_for(who)).plan == "enterprise"


async def followed(quota: QuotaService, migrated: Settings) -> LimitsFollower:
    follower = LimitsFollower.for_dsn(quota, migrated.postgres_dsn)
    follower.start()
    await asyncio.wait_for(follower.listening.wait(), 10)
    return follower


async def eventually(check: Callable[[], Awaitable[bool]]) -> bool:
    for _ in range(100):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_followed_cache_sees_a_cli_change_without_being_told(migrated: Settings, quota: QuotaService) -> None:
    """Cached for minutes while followed, yet the CLI's change reaches the service at once (its NOTIFY)."""
    follower = await followed(quota, migrated)
    try:
        who = user()
        assert (await quota.limits_for(who)).plan == "free"
        assert await asyncio.to_thread(quota_cli, ["set", who, "--plan", "enterprise"], migrated) == 0

        async def is_enterprise() -> bool:
            return (await quota.limits_for(who)).plan == "enterprise"

        assert await eventually(is_enterprise)
        assert await asyncio.to_thread(quota_cli, ["set", who, "--tokens-per-day", "77"], migrated) == 0

        async def has_override() -> bool:
            return (await quota.limits_for(who)).tokens_per_day == 77

        assert await eventually(has_override)
    finally:
        await follower.close()


async def test_a_plan_change_is_forgotten_for_every_user(
    migrated: Settings, quota: QuotaService, pool: asyncpg.Pool
) -> None:
    follower = await followed(quota, migrated)
    bump = "UPDATE quota_plans SET tokens_per_day = tokens_per_day + $1 WHERE name = 'free'"
    try:
        who = user()
        before = (await quota.limits_for(who)).tokens_per_day
        await pool.execute(bump, 1)
        try:

            async def moved() -> bool:
                return (await quota.limits_for(who)).tokens_per_day == before + 1

            assert await eventually(moved)
        finally:
            await pool.execute(bump, -1)  # the plan as the other tests know it
    finally:
        await follower.close()


async def test_an_unfollowed_cache_keeps_its_short_expiry(
    migrated: Settings, pool: asyncpg.Pool, client: redis.Redis
) -> None:
    """No follower: a change shows after the short expiry (here 1 s), the way it did before 0013."""
    quota = QuotaService(pool, client, QuotaSettings.of(migrated), lambda: NOW, limits_cache_s=1.0)
    who = user()
    assert (await quota.limits_for(who)).plan == "free"
    await pool.execute("INSERT INTO user_quotas (user_id, plan) VALUES ($1, 'pro')", who)  # a write of ms
    assert (await quota.limits_for(who)).plan == "free"  # cached
    await asyncio.sleep(1.1)
    assert (await quota.limits_for(who)).plan == "pro"


def test_cli_lists_the_plans(migrated: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert quota_cli(["plans"], migrated) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["free", "pro", "enterprise"]


def test_cli_unknown_plan_is_a_usage_error(migrated: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert quota_cli(["set", user(), "--plan", "gold"], migrated) == 2
    assert "unknown plan 'gold'; known plans: enterprise, free, pro" in capsys.readouterr().err


def test_cli_show_of_an_unknown_user_says_the_default_plan_applies(
    migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    who = user()
    assert quota_cli(["show", who], migrated) == 1
    err = capsys.readouterr().err
    assert f"user '{who}' has no quota settings; the default plan 'free' applies" in err


def test_cli_set_without_anything_to_set_is_a_usage_error(
    migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert quota_cli(["set", user()], migrated) == 2
    assert "nothing to set" in capsys.readouterr().err
