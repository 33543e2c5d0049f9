"""Each service's Postgres role (migration 0005) against the real Postgres: it can do what its service
does, through the service's own code, and nothing more.

Every role gets a LOGIN user of this run (a member, as each Deployment's user is in Kubernetes), dropped
afterwards; the group roles themselves are cluster-wide and stay, as they would on a real server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from events.model import AnyEvent, InferenceCompleted
from mlp.db import create_pool, drop_database
from mlp.settings import Settings
from projections.migrate import migrate
from projections.postgres import store_and_project, store_events
from projections.queries import get_request
from projections.replay import replay
from projections.sample_events import request_stream
from quota.plans import day_window, month_window
from quota.store import PostgresLedgerSource, UsageTotals, daily_usage, fetch_limits
from read_api.metrics_routes import token_rate
from tests.support.postgres_roles import SERVICE_ROLES, login_users
from webhooks import store as webhook_store
from webhooks.rules import Outcome

pytestmark = pytest.mark.integration

ROLES = SERVICE_ROLES
QUOTA_ROLES = ("mlp_gateway", "mlp_worker", "mlp_collector", "mlp_read_api")  # the dispatcher holds no quota
QUOTA_READS = {"SELECT"}

# The decision for every table: which service role holds which privileges on it. A table that a later
# migration adds fails test_every_table_has_decided_grants until its grants are decided here and in SQL.
EXPECTED_GRANTS: dict[str, dict[str, set[str]]] = {
    "schema_migrations": {},
    # The dispatcher reads it for one-off targets and the bindings' catch-up (0012).
    "event_store": {"mlp_collector": {"SELECT", "INSERT"}, "mlp_read_api": {"SELECT"}, "mlp_dispatcher": {"SELECT"}},
    "inference_requests": {
        "mlp_gateway": QUOTA_READS,
        "mlp_worker": QUOTA_READS,
        "mlp_collector": {"SELECT", "INSERT", "UPDATE"},
        "mlp_read_api": {"SELECT"},
    },
    "inference_results": {"mlp_collector": {"SELECT", "INSERT"}, "mlp_read_api": {"SELECT"}},
    "token_usage": {
        "mlp_gateway": QUOTA_READS,
        "mlp_worker": QUOTA_READS,
        "mlp_collector": {"SELECT", "INSERT"},
        "mlp_read_api": {"SELECT"},
    },
    "token_usage_daily": {
        "mlp_gateway": QUOTA_READS,  # the quota rebuild's per-window totals (0008)
        "mlp_worker": QUOTA_READS,
        "mlp_collector": {"SELECT", "INSERT", "UPDATE"},
        "mlp_read_api": {"SELECT"},
    },
    "quota_plans": {role: {"SELECT"} for role in QUOTA_ROLES},
    "user_quotas": {role: {"SELECT"} for role in QUOTA_ROLES},
    # The key store: read by both APIs (which record a key's last use); the gateway's admin routes write keys.
    "api_keys": {"mlp_gateway": {"SELECT", "INSERT"}, "mlp_read_api": {"SELECT"}},
    # Webhooks (0009): the gateway's routes register, list and delete endpoints and record a submit's
    # one-off target; the dispatcher reads them and works off the delivery log.
    "webhooks": {"mlp_gateway": {"SELECT", "INSERT", "DELETE"}, "mlp_dispatcher": {"SELECT"}},
    "webhook_user_secrets": {"mlp_gateway": {"SELECT", "INSERT"}, "mlp_dispatcher": {"SELECT"}},
    # The dispatcher removes a one-off target once its delivery is enqueued (0012).
    "webhook_request_targets": {"mlp_gateway": {"SELECT", "INSERT", "DELETE"}, "mlp_dispatcher": {"SELECT", "DELETE"}},
    "webhook_deliveries": {"mlp_gateway": {"SELECT"}, "mlp_dispatcher": {"SELECT", "INSERT", "UPDATE"}},
    # The users whose outcome keys the dispatcher bound (0012): its own record.
    "webhook_bindings": {"mlp_dispatcher": {"SELECT", "INSERT", "DELETE"}},
}
EXPECTED_COLUMN_GRANTS: dict[tuple[str, str], dict[str, set[str]]] = {
    ("api_keys", "last_used_at"): {"mlp_gateway": {"UPDATE"}, "mlp_read_api": {"UPDATE"}},
    ("api_keys", "revoked_at"): {"mlp_gateway": {"UPDATE"}},
    ("api_keys", "replaced_by"): {"mlp_gateway": {"UPDATE"}},
}

_TABLE_GRANTS = """
SELECT c.relname AS table_name, r.rolname AS grantee, a.privilege_type
FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
JOIN pg_roles AS r ON r.oid = a.grantee
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND r.rolname = ANY($1::text[])
"""
_COLUMN_GRANTS = """
SELECT table_name, column_name, grantee, privilege_type FROM information_schema.column_privileges
WHERE table_schema = 'public' AND grantee = ANY($1::text[])
  AND (table_name, grantee, privilege_type) NOT IN (
      SELECT table_name, grantee, privilege_type FROM information_schema.table_privileges
      WHERE table_schema = 'public')
"""
_TABLES = "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"


@pytest.fixture(scope="module")
async def login_settings(module_settings: Settings) -> AsyncIterator[dict[str, Settings]]:
    """Per role, Settings that connect as a LOGIN member of it."""
    async with login_users(module_settings.postgres_dsn) as dsns:
        yield {role: module_settings.model_copy(update={"postgres_dsn": dsn}) for role, dsn in dsns.items()}


@pytest.fixture(scope="module")
async def pools(login_settings: dict[str, Settings]) -> AsyncIterator[dict[str, asyncpg.Pool]]:
    """The services' own pool factory, one pool per role."""
    opened = {role: await create_pool(settings, max_size=2) for role, settings in login_settings.items()}
    yield opened
    for pool in opened.values():
        await pool.close()


async def _grants(conn: asyncpg.Connection) -> tuple[dict[str, dict[str, set[str]]], set[str]]:
    found: dict[str, dict[str, set[str]]] = {}
    for row in await conn.fetch(_TABLE_GRANTS, list(ROLES)):
        found.setdefault(row["table_name"], {}).setdefault(row["grantee"], set()).add(row["privilege_type"])
    tables = {row["relname"] for row in await conn.fetch(_TABLES)}
    return found, tables


async def _assert_decided_grants(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        found, tables = await _grants(conn)
        columns: dict[tuple[str, str], dict[str, set[str]]] = {}
        for row in await conn.fetch(_COLUMN_GRANTS, list(ROLES)):
            key = (row["table_name"], row["column_name"])
            columns.setdefault(key, {}).setdefault(row["grantee"], set()).add(row["privilege_type"])
    finally:
        await conn.close()
    undecided = tables - set(EXPECTED_GRANTS)
    assert not undecided, f"tables without a grants decision (migration + EXPECTED_GRANTS): {undecided}"
    for table in tables:
        assert found.get(table, {}) == EXPECTED_GRANTS[table], table
    expected_columns = {key: grants for key, grants in EXPECTED_COLUMN_GRANTS.items() if key[0] in tables}
    assert columns == expected_columns


async def _refused(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute(sql, *args)


async def test_every_table_has_decided_grants(module_settings: Settings) -> None:
    await _assert_decided_grants(module_settings.postgres_dsn)


def _completed(user_id: str) -> list[AnyEvent]:
    return request_stream(f"roles-{uuid.uuid4().hex[:12]}", user_id=user_id, outcome="completed")


async def test_collector_appends_and_projects_but_cannot_change_or_unguard_the_event_store(
    pools: dict[str, asyncpg.Pool],
) -> None:
    collector = pools["mlp_collector"]
    events = _completed("roles-alice")
    new = await store_and_project(collector, events)  # the collector's write: one transaction
    assert [e.event_id for e in new] == [e.event_id for e in events]
    request_id = events[0].request_id
    assert await collector.fetchval("SELECT status FROM inference_requests WHERE request_id = $1", request_id) == (
        "completed"
    )
    assert await collector.fetchval("SELECT count(*) FROM token_usage WHERE request_id = $1", request_id) == 1
    assert await store_and_project(collector, events) == []  # a redelivery changes nothing

    for sql in (
        "UPDATE event_store SET type = 'InferenceFailed' WHERE request_id = $1",
        "DELETE FROM event_store WHERE request_id = $1",
        "UPDATE token_usage SET total_tokens = 0 WHERE request_id = $1",
        "DELETE FROM inference_requests WHERE request_id = $1",
    ):
        await _refused(collector, sql, request_id)
    for sql in (
        "TRUNCATE event_store",  # TRUNCATE fires no row trigger: it must be refused outright
        "ALTER TABLE event_store DISABLE TRIGGER event_store_append_only",
        "DROP TRIGGER event_store_append_only ON event_store",
        "CREATE OR REPLACE FUNCTION event_store_append_only() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN NEW; END $$",
        "DROP TABLE event_store",
        "ALTER TABLE event_store RENAME TO event_store_gone",
        "SET session_replication_role = replica",  # would skip every trigger
        "CREATE TABLE collector_scratch (x int)",
        "UPDATE quota_plans SET tokens_per_day = 0",
    ):
        await _refused(collector, sql)
    assert await collector.fetchval("SELECT count(*) FROM event_store WHERE request_id = $1", request_id) == len(events)


@pytest.mark.parametrize("role", ["mlp_gateway", "mlp_worker"])
async def test_gateway_and_worker_read_the_quota_inputs_and_write_nothing(
    pools: dict[str, asyncpg.Pool], role: str
) -> None:
    pool = pools[role]
    await store_and_project(pools["mlp_collector"], _completed("roles-bob"))
    limits = await fetch_limits(pool, "roles-bob", "free")
    assert limits.plan == "free"
    now = datetime.now(UTC)
    source = PostgresLedgerSource(pool)
    users = {
        row.user_id
        async for batch in source.ledger_rows(day_window(now), month_window(now), now - timedelta(days=1))
        if isinstance(batch, list)
        for row in batch
        if isinstance(row, UsageTotals)
    }
    assert "roles-bob" in users
    assert await source.charged("roles-forged") is None  # the redelivery check reads the ledger too

    outcome = InferenceCompleted(
        event_id=str(uuid.uuid4()),
        request_id="roles-forged",
        occurred_at=now,
        user_id="roles-bob",
        model="basic-model",
        completion="forged",
        prompt_tokens=1,
        completion_tokens=1,
        latency_ms=1.0,
    )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with pool.acquire() as conn, conn.transaction():
            await store_events(conn, [outcome])  # an outcome event written as this service
    for sql in (
        "SELECT count(*) FROM event_store",
        "INSERT INTO inference_requests (request_id, user_id, model, status, updated_at)"
        " VALUES ('roles-forged', 'roles-bob', 'basic-model', 'completed', now())",
        "UPDATE user_quotas SET plan = 'enterprise'",
        "INSERT INTO user_quotas (user_id, plan) VALUES ('roles-bob', 'enterprise')",
        "DELETE FROM token_usage",
        "DROP TRIGGER event_store_append_only ON event_store",
    ):
        await _refused(pool, sql)


async def test_read_api_reads_what_it_shows_and_writes_nothing(pools: dict[str, asyncpg.Pool]) -> None:
    read_api = pools["mlp_read_api"]
    events = _completed("roles-carol")
    await store_and_project(pools["mlp_collector"], events)
    request_id = events[0].request_id

    view = await get_request(read_api, request_id)
    assert view is not None
    assert view.status == "completed"
    today = datetime.now(UTC).date()
    assert [d.requests for d in await daily_usage(read_api, "roles-carol", today, today)] == [1]
    assert (await token_rate(read_api, None))["tokens_per_minute"] >= 0
    assert await read_api.fetchval("SELECT count(*) FROM event_store WHERE request_id = $1", request_id) == len(events)

    for sql in (
        "INSERT INTO event_store (event_id, request_id, type, occurred_at, payload)"
        " VALUES (gen_random_uuid(), 'x', 'InferenceCompleted', now(), '{}')",
        "UPDATE inference_requests SET status = 'failed'",
        "DELETE FROM inference_results",
        "INSERT INTO user_quotas (user_id, plan) VALUES ('roles-carol', 'enterprise')",
        "UPDATE token_usage_daily SET total_tokens = 0",
        "TRUNCATE token_usage",
    ):
        await _refused(read_api, sql)


async def test_gateway_registers_webhooks_and_the_dispatcher_works_off_deliveries(
    pools: dict[str, asyncpg.Pool],
) -> None:
    gateway, dispatcher, collector = pools["mlp_gateway"], pools["mlp_dispatcher"], pools["mlp_collector"]
    hook, _ = await webhook_store.create_webhook(
        gateway, "roles-erin", "http://127.0.0.1:9/hook", ["InferenceCompleted"], max_per_user=5
    )
    assert "roles-erin" in await webhook_store.webhook_users(dispatcher)
    await webhook_store.record_bound(dispatcher, "roles-erin")
    assert await webhook_store.bound_users(dispatcher, "roles-erin") == {"roles-erin"}
    stream = _completed("roles-erin")
    event = stream[-1]
    assert isinstance(event, InferenceCompleted)
    await webhook_store.remember_target(gateway, event.request_id, "roles-erin", "http://127.0.0.1:9/once")
    async with collector.acquire() as conn, conn.transaction():
        await store_events(conn, stream)
    assert await webhook_store.enqueue(dispatcher, event) == 1  # the endpoint (over the bus)
    assert await webhook_store.catch_up(dispatcher, "roles-erin") == 0  # enqueued already
    assert await webhook_store.enqueue_one_off_targets(dispatcher) == 1  # the one-off target (the event store)
    await webhook_store.record_unbound(dispatcher, "roles-erin")
    claimed = await webhook_store.claim_due(dispatcher, 10, 30.0)
    assert {c.url for c in claimed} >= {"http://127.0.0.1:9/hook", "http://127.0.0.1:9/once"}
    assert all(c.secret for c in claimed)
    for due in claimed:
        outcome = Outcome("delivered", None)
        assert await webhook_store.record_attempt(dispatcher, due, outcome, status_code=200, error=None)
    assert [d.state for d in await webhook_store.webhook_deliveries(gateway, hook.webhook_id)] == ["delivered"]
    for sql in (
        "SELECT count(*) FROM api_keys",
        "INSERT INTO event_store (event_id, request_id, type, occurred_at, payload)"
        " VALUES (gen_random_uuid(), 'x', 'InferenceCompleted', now(), '{}')",
        "DELETE FROM webhooks",
        "UPDATE webhooks SET url = 'http://evil.example/'",
        "DELETE FROM webhook_deliveries",
    ):
        await _refused(dispatcher, sql)
    await _refused(gateway, "UPDATE webhook_deliveries SET state = 'pending'")
    assert await webhook_store.delete_webhook(gateway, hook.webhook_id)


async def test_replay_keeps_the_read_models_owner_and_service_grants(
    module_settings: Settings, pools: dict[str, asyncpg.Pool]
) -> None:
    owner_sql = "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'inference_requests'::regclass"
    admin = await asyncpg.connect(module_settings.postgres_dsn)
    try:
        owner = await admin.fetchval(owner_sql)
        await replay(module_settings, with_cache=False)
        assert await admin.fetchval(owner_sql) == owner
    finally:
        await admin.close()
    await _assert_decided_grants(module_settings.postgres_dsn)
    # The swapped-in tables work for the services' open pools as the old ones did.
    events = _completed("roles-dave")
    assert len(await store_and_project(pools["mlp_collector"], events)) == len(events)
    assert await get_request(pools["mlp_read_api"], events[0].request_id) is not None


async def test_the_roles_migration_runs_in_many_databases_at_once(module_settings: Settings) -> None:
    """Roles are cluster-wide: migrating several fresh databases concurrently creates each role once."""
    dsns = [
        urlunsplit(urlsplit(module_settings.postgres_dsn)._replace(path=f"/mlp_roles_{uuid.uuid4().hex[:10]}"))
        for _ in range(3)
    ]
    try:
        applied = await asyncio.gather(*(migrate(dsn) for dsn in dsns))
        assert all(5 in [m.version for m in migrations] for migrations in applied)
        for dsn in dsns:
            await _assert_decided_grants(dsn)
    finally:
        await asyncio.gather(*(drop_database(dsn) for dsn in dsns))
