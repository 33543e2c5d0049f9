"""Quota limits and windows: pure data and pure functions (the clock is always passed in).

Limits are data (Postgres ``quota_plans`` + per-user ``user_quotas`` overrides); this module only
combines them and computes the UTC windows they apply to.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal, NamedTuple

from events.registry import ModelSpec
from events.request_rules import IDENTIFIER

LimitName = Literal["tokens_per_day", "tokens_per_month", "requests_per_minute", "max_tokens_per_request"]
LIMIT_NAMES: Final[tuple[LimitName, ...]] = (
    "tokens_per_day",
    "tokens_per_month",
    "requests_per_minute",
    "max_tokens_per_request",
)
WindowKind = Literal["day", "month"]

PLAN_NAME: Final = re.compile(r"^[a-z0-9_\-]{1,32}$")
# The Redis scripts compute in Lua numbers (doubles): integers are exact up to 2**53.
MAX_LIMIT: Final = 2**53 - 1
# A plan's max_timeout_s unless it sets one (the column's default, migration 0010).
DEFAULT_MAX_TIMEOUT_S: Final = 3600
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class QuotaError(Exception):
    """Base of the quota context's errors (translated to HTTP/CLI answers at the edge)."""


class InvalidQuota(QuotaError, ValueError):
    """A limit, plan name or user id that is not acceptable (bad input)."""


class UnknownPlan(QuotaError, LookupError):
    def __init__(self, plan: str, known: tuple[str, ...] = ()) -> None:
        hint = f"; known plans: {', '.join(known)}" if known else ""
        super().__init__(f"unknown plan {plan!r}{hint}")
        self.plan = plan


def check_limit(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidQuota(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise InvalidQuota(f"{name} must be >= 0, got {value}")
    if value > MAX_LIMIT:
        raise InvalidQuota(f"{name} is too large: {value}")
    return value


def check_plan_name(name: str) -> str:
    if not PLAN_NAME.fullmatch(name):
        raise InvalidQuota(f"plan name must match {PLAN_NAME.pattern}, got {name!r}")
    return name


def check_user_id(user_id: str) -> str:
    if not IDENTIFIER.fullmatch(user_id):  # user ids travel in keys, routing keys and URLs
        raise InvalidQuota(f"user_id must match {IDENTIFIER.pattern}, got {user_id!r}")
    return user_id


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force for one user: a plan's limits with the user's overrides applied."""

    plan: str
    tokens_per_day: int
    tokens_per_month: int
    requests_per_minute: int
    max_tokens_per_request: int
    # The plan's bounds on a request's deadline (plan-wide; migration 0010): a submit's timeout_s is at most
    # max_timeout_s; default_timeout_s (None: no deadline) applies to a request that names none.
    max_timeout_s: int = DEFAULT_MAX_TIMEOUT_S
    default_timeout_s: int | None = None

    def __post_init__(self) -> None:
        check_plan_name(self.plan)
        for name in LIMIT_NAMES:
            check_limit(name, getattr(self, name))
        if self.max_timeout_s < 1:
            raise InvalidQuota(f"max_timeout_s must be >= 1, got {self.max_timeout_s}")
        if self.default_timeout_s is not None and not 1 <= self.default_timeout_s <= self.max_timeout_s:
            raise InvalidQuota(f"default_timeout_s must be within 1..max_timeout_s, got {self.default_timeout_s}")


@dataclass(frozen=True, slots=True)
class Overrides:
    """Per-user overrides; None keeps the plan's value."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_minute: int | None = None
    max_tokens_per_request: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                check_limit(f.name, value)

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}

    def is_empty(self) -> bool:
        return all(v is None for v in self.as_dict().values())


def effective_limits(plan: Limits, overrides: Overrides) -> Limits:
    changes: dict[str, Any] = {name: value for name, value in overrides.as_dict().items() if value is not None}
    return replace(plan, **changes)


class Window(NamedTuple):
    """One UTC quota window: ``id`` names it in keys and answers (``2025-01-31``, ``2025-01``)."""

    id: str
    starts_at: datetime
    resets_at: datetime


def _as_utc(now: datetime) -> datetime:
    # A naive datetime is ambiguous: refuse it rather than guess the machine's zone.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("quota windows need a timezone-aware datetime")
    return now.astimezone(UTC)


def day_window(now: datetime) -> Window:
    now = _as_utc(now)
    return _day_window(now.year, now.month, now.day)


def month_window(now: datetime) -> Window:
    now = _as_utc(now)
    return _month_window(now.year, now.month)


# Every admission, reservation and commit asks for both windows: computed once per day or month.
@functools.lru_cache(maxsize=64)
def _day_window(year: int, month: int, day: int) -> Window:
    start = datetime(year, month, day, tzinfo=UTC)
    return Window(start.strftime("%Y-%m-%d"), start, start + timedelta(days=1))


@functools.lru_cache(maxsize=64)
def _month_window(year: int, month: int) -> Window:
    start = datetime(year, month, 1, tzinfo=UTC)
    following = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return Window(start.strftime("%Y-%m"), start, following)


def window(kind: WindowKind, now: datetime) -> Window:
    return day_window(now) if kind == "day" else month_window(now)


def day_of(now: datetime) -> date:
    return _as_utc(now).date()


def seconds_until(now: datetime, then: datetime) -> int:
    """Whole seconds from ``now`` until ``then``, rounded up and at least 1 (a Retry-After value)."""
    return max(1, math.ceil((then - now).total_seconds()))


def to_ms(moment: datetime) -> int:
    """Epoch milliseconds (the scripts' clock unit)."""
    # Integer arithmetic: float timestamps would turn 23:59:59.999 into ...998 ms.
    return (_as_utc(moment) - _EPOCH) // timedelta(milliseconds=1)


def reservation_estimate(prompt: str, max_tokens: int, model: ModelSpec | None = None) -> int:
    """An UPPER bound of the tokens a request can use: what is reserved before Triton is called.

    Every WordPiece/BPE token covers at least one character of the prompt, so the prompt has at
    most ``len(prompt)`` tokens; the completion has at most ``max_tokens``. Reserving the upper
    bound means concurrent requests never push a user past the limit; the commit then charges
    the actual count and returns the rest. The gateway's admission uses the same bound, so a
    request it admits is one the worker's reservation can cover.

    With the model's registry entry: an embed model generates nothing (its requests' max_tokens is
    not charged), and the special tokens its tokenizer adds ([CLS], [SEP]) are counted.
    """
    if model is None:
        return len(prompt) + max_tokens
    completion = max_tokens if model.generates else 0
    return len(prompt) + model.tokenizer.special_tokens + completion


def remaining(limit: int, used: int, reserved: int) -> int:
    return max(0, limit - used - reserved)
