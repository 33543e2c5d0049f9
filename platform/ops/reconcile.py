"""``mlp reconcile [--from --to] [--repair]``: prove that the books balance, from the event store (the truth).

  stream      every request of the window has exactly one terminal event and one InferenceRequested
              (a request younger than --grace may still be on its way; a poison message that named
              its request has a rejection alone);
  read_model  inference_requests, inference_results and token_usage equal a fresh projection of the
              requests' events (the collector's projector and SQL, applied to temporary tables);
  ledger      token_usage_daily equals the sums of the token_usage ledger per user, UTC day and model
              (and the ledger rows equal the committed tokens of the events: read_model above);
  redis       the quota counters equal the ledger (tokens used today and this month) plus the open
              reservations (running requests not charged yet).

The window's requests are those with an event that occurred in [--from, --to) (default: today, UTC);
their whole streams are checked. Postgres is read in one snapshot per chunk, so a collector writing
meanwhile causes no drift; Redis cannot share that snapshot, so drift is confirmed by a second look
after --settle seconds. Exit 0: zero drift rows; 1: drift (or left after --repair); 2: bad arguments.

``--repair`` rebuilds what drifted from the event store: the drifted requests' rows (re-projected under
the lock replay takes, so no event is missed), the daily aggregates from the ledger, and the Redis
counters (the quota rebuild every service runs after a Redis restart). A stream drift cannot be
repaired from the store: it is investigated (docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final, TextIO

import asyncpg
import redis.asyncio as redis

from events.model import AnyEvent, EventDecodeError, decode_event
from mlp.cache import create_redis
from mlp.settings import Settings, get_settings
from ops.drift import (
    CounterKey,
    CounterKind,
    Drift,
    Usage,
    UsageKey,
    confirmed,
    count_streams,
    counter_drift,
    expected_counters,
    ledger_drift,
    render_table,
    row_drift,
    stream_drift,
)
from projections.postgres import LIVE, Connection, Tables, apply_plan
from projections.projector import plan_events
from projections.queries import cache_fields_of_row, select_view_sql
from projections.replay import CACHE_TTL_S
from projections.status_cache import StatusCache, StatusKeys
from quota.ledger import QuotaKeys, RedisLedger
from quota.plans import day_window, month_window, to_ms
from quota.store import PostgresLedgerSource

EXIT_OK, EXIT_DRIFT = 0, 1  # 2: bad arguments (argparse)
FRESH: Final = LIVE.suffixed("_reconcile")  # temporary tables: this session's only
DEFAULT_CHUNK: Final = 2000
DEFAULT_GRACE_S: Final = 300.0
DEFAULT_SETTLE_S: Final = 2.0
# The read models compared row by row (token_usage_daily is the ledger check's).
_ROW_TABLES: Final = (LIVE.requests, LIVE.results, LIVE.usage)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def days(self) -> tuple[date, date]:
        """The UTC days the window touches (first, last)."""
        last = (self.end - timedelta(microseconds=1)).astimezone(UTC).date()
        return self.start.astimezone(UTC).date(), max(last, self.start.astimezone(UTC).date())


@dataclass
class Findings:
    drift: list[Drift] = field(default_factory=list)
    requests: int = 0
    events: int = 0
    notes: list[str] = field(default_factory=list)
    # what --repair rebuilds
    requests_to_rebuild: set[str] = field(default_factory=set)
    days_to_rebuild: set[UsageKey] = field(default_factory=set)
    counters_drifted: bool = False

    @property
    def ledger_rows_drifted(self) -> bool:
        """A token_usage row differs from the events: the counters follow the ledger, so they move too."""
        return any(d.check == "read_model" and d.key.startswith(f"{LIVE.usage}/") for d in self.drift)


# --- reading --------------------------------------------------------------------------------------


async def _create_fresh_tables(conn: Connection) -> None:
    for live, fresh in zip(LIVE.all(), FRESH.all(), strict=True):
        await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {fresh} (LIKE {live} INCLUDING ALL)")


async def window_request_ids(conn: Connection, window: Window) -> list[str]:
    """Requests with an event in the window, and read-model rows updated in it (a row without events)."""
    rows = await conn.fetch(
        f"""
        SELECT request_id FROM event_store WHERE occurred_at >= $1 AND occurred_at < $2
        UNION
        SELECT request_id FROM {LIVE.requests} WHERE updated_at >= $1 AND updated_at < $2
        ORDER BY 1
        """,
        window.start,
        window.end,
    )
    return [r["request_id"] for r in rows]


def _decode(payloads: Sequence[str]) -> tuple[list[AnyEvent], int]:
    events: list[AnyEvent] = []
    for payload in payloads:
        with contextlib.suppress(EventDecodeError):  # counted: a type newer than this reader
            events.append(decode_event(payload))
    return events, len(payloads) - len(events)


async def _rows(conn: Connection, table: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(f"SELECT * FROM {table} WHERE request_id = ANY($1::text[])", list(ids))
    return {r["request_id"]: dict(r) for r in rows}


async def _check_chunk(conn: Connection, ids: Sequence[str], now: datetime, grace_s: float, findings: Findings) -> None:
    # One snapshot: a collector stores events and projects them in one transaction, so within it the
    # events and the read models agree unless they drifted.
    async with conn.transaction(isolation="repeatable_read"):
        stored = await conn.fetch(
            "SELECT request_id, type, occurred_at, payload::text AS payload FROM event_store"
            " WHERE request_id = ANY($1::text[]) ORDER BY position",
            list(ids),
        )
        events, skipped = _decode([r["payload"] for r in stored])
        if skipped:
            findings.notes.append(f"{skipped} stored event(s) this version cannot decode (newer types?)")
        for table in FRESH.all():
            await conn.execute(f"TRUNCATE {table}")
        await apply_plan(conn, plan_events(events), FRESH)
        drift = stream_drift(
            count_streams((r["request_id"], r["type"], r["occurred_at"]) for r in stored), now, grace_s
        )
        for live, fresh in zip(_ROW_TABLES, (FRESH.requests, FRESH.results, FRESH.usage), strict=True):
            found = row_drift(live, await _rows(conn, fresh, ids), await _rows(conn, live, ids))
            findings.requests_to_rebuild |= {d.key.partition("/")[2] for d in found}
            drift += found
    findings.drift += drift
    findings.events += len(stored)


async def check_streams_and_read_models(
    conn: Connection, window: Window, now: datetime, grace_s: float, findings: Findings, chunk: int = DEFAULT_CHUNK
) -> None:
    await _create_fresh_tables(conn)
    ids = await window_request_ids(conn, window)
    findings.requests = len(ids)
    for i in range(0, len(ids), chunk):
        await _check_chunk(conn, ids[i : i + chunk], now, grace_s, findings)


def _usage(row: asyncpg.Record) -> Usage:
    return Usage(
        int(row["prompt_tokens"]), int(row["completion_tokens"]), int(row["total_tokens"]), int(row["requests"])
    )


async def check_ledger(conn: Connection, window: Window, findings: Findings) -> None:
    first, last = window.days()
    since = datetime.combine(first, time(), UTC)
    until = datetime.combine(last + timedelta(days=1), time(), UTC)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        sums = await conn.fetch(
            f"""
            SELECT user_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, model,
                   sum(prompt_tokens)::bigint AS prompt_tokens, sum(completion_tokens)::bigint AS completion_tokens,
                   sum(total_tokens)::bigint AS total_tokens, count(*)::bigint AS requests
            FROM {LIVE.usage} WHERE occurred_at >= $1 AND occurred_at < $2
            GROUP BY 1, 2, 3
            """,
            since,
            until,
        )
        daily = await conn.fetch(
            f"SELECT user_id, day, model, prompt_tokens, completion_tokens, total_tokens, requests"
            f" FROM {LIVE.daily} WHERE day BETWEEN $1 AND $2",
            first,
            last,
        )
    found = ledger_drift(
        {UsageKey(r["user_id"], r["day"], r["model"]): _usage(r) for r in sums},
        {UsageKey(r["user_id"], r["day"], r["model"]): _usage(r) for r in daily},
    )
    drifted = {d.key for d in found}
    keys = {UsageKey(r["user_id"], r["day"], r["model"]) for r in [*sums, *daily]}
    findings.days_to_rebuild |= {k for k in keys if f"token_usage_daily/{k}" in drifted}
    findings.drift += found


async def _redis_counters(
    client: redis.Redis, keys: QuotaKeys, day_id: str, month_id: str, now_ms: int
) -> dict[CounterKey, int]:
    """The counters of the current windows, and each user's live (unexpired) reservations."""
    actual: dict[CounterKey, int] = {}
    windows: tuple[tuple[CounterKind, str, str], ...] = (("used_day", "ud:", day_id), ("used_month", "um:", month_id))
    for kind, infix, window_id in windows:
        async for key in client.scan_iter(match=f"{keys.base}{infix}*", count=1000):
            user, _, window = str(key).removeprefix(keys.base + infix).rpartition(":")
            if window == window_id:  # an older window's key only waits for its expiry
                actual[CounterKey(kind, user, window)] = int(await client.get(key) or 0)
    async for key in client.scan_iter(match=f"{keys.base}rz:*", count=1000):
        user = str(key).removeprefix(keys.base + "rz:")
        live = [str(member) for member in await client.zrangebyscore(key, f"({now_ms}", "+inf")]
        if live:
            amounts = await client.hmget(keys.amounts(user), live)
            actual[CounterKey("reserved", user)] = sum(int(a or 0) for a in amounts)
    return actual


async def check_redis(
    conn: Connection, client: redis.Redis, settings: Settings, now: datetime, findings: Findings
) -> None:
    keys = QuotaKeys(settings.redis_prefix)
    if not await client.exists(keys.built):
        findings.notes.append("the quota counters are not built (the next request rebuilds them from the ledger)")
        return
    day, month = day_window(now), month_window(now)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        used = await conn.fetch(
            f"""
            SELECT user_id,
                   COALESCE(sum(total_tokens) FILTER (WHERE occurred_at >= $1 AND occurred_at < $2), 0)::bigint AS day,
                   sum(total_tokens)::bigint AS month
            FROM {LIVE.usage} WHERE occurred_at >= $3 AND occurred_at < $4 GROUP BY user_id
            """,
            day.starts_at,
            day.resets_at,
            month.starts_at,
            month.resets_at,
        )
        # As the quota rebuild counts them (quota.store.PostgresLedgerSource): running, not charged, not expired.
        held = await conn.fetch(
            f"""
            SELECT r.user_id, sum(r.reserved_tokens)::bigint AS tokens FROM {LIVE.requests} r
            WHERE r.status = 'running' AND r.reserved_tokens > 0 AND r.started_at > $1
              AND NOT EXISTS (SELECT 1 FROM {LIVE.usage} u WHERE u.request_id = r.request_id)
            GROUP BY r.user_id
            """,
            now - timedelta(seconds=settings.reservation_ttl_s),
        )
    expected = expected_counters(
        {(r["user_id"], day.id): int(r["day"]) for r in used if r["day"]},
        {(r["user_id"], month.id): int(r["month"]) for r in used},
        {r["user_id"]: int(r["tokens"]) for r in held},
    )
    found = counter_drift(expected, await _redis_counters(client, keys, day.id, month.id, to_ms(now)))
    findings.counters_drifted = findings.counters_drifted or bool(found)
    findings.drift += found


async def check(
    conn: Connection,
    client: redis.Redis,
    settings: Settings,
    window: Window,
    *,
    now: datetime | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    chunk: int = DEFAULT_CHUNK,
) -> Findings:
    """Every check once; the drift rows sorted by check and key."""
    now = now or datetime.now(UTC)
    findings = Findings()
    await check_streams_and_read_models(conn, window, now, grace_s, findings, chunk)
    await check_ledger(conn, window, findings)
    await check_redis(conn, client, settings, now, findings)
    findings.drift.sort()
    return findings


async def check_settled(
    conn: Connection, client: redis.Redis, settings: Settings, window: Window, settle_s: float, **kwargs: Any
) -> Findings:
    """``check``, and where it found drift a second look after ``settle_s``: only drift seen twice stays."""
    first = await check(conn, client, settings, window, **kwargs)
    if not first.drift or settle_s <= 0:
        return first
    await asyncio.sleep(settle_s)
    second = await check(conn, client, settings, window, **kwargs)
    second.drift = confirmed(first.drift, second.drift)
    kept = {d.key.partition("/")[2] for d in second.drift if d.check == "read_model"}
    second.requests_to_rebuild &= kept
    second.counters_drifted = any(d.check == "redis" for d in second.drift)
    ledger_keys = {d.key for d in second.drift if d.check == "ledger"}
    second.days_to_rebuild = {k for k in second.days_to_rebuild if f"token_usage_daily/{k}" in ledger_keys}
    return second


# --- repairing ------------------------------------------------------------------------------------

_DAILY_KEYS = "unnest($1::text[], $2::date[], $3::text[]) AS k(user_id, day, model)"


async def rebuild_daily(conn: Connection, keys: set[UsageKey], tables: Tables = LIVE) -> None:
    """The aggregate rows of these (user, day, model) recomputed from the ledger. Call in a transaction."""
    if not keys:
        return
    ordered = sorted(keys)
    args = ([k.user_id for k in ordered], [k.day for k in ordered], [k.model for k in ordered])
    await conn.execute(
        f"DELETE FROM {tables.daily} d USING {_DAILY_KEYS}"
        " WHERE d.user_id = k.user_id AND d.day = k.day AND d.model = k.model",
        *args,
    )
    await conn.execute(
        f"""
        INSERT INTO {tables.daily} (user_id, day, model, prompt_tokens, completion_tokens, total_tokens, requests)
        SELECT k.user_id, k.day, k.model, sum(u.prompt_tokens), sum(u.completion_tokens), sum(u.total_tokens), count(*)
        FROM {_DAILY_KEYS}
        JOIN {tables.usage} u ON u.user_id = k.user_id AND u.model = k.model
         AND u.occurred_at >= k.day::timestamp AT TIME ZONE 'UTC'
         AND u.occurred_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
        GROUP BY k.user_id, k.day, k.model
        """,
        *args,
    )


async def rebuild_requests(conn: Connection, request_ids: set[str]) -> set[UsageKey]:
    """Re-project these requests from their events into the live read models, under replay's lock (writers
    wait, readers go on), and recompute the daily rows their usage touches. Returns those (user, day, model)."""
    ids = sorted(request_ids)
    async with conn.transaction():
        await conn.execute("LOCK TABLE event_store IN EXCLUSIVE MODE")
        stored = await conn.fetch(
            "SELECT payload::text AS payload FROM event_store WHERE request_id = ANY($1::text[]) ORDER BY position",
            ids,
        )
        events, _ = _decode([r["payload"] for r in stored])
        usage_keys = "user_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, model"
        touched = await conn.fetch(f"SELECT {usage_keys} FROM {LIVE.usage} WHERE request_id = ANY($1::text[])", ids)
        for table in _ROW_TABLES:
            await conn.execute(f"DELETE FROM {table} WHERE request_id = ANY($1::text[])", ids)
        await apply_plan(conn, plan_events(events), LIVE)
        touched += await conn.fetch(f"SELECT {usage_keys} FROM {LIVE.usage} WHERE request_id = ANY($1::text[])", ids)
        days = {UsageKey(r["user_id"], r["day"], r["model"]) for r in touched}
        await rebuild_daily(conn, days)
    return days


async def restore_status_cache(conn: Connection, client: redis.Redis, settings: Settings, request_ids: set[str]) -> int:
    """The repaired requests' status cache entries, from the rebuilt rows (as replay writes them)."""
    rows = await conn.fetch(select_view_sql() + "WHERE r.request_id = ANY($1::text[])", sorted(request_ids))
    cache = StatusCache(client, StatusKeys(settings.redis_prefix), ttl_s=CACHE_TTL_S)
    return await cache.restore_many([(r["request_id"], cache_fields_of_row(r)) for r in rows])


async def rebuild_counters(client: redis.Redis, settings: Settings, now: datetime) -> None:
    """The quota rebuild of a Redis restart: the marker goes, and the counters are rebuilt from the ledger
    under the rebuild lock (services wait for it meanwhile, as they do after a restart)."""
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2, timeout=10)
    assert pool is not None
    try:
        ledger = RedisLedger(
            client,
            settings.redis_prefix,
            PostgresLedgerSource(pool),
            reservation_ttl_s=settings.reservation_ttl_s,
            committed_ttl_s=settings.quota_committed_ttl_s,
            lock_ttl_s=settings.quota_rebuild_lock_ttl_s,
        )
        await client.delete(ledger.keys.built)
        await ledger.ensure_built(now)
    finally:
        await pool.close()


@dataclass
class Repaired:
    requests: int = 0
    daily_rows: int = 0
    cache_entries: int = 0
    counters: bool = False

    def describe(self) -> str:
        return (
            f"repaired: {self.requests} request(s) re-projected, {self.daily_rows} daily row(s) recomputed,"
            f" {self.cache_entries} status cache entr(ies) restored,"
            f" counters rebuilt: {'yes' if self.counters else 'no'}"
        )


async def repair(conn: Connection, client: redis.Redis, settings: Settings, findings: Findings) -> Repaired:
    done = Repaired()
    days: set[UsageKey] = set()
    if findings.requests_to_rebuild:
        days = await rebuild_requests(conn, findings.requests_to_rebuild)  # their daily rows included
        done.requests = len(findings.requests_to_rebuild)
        done.cache_entries = await restore_status_cache(conn, client, settings, findings.requests_to_rebuild)
    if findings.days_to_rebuild - days:
        async with conn.transaction():
            await rebuild_daily(conn, findings.days_to_rebuild - days)
    done.daily_rows = len(days | findings.days_to_rebuild)
    if findings.counters_drifted or findings.ledger_rows_drifted:
        await rebuild_counters(client, settings, datetime.now(UTC))
        done.counters = True
    return done


# --- the command ----------------------------------------------------------------------------------


def parse_moment(text: str) -> datetime:
    """An ISO date (midnight UTC) or date-time (UTC when it names no zone)."""
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def default_window(now: datetime) -> Window:
    return Window(datetime.combine(now.astimezone(UTC).date(), time(), UTC), now + timedelta(seconds=1))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlp reconcile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from", dest="start", type=parse_moment, help="window start (ISO date or time; default today 00:00 UTC)"
    )
    parser.add_argument("--to", dest="end", type=parse_moment, help="window end, exclusive (default now)")
    parser.add_argument("--repair", action="store_true", help="rebuild what drifted from the event store")
    parser.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE_S, help="seconds a request may go without an outcome (default 300)"
    )
    parser.add_argument(
        "--settle", type=float, default=DEFAULT_SETTLE_S, help="seconds before the confirming second look (default 2)"
    )
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="requests per snapshot (default 2000)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


async def run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    now = datetime.now(UTC)
    window = default_window(now)
    window = Window(args.start or window.start, args.end or window.end)
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    client = create_redis(settings, max_connections=4)
    try:
        kwargs: dict[str, Any] = {"grace_s": args.grace, "chunk": args.chunk}
        findings = await check_settled(conn, client, settings, window, args.settle, **kwargs)
        report: dict[str, Any] = {
            "window": {"from": window.start.isoformat(), "to": window.end.isoformat()},
            "requests": findings.requests,
            "events": findings.events,
            "drift": [d.as_dict() for d in findings.drift],
            "notes": findings.notes,
        }
        text = [
            f"reconcile {window.start.isoformat()} .. {window.end.isoformat()}:"
            f" {findings.requests} request(s), {findings.events} event(s)",
            render_table(findings.drift),
            *(f"note: {n}" for n in findings.notes),
        ]
        left = findings.drift
        if args.repair and findings.drift:
            repaired = await repair(conn, client, settings, findings)
            after = await check_settled(conn, client, settings, window, args.settle, **kwargs)
            left = after.drift
            report["repaired"] = dataclasses.asdict(repaired)
            report["after_repair"] = [d.as_dict() for d in after.drift]
            text += [repaired.describe(), "after repair:", render_table(after.drift)]
    finally:
        await client.aclose()
        await conn.close()
    out.write((json.dumps(report, indent=2) if args.json else "\n".join(text)) + "\n")
    return EXIT_DRIFT if left else EXIT_OK


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(list(argv))
    if args.chunk < 1 or args.grace < 0 or args.settle < 0:
        parser.error("--chunk must be >= 1, --grace and --settle >= 0")
    if args.start and args.end and args.start >= args.end:
        parser.error("--from must be before --to")
    return args


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, settings: Settings | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run(args, settings or get_settings(), out or sys.stdout))
