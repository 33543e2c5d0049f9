"""Throughput of the reservation script against a plain INCRBY loop on the same Redis, same run.

The INCRBY loop is the seed's (non-atomic, unchecked) counter: the floor of what one Redis round
trip costs. The ratio says what atomicity, idempotency and expiry cost on top of it.

``await bench_reservations(settings)`` (for ``mlp bench``) or ``python -m ops.bench.reservations``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as redis

from events.model import utc_now
from mlp.cache import create_redis
from mlp.settings import Settings, get_settings
from quota.ledger import EmptyLedgerSource, RedisLedger
from quota.plans import MAX_LIMIT, Limits


@dataclass(frozen=True, slots=True)
class ReservationBench:
    operations: int
    concurrency: int
    reserve_per_s: float
    incrby_per_s: float

    @property
    def ratio(self) -> float:
        return self.reserve_per_s / self.incrby_per_s if self.incrby_per_s else 0.0

    def summary(self) -> str:
        return (
            f"quota reserve script: {self.reserve_per_s:,.0f}/s vs plain INCRBY: {self.incrby_per_s:,.0f}/s "
            f"(ratio {self.ratio:.2f}; {self.operations} ops, concurrency {self.concurrency})"
        )


async def _timed(operations: int, concurrency: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Operations per second of ``op`` run by ``concurrency`` sequential loops."""

    async def loop(worker: int) -> None:
        for i in range(worker, operations, concurrency):
            await op(i)

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(concurrency)))
    return operations / (time.perf_counter() - started)


async def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])


async def bench_reservations(
    settings: Settings, *, operations: int = 20_000, concurrency: int = 32, users: int = 100
) -> ReservationBench:
    """Reservations/s of the quota script vs INCRBY/s, against ``settings.redis_url``, in one run.

    Uses its own key prefix under ``settings.redis_prefix`` and removes it afterwards.
    """
    client = create_redis(settings)
    prefix = f"{settings.redis_prefix}bench:{uuid.uuid4().hex[:8]}:"
    ledger = RedisLedger(client, prefix, EmptyLedgerSource(), reservation_ttl_s=settings.reservation_ttl_s)
    limits = Limits("bench", MAX_LIMIT, MAX_LIMIT, MAX_LIMIT, MAX_LIMIT)
    try:
        await ledger.ensure_built(utc_now())
        await ledger.reserve("warm-up", "u0", 1, limits, utc_now())  # loads the script

        async def reserve(i: int) -> object:
            return await ledger.reserve(f"r{i}", f"u{i % users}", 10, limits, utc_now())

        async def incrby(i: int) -> object:
            return await client.incrby(f"{prefix}incr:u{i % users}", 10)

        incrby_rate = await _timed(operations, concurrency, incrby)
        reserve_rate = await _timed(operations, concurrency, reserve)
        return ReservationBench(operations, concurrency, reserve_rate, incrby_rate)
    finally:
        await _delete_prefix(client, prefix)
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.reservations", description=__doc__)
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    result = asyncio.run(bench_reservations(get_settings(), operations=args.operations, concurrency=args.concurrency))
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
