"""QuotaService: the facade the gateway, the worker and the read API use.

- gateway: ``admit(user, max_tokens)`` -- a cheap check (could max_tokens still fit?) plus
  requests-per-minute; answers 429 with ``retry_after_s`` when not allowed.
- worker: ``reserve`` an upper bound of the request's tokens (claiming the request id, see
  quota.scripts), then ``commit`` the actual tokens or ``release`` on failure. All three are idempotent
  by request_id; ``refuse`` claims a request as refused (a rejection that must be the request's own).
- read API: ``view(user)`` for GET /api/v1/users/{user_id}/quota.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Final, Literal, cast, get_args

import asyncpg
import redis.asyncio as redis

from events.identity import RequestClaim
from events.model import utc_now
from events.request_rules import Rejection, RejectReason, check_max_tokens_per_request
from mlp.settings import Settings
from projections.status_cache import QueuedStatus
from quota import store
from quota.ledger import (
    COMMITTED_TTL_S,
    LOCK_TTL_S,
    CancelResult,
    QuotaUnavailable,
    RedisLedger,
    ReleaseResult,
    ReserveResult,
)
from quota.plans import (
    LimitName,
    Limits,
    Window,
    WindowKind,
    check_user_id,
    day_window,
    month_window,
    remaining,
    seconds_until,
)

LIMITS_CACHE_S = 5.0
# While a limits follower listens (quota.limits_follower), a change is notified at once: the entries may
# live this long, the backstop for a notification lost with its connection.
LIMITS_CACHE_FOLLOWED_S = 300.0
LIMITS_CACHE_SIZE = 10_000
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """The settings the quota service uses (built from the platform's ``Settings`` by a composition root)."""

    redis_prefix: str
    default_plan: str  # the plan of a user without one of their own
    reservation_ttl_s: float  # how long a worker's hold lives unless committed or released
    committed_ttl_s: int = COMMITTED_TTL_S  # how long a claim and a committed record live (redeliveries)
    rebuild_lock_ttl_s: float = LOCK_TTL_S  # the rebuild's lock, renewed while it runs

    @classmethod
    def of(cls, settings: Settings) -> QuotaSettings:
        return cls(
            settings.redis_prefix,
            settings.default_plan,
            settings.reservation_ttl_s,
            settings.quota_committed_ttl_s,
            settings.quota_rebuild_lock_ttl_s,
        )


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    limit: LimitName | None = None
    retry_after_s: int = 0
    detail: str = ""


# What the worker does with a message, given its reservation:
# run: call Triton (granted; or already, the redelivery of a request whose hold is still live);
# finished: acknowledge, nothing else (the status cache holds the outcome);
# done: the request ended (committed or released): publish ``outcome_event`` again when kept, acknowledge;
# refused: publish ``rejection`` on the request; conflict: the id names another request, answer the
# publisher alone (events.identity.duplicate_rejection).
# cancel: a cancel was asked for while it held its reservation (a redelivery): end it cancelled, never run it.
Answer = Literal["run", "finished", "done", "refused", "conflict", "cancel"]
_REJECT_REASONS: Final = frozenset(get_args(RejectReason))
# The limits the quota scripts refuse by (max_tokens_per_request is a request rule: see reserve's max_tokens).
_COUNTED_LIMITS: Final = frozenset({"tokens_per_day", "tokens_per_month", "requests_per_minute"})


@dataclass(frozen=True, slots=True)
class Reservation:
    """The worker's answer; ``answer`` says what to do. ``granted`` means: a reservation is held for it.

    ``already`` is True for a redelivery: the first reservation is still held, or the request was
    already committed (``committed``; its tokens are charged and committing again changes nothing).
    """

    granted: bool
    already: bool
    limit: LimitName | None
    reserved_tokens: int
    committed: bool = False
    # The request's status cache already holds its outcome: nothing to run and nothing reserved.
    finished: bool = False
    answer: Answer = "run"
    rejection: Rejection | None = None  # refused: what to tell the publisher, on the request
    outcome_event: bytes | None = None  # done: the outcome event the request ended with, when kept


@dataclass(frozen=True, slots=True)
class WindowUsage:
    window: WindowKind
    id: str
    limit: int
    used: int
    reserved: int
    remaining: int
    starts_at: datetime
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class QuotaView:
    user_id: str
    plan: str
    requests_per_minute: int
    max_tokens_per_request: int
    day: WindowUsage
    month: WindowUsage


def _window_usage(kind: WindowKind, window: Window, limit: int, used: int, reserved: int) -> WindowUsage:
    return WindowUsage(
        kind, window.id, limit, used, reserved, remaining(limit, used, reserved), window.starts_at, window.resets_at
    )


_LIMIT_WORDS: dict[str, str] = {
    "tokens_per_day": "daily token quota",
    "tokens_per_month": "monthly token quota",
    "requests_per_minute": "requests-per-minute limit",
    "max_tokens_per_request": "max_tokens per request",
}


def _rpm_detail(limits: Limits) -> str:
    """Why requests_per_minute refused: the gateway's 429 and the worker's rejection say the same."""
    return f"{limits.requests_per_minute} requests per minute allowed on the {limits.plan} plan"


def _answered(result: ReserveResult) -> Reservation:
    """A reservation's answer other than a refusal."""
    match result.outcome:
        case "finished":
            return Reservation(False, False, None, 0, finished=True, answer="finished")
        case "granted":
            return Reservation(True, False, None, result.tokens)
        case "already":
            return Reservation(True, True, None, result.tokens)
        case "committed":
            return Reservation(
                True, True, None, result.tokens, committed=True, answer="done", outcome_event=result.outcome_event
            )
        case "released":
            return Reservation(False, True, None, 0, answer="done", outcome_event=result.outcome_event)
        case "conflict":
            return Reservation(False, False, None, 0, answer="conflict")
        case "cancelling":
            return Reservation(True, True, None, result.tokens, answer="cancel")
    raise QuotaUnavailable(f"unexpected reservation outcome {result.outcome!r}")


def _refused(result: ReserveResult, limits: Limits, tokens: int, refusal: Rejection | None) -> Reservation:
    """A refused reservation: a quota limit (the gateway's reasons and words), or a request rule."""
    if result.limit in _COUNTED_LIMITS:
        limit = cast(LimitName, result.limit)
        if limit == "requests_per_minute":
            detail = _rpm_detail(limits)
        else:
            budget = limits.tokens_per_day if limit == "tokens_per_day" else limits.tokens_per_month
            detail = (
                f"{_LIMIT_WORDS[limit]} of {budget} tokens on the {limits.plan} plan cannot cover this "
                f"request's {tokens} tokens (an upper bound)"
            )
        return Reservation(False, False, limit, 0, answer="refused", rejection=Rejection("quota_exceeded", detail))
    return Reservation(False, False, None, 0, answer="refused", rejection=_stored_rejection(result, refusal))


def _stored_rejection(result: ReserveResult, refusal: Rejection | None) -> Rejection:
    """The rule a claim was refused for: the caller's own rejection when it names the same reason (the usual
    case: a redelivery breaks the same rule), else the stored reason with a generic message."""
    if refusal is not None and refusal.reason == result.limit:
        return refusal
    reason = cast(RejectReason, result.limit) if result.limit in _REJECT_REASONS else "invalid_request"
    return Rejection(reason, f"this request was refused before ({result.limit})")


class QuotaService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: redis.Redis,
        settings: QuotaSettings,
        clock: Callable[[], datetime] = utc_now,
        *,
        limits_cache_s: float = LIMITS_CACHE_S,
        rebuild_timeout_s: float = 30.0,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._clock = clock
        self._limits_cache_s = limits_cache_s
        self._limits: OrderedDict[str, tuple[float, Limits]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Limits]] = {}
        self._forgotten = 0  # counts forget_limits: a load that overlapped one may hold what it forgot
        self._followed: asyncio.Event | None = None
        self.ledger = RedisLedger(
            redis,
            settings.redis_prefix,
            store.PostgresLedgerSource(pool),
            reservation_ttl_s=settings.reservation_ttl_s,
            committed_ttl_s=settings.committed_ttl_s,
            rebuild_timeout_s=rebuild_timeout_s,
            lock_ttl_s=settings.rebuild_lock_ttl_s,
        )

    # --- limits ---------------------------------------------------------------------------------

    async def limits_for(self, user_id: str) -> Limits:
        """The user's limits, cached: for minutes while a follower forgets every change (``follow_limit_changes``),
        else for a few seconds (``mlp quota set`` takes effect that fast)."""
        check_user_id(user_id)
        cached = self._limits.get(user_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        task = self._loading.get(user_id)
        if task is None:  # one query per user, however many requests wait for it
            task = asyncio.ensure_future(self._load_limits(user_id, cached[1] if cached else None))
            self._loading[user_id] = task
            task.add_done_callback(lambda done: self._loaded(user_id, done))
        return await asyncio.shield(task)

    def follow_limit_changes(self, listening: asyncio.Event) -> None:
        """Cache limits for minutes while ``listening`` is set: a follower (quota.limits_follower) then calls
        ``forget_limits`` for every change, and forgets all each time it listens again."""
        self._followed = listening

    async def _load_limits(self, user_id: str, stale: Limits | None) -> Limits:
        forgotten = self._forgotten
        try:
            limits = await store.fetch_limits(self._pool, user_id, self._settings.default_plan)
        except _DB_ERRORS as exc:
            if stale is not None:  # Postgres is briefly away: the last known limits beat a 503
                return stale
            raise QuotaUnavailable(f"cannot read quota limits: {type(exc).__name__}: {exc}") from exc
        if forgotten == self._forgotten:  # else a change was notified meanwhile: this read may predate it
            self._remember(user_id, limits)
        return limits

    def _loaded(self, user_id: str, task: asyncio.Future[Limits]) -> None:
        if self._loading.get(user_id) is task:
            del self._loading[user_id]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    def _remember(self, user_id: str, limits: Limits) -> None:
        followed = self._followed is not None and self._followed.is_set()
        ttl_s = max(self._limits_cache_s, LIMITS_CACHE_FOLLOWED_S) if followed else self._limits_cache_s
        self._limits[user_id] = (time.monotonic() + ttl_s, limits)
        self._limits.move_to_end(user_id)
        while len(self._limits) > LIMITS_CACHE_SIZE:
            self._limits.popitem(last=False)

    def forget_limits(self, user_id: str | None = None) -> None:
        self._forgotten += 1
        if user_id is None:
            self._limits.clear()
        else:
            self._limits.pop(user_id, None)

    # --- gateway --------------------------------------------------------------------------------

    async def admit(
        self,
        user_id: str,
        max_tokens: int,
        estimate_tokens: int | None = None,
        *,
        queued: QueuedStatus | None = None,
        request_id: str | None = None,
        claim: RequestClaim | None = None,
    ) -> Admission:
        """Gateway check: ``max_tokens`` against the per-request limit, ``estimate_tokens`` (default:
        max_tokens) against the remaining budget, and the requests-per-minute window. ``queued``: the
        request's first status entry, written only when admitted, in the same Redis round trip;
        ``request_id`` and ``claim``: the request is claimed for ``user_id`` then too (before it is published)."""
        limits = await self.limits_for(user_id)
        too_many = check_max_tokens_per_request(max_tokens, limits.max_tokens_per_request, limits.plan)
        if too_many is not None:
            return Admission(False, "max_tokens_per_request", 0, too_many.message)
        now = self._clock()
        needed = max_tokens if estimate_tokens is None else estimate_tokens
        result = await self.ledger.admit(
            user_id, needed, limits, now, queued=queued, request_id=request_id, claim=claim
        )
        if result.allowed or result.limit is None:
            return Admission(True)
        if result.limit == "requests_per_minute":
            retry = max(1, -(-result.retry_ms // 1000))
            return Admission(False, result.limit, retry, _rpm_detail(limits))
        reset_window, limit = (
            (day_window(now), limits.tokens_per_day)
            if result.limit == "tokens_per_day"
            else (month_window(now), limits.tokens_per_month)
        )
        detail = (
            f"{_LIMIT_WORDS[result.limit]} of {limit} tokens on the {limits.plan} plan cannot fit "
            f"{needed} more tokens (used {result.used}, reserved {result.reserved}); "
            f"resets at {reset_window.resets_at.isoformat()}"
        )
        return Admission(False, result.limit, seconds_until(now, reset_window.resets_at), detail)

    # --- worker ---------------------------------------------------------------------------------

    async def reserve(
        self,
        request_id: str,
        user_id: str,
        tokens: int,
        *,
        status_key: str | None = None,
        claim: RequestClaim | None = None,
        refusal: Rejection | None = None,
        max_tokens: int | None = None,
        count_request: bool = False,
    ) -> Reservation:
        """Claim the request and reserve ``tokens`` (see scripts.RESERVE and ``Reservation.answer``).

        ``status_key``: check that status-cache hash too; ``claim``: the message's event and content (a
        different one under the same id is a conflict); ``refusal``: the request breaks this request rule;
        ``max_tokens``: checked against the plan's per-request ceiling (the admission's rule, the same
        message); ``count_request``: a new claim counts against the requests-per-minute limit (bus
        requests: the gateway's admission counted its own).
        """
        limits = await self.limits_for(user_id)
        if refusal is None and max_tokens is not None:
            refusal = check_max_tokens_per_request(max_tokens, limits.max_tokens_per_request, limits.plan)
        result = await self.ledger.reserve(
            request_id,
            user_id,
            tokens,
            limits,
            self._clock(),
            status_key=status_key,
            claim=claim,
            refusal=refusal.reason if refusal is not None else None,
            count_request=count_request,
        )
        if result.outcome == "refused":
            return _refused(result, limits, tokens, refusal)
        return _answered(result)

    async def claim(self, request_id: str, user_id: str, claim: RequestClaim, *, status_key: str | None = None) -> bool:
        """The collector's claim before it stores a request: False when the id names another request."""
        return await self.ledger.claim(request_id, user_id, self._clock(), claim=claim, status_key=status_key)

    async def refuse(
        self,
        request_id: str,
        user_id: str,
        claim: RequestClaim,
        rejection: Rejection,
        *,
        status_key: str | None = None,
    ) -> Reservation:
        """Claim the request as refused with ``rejection`` (no limits, no reservation). ``answer`` "refused":
        the rejection may be published on the request; anything else: the id is not this message's to end."""
        result = await self.ledger.refuse(
            request_id, user_id, rejection.reason, self._clock(), claim=claim, status_key=status_key
        )
        if result.outcome == "refused":
            return Reservation(False, False, None, 0, answer="refused", rejection=_stored_rejection(result, rejection))
        return _answered(result)

    async def commit(
        self,
        request_id: str,
        actual_tokens: int,
        *,
        user_id: str | None = None,
        at: datetime | None = None,
        outcome: bytes | None = None,
    ) -> None:
        """Charge ``actual_tokens`` once. ``at``: the completion's time (default: now), which picks the window.
        ``outcome``: the encoded outcome event, kept with the claim (a redelivery is answered with it)."""
        await self.ledger.commit(request_id, actual_tokens, at or self._clock(), user_id=user_id, outcome=outcome)

    async def release(
        self,
        request_id: str,
        *,
        outcome: bytes | None = None,
        user_id: str | None = None,
        claim: RequestClaim | None = None,
    ) -> ReleaseResult:
        """Free the request's hold (it failed). ``outcome``: its encoded outcome event, kept with the claim;
        ``user_id``/``claim``: the ending message's, checked against the claim (see RedisLedger.release)."""
        return await self.ledger.release(request_id, self._clock(), outcome=outcome, user_id=user_id, claim=claim)

    async def cancel(
        self, request_id: str, user_id: str, *, outcome: bytes, status_key: str, channel: str, cause: str = "http"
    ) -> CancelResult:
        """Cancel the owner's request, atomically with the worker's reservation (see RedisLedger.cancel).
        Nothing is charged here: a request cancelled while queued never held a reservation, and a running
        one's reservation is released by its worker when its Triton call is cancelled."""
        return await self.ledger.cancel(
            request_id, user_id, self._clock(), outcome=outcome, status_key=status_key, channel=channel, cause=cause
        )

    # --- read API -------------------------------------------------------------------------------

    async def daily_usage(self, user_id: str, first: date, last: date) -> list[store.DailyUsage]:
        """Per-day, per-model token totals from the ledger (Postgres), ``first`` to ``last`` inclusive."""
        try:
            return await store.daily_usage(self._pool, user_id, first, last)
        except _DB_ERRORS as exc:
            raise QuotaUnavailable(f"cannot read usage: {type(exc).__name__}: {exc}") from exc

    async def view(self, user_id: str) -> QuotaView:
        limits = await self.limits_for(user_id)
        snap = await self.ledger.snapshot(user_id, self._clock())
        return QuotaView(
            user_id=user_id,
            plan=limits.plan,
            requests_per_minute=limits.requests_per_minute,
            max_tokens_per_request=limits.max_tokens_per_request,
            day=_window_usage("day", snap.day, limits.tokens_per_day, snap.used_day, snap.reserved),
            month=_window_usage("month", snap.month, limits.tokens_per_month, snap.used_month, snap.reserved),
        )
