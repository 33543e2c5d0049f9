"""Who a presented key belongs to, with a short, bounded cache: one instance per service replica.

- A lookup's answer (the caller, or why the key is refused) is trusted for ``auth_cache_ttl_s`` (5 s
  by default, 30 s at most), never past the key's own expiry or grace end: a key revoked anywhere
  stops working on every replica within that bound. Refusals are cached too, so a client retrying a
  bad key does not query Postgres per request. At most ``MAX_ENTRIES`` answers are kept.
- Open mode (development and test only): no key in ``MLP_API_KEYS`` and no working stored key. The
  "is any key stored" answer is cached for the same TTL, so the first ``mlp keys create`` closes
  every replica within it (and revoking the last key opens development again).
- Postgres unreachable: answers already known keep being used for ``STALE_IF_ERROR`` (the gateway
  keeps accepting through a database outage, as it does for quota limits); an unknown key then gets
  ``AuthUnavailable`` (503), never a guess.
- ``last_used_at`` is written off the request path, at most once a minute per key and replica, in
  one statement for all keys used meanwhile.

The clock is injected: tests move time to check expiry, grace and the cache bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from events.model import utc_now
from mlp.settings import Settings
from tenancy.caller import OPEN, Caller
from tenancy.key_store import KeyStore
from tenancy.keys import (
    AuthNotConfigured,
    KeyRecord,
    hash_key,
    key_id_of,
    parse_bootstrap_keys,
    pepper_of,
    same_hash,
)

log = logging.getLogger(__name__)

MAX_ENTRIES: Final = 10_000
STALE_IF_ERROR: Final = timedelta(minutes=5)
LAST_USED_EVERY: Final = timedelta(minutes=1)
# What a failed store call raises (the pool's acquire timeout is a TimeoutError).
STORE_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

REQUIRED = "an API key is required (Authorization: Bearer <key> or X-API-Key: <key>)"
UNKNOWN = "unknown API key"


class Unauthorized(Exception):
    """No key, or a key that does not work: 401."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthUnavailable(Exception):
    """The key store cannot be asked and the answer is not known: 503 (never let an unknown key in)."""


@dataclass(frozen=True, slots=True)
class _Answer:
    caller: Caller | None  # None: refused, for ``refusal``
    refusal: str
    fetched_at: datetime
    fresh_until: datetime  # trusted without asking the store until then
    record: KeyRecord | None = None  # the key that works: never trusted past its own end (expiry, grace)


class Authenticator:
    def __init__(self, settings: Settings, store: KeyStore, clock: Callable[[], datetime] = utc_now) -> None:
        self._pepper = pepper_of(settings)
        self._production = settings.environment == "production"
        self._ttl = timedelta(seconds=settings.auth_cache_ttl_s)
        self._store = store
        self._clock = clock
        self._bootstrap = {
            hash_key(self._pepper, b.key): Caller(user_id=b.user_id, scope=b.scope, key_id=f"env-{i}")
            for i, b in enumerate(parse_bootstrap_keys(settings.api_keys), start=1)
        }
        self._answers: dict[bytes, _Answer] = {}
        self._any_stored: tuple[bool, datetime] | None = None  # (answer, fresh until)
        self._used: dict[str, datetime] = {}  # key id -> last use not yet written
        self._written: dict[str, datetime] = {}  # key id -> when its last use was last written
        self._flush: asyncio.Task[None] | None = None

    @property
    def pepper(self) -> bytes:
        return self._pepper

    @property
    def store(self) -> KeyStore:
        return self._store

    def now(self) -> datetime:
        """The injected clock: key management routes date their changes with it too."""
        return self._clock()

    async def start(self) -> None:
        """Check, before serving, that keys can be looked up at all (the table exists)."""
        try:
            await self._refresh_mode(self._clock())
        except asyncpg.UndefinedTableError as exc:
            raise AuthNotConfigured("the api_keys table is missing: run `mlp migrate` (migration 0003)") from exc

    async def close(self) -> None:
        await self.flush_last_used()

    async def is_open(self) -> bool:
        """Open mode: development or test with no key configured anywhere. Production: never."""
        if self._production or self._bootstrap:
            return False
        now = self._clock()
        if self._any_stored is None or self._any_stored[1] <= now:
            try:
                await self._refresh_mode(now)
            except STORE_ERRORS as exc:
                if self._any_stored is None:
                    raise AuthUnavailable("API keys cannot be looked up") from exc
                log.warning("key store unavailable, keeping the last open-mode answer: %r", exc)
                self._any_stored = (self._any_stored[0], now + self._ttl)  # asked again after another TTL
        assert self._any_stored is not None
        return not self._any_stored[0]

    async def _refresh_mode(self, now: datetime) -> None:
        self._any_stored = (await self._store.any_active(now), now + self._ttl)

    async def authenticate(self, presented: str | None) -> Caller:
        """The caller a request's key names (the open caller in open mode without a key); raises
        ``Unauthorized`` or ``AuthUnavailable``."""
        if not presented:
            if await self.is_open():
                return OPEN
            raise Unauthorized(REQUIRED)
        now = self._clock()
        digest = hash_key(self._pepper, presented)
        bootstrap = self._bootstrap.get(digest)  # a dict keyed by HMACs: the lookup leaks nothing of a key
        if bootstrap is not None:
            return bootstrap
        answer = self._answers.get(digest)
        if answer is None or answer.fresh_until <= now:
            answer = await self._look_up(presented, digest, now, answer)
        ended = None if answer.record is None else answer.record.refusal(now)
        if ended is not None:  # expired or out of its grace period within the TTL: known without asking
            answer = self._remember(digest, _Answer(None, ended, now, now + self._ttl))
        if answer.caller is None:
            raise Unauthorized(answer.refusal)
        self._note_use(answer.caller, now)
        return answer.caller

    async def _look_up(self, presented: str, digest: bytes, now: datetime, known: _Answer | None) -> _Answer:
        key_id = key_id_of(presented)
        if key_id is None:  # not a stored key's format: no query needed
            return self._remember(digest, _Answer(None, UNKNOWN, now, now + self._ttl))
        try:
            record = await self._store.find(key_id)
        except STORE_ERRORS as exc:
            if known is not None and now - known.fetched_at < STALE_IF_ERROR:
                log.warning("key store unavailable, using the answer of %s for %s: %r", known.fetched_at, key_id, exc)
                # Asked again after another TTL, not on every request of the outage.
                return self._remember(digest, replace(known, fresh_until=now + self._ttl))
            raise AuthUnavailable("API keys cannot be looked up") from exc
        if record is None or not same_hash(record.key_hash, digest):
            return self._remember(digest, _Answer(None, UNKNOWN, now, now + self._ttl))
        refusal = record.refusal(now)
        if refusal is not None:
            return self._remember(digest, _Answer(None, refusal, now, now + self._ttl))
        caller = Caller(user_id=record.user_id, scope=record.scope, key_id=record.key_id)
        return self._remember(digest, _Answer(caller, "", now, now + self._ttl, record))

    def _remember(self, digest: bytes, answer: _Answer) -> _Answer:
        self._answers.pop(digest, None)  # re-inserted last: the dict's order is the eviction order
        while len(self._answers) >= MAX_ENTRIES:
            del self._answers[next(iter(self._answers))]
        self._answers[digest] = answer
        return answer

    def forget(self, key_id: str) -> None:
        """Drop this replica's cached answers for a key (after a revoke or rotate through this replica)."""
        for digest in [d for d, a in self._answers.items() if a.caller is not None and a.caller.key_id == key_id]:
            del self._answers[digest]
        self._any_stored = None

    def _note_use(self, caller: Caller, now: datetime) -> None:
        key_id = caller.key_id
        assert key_id is not None
        written = self._written.get(key_id)
        if written is not None and now - written < LAST_USED_EVERY:
            return
        self._used[key_id] = now
        self._written[key_id] = now
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._write_last_used())

    async def flush_last_used(self) -> None:
        """Wait for the background write, then write what is still pending (on close; tests)."""
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
        await self._write_last_used()

    async def _write_last_used(self) -> None:
        """Write the pending last-use times (a failure is logged: it is bookkeeping, not auth)."""
        if not self._used:
            return
        used, self._used = self._used, {}
        if len(self._written) > MAX_ENTRIES:
            self._written.clear()
        try:
            await self._store.touch(list(used.items()))
        except STORE_ERRORS as exc:
            log.warning("could not record the last use of %d API key(s): %r", len(used), exc)
