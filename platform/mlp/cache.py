"""Redis adapter: client factory and key naming under the configured prefix."""

from __future__ import annotations

import redis.asyncio as redis

from mlp.settings import Settings


def create_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry_on_timeout=True,
    )


class Keys:
    """Every Redis key the platform uses, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def status(self, request_id: str) -> str:
        return f"{self.prefix}status:{request_id}"

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}seen:{event_id}"

    def idempotency(self, user_id: str, key: str) -> str:
        return f"{self.prefix}idem:{user_id}:{key}"

    def pattern(self, kind: str) -> str:
        return f"{self.prefix}{kind}:*"
