"""Keeps a QuotaService's cached limits in step with Postgres: ``LISTEN mlp_quota_limits`` (migration 0013).

Every change of ``user_quotas`` notifies its user id, every change of ``quota_plans`` ``*``; the follower
forgets those cached limits, so ``mlp quota set`` takes effect at once and the services need not re-read
the limits of a busy user every few seconds (a third of the limit reads were per request at 500 users).
While nothing listens (the connection lost, Postgres restarting) the cache falls back to its short expiry,
and everything cached is forgotten each time the LISTEN is in place again: a change missed meanwhile is
never served for long.
"""

from __future__ import annotations

import asyncio
import contextlib

from mlp.db import Connect, listen_connector, listen_forever
from quota.service import QuotaService

LIMITS_CHANNEL = "mlp_quota_limits"
ALL_USERS = "*"


class LimitsFollower:
    def __init__(self, quota: QuotaService, connect: Connect) -> None:
        self._quota = quota
        self._connect = connect
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while the LISTEN is in place (tests wait on it)
        quota.follow_limit_changes(self.listening)

    @classmethod
    def for_dsn(cls, quota: QuotaService, dsn: str) -> LimitsFollower:
        return cls(quota, listen_connector(dsn))

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="quota-limits-follower")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._quota.forget_limits(None if payload == ALL_USERS else str(payload))

    async def _listen(self) -> None:
        await listen_forever(
            self._connect,
            LIMITS_CHANNEL,
            self._notified,
            listening=self.listening,
            on_listening=self._quota.forget_limits,
            closing=lambda: self._closing,
            what="quota limit notifications",
        )
