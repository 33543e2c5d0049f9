"""``mlp replay``: rebuild the read models and the Redis status cache from the event store."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from mlp.settings import get_settings
from projections.replay import ReplayError, replay


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mlp replay", description="Rebuild the read models and the Redis status cache from the event store."
    )
    parser.add_argument("--chunk", type=int, default=2000, help="events per projection transaction (default 2000)")
    parser.add_argument("--no-cache", action="store_true", help="do not re-populate the Redis status cache")
    args = parser.parse_args(argv)
    if not 1 <= args.chunk <= 100_000:
        parser.error("--chunk must be between 1 and 100000")
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s %(message)s")
    try:
        report = asyncio.run(replay(settings, chunk=args.chunk, with_cache=not args.no_cache))
    except ReplayError as exc:
        print(f"mlp replay: {exc}", file=sys.stderr)
        return 1
    print(
        f"replayed {report.events} event(s) into {report.requests} request(s), {report.results} result(s),"
        f" {report.usage} usage row(s); {report.cached} status cache entr(ies) written;"
        f" {report.skipped} skipped; {report.seconds:.1f}s"
    )
    return 0
