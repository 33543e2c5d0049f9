"""Tenants and keys over both APIs, in-process against the real RabbitMQ, Redis and Postgres.

Keys are made with the real ``mlp keys`` command and the gateway's admin routes; the services and the
command share one movable clock, so expiry, the rotation grace and the cache bound are checked by
moving time instead of waiting. Each test module's own database: stored keys end open mode, which
must not leak into other modules' tests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from api_gateway.main import create_app as create_gateway
from events.model import new_event_id
from mlp.settings import Settings
from ops.keys import main as keys_cli
from ops.up import describe_auth
from projections.migrate import migrate
from read_api.main import create_app as create_read_api
from tenancy.authenticator import Authenticator, AuthUnavailable, Unauthorized
from tenancy.key_store import KeyStore
from tenancy.keys import AuthNotConfigured, hash_key, pepper_of
from tests.support.apps import running
from tests.support.isolation import isolated_namespace

pytestmark = pytest.mark.integration

SEED = {"prompt": "test prompt", "model": "basic-model"}
START = datetime(2031, 3, 1, 9, 0, tzinfo=UTC)


class Clock:
    """The one clock of the services and the command in a test: moved by hand."""

    def __init__(self) -> None:
        self.at = START

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Platform:
    settings: Settings
    clock: Clock
    gateway: httpx.AsyncClient
    api: httpx.AsyncClient
    apps: tuple[FastAPI, FastAPI]

    def authenticators(self) -> list[Authenticator]:
        return [app.state.deps.authenticator for app in self.apps]


async def cli(capsys: pytest.CaptureFixture[str], settings: Settings, clock: Clock, *argv: str) -> tuple[int, str]:
    """``mlp keys ...`` (in a thread: it runs its own event loop). Returns the exit code and its stdout."""
    capsys.readouterr()
    code = await asyncio.to_thread(keys_cli, list(argv), settings, clock)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


async def create_key(capsys: pytest.CaptureFixture[str], p: Platform, *argv: str) -> str:
    code, out = await cli(capsys, p.settings, p.clock, "create", *argv)
    assert code == 0, out
    return out.strip().splitlines()[-1]  # the key: always the last line


@pytest.fixture
async def platform(module_settings: Settings) -> AsyncIterator[Platform]:
    clock = Clock()
    gateway_app = create_gateway(module_settings, clock)
    api_app = create_read_api(module_settings, clock)
    async with running(gateway_app) as gateway, running(api_app) as api:
        yield Platform(module_settings, clock, gateway, api, (gateway_app, api_app))


async def test_two_users_and_an_admin_over_both_apis(platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:
    alice = await create_key(capsys, platform, "alice")
    bob = await create_key(capsys, platform, "bob")
    admin = await create_key(capsys, platform, "ops", "--admin")
    gw, api = platform.gateway, platform.api
    # Services started open (no key yet in this database) close within their cache TTL.
    platform.clock.advance(seconds=platform.settings.auth_cache_ttl_s)

    # Submits: a key submits as its own user only; an admin key for anyone.
    mine = await gw.post("/api/v1/inference", json={**SEED, "user_id": "alice"}, headers=bearer(alice))
    theirs = await gw.post("/api/v1/inference", json={**SEED, "user_id": "bob"}, headers={"X-API-Key": bob})
    spoofed = await gw.post("/api/v1/inference", json={**SEED, "user_id": "bob"}, headers=bearer(alice))
    for_carol = await gw.post("/api/v1/inference", json={**SEED, "user_id": "carol"}, headers=bearer(admin))
    assert (mine.status_code, theirs.status_code, spoofed.status_code, for_carol.status_code) == (202, 202, 403, 202)
    assert spoofed.json()["error"] == "forbidden"
    a_id, b_id = mine.json()["request_id"], theirs.json()["request_id"]

    # A request: its owner and an admin see it; another user gets the unknown-id answer.
    assert (await api.get(f"/api/v1/inference/{a_id}", headers=bearer(alice))).json()["user_id"] == "alice"
    assert (await api.get(f"/api/v1/inference/{a_id}", headers=bearer(admin))).status_code == 200
    assert (await api.get(f"/api/v1/inference/{b_id}", headers=bearer(admin))).json()["user_id"] == "bob"
    for request_id, key in ((a_id, bob), (b_id, alice)):
        other = await api.get(f"/api/v1/inference/{request_id}", headers=bearer(key))
        assert other.status_code == 404
        assert other.json() == {"error": "not_found", "detail": f"no request {request_id}"}
    unknown_id = new_event_id()
    unknown = await api.get(f"/api/v1/inference/{unknown_id}", headers=bearer(bob))
    assert (unknown.status_code, unknown.json()) == (404, {"error": "not_found", "detail": f"no request {unknown_id}"})

    # Quota and usage: one's own, or everyone's for an admin; another user's is 403.
    for route in ("quota", "usage"):
        assert (await api.get(f"/api/v1/users/alice/{route}", headers=bearer(alice))).status_code == 200
        refused = await api.get(f"/api/v1/users/bob/{route}", headers=bearer(alice))
        assert refused.status_code == 403
        assert refused.json()["error"] == "forbidden"
        assert (await api.get(f"/api/v1/users/bob/{route}", headers=bearer(admin))).status_code == 200

    # No key, or a bad one: 401 on both APIs, with the challenge header.
    for client, method, path in (
        (gw, "POST", "/api/v1/inference"),
        (api, "GET", f"/api/v1/inference/{a_id}"),
        (api, "GET", "/api/v1/users/alice/quota"),
    ):
        for headers in (
            {},
            bearer("nonsense"),
            bearer(alice[:-2] + "xx"),
            {"X-API-Key": "mlp_000000000000_" + "x" * 43},
        ):
            answer = await client.request(method, path, json={**SEED, "user_id": "alice"}, headers=headers)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert answer.json()["error"] == "unauthorized"
            assert answer.headers["WWW-Authenticate"] == "Bearer"

    # KEDA's input stays readable without a key: an aggregate of no one's data.
    assert (await api.get("/api/v1/metrics/token-rate")).status_code == 200
    # Key management: admin scope only.
    assert (await gw.get("/api/v1/keys", headers=bearer(alice))).status_code == 403
    listed = await gw.get("/api/v1/keys", params={"user_id": "alice"}, headers=bearer(admin))
    assert listed.status_code == 200
    assert [k["user_id"] for k in listed.json()["items"]] == ["alice"]
    assert "key" not in listed.json()["items"][0]
    assert "key_hash" not in listed.json()["items"][0]


async def test_a_cli_key_works_at_once_and_a_revoked_one_stops_within_the_ttl(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    key = await create_key(capsys, platform, "dora")
    quota = "/api/v1/users/dora/quota"
    assert (await platform.api.get(quota, headers=bearer(key))).status_code == 200
    submit = {**SEED, "user_id": "dora"}
    assert (await platform.gateway.post("/api/v1/inference", json=submit, headers=bearer(key))).status_code == 202

    code, out = await cli(capsys, platform.settings, platform.clock, "revoke", key)  # the key itself names its id
    assert code == 0, out
    assert "revoked" in out
    platform.clock.advance(seconds=platform.settings.auth_cache_ttl_s)  # each replica's cache bound (<= 30 s)
    refused = await platform.api.get(quota, headers=bearer(key))
    assert (refused.status_code, refused.json()["detail"]) == (401, f"API key {key.split('_')[1]} was revoked")
    assert (await platform.gateway.post("/api/v1/inference", json=submit, headers=bearer(key))).status_code == 401
    code, out = await cli(capsys, platform.settings, platform.clock, "revoke", key.split("_")[1])
    assert (code, "already revoked" in out) == (0, True)


async def test_a_rotated_key_works_during_the_grace_period_and_fails_after_it(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    old = await create_key(capsys, platform, "erin", "--expires", "90d")
    old_id = old.split("_")[1]
    code, out = await cli(capsys, platform.settings, platform.clock, "rotate", old_id, "--grace", "24h")
    assert code == 0, out
    new = out.strip().splitlines()[-1]
    assert new.startswith("mlp_")
    assert new != old
    quota = "/api/v1/users/erin/quota"

    platform.clock.advance(hours=23, minutes=59, seconds=59)
    assert (await platform.api.get(quota, headers=bearer(old))).status_code == 200
    assert (await platform.api.get(quota, headers=bearer(new))).status_code == 200
    platform.clock.advance(seconds=1)  # inside the cache TTL: the cached answer never outlives the grace
    ended = await platform.api.get(quota, headers=bearer(old))
    assert ended.status_code == 401
    assert "grace period ended" in ended.json()["detail"]
    assert (await platform.api.get(quota, headers=bearer(new))).status_code == 200
    code, listed = await cli(capsys, platform.settings, platform.clock, "list", "erin")
    assert code == 0
    assert f"replaced by {new.split('_')[1]}" in listed
    # The new key has the old one's lifetime (90 days), counted from the rotation (a day ago now).
    platform.clock.advance(days=88)
    assert (await platform.api.get(quota, headers=bearer(new))).status_code == 200
    platform.clock.advance(days=1)
    expired = await platform.api.get(quota, headers=bearer(new))
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]


async def test_admin_routes_create_list_rotate_and_revoke(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = bearer(await create_key(capsys, platform, "root", "--admin"))
    gw = platform.gateway
    created = await gw.post("/api/v1/keys", json={"user_id": "fred", "expires_in": "30d"}, headers=admin)
    assert created.status_code == 201, created.text
    fred = created.json()
    assert (fred["user_id"], fred["scope"], fred["state"]) == ("fred", "user", "active")
    assert fred["key"].startswith(f"mlp_{fred['key_id']}_")
    assert (await platform.api.get("/api/v1/users/fred/usage", headers=bearer(fred["key"]))).status_code == 200

    rotated = await gw.post(f"/api/v1/keys/{fred['key_id']}/rotate", json={"grace": "0s"}, headers=admin)
    assert rotated.status_code == 201, rotated.text
    assert rotated.json()["old"]["replaced_by"] == rotated.json()["new"]["key_id"]
    # Through the same replica a change is seen at once; grace 0s: the old key stops now.
    assert (
        await gw.post("/api/v1/inference", json={**SEED, "user_id": "fred"}, headers=bearer(fred["key"]))
    ).status_code == 401
    again = await gw.post(f"/api/v1/keys/{fred['key_id']}/rotate", headers=admin)
    assert again.status_code == 409

    new_id = rotated.json()["new"]["key_id"]
    revoked = await gw.delete(f"/api/v1/keys/{new_id}", headers=admin)
    assert (revoked.status_code, revoked.json()["state"]) == (200, "revoked")
    new_key = rotated.json()["new"]["key"]
    assert (
        await gw.post("/api/v1/inference", json={**SEED, "user_id": "fred"}, headers=bearer(new_key))
    ).status_code == 401

    bad = [
        await gw.post("/api/v1/keys", json={"user_id": "a.b"}, headers=admin),
        await gw.post("/api/v1/keys", json={"user_id": "fred", "scope": "root"}, headers=admin),
        await gw.post("/api/v1/keys", json={"user_id": "fred", "expires_in": "99999d"}, headers=admin),
        await gw.post(f"/api/v1/keys/{new_id}/rotate", json={"grace": "31d"}, headers=admin),
    ]
    assert [b.status_code for b in bad] == [422, 422, 422, 422]
    assert (await gw.delete("/api/v1/keys/000000000000", headers=admin)).status_code == 404
    assert (await gw.delete("/api/v1/keys/not-an-id", headers=admin)).status_code == 422


async def test_the_store_keeps_a_peppered_hash_never_the_key(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    key = await create_key(capsys, platform, "gina")
    key_id = key.split("_")[1]
    assert (await platform.api.get("/api/v1/users/gina/quota", headers=bearer(key))).status_code == 200
    for authenticator in platform.authenticators():
        await authenticator.flush_last_used()
    conn = await asyncpg.connect(platform.settings.postgres_dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        dump = str(await conn.fetch("SELECT * FROM api_keys"))
    finally:
        await conn.close()
    assert row is not None
    secret = key.split("_", 2)[2]
    assert secret not in dump
    assert key not in dump
    assert bytes(row["key_hash"]) == hash_key(pepper_of(platform.settings), key)
    assert bytes(row["key_hash"]) != key.encode()
    assert row["last_used_at"] == platform.clock.at  # recorded off the request path


async def test_bootstrap_keys_authenticate_like_stored_ones_an_admin_one_reads_all(module_settings: Settings) -> None:
    keyed = module_settings.model_copy(update={"api_keys": "k-hana=hana,k-ops=ops/admin"})
    async with running(create_read_api(keyed)) as api:
        assert (await api.get("/api/v1/users/hana/quota", headers={"X-API-Key": "k-hana"})).status_code == 200
        assert (await api.get("/api/v1/users/ivan/quota", headers={"X-API-Key": "k-hana"})).status_code == 403
        assert (await api.get("/api/v1/users/ivan/quota", headers=bearer("k-ops"))).status_code == 200
        assert (await api.get("/api/v1/users/ivan/quota")).status_code == 401


async def test_development_is_open_until_a_key_exists_then_never_without_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    with isolated_namespace("open") as ns:
        settings = Settings(
            environment="development",
            postgres_dsn=ns.postgres_dsn,
            redis_url=ns.redis_url,
            redis_prefix=ns.redis_prefix,
            rabbitmq_url=ns.rabbitmq_url,
        )
        await migrate(settings.postgres_dsn)
        opened, said = await describe_auth(settings)  # what `mlp up` prints
        assert opened
        assert said.startswith("open (development")
        async with running(create_read_api(settings, clock)) as api:
            assert (await api.get("/api/v1/users/anyone/quota")).status_code == 200  # open: the seed's curl works
            assert (await api.get("/api/v1/users/anyone/quota", headers=bearer("nonsense"))).status_code == 401
            code, out = await cli(capsys, settings, clock, "create", "june")
            assert code == 0, out
            clock.advance(seconds=settings.auth_cache_ttl_s)  # every replica learns within its cache TTL
            closed = await api.get("/api/v1/users/anyone/quota")
            assert (closed.status_code, closed.json()["error"]) == (401, "unauthorized")
            june = out.strip().splitlines()[-1]
            assert (await api.get("/api/v1/users/june/quota", headers=bearer(june))).status_code == 200
        assert await describe_auth(settings) == (False, "keys required (1 stored, 0 from MLP_API_KEYS; docs/auth.md)")


async def test_production_is_never_open_and_refuses_to_start_without_a_pepper(module_settings: Settings) -> None:
    production = module_settings.model_copy(update={"environment": "production"})
    with pytest.raises(AuthNotConfigured, match="MLP_KEY_PEPPER"):
        create_read_api(production)
    with pytest.raises(AuthNotConfigured, match="MLP_KEY_PEPPER"):
        create_gateway(production)
    with isolated_namespace("prod") as ns:  # a database without any key: production still asks for one
        peppered = production.model_copy(update={"key_pepper": SecretStr("s" * 40), "postgres_dsn": ns.postgres_dsn})
        await migrate(ns.postgres_dsn)
        async with running(create_read_api(peppered)) as api:
            answer = await api.get("/api/v1/users/anyone/quota")
            assert (answer.status_code, answer.json()["error"]) == (401, "unauthorized")

    env = {**os.environ, "MLP_ENVIRONMENT": "production", "MLP_POSTGRES_DSN": module_settings.postgres_dsn}
    env.pop("MLP_KEY_PEPPER", None)
    for command in ("api", "gateway"):
        started = subprocess.run(
            [sys.executable, "-m", "ops.cli", command], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert started.returncode == 2, started.stderr
        assert "cannot start" in started.stderr
        assert "MLP_KEY_PEPPER" in started.stderr


async def test_known_keys_keep_working_while_postgres_is_unreachable_unknown_ones_get_503(
    module_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    code, out = await cli(capsys, module_settings, clock, "create", "kim")
    assert code == 0, out
    kim = out.strip().splitlines()[-1]
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=1)
    assert pool is not None
    authenticator = Authenticator(module_settings, KeyStore(pool, pepper_of(module_settings)), clock)
    await authenticator.start()
    assert (await authenticator.authenticate(kim)).user_id == "kim"
    with pytest.raises(Unauthorized):
        await authenticator.authenticate("nonsense")
    await pool.close()  # every query now fails as with Postgres down
    clock.advance(seconds=60)
    assert (await authenticator.authenticate(kim)).user_id == "kim"  # the last answer, within STALE_IF_ERROR
    with pytest.raises(AuthUnavailable):
        await authenticator.authenticate(kim[:-3] + "abc")  # never seen: not guessed
    clock.advance(minutes=5)
    with pytest.raises(AuthUnavailable):
        await authenticator.authenticate(kim)
    await authenticator.close()  # its last-use write fails quietly: bookkeeping, not auth


async def test_last_use_is_written_at_most_once_a_minute_per_key(
    module_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    code, out = await cli(capsys, module_settings, clock, "create", "lena")
    assert code == 0, out
    lena = out.strip().splitlines()[-1]
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    store = KeyStore(pool, pepper_of(module_settings))
    authenticator = Authenticator(module_settings, store, clock)
    key_id = lena.split("_")[1]

    async def last_used() -> datetime | None:
        await authenticator.flush_last_used()
        record = await store.find(key_id)
        assert record is not None
        return record.last_used_at

    try:
        await authenticator.authenticate(lena)
        assert await last_used() == START
        clock.advance(seconds=59)  # the answer is re-read from the store (TTL), the use is not re-written
        await authenticator.authenticate(lena)
        assert await last_used() == START
        clock.advance(seconds=1)
        await authenticator.authenticate(lena)
        assert await last_used() == START + timedelta(minutes=1)
    finally:
        await authenticator.close()
        await pool.close()
