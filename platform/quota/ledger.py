"""The Redis quota ledger: atomic reservations, commits and releases (one Lua script each).

Redis is the fast copy; Postgres ``token_usage`` is the truth. When the ``built`` marker is
missing (Redis restarted or the keys were flushed), every script answers NOT_BUILT and the
caller rebuilds the counters from the ledger under a lock before anything else is reserved,
committed, released or admitted. See :mod:`quota.scripts` for the key layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, cast

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from events.identity import RequestClaim
from mlp import metrics
from projections.status_cache import QueuedStatus
from quota import scripts
from quota.plans import LimitName, Limits, QuotaError, Window, day_window, month_window, to_ms
from quota.script_pipeline import ScriptPipeline
from quota.store import LedgerState

log = logging.getLogger(__name__)

# How long a committed request stays known, so a redelivery never charges it twice; every claim (the
# record of who named a request, in any state) lives as long, so an ended request never runs again.
COMMITTED_TTL_S = 86_400
# The largest outcome event kept with a claim (a redelivery is answered with it); a bigger one is not kept,
# and the redelivery is then acknowledged without work (its outcome was published: the commit came first).
MAX_OUTCOME_BYTES = 1_048_576
# A used counter outlives its window by this much (late reads, clock skew between hosts).
WINDOW_GRACE_S = 3_600
# The user's reservation keys outlive their last reservation by this much (a late commit still finds them;
# the request's own record, its claim, lives COMMITTED_TTL_S).
RECORD_GRACE_MS = 3_600_000
_PIPELINE_CHUNK = 1_000
# Committed records restored per script call by a rebuild (4 arguments each).
_RESTORE_CHUNK = 1_000


class QuotaUnavailable(QuotaError):
    """Redis (or the rebuild's Postgres) cannot answer now: retry later (HTTP 503, nack+requeue)."""


class LedgerSource(Protocol):
    async def ledger_state(self, day: Window, month: Window, charged_since: datetime) -> LedgerState: ...


class EmptyLedgerSource:
    """A ledger with nothing in it (benchmarks, fresh installations)."""

    async def ledger_state(self, day: Window, month: Window, charged_since: datetime) -> LedgerState:
        return LedgerState([], [], [])


class QuotaKeys:
    def __init__(self, redis_prefix: str) -> None:
        self.base = f"{redis_prefix}quota:"
        self.built = self.base + "built"
        self.lock = self.base + "rebuild-lock"

    def record(self, request_id: str) -> str:
        return f"{self.base}rq:{request_id}"

    def reservations(self, user_id: str) -> str:
        return f"{self.base}rz:{user_id}"

    def amounts(self, user_id: str) -> str:
        return f"{self.base}ra:{user_id}"

    def reserved_sum(self, user_id: str) -> str:
        return f"{self.base}rs:{user_id}"

    def used_day(self, user_id: str, day_id: str) -> str:
        return f"{self.base}ud:{user_id}:{day_id}"

    def used_month(self, user_id: str, month_id: str) -> str:
        return f"{self.base}um:{user_id}:{month_id}"

    def pattern(self) -> str:
        return self.base + "*"


# finished: the status cache holds the outcome; done: the claim ended (committed or released), see
# ReserveResult.ended; conflict: the request id names another request (another owner, event or content).
# cancelling: it holds a reservation and a cancel was asked for meanwhile (scripts.CANCEL's mark).
ReserveOutcome = Literal["finished", "granted", "already", "committed", "released", "refused", "conflict", "cancelling"]


@dataclass(frozen=True, slots=True)
class ReserveResult:
    outcome: ReserveOutcome
    tokens: int  # reserved (granted/already) or charged (committed); 0 otherwise
    # refused: the limit (LimitName) or the request rule's reason (events.request_rules.RejectReason)
    limit: str | None = None
    retry_ms: int = 0  # refused by requests_per_minute: until the window has room again
    outcome_event: bytes | None = None  # committed/released: the outcome event it ended with, when kept


@dataclass(frozen=True, slots=True)
class CommitResult:
    outcome: Literal["committed", "already", "unknown"]
    charged: int
    released_hold: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    outcome: Literal["released", "committed", "none", "conflict"]
    freed: int = 0


# scripts.CANCEL's answers: queued (the cancel won the request: publish its InferenceCancelled), running
# (its worker was told), cancelled (before: ``kept`` is the InferenceCancelled kept, when kept), ended
# (another terminal state, ``state``), unknown (another owner's, or no such request).
CancelOutcome = Literal["queued", "running", "cancelled", "ended", "unknown"]


@dataclass(frozen=True, slots=True)
class CancelResult:
    outcome: CancelOutcome
    kept: bytes | None = None
    state: str = ""


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    day: Window
    month: Window
    used_day: int
    used_month: int
    reserved: int


@dataclass(frozen=True, slots=True)
class AdmitResult:
    allowed: bool
    limit: LimitName | None = None
    retry_ms: int = 0
    used: int = 0
    reserved: int = 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _kept_outcome(outcome: bytes | None) -> bytes:
    """The outcome bytes a claim keeps ('' = none: absent or over MAX_OUTCOME_BYTES)."""
    if outcome is None:
        return b""
    if len(outcome) > MAX_OUTCOME_BYTES:
        log.warning("outcome event of %d bytes not kept with its claim (limit %d)", len(outcome), MAX_OUTCOME_BYTES)
        return b""
    return outcome


def _window_ttl_s(window: Window, now: datetime) -> int:
    return max(1, int((window.resets_at - now).total_seconds()) + WINDOW_GRACE_S)


class RedisLedger:
    def __init__(
        self,
        client: redis.Redis,
        redis_prefix: str,
        source: LedgerSource,
        *,
        reservation_ttl_s: float,
        committed_ttl_s: int = COMMITTED_TTL_S,
        rebuild_timeout_s: float = 30.0,
        lock_ttl_s: float = 30.0,
    ) -> None:
        self._redis = client
        self.keys = QuotaKeys(redis_prefix)
        self._source = source
        self._reservation_ttl_ms = round(reservation_ttl_s * 1000)
        self._committed_ttl_s = committed_ttl_s
        self._rebuild_timeout_s = rebuild_timeout_s
        self._lock_ttl_ms = round(lock_ttl_s * 1000)
        # register_script: EVALSHA, and SCRIPT LOAD again after NOSCRIPT (e.g. a restarted Redis).
        self._reserve = client.register_script(scripts.RESERVE)
        self._claim = client.register_script(scripts.CLAIM)
        self._commit = client.register_script(scripts.COMMIT)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._snapshot = client.register_script(scripts.SNAPSHOT)
        self._admit = client.register_script(scripts.ADMIT)
        self._finish = client.register_script(scripts.FINISH_REBUILD)
        self._restore_committed = client.register_script(scripts.RESTORE_COMMITTED)
        self._release_lock = client.register_script(scripts.RELEASE_LOCK)
        # The hot scripts (admit, reserve, commit, ...) of concurrent callers share pipelines (group commit).
        self._scripts = ScriptPipeline(client)

    # --- the operations -------------------------------------------------------------------------

    async def reserve(
        self,
        request_id: str,
        user_id: str,
        tokens: int,
        limits: Limits,
        now: datetime,
        *,
        status_key: str | None = None,
        claim: RequestClaim | None = None,
        refusal: str | None = None,
        count_request: bool = False,
    ) -> ReserveResult:
        """Claim the request and reserve ``tokens`` for it (scripts.RESERVE).

        ``status_key``: the request's status-cache hash; a terminal status there answers "finished".
        ``claim``: the message's event and content, which a later message must match to be the same
        request (None: unchecked, as for callers that name their own ids). ``refusal``: the request
        breaks this rule (a RejectReason): record the claim as refused. ``count_request``: a new claim
        takes a place in the user's requests-per-minute window (bus requests; the gateway counted its own).
        """
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        day, month = day_window(now), month_window(now)
        now_ms = to_ms(now)
        reply = await self._run(
            self._reserve,
            [
                request_id,
                user_id,
                tokens,
                now_ms,
                now_ms + self._reservation_ttl_ms,
                day.id,
                month.id,
                limits.tokens_per_day,
                limits.tokens_per_month,
                RECORD_GRACE_MS,
                self._committed_ttl_s * 1000,
                status_key or "",
                claim.event_id if claim else "",
                claim.digest if claim else "",
                refusal or "",
                limits.requests_per_minute if count_request else "",
            ],
            now,
        )
        return _reserve_result(reply)

    async def claim(
        self, request_id: str, user_id: str, now: datetime, *, claim: RequestClaim, status_key: str | None = None
    ) -> bool:
        """Claim the request for ``user_id`` unless another request holds the id (scripts.CLAIM). True: the
        request is this message's (claimed now, or already its own); False: the id names another request."""
        reply = await self._run(
            self._claim,
            [request_id, user_id, self._committed_ttl_s * 1000, status_key or "", claim.event_id, claim.digest],
            now,
        )
        return reply[0] == "MINE"

    async def refuse(
        self,
        request_id: str,
        user_id: str,
        reason: str,
        now: datetime,
        *,
        claim: RequestClaim,
        status_key: str | None = None,
    ) -> ReserveResult:
        """Claim the request as refused for ``reason`` unless another request holds the id (scripts.RESERVE
        with a refusal: no limits are read, nothing is reserved). "refused": the refusal may be addressed to
        the request; any other answer: the request id is not this message's to end."""
        now_ms = to_ms(now)
        day, month = day_window(now), month_window(now)
        reply = await self._run(
            self._reserve,
            [
                request_id,
                user_id,
                0,
                now_ms,
                now_ms,
                day.id,
                month.id,
                0,
                0,
                RECORD_GRACE_MS,
                self._committed_ttl_s * 1000,
                status_key or "",
                claim.event_id,
                claim.digest,
                reason,
                "",
            ],
            now,
        )
        return _reserve_result(reply)

    async def commit(
        self,
        request_id: str,
        actual_tokens: int,
        now: datetime,
        *,
        user_id: str | None = None,
        outcome: bytes | None = None,
    ) -> CommitResult:
        """Charge the actual tokens once (idempotent by request_id) and free the rest of the hold.

        ``user_id`` lets a commit charge the right user when the reservation record is gone (it
        expired long ago, or Redis was flushed before the request was known to the ledger).
        ``outcome``: the outcome event about to be published, kept with the claim (MAX_OUTCOME_BYTES):
        a redelivery of the request is answered with it, never run again.
        """
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        day, month = day_window(now), month_window(now)
        reply = await self._run(
            self._commit,
            [
                request_id,
                actual_tokens,
                to_ms(now),
                day.id,
                month.id,
                _window_ttl_s(day, now),
                _window_ttl_s(month, now),
                self._committed_ttl_s * 1000,
                user_id or "",
                _kept_outcome(outcome),
            ],
            now,
        )
        match reply[0]:
            case "COMMITTED":
                return CommitResult("committed", int(reply[1]), int(reply[2]))
            case "ALREADY":
                return CommitResult("already", int(reply[1]))
            case "UNKNOWN":
                return CommitResult("unknown", 0)
        raise QuotaUnavailable(f"unexpected commit reply {reply!r}")

    async def release(
        self,
        request_id: str,
        now: datetime,
        *,
        outcome: bytes | None = None,
        user_id: str | None = None,
        claim: RequestClaim | None = None,
    ) -> ReleaseResult:
        """Free the request's hold: it ended without a charge. ``outcome``: its outcome event, kept with the
        claim like a commit's. ``user_id`` and ``claim``: the ending message's, checked against the claim
        ("conflict": it may not end this request); a request without a claim is then claimed as released."""
        reply = await self._run(
            self._release,
            [
                request_id,
                to_ms(now),
                self._committed_ttl_s * 1000,
                _kept_outcome(outcome),
                user_id or "",
                claim.event_id if claim else "",
                claim.digest if claim else "",
            ],
            now,
        )
        match reply[0]:
            case "RELEASED":
                return ReleaseResult("released", int(reply[1]))
            case "COMMITTED":
                return ReleaseResult("committed")
            case "NONE":
                return ReleaseResult("none")
            case "CONFLICT":
                return ReleaseResult("conflict")
        raise QuotaUnavailable(f"unexpected release reply {reply!r}")

    async def snapshot(self, user_id: str, now: datetime) -> UsageSnapshot:
        day, month = day_window(now), month_window(now)
        reply = await self._run(self._snapshot, [user_id, to_ms(now), day.id, month.id], now)
        return UsageSnapshot(day, month, int(reply[1]), int(reply[2]), int(reply[3]))

    async def admit(
        self,
        user_id: str,
        max_tokens: int,
        limits: Limits,
        now: datetime,
        *,
        queued: QueuedStatus | None = None,
        request_id: str | None = None,
        claim: RequestClaim | None = None,
    ) -> AdmitResult:
        """``queued``: written as the request's status-cache entry when admitted (scripts.ADMIT).
        ``request_id`` and ``claim``: the request is claimed for ``user_id`` when admitted, before it is published."""
        day, month = day_window(now), month_window(now)
        claim_args: list[Any] = ["", "", "", 0]
        if request_id is not None and claim is not None:
            claim_args = [request_id, claim.event_id, claim.digest, self._committed_ttl_s * 1000]
        status_args: list[Any] = (
            ["", 0, *claim_args] if queued is None else [queued.key, queued.ttl_s, *claim_args, *queued.fields]
        )
        reply = await self._run(
            self._admit,
            [
                user_id,
                to_ms(now),
                day.id,
                month.id,
                limits.tokens_per_day,
                limits.tokens_per_month,
                max_tokens,
                limits.requests_per_minute,
                *status_args,
            ],
            now,
        )
        if reply[0] == "OK":
            return AdmitResult(True)
        return AdmitResult(False, cast(LimitName, reply[1]), int(reply[2]), int(reply[3]), int(reply[4]))

    # --- the rebuild ----------------------------------------------------------------------------

    async def is_built(self) -> bool:
        try:
            return bool(await self._redis.exists(self.keys.built))
        except RedisError as exc:
            raise QuotaUnavailable(f"redis: {exc}") from exc

    async def ensure_built(self, now: datetime) -> bool:
        """Rebuild the counters from the ledger unless built; True when this call rebuilt them.

        One process rebuilds under a SET NX lock; the others wait for the marker. If the
        rebuilder dies, its lock expires and the next waiter takes over.
        """
        deadline = asyncio.get_running_loop().time() + self._rebuild_timeout_s
        token = uuid.uuid4().hex
        try:
            while not await self._redis.exists(self.keys.built):
                if await self._redis.set(self.keys.lock, token, nx=True, px=self._lock_ttl_ms):
                    # Check again under the lock: a rebuild that finished between our check and
                    # the SET NX must not be redone (it would wipe what was reserved since).
                    if await self._redis.exists(self.keys.built):
                        await self._release_lock(args=[self.keys.base, token])
                        return False
                    if await self._rebuild_locked(token, now):
                        return True
                    continue
                if asyncio.get_running_loop().time() > deadline:
                    raise QuotaUnavailable("quota counters are being rebuilt; try again shortly")
                await asyncio.sleep(0.05)
        except RedisError as exc:
            raise QuotaUnavailable(f"redis: {exc}") from exc
        return False

    async def _rebuild_locked(self, token: str, now: datetime) -> bool:
        day, month = day_window(now), month_window(now)
        metrics.QUOTA_REBUILD_IN_PROGRESS.inc()
        try:
            state = await self._source.ledger_state(day, month, now - timedelta(seconds=self._committed_ttl_s))
            await self._clear_counters()
            await self._write_state(state, day, month, now)
            done = bool(await self._finish(args=[self.keys.base, token, now.isoformat()]))
        except BaseException as exc:
            metrics.QUOTA_REBUILDS.labels(outcome="failed").inc()
            # Let the next caller try at once instead of waiting for the lock to expire.
            with contextlib.suppress(RedisError):
                await self._release_lock(args=[self.keys.base, token])
            if isinstance(exc, QuotaError | RedisError) or not isinstance(exc, Exception):
                raise
            # asyncpg/OS errors: the truth cannot be read now.
            raise QuotaUnavailable(f"cannot read the usage ledger: {type(exc).__name__}: {exc}") from exc
        finally:
            metrics.QUOTA_REBUILD_IN_PROGRESS.dec()
        # Not done: this rebuild outlived its lock and did not take effect (another process may redo it).
        metrics.QUOTA_REBUILDS.labels(outcome="done" if done else "failed").inc()
        if done:
            log.warning(
                "quota counters rebuilt from the ledger: %d users, %d charged requests, %d open reservations",
                len(state.totals),
                len(state.charged),
                len(state.open),
            )
        return done

    async def _clear_counters(self) -> None:
        # Leftovers (if only the marker was lost) must not add to the rebuilt values.
        # Large SCAN pages and UNLINK (freed off Redis's main thread): a day of records is ~10^5 keys.
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=self.keys.pattern(), count=10_000):
            name = _text(key)
            if name != self.keys.lock:
                batch.append(name)
            if len(batch) >= 5_000:
                await self._redis.unlink(*batch)
                batch.clear()
        if batch:
            await self._redis.unlink(*batch)

    async def _write_state(self, state: LedgerState, day: Window, month: Window, now: datetime) -> None:
        k = self.keys
        now_ms = to_ms(now)
        day_ttl, month_ttl = _window_ttl_s(day, now), _window_ttl_s(month, now)
        commands: list[tuple[Any, ...]] = []
        for t in state.totals:
            commands.append(("SET", k.used_month(t.user_id, month.id), t.month_tokens, "EX", month_ttl))
            if t.day_tokens:
                commands.append(("SET", k.used_day(t.user_id, day.id), t.day_tokens, "EX", day_ttl))
        committed_ttl_ms = self._committed_ttl_s * 1000
        # The claims of charged requests come back with them (owner and charge; the outcome event is not in
        # the ledger: a redelivery is then acknowledged without work). Other claims (admitted, refused,
        # failed) are not in Postgres and are lost with Redis (docs/bus.md, "Request identity").
        committed: list[Any] = []
        for c in state.charged:
            ttl = committed_ttl_ms - (now_ms - to_ms(c.occurred_at))
            if ttl > 0:
                committed += (c.request_id, c.user_id, c.total_tokens, ttl)
        last_expiry: dict[str, int] = {}
        for r in state.open:
            started_ms = to_ms(r.started_at) if r.started_at is not None else now_ms
            expires = started_ms + self._reservation_ttl_ms
            if expires <= now_ms:
                continue  # that worker's hold would have expired by now
            rec = k.record(r.request_id)
            commands.append(("HSET", rec, "s", "reserved", "u", r.user_id, "t", r.reserved_tokens, "e", expires))
            commands.append(("PEXPIRE", rec, expires - now_ms + RECORD_GRACE_MS))
            commands.append(("ZADD", k.reservations(r.user_id), expires, r.request_id))
            commands.append(("HSET", k.amounts(r.user_id), r.request_id, r.reserved_tokens))
            commands.append(("INCRBY", k.reserved_sum(r.user_id), r.reserved_tokens))
            last_expiry[r.user_id] = max(expires, last_expiry.get(r.user_id, 0))
        for user_id, expires in last_expiry.items():
            ttl = expires - now_ms + RECORD_GRACE_MS
            for key in (k.reservations(user_id), k.amounts(user_id), k.reserved_sum(user_id)):
                commands.append(("PEXPIRE", key, ttl))
        await self._pipeline(commands)
        step = 4 * _RESTORE_CHUNK
        for i in range(0, len(committed), step):
            await self._restore_committed(args=[k.base, *committed[i : i + step]])

    async def _pipeline(self, commands: Sequence[tuple[Any, ...]]) -> None:
        for i in range(0, len(commands), _PIPELINE_CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                for command in commands[i : i + _PIPELINE_CHUNK]:
                    pipe.execute_command(*command)
                await pipe.execute()

    async def cancel(
        self,
        request_id: str,
        user_id: str,
        now: datetime,
        *,
        outcome: bytes,
        status_key: str,
        channel: str,
        cause: str = "http",
    ) -> CancelResult:
        """Cancel the request for its owner ``user_id``, atomically with the worker's reservation
        (scripts.CANCEL). ``outcome``: the InferenceCancelled kept with the claim when the cancel wins it
        while queued; ``channel``: where a running request's id is announced to its worker."""
        reply = await self._run(
            self._cancel,
            [request_id, user_id, status_key, outcome, self._committed_ttl_s * 1000, channel, cause],
            now,
        )
        match reply[0]:
            case "QUEUED":
                return CancelResult("queued")
            case "RUNNING":
                return CancelResult("running")
            case "CANCELLED":
                return CancelResult("cancelled", reply[1].encode() or None)
            case "ENDED":
                return CancelResult("ended", state=reply[1])
            case "UNKNOWN":
                return CancelResult("unknown")
        raise QuotaUnavailable(f"unexpected cancel reply {reply!r}")

    # --- plumbing -------------------------------------------------------------------------------

    async def _run(self, script: AsyncScript, args: list[Any], now: datetime) -> list[str]:
        for _ in range(3):
            try:
                raw = await self._scripts.run(script, [self.keys.base, *args])
            except RedisError as exc:
                raise QuotaUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
            reply = [_text(v) for v in raw]
            if reply[0] != "NOT_BUILT":
                return reply
            await self.ensure_built(now)
        raise QuotaUnavailable("quota counters were lost again while rebuilding")


def _reserve_result(reply: list[str]) -> ReserveResult:
    """scripts.RESERVE's reply. The outcome event is JSON (UTF-8), so it survives the client's decoding."""
    match reply[0]:
        case "FINISHED":
            return ReserveResult("finished", 0)
        case "GRANTED":
            return ReserveResult("granted", int(reply[1]))
        case "ALREADY":
            return ReserveResult("already", int(reply[1]))
        case "DONE":
            outcome: ReserveOutcome = "committed" if reply[1] == "committed" else "released"
            return ReserveResult(outcome, int(reply[2]), outcome_event=reply[3].encode() or None)
        case "REFUSED":
            return ReserveResult("refused", 0, reply[1], retry_ms=int(reply[2]))
        case "CONFLICT":
            return ReserveResult("conflict", 0)
        case "CANCELLING":
            return ReserveResult("cancelling", int(reply[1]))
    raise QuotaUnavailable(f"unexpected reserve reply {reply!r}")
