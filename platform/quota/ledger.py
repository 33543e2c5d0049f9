"""The Redis quota ledger: atomic reservations, commits and releases (one Lua script each).

Redis is the fast copy; Postgres ``token_usage`` is the truth. When the ``built`` marker is
missing (Redis restarted or the keys were flushed), every script answers NOT_BUILT and the
caller rebuilds the counters from the ledger under a lock before anything else is reserved,
committed, released or admitted. See :mod:`quota.scripts` for the key layout.

The rebuild stays flat: it restores the per-window totals (one row per user, from the daily
aggregate) and the open reservations, streamed in chunks, and no record per charged request. It
keeps its Postgres snapshot instead, as long as a committed record lives: meanwhile a reservation
or a commit of a request Redis has no record of answers VERIFY, and the ledger says whether that
request was charged (then its record is adopted as committed, and charged once if the rebuild did
not count it). Its lock is renewed while it runs, and each of its writes is fenced by the lock's
token: a rebuild that lost its lock writes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
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
from quota.store import ChargedRequest, LedgerBatch, LedgerSnapshot, OpenReservation, UsageTotals

log = logging.getLogger(__name__)

# How long a committed request stays known, so a redelivery never charges it twice; every claim (the
# record of who named a request, in any state) lives as long, so an ended request never runs again
# (after that the status cache, which lives a day, still answers a finished request's redelivery).
# Only a request's redeliveries need it: minutes (MLP_QUOTA_COMMITTED_TTL_S).
COMMITTED_TTL_S = 900
LOCK_TTL_S = 30.0
# The largest outcome event kept with a claim (a redelivery is answered with it); a bigger one is not kept,
# and the redelivery is then acknowledged without work (its outcome was published: the commit came first).
MAX_OUTCOME_BYTES = 1_048_576
# A used counter outlives its window by this much (late reads, clock skew between hosts).
WINDOW_GRACE_S = 3_600
# The user's reservation keys outlive their last reservation by this much (a late commit still finds them;
# the request's own record, its claim, lives COMMITTED_TTL_S).
RECORD_GRACE_MS = 3_600_000
# Rows restored per fenced script call by a rebuild.
_RESTORE_CHUNK = 1_000
# Leftover keys cleared per fenced script call by a rebuild.
_CLEAR_CHUNK = 5_000


class QuotaUnavailable(QuotaError):
    """Redis (or the rebuild's Postgres) cannot answer now: retry later (HTTP 503, nack+requeue)."""


class LedgerSource(Protocol):
    def ledger_rows(self, day: Window, month: Window, open_since: datetime) -> AsyncGenerator[LedgerBatch, None]:
        """The snapshot first, then the totals and the open reservations in chunks (quota.store)."""
        ...

    async def charged(self, request_id: str) -> ChargedRequest | None: ...


class EmptyLedgerSource:
    """A ledger with nothing in it (benchmarks, fresh installations)."""

    async def ledger_rows(self, day: Window, month: Window, open_since: datetime) -> AsyncGenerator[LedgerBatch, None]:
        yield LedgerSnapshot(0, 0, frozenset())

    async def charged(self, request_id: str) -> ChargedRequest | None:
        return None


class _LockLost(QuotaError):
    """A fenced write of the rebuild was refused: another process holds the lock now."""


@dataclass(slots=True)
class RebuildStats:
    """What one rebuild read and wrote: rows per kind (what stays flat), fenced script calls."""

    totals: int = 0
    open: int = 0
    cleared: int = 0
    writes: int = 0
    lock_renewals: int = 0

    def count(self, batch: LedgerBatch) -> None:
        if isinstance(batch, LedgerSnapshot) or not batch:
            return
        if isinstance(batch[0], UsageTotals):
            self.totals += len(batch)
        else:
            self.open += len(batch)


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
        lock_ttl_s: float = LOCK_TTL_S,
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
        self._adopt = client.register_script(scripts.ADOPT_COMMITTED)
        self._finish = client.register_script(scripts.FINISH_REBUILD)
        self._fenced_unlink = client.register_script(scripts.FENCED_UNLINK)
        self._fenced_totals = client.register_script(scripts.FENCED_RESTORE_TOTALS)
        self._fenced_open = client.register_script(scripts.FENCED_RESTORE_OPEN)
        self._renew_lock = client.register_script(scripts.RENEW_LOCK)
        self._release_lock = client.register_script(scripts.RELEASE_LOCK)
        self.last_rebuild: RebuildStats | None = None  # what this process's last rebuild read and wrote
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
        reply = await self._run_verified(
            self._reserve,
            request_id,
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
        reply = await self._run_verified(
            self._reserve,
            request_id,
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
        reply = await self._run_verified(
            self._commit,
            request_id,
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
        stats = RebuildStats()
        metrics.QUOTA_REBUILD_IN_PROGRESS.inc()
        renewal = asyncio.create_task(self._keep_lock(token, stats), name="quota-rebuild-lock")
        snapshot: LedgerSnapshot | None = None
        try:
            await self._clear_counters(token, stats)
            open_since = now - timedelta(milliseconds=self._reservation_ttl_ms)
            async with contextlib.aclosing(self._source.ledger_rows(day, month, open_since)) as rows:
                async for batch in rows:
                    stats.count(batch)
                    if isinstance(batch, LedgerSnapshot):
                        snapshot = batch
                    elif batch and isinstance(batch[0], UsageTotals):
                        await self._restore_totals(token, batch, day, month, now, stats)
                    elif batch:
                        await self._restore_open(token, cast(list[OpenReservation], batch), now, stats)
            if snapshot is None:
                raise QuotaUnavailable("the usage ledger gave no snapshot")
            done = bool(
                await self._finish(
                    args=[self.keys.base, token, now.isoformat(), snapshot.text(), self._committed_ttl_s * 1000]
                )
            )
        except _LockLost:
            done = False  # another process took the lock over: it rebuilds; nothing more was written here
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
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            metrics.QUOTA_REBUILD_IN_PROGRESS.dec()
            self.last_rebuild = stats
        # Not done: this rebuild lost its lock and did not take effect (another process redoes it).
        metrics.QUOTA_REBUILDS.labels(outcome="done" if done else "failed").inc()
        if done:
            log.warning(
                "quota counters rebuilt from the ledger: %d users' totals, %d open reservations, %d keys cleared",
                stats.totals,
                stats.open,
                stats.cleared,
            )
        return done

    async def _keep_lock(self, token: str, stats: RebuildStats) -> None:
        """Renew the rebuild lock every third of its TTL while the rebuild runs; stop once it is lost
        (the fenced writes then refuse, and the rebuild gives up)."""
        while True:
            await asyncio.sleep(self._lock_ttl_ms / 3000)
            try:
                renewed = await self._renew_lock(args=[self.keys.base, token, self._lock_ttl_ms])
            except RedisError as exc:
                log.warning("quota rebuild: cannot renew the lock (%s); retrying", exc)
                continue
            if not renewed:
                log.warning("quota rebuild: the lock was taken over; this rebuild stops at its next write")
                return
            stats.lock_renewals += 1

    async def _fenced(self, script: AsyncScript, token: str, args: Sequence[Any], stats: RebuildStats) -> int:
        result = int(await script(args=[self.keys.base, token, *args]))
        stats.writes += 1
        if result < 0:
            raise _LockLost("the quota rebuild lock is not this rebuild's any more")
        return result

    async def _clear_counters(self, token: str, stats: RebuildStats) -> None:
        # Leftovers (if only the marker was lost) must not add to the rebuilt values.
        # Large SCAN pages and UNLINK (freed off Redis's main thread).
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=self.keys.pattern(), count=10_000):
            batch.append(_text(key))
            if len(batch) >= _CLEAR_CHUNK:
                stats.cleared += await self._fenced(self._fenced_unlink, token, batch, stats)
                batch.clear()
        if batch:
            stats.cleared += await self._fenced(self._fenced_unlink, token, batch, stats)

    async def _restore_totals(
        self, token: str, totals: list[UsageTotals], day: Window, month: Window, now: datetime, stats: RebuildStats
    ) -> None:
        head = [day.id, month.id, _window_ttl_s(day, now), _window_ttl_s(month, now)]
        for i in range(0, len(totals), _RESTORE_CHUNK):
            flat = [v for t in totals[i : i + _RESTORE_CHUNK] for v in (t.user_id, t.day_tokens, t.month_tokens)]
            await self._fenced(self._fenced_totals, token, [*head, *flat], stats)

    async def _restore_open(
        self, token: str, reservations: list[OpenReservation], now: datetime, stats: RebuildStats
    ) -> None:
        flat = open_reservation_args(reservations, to_ms(now), self._reservation_ttl_ms)
        step = 4 * _RESTORE_CHUNK
        for i in range(0, len(flat), step):
            await self._fenced(self._fenced_open, token, [to_ms(now), RECORD_GRACE_MS, *flat[i : i + step]], stats)

    async def _verify(self, request_id: str, snapshot: str, now: datetime) -> None:
        """VERIFY: Redis has no record of the request since a rebuild; the ledger says whether it was charged.
        Charged: its record is adopted as committed (and the charge counted once, when the rebuild's
        snapshot did not hold the row)."""
        try:
            row = await self._source.charged(request_id)
        except QuotaError:
            raise
        except Exception as exc:  # asyncpg/OS errors: the truth cannot be read now
            raise QuotaUnavailable(f"cannot read the usage ledger: {type(exc).__name__}: {exc}") from exc
        if row is None:
            return
        counted = LedgerSnapshot.parse(snapshot).counts(row.xmin)
        day, month = day_window(row.occurred_at), month_window(row.occurred_at)
        await self._run(
            self._adopt,
            [
                request_id,
                row.user_id,
                row.total_tokens,
                "" if counted else "1",
                day.id,
                month.id,
                _window_ttl_s(day, now),
                _window_ttl_s(month, now),
                self._committed_ttl_s * 1000,
                to_ms(now),
            ],
            now,
        )

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

    async def _run_verified(self, script: AsyncScript, request_id: str, args: list[Any], now: datetime) -> list[str]:
        """Run a script that may answer VERIFY (its last argument: verified or not): verify, then run it again."""
        reply = await self._run(script, [*args, ""], now)
        if reply[0] != "VERIFY":
            return reply
        await self._verify(request_id, reply[1], now)
        return await self._run(script, [*args, "1"], now)

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


def open_reservation_args(reservations: Sequence[OpenReservation], now_ms: int, reservation_ttl_ms: int) -> list[Any]:
    """FENCED_RESTORE_OPEN's groups (request_id, user, tokens, expires_ms) for the holds still live. Pure."""
    flat: list[Any] = []
    for r in reservations:
        started_ms = to_ms(r.started_at) if r.started_at is not None else now_ms
        expires = started_ms + reservation_ttl_ms
        if expires > now_ms:  # else that worker's hold would have expired by now
            flat += (r.request_id, r.user_id, r.reserved_tokens, expires)
    return flat


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
