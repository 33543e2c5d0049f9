"""Waiting for an eventual condition in tests: a bound that fails instead of hanging, not a timing goal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

DEADLINE_S = 60.0


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = DEADLINE_S, interval_s: float = 0.05
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(interval_s)
