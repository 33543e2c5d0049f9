"""Time of the quota rebuild (Redis lost its counters) against the number of requests charged in the day.

For each size it creates a database of its own, migrates it, writes that many ledger rows (the row and its
daily aggregate, as the collector does), spread over the last 23 hours among ``--users`` users, then flushes
the bench's quota keys and rebuilds them from the ledger ``--repeat`` times (the median is reported). The
database is dropped afterwards. Only the settings' Postgres server and Redis are used, under a prefix of
the bench's own.

  python -m ops.bench.rebuild --rows 1000,10000,100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from mlp.cache import create_redis
from mlp.db import drop_database
from mlp.settings import Settings, get_settings
from projections.migrate import migrate
from projections.postgres import apply_plan
from projections.projector import ChargeUsage, plan
from quota.ledger import RedisLedger
from quota.store import PostgresLedgerSource

_INSERT_CHUNK = 5_000


@dataclass(frozen=True, slots=True)
class RebuildTiming:
    rows: int
    users: int
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> str:
        runs = ", ".join(f"{s * 1000:.0f}" for s in self.seconds)
        return (
            f"{self.rows:>8,} ledger rows, {self.users} users: rebuild {self.median_s * 1000:,.0f} ms (runs: {runs} ms)"
        )


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def _fill(pool: asyncpg.Pool, rows: int, users: int, now: datetime) -> None:
    for start in range(0, rows, _INSERT_CHUNK):
        writes = [
            ChargeUsage(
                request_id=f"bench-{i}",
                user_id=f"bench-user-{i % users}",
                model="basic-model",
                prompt_tokens=10,
                completion_tokens=20,
                total_tokens=30,
                occurred_at=now - timedelta(hours=23 * i / rows),
            )
            for i in range(start, min(rows, start + _INSERT_CHUNK))
        ]
        async with pool.acquire() as conn, conn.transaction():
            await apply_plan(conn, plan(writes))


async def time_rebuild(settings: Settings, rows: int, users: int, repeat: int) -> RebuildTiming:
    name = f"{settings.postgres_database}_rebuild_bench_{uuid.uuid4().hex[:8]}"
    dsn = _with_database(settings.postgres_dsn, name)
    prefix = f"{name}:"
    await migrate(dsn)
    client = create_redis(settings)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        now = datetime.now(UTC)
        await _fill(pool, rows, users, now)
        await pool.execute("ANALYZE")
        ledger = RedisLedger(client, prefix, PostgresLedgerSource(pool), reservation_ttl_s=settings.reservation_ttl_s)
        seconds = []
        for _ in range(repeat):
            keys = [k async for k in client.scan_iter(match=f"{prefix}quota:*", count=10_000)]
            for i in range(0, len(keys), 5_000):
                await client.unlink(*keys[i : i + 5_000])
            started = time.perf_counter()
            assert await ledger.ensure_built(now)
            seconds.append(time.perf_counter() - started)
        keys = [k async for k in client.scan_iter(match=f"{prefix}quota:*", count=10_000)]
        for i in range(0, len(keys), 5_000):
            await client.unlink(*keys[i : i + 5_000])
        return RebuildTiming(rows, users, seconds)
    finally:
        await pool.close()
        await client.aclose()
        await drop_database(dsn)


async def bench_rebuild(settings: Settings, sizes: Sequence[int], users: int, repeat: int) -> list[RebuildTiming]:
    return [await time_rebuild(settings, rows, users, repeat) for rows in sizes]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.rebuild", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000,10000,100000", help="ledger sizes, comma-separated")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.rows.split(",") if v]
    for timing in asyncio.run(bench_rebuild(get_settings(), sizes, args.users, args.repeat)):
        print(timing.summary(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
