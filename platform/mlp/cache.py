"""Redis adapter: client factory and key naming under the configured prefix."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as redis

from mlp.settings import Settings

log = logging.getLogger(__name__)


def create_redis(settings: Settings, max_connections: int = 64) -> redis.Redis:
    # A blocking pool: redis-py's default pool raises MaxConnectionsError under a burst
    # instead of waiting for a free connection.
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=5,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry_on_timeout=True,
    )
    return redis.Redis(connection_pool=pool)


class Keys:
    """Redis keys under the platform's prefix, except those with an owner of their own: the status
    cache's (``projections.status_cache.StatusKeys``) and the quota ledger's (``quota.ledger.QuotaKeys``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}seen:{event_id}"

    def idempotency(self, user_id: str, key: str) -> str:
        # The user id's length first: user ids may hold ':', and ("a:b", "c") must not name ("a", "b:c")'s record.
        return f"{self.prefix}idem:{len(user_id)}:{user_id}:{key}"

    def pattern(self, kind: str) -> str:
        return f"{self.prefix}{kind}:*"


class Subscription:
    """One Redis pub/sub channel followed in the background: ``on_message(data)`` for each message,
    resubscribing after Redis restarts (messages published meanwhile are lost: pub/sub is at most once).

    ``close`` lets the loop notice within ``poll_s``; cancelling it is the fallback only, since a
    cancellation that lands inside redis-py's pub/sub read can be swallowed there."""

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        on_message: Callable[[str], None],
        *,
        name: str,
        poll_s: float = 1.0,
    ) -> None:
        self._redis = client
        self._channel = channel
        self._on_message = on_message
        self._name = name
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.subscribed = asyncio.Event()  # set while subscribed (tests wait on it)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name=self._name)

    async def close(self) -> None:
        self._closing = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._poll_s + 2.0)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2.0)

    async def _listen(self) -> None:
        while not self._closing:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    self.subscribed.set()
                    while not self._closing:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll_s)
                        if message is None or message.get("type") != "message":
                            continue
                        data = message["data"]
                        self._on_message(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: the owner's fallback covers the gap
                self.subscribed.clear()
                if self._closing:
                    return
                log.warning("%s: subscription lost (%r); resubscribing", self._name, exc)
                await asyncio.sleep(1.0)
