"""``mlp migrate``: create the database if missing and apply pending migrations."""

from __future__ import annotations

import argparse
import asyncio

from mlp.settings import get_settings
from projections.migrate import migrate


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="mlp migrate", description=__doc__).parse_args(argv)
    settings = get_settings()
    applied = asyncio.run(migrate(settings.postgres_dsn))
    where = settings.redacted(settings.postgres_dsn)
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    print(f"database {where} is up to date ({len(applied)} migration(s) applied)")
    return 0
