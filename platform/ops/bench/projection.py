"""Throughput of the Postgres projection: batched (one transaction per batch) vs one event at a time.

Usage: ``python -m ops.bench.projection [--requests N] [--batch B]`` (against MLP_POSTGRES_DSN's
server; it creates and drops a scratch database of its own). Both runs store and project the same
kind of stream (Requested, Started, Completed per request, in a shuffled order) into the same
database, so the numbers are comparable. ``bench`` is importable (``mlp bench`` may call it).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from mlp.db import drop_database
from mlp.settings import get_settings
from projections.migrate import migrate
from projections.postgres import apply_batch
from projections.sample_events import synthetic_stream


@dataclass(frozen=True)
class BenchResult:
    events: int
    batch_size: int
    batched_events_per_s: float
    single_events_per_s: float

    @property
    def speedup(self) -> float:
        return self.batched_events_per_s / self.single_events_per_s


async def bench(dsn: str, requests: int = 2000, batch_size: int = 500) -> BenchResult:
    """Run both ways against a scratch database next to ``dsn``'s (created and dropped here)."""
    parts = urlsplit(dsn)
    scratch = urlunsplit(parts._replace(path=f"/mlp_bench_{uuid.uuid4().hex[:8]}"))
    await migrate(scratch)
    try:
        conn = await asyncpg.connect(scratch, timeout=10)
        try:
            batched = synthetic_stream(requests, seed=1)
            started = time.perf_counter()
            for i in range(0, len(batched), batch_size):
                await apply_batch(conn, batched[i : i + batch_size])
            batched_rate = len(batched) / (time.perf_counter() - started)

            single = synthetic_stream(requests, seed=2)
            started = time.perf_counter()
            for event in single:  # the plain loop: one event, one transaction, one row per statement
                await apply_batch(conn, [event])
            single_rate = len(single) / (time.perf_counter() - started)
        finally:
            await conn.close()
    finally:
        await drop_database(scratch)
    return BenchResult(len(batched), batch_size, batched_rate, single_rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_projection", description="projection throughput, batched vs single")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (3 events each)")
    parser.add_argument("--batch", type=int, default=500, help="events per batch (default 500)")
    args = parser.parse_args(argv)
    if args.requests < 1 or not 1 <= args.batch <= 10_000:
        parser.error("--requests must be >= 1 and --batch within 1..10000")
    result = asyncio.run(bench(get_settings().postgres_dsn, args.requests, args.batch))
    print(f"events per run: {result.events}")
    print(f"batched ({result.batch_size}/tx): {result.batched_events_per_s:,.0f} events/s")
    print(f"single-row loop (1/tx):   {result.single_events_per_s:,.0f} events/s")
    print(f"speed-up: x{result.speedup:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
