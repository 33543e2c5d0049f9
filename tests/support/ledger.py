"""Charges written to the usage ledger as the collector writes them (the row and its daily aggregate, in one
statement: projections.postgres), for tests that need a ledger without running requests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import asyncpg

from projections.postgres import apply_plan
from projections.projector import ChargeUsage, plan

# request_id, user_id, total tokens, occurred_at
Charge = tuple[str, str, int, datetime]


async def charge_ledger(pool: asyncpg.Pool, charges: Iterable[Charge], *, model: str = "basic-model") -> None:
    writes = [
        ChargeUsage(
            request_id=rid,
            user_id=who,
            model=model,
            prompt_tokens=tokens // 2,
            completion_tokens=tokens - tokens // 2,
            total_tokens=tokens,
            occurred_at=at,
        )
        for rid, who, tokens, at in charges
    ]
    async with pool.acquire() as conn, conn.transaction():
        await apply_plan(conn, plan(writes))
