"""Idempotency-Key records in Redis: one per (user, key), claimed before the publish, kept 24 h after it.

A record is ``pending`` while its submit runs, then the request id it answered with. The pending claim
lives only as long as a submit can take (``pending_ttl_s``), so a submit that died half-way (a crash,
or Redis lost right after the confirmed publish) blocks its key for seconds, never for the 24 h of a
finished record. Keys are namespaced per user by ``mlp.cache.Keys.idempotency``: no two (user, key)
pairs share a record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final

import redis.asyncio as redis
from redis.exceptions import RedisError

from mlp.cache import Keys

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_S: Final = 86_400
PENDING: Final = "pending"
# What an Idempotency-Key may hold: UUIDs, ULIDs, base64/base64url and dotted or colon-separated names.
IDEMPOTENCY_KEY_PATTERN: Final = r"^[A-Za-z0-9_\-.:@+/=]{1,128}$"
# Waits between the tries of recording a finished submit (the request is queued: worth a few tries).
RECORD_RETRY_DELAYS_S: Final = (0.05, 0.2, 0.5)


def pending_ttl_for(publish_timeout_s: float) -> int:
    """How long a claim may stay pending: longer than a submit can take (admission plus a confirmed publish)."""
    return int(2 * publish_timeout_s) + 30


class IdempotencyRecords:
    def __init__(
        self,
        redis_client: redis.Redis,
        keys: Keys,
        *,
        pending_ttl_s: int,
        ttl_s: int = IDEMPOTENCY_TTL_S,
        retry_delays_s: Sequence[float] = RECORD_RETRY_DELAYS_S,
    ) -> None:
        self._redis = redis_client
        self._keys = keys
        self._pending_ttl_s = pending_ttl_s
        self._ttl_s = ttl_s
        self._retry_delays_s = tuple(retry_delays_s)

    async def claim(self, user_id: str, key: str) -> str | None:
        """None when this submit now owns the key; else what the record holds (``PENDING`` or a request id)."""
        record = self._keys.idempotency(user_id, key)
        if await self._redis.set(record, PENDING, nx=True, ex=self._pending_ttl_s):
            return None
        existing = await self._redis.get(record)
        return PENDING if existing is None else str(existing)  # None: it expired in between; still busy

    async def record(self, user_id: str, key: str, request_id: str) -> bool:
        """Store the request id a claimed key answered with. The request is queued whatever happens here:
        on a Redis failure, retry briefly, then leave the pending claim to expire. False when not stored."""
        record = self._keys.idempotency(user_id, key)
        for delay in (*self._retry_delays_s, None):
            try:
                await self._redis.set(record, request_id, ex=self._ttl_s)
                return True
            except RedisError as exc:
                if delay is None:
                    log.warning(
                        "Idempotency-Key of request %s not recorded (%r); its pending claim expires in %d s",
                        request_id,
                        exc,
                        self._pending_ttl_s,
                    )
                    return False
                await asyncio.sleep(delay)
        return False  # unreachable: the loop returns on its last try

    async def release(self, user_id: str, key: str) -> None:
        """Give the key up after a refused submit, so that a retry can go ahead. Best effort: a claim that
        cannot be deleted expires with its pending TTL."""
        try:
            await self._redis.delete(self._keys.idempotency(user_id, key))
        except RedisError as exc:
            log.warning("Idempotency-Key claim not released (%r); it expires in %d s", exc, self._pending_ttl_s)
