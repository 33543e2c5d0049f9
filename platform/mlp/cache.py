"""Redis adapter: client factory and key naming under the configured prefix."""

from __future__ import annotations

import redis.asyncio as redis

from mlp.settings import Settings


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
