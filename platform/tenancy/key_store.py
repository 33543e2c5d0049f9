"""The API keys in Postgres (table ``api_keys``, migration 0003): a thin asyncpg adapter.

Every validity check takes ``now`` from the caller, so an injected clock decides (tests of expiry and
rotation grace); the database's own clock is never asked. The management operations here are the
ones both ``mlp keys`` and the gateway's admin routes run.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tenancy.keys import (
    MAX_GRACE,
    IssuedKey,
    KeyRecord,
    KeyScope,
    check_scope,
    hash_key,
    new_key,
)

_COLUMNS = "key_id, user_id, scope, key_hash, created_at, expires_at, revoked_at, last_used_at, replaced_by"
_ACTIVE = "(revoked_at IS NULL OR revoked_at > $1) AND (expires_at IS NULL OR expires_at > $1)"


class UnknownKey(LookupError):
    """No stored key has this id."""


class KeyNotRotatable(ValueError):
    """Only a key that works and is not already being replaced can be rotated."""


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: the plaintext (shown once) and what was stored."""

    plaintext: str
    record: KeyRecord


@dataclass(frozen=True, slots=True)
class RotatedKey:
    created: CreatedKey
    old: KeyRecord  # with its grace period's end as revoked_at


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        user_id=row["user_id"],
        scope=check_scope(row["scope"]),
        key_hash=bytes(row["key_hash"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        replaced_by=row["replaced_by"],
    )


class KeyStore:
    def __init__(self, pool: asyncpg.Pool, pepper: bytes) -> None:
        self._pool = pool
        self._pepper = pepper

    async def find(self, key_id: str) -> KeyRecord | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = $1", key_id)
        return None if row is None else _record(row)

    async def any_active(self, now: datetime) -> bool:
        """Whether some stored key works at ``now`` (development is open only while none does)."""
        found: bool = await self._pool.fetchval(f"SELECT EXISTS (SELECT 1 FROM api_keys WHERE {_ACTIVE})", now)
        return found

    async def count_active(self, now: datetime) -> int:
        count: int = await self._pool.fetchval(f"SELECT count(*) FROM api_keys WHERE {_ACTIVE}", now)
        return count

    async def list(self, user_id: str | None = None) -> list[KeyRecord]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM api_keys WHERE $1::text IS NULL OR user_id = $1"
            " ORDER BY user_id, created_at, key_id",
            user_id,
        )
        return [_record(r) for r in rows]

    async def create(
        self, user_id: str, scope: KeyScope, now: datetime, expires_at: datetime | None = None
    ) -> CreatedKey:
        async with self._pool.acquire() as conn:
            return await self._insert(conn, user_id, scope, now, expires_at)

    async def _insert(
        self, conn: PoolConnectionProxy, user_id: str, scope: KeyScope, now: datetime, expires_at: datetime | None
    ) -> CreatedKey:
        for _ in range(5):  # 48 random bits of key id: a collision is rare, and retried
            issued: IssuedKey = new_key()
            record = KeyRecord(
                key_id=issued.key_id,
                user_id=user_id,
                scope=scope,
                key_hash=hash_key(self._pepper, issued.plaintext),
                created_at=now,
                expires_at=expires_at,
            )
            inserted = await conn.fetchval(
                "INSERT INTO api_keys (key_id, user_id, scope, key_hash, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
                record.key_id,
                record.user_id,
                record.scope,
                record.key_hash,
                record.created_at,
                record.expires_at,
            )
            if inserted is not None:
                return CreatedKey(issued.plaintext, record)
        raise RuntimeError("could not draw an unused key id")  # pragma: no cover - 5 collisions in 2**48

    async def revoke(self, key_id: str, now: datetime) -> tuple[KeyRecord, bool]:
        """Revoke now (also cutting a rotation's grace short). Returns the key and whether this call
        changed it (False: it was revoked already)."""
        row = await self._pool.fetchrow(
            f"UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 AND (revoked_at IS NULL OR revoked_at > $2)"
            f" RETURNING {_COLUMNS}",
            key_id,
            now,
        )
        if row is not None:
            return _record(row), True
        found = await self.find(key_id)
        if found is None:
            raise UnknownKey(key_id)
        return found, False

    async def rotate(self, key_id: str, now: datetime, grace: timedelta) -> RotatedKey:
        """A new key for the same user and scope (with the old one's lifetime, counted from now); the old
        key keeps working until ``now + grace``, then stops."""
        if not timedelta(0) <= grace <= MAX_GRACE:
            raise KeyNotRotatable(f"the grace period must lie between 0 and {MAX_GRACE.days} days")
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = $1 FOR UPDATE", key_id)
            if row is None:
                raise UnknownKey(key_id)
            old = _record(row)
            if old.refusal(now) is not None:
                raise KeyNotRotatable(f"{old.refusal(now)}: create a new key instead (`mlp keys create`)")
            if old.revoked_at is not None:
                raise KeyNotRotatable(f"API key {key_id} is already being replaced by {old.replaced_by}")
            expires_at = None if old.expires_at is None else now + (old.expires_at - old.created_at)
            created = await self._insert(conn, old.user_id, old.scope, now, expires_at)
            ends = now + grace
            updated = await conn.fetchrow(
                f"UPDATE api_keys SET revoked_at = $2, replaced_by = $3 WHERE key_id = $1 RETURNING {_COLUMNS}",
                key_id,
                ends,
                created.record.key_id,
            )
            return RotatedKey(created, _record(updated))

    async def touch(self, used: Collection[tuple[str, datetime]]) -> None:
        """Record when keys were last used (one statement for a batch, never moving a time backwards)."""
        if not used:
            return
        key_ids: Sequence[str] = [k for k, _ in used]
        times: Sequence[datetime] = [t for _, t in used]
        await self._pool.execute(
            "UPDATE api_keys AS k SET last_used_at = u.at FROM unnest($1::text[], $2::timestamptz[]) AS u(key_id, at)"
            " WHERE k.key_id = u.key_id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
            key_ids,
            times,
        )
