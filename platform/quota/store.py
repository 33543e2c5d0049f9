"""Postgres adapter of the quota context: plans, per-user overrides, the usage ledger.

``token_usage`` (one row per charged request) is the truth, ``token_usage_daily`` its per-day aggregate;
Redis holds a fast copy that :class:`PostgresLedgerSource` rebuilds it from.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from quota.plans import LIMIT_NAMES, Limits, Overrides, QuotaError, UnknownPlan, Window

Connection = asyncpg.Connection | PoolConnectionProxy
Executor = asyncpg.Pool | Connection

_LIMIT_COLUMNS = ", ".join(LIMIT_NAMES)


class QuotaConfigError(QuotaError):
    """The quota configuration is unusable (e.g. the default plan does not exist)."""


@dataclass(frozen=True, slots=True)
class UserQuota:
    user_id: str
    plan: str
    overrides: Overrides
    updated_at: datetime


# The plan's deadline bounds (migration 0010), read with its limits.
_TIMEOUT_COLUMNS = "max_timeout_s, default_timeout_s"


def _limits(row: asyncpg.Record, plan_column: str = "name") -> Limits:
    default = row["default_timeout_s"]
    counted = [int(row[name]) for name in LIMIT_NAMES]
    limits = Limits(row[plan_column], *counted)
    return replace(
        limits, max_timeout_s=int(row["max_timeout_s"]), default_timeout_s=None if default is None else int(default)
    )


async def list_plans(db: Executor) -> list[Limits]:
    rows = await db.fetch(
        f"SELECT name, {_LIMIT_COLUMNS}, {_TIMEOUT_COLUMNS} FROM quota_plans ORDER BY tokens_per_day, name"
    )
    return [_limits(r) for r in rows]


async def plan_names(db: Executor) -> tuple[str, ...]:
    return tuple(r["name"] for r in await db.fetch("SELECT name FROM quota_plans ORDER BY name"))


async def fetch_limits(db: Executor, user_id: str, default_plan: str) -> Limits:
    """The limits in force for ``user_id``: their plan (or the default plan) with their overrides."""
    row = await db.fetchrow(
        f"""
        SELECT p.name, {", ".join(f"COALESCE(u.{n}, p.{n}) AS {n}" for n in LIMIT_NAMES)},
               p.max_timeout_s, p.default_timeout_s
        FROM (SELECT $1::text AS user_id) AS who
        LEFT JOIN user_quotas AS u ON u.user_id = who.user_id
        JOIN quota_plans AS p ON p.name = COALESCE(u.plan, $2::text)
        """,
        user_id,
        default_plan,
    )
    if row is None:
        raise QuotaConfigError(f"the default quota plan {default_plan!r} is not in quota_plans")
    return _limits(row)


async def get_user_quota(db: Executor, user_id: str) -> UserQuota | None:
    row = await db.fetchrow(
        f"SELECT user_id, plan, {_LIMIT_COLUMNS}, updated_at FROM user_quotas WHERE user_id = $1", user_id
    )
    if row is None:
        return None
    overrides = Overrides(**{n: None if row[n] is None else int(row[n]) for n in LIMIT_NAMES})
    return UserQuota(row["user_id"], row["plan"], overrides, row["updated_at"])


async def set_user_quota(
    conn: Connection,
    user_id: str,
    *,
    plan: str | None,
    overrides: Overrides,
    clear_overrides: bool,
    default_plan: str,
) -> UserQuota:
    """Create or change a user's quota row. Unset overrides keep their stored value unless cleared."""
    async with conn.transaction():
        known = await plan_names(conn)
        if plan is not None and plan not in known:
            raise UnknownPlan(plan, known)
        current = await get_user_quota(conn, user_id)
        new_plan = plan or (current.plan if current else default_plan)
        if new_plan not in known:
            raise UnknownPlan(new_plan, known)
        kept = Overrides() if clear_overrides or current is None else current.overrides
        merged = {n: v if v is not None else kept.as_dict()[n] for n, v in overrides.as_dict().items()}
        values: list[Any] = [merged[n] for n in LIMIT_NAMES]
        await conn.execute(
            f"""
            INSERT INTO user_quotas (user_id, plan, {_LIMIT_COLUMNS}, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, now())
            ON CONFLICT (user_id) DO UPDATE SET plan = EXCLUDED.plan,
                {", ".join(f"{n} = EXCLUDED.{n}" for n in LIMIT_NAMES)}, updated_at = now()
            """,
            user_id,
            new_plan,
            *values,
        )
        stored = await get_user_quota(conn, user_id)
    assert stored is not None
    return stored


# --- the ledger, for rebuilding the Redis counters ---------------------------------------------
#
# The rebuild reads O(users x windows) rows, whatever the number of requests: the per-window totals come
# from token_usage_daily (maintained with each ledger row, exactly once: projections.postgres._APPLY_PLAN),
# plus the open reservations (requests running now). It writes no per-request record for the charged
# requests: it keeps its snapshot instead, and a script that finds no record of a request while that
# snapshot is kept asks the ledger (``charged``) whether the request was charged, and whether the rebuild
# counted it (``LedgerSnapshot.counts``).

_XID_SPACE = 1 << 32
# Transaction ids below 3 are special (invalid, bootstrap, frozen): always in every snapshot.
_FIRST_NORMAL_XID = 3


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """The rebuild's Postgres snapshot (``pg_current_snapshot()``): which transactions' rows it saw."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> LedgerSnapshot:
        """``xmin:xmax:xip,xip,...`` (pg_snapshot's text form). Pure."""
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"

    def counts(self, xmin32: int) -> bool:
        """Whether a committed row written by the transaction whose 32-bit id is ``xmin32`` (a row's
        ``xmin``) was visible in this snapshot, i.e. counted by the rebuild. Pure.

        The 32-bit id is placed in the 64-bit space nearest to the snapshot's xmax (exact for any row
        written within 2^31 transactions of the rebuild; an older row was frozen, or is visible anyway).
        ``mlp replay`` rewrites every ledger row in its own transaction: after a replay within a snapshot's
        life, rebuild the counters (``mlp reconcile --repair``) so that the snapshot is the replayed ledger's."""
        if xmin32 < _FIRST_NORMAL_XID:
            return True
        ahead = (xmin32 - self.xmax) % _XID_SPACE
        full = self.xmax + ahead if ahead < _XID_SPACE // 2 else self.xmax - (_XID_SPACE - ahead)
        return full < self.xmin or (full < self.xmax and full not in self.xip)


@dataclass(frozen=True, slots=True)
class UsageTotals:
    user_id: str
    day_tokens: int
    month_tokens: int


@dataclass(frozen=True, slots=True)
class ChargedRequest:
    """A ledger row, as the redelivery check reads it; ``xmin``: the 32-bit id of the transaction that wrote it."""

    request_id: str
    user_id: str
    total_tokens: int
    occurred_at: datetime
    xmin: int


@dataclass(frozen=True, slots=True)
class OpenReservation:
    request_id: str
    user_id: str
    reserved_tokens: int
    started_at: datetime | None


# What a rebuild reads, in this order and in one consistent snapshot: the snapshot itself, then the
# totals, then the open reservations (each in chunks).
LedgerBatch = LedgerSnapshot | list[UsageTotals] | list[OpenReservation]

_TOTALS = """
SELECT user_id,
       COALESCE(sum(total_tokens) FILTER (WHERE day = $1), 0)::bigint AS day_tokens,
       sum(total_tokens)::bigint AS month_tokens
FROM token_usage_daily
WHERE day >= $2 AND day < $3
GROUP BY user_id
"""
# Running requests not yet in the ledger still hold their reservation, unless it has expired by now.
_OPEN = """
SELECT r.request_id, r.user_id, r.reserved_tokens, r.started_at
FROM inference_requests AS r
WHERE r.status = 'running' AND r.reserved_tokens > 0 AND (r.started_at IS NULL OR r.started_at > $1)
  AND NOT EXISTS (SELECT 1 FROM token_usage AS u WHERE u.request_id = r.request_id)
"""
_CHARGED = """
SELECT request_id, user_id, total_tokens, occurred_at, xmin::text::bigint AS xmin
FROM token_usage WHERE request_id = $1
"""


class PostgresLedgerSource:
    def __init__(self, pool: asyncpg.Pool, *, chunk: int = 1_000) -> None:
        self._pool = pool
        self._chunk = chunk

    async def ledger_rows(self, day: Window, month: Window, open_since: datetime) -> AsyncGenerator[LedgerBatch, None]:
        """The snapshot, then the totals and the open reservations, streamed (a cursor each) in chunks."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield LedgerSnapshot.parse(str(await conn.fetchval("SELECT pg_current_snapshot()::text")))
            totals: list[UsageTotals] = []
            cursor = conn.cursor(_TOTALS, day.starts_at.date(), month.starts_at.date(), month.resets_at.date())
            async for r in cursor:
                totals.append(UsageTotals(r["user_id"], int(r["day_tokens"]), int(r["month_tokens"])))
                if len(totals) >= self._chunk:
                    yield totals
                    totals = []
            if totals:
                yield totals
            open_: list[OpenReservation] = []
            async for r in conn.cursor(_OPEN, open_since):
                open_.append(OpenReservation(r["request_id"], r["user_id"], int(r["reserved_tokens"]), r["started_at"]))
                if len(open_) >= self._chunk:
                    yield open_
                    open_ = []
            if open_:
                yield open_

    async def charged(self, request_id: str) -> ChargedRequest | None:
        """The request's ledger row, if it was charged."""
        row = await self._pool.fetchrow(_CHARGED, request_id)
        if row is None:
            return None
        return ChargedRequest(
            row["request_id"], row["user_id"], int(row["total_tokens"]), row["occurred_at"], int(row["xmin"])
        )


# --- usage reports ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DailyUsage:
    day: date
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int


async def daily_usage(db: Executor, user_id: str, first: date, last: date) -> list[DailyUsage]:
    rows = await db.fetch(
        """
        SELECT day, model, prompt_tokens, completion_tokens, total_tokens, requests
        FROM token_usage_daily
        WHERE user_id = $1 AND day BETWEEN $2 AND $3
        ORDER BY day, model
        """,
        user_id,
        first,
        last,
    )
    return [
        DailyUsage(
            r["day"],
            r["model"],
            int(r["prompt_tokens"]),
            int(r["completion_tokens"]),
            int(r["total_tokens"]),
            int(r["requests"]),
        )
        for r in rows
    ]
