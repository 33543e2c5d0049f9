"""Quota limits and UTC windows: pure functions, the clock passed in."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from quota.plans import (
    InvalidQuota,
    Limits,
    Overrides,
    UnknownPlan,
    check_user_id,
    day_window,
    effective_limits,
    month_window,
    remaining,
    seconds_until,
    to_ms,
)

FREE = Limits("free", 100_000, 1_000_000, 60, 1024)


def test_overrides_replace_only_the_limits_they_set() -> None:
    limits = effective_limits(FREE, Overrides(tokens_per_day=5, requests_per_minute=0))
    assert limits == Limits("free", 5, 1_000_000, 0, 1024)
    assert effective_limits(FREE, Overrides()) == FREE


@pytest.mark.parametrize(
    "field", ["tokens_per_day", "tokens_per_month", "requests_per_minute", "max_tokens_per_request"]
)
def test_negative_limits_are_refused_with_the_limit_named(field: str) -> None:
    with pytest.raises(InvalidQuota, match=f"{field} must be >= 0"):
        Overrides(**{field: -1})
    bad: dict[str, Any] = {field: -5}
    with pytest.raises(InvalidQuota, match=field):
        replace(FREE, **bad)


def test_limits_beyond_exact_lua_integers_and_non_integers_are_refused() -> None:
    with pytest.raises(InvalidQuota, match="too large"):
        Overrides(tokens_per_day=2**53)
    with pytest.raises(InvalidQuota, match="integer"):
        Overrides(tokens_per_day=True)


def test_plan_names_and_user_ids_are_validated() -> None:
    with pytest.raises(InvalidQuota, match="plan name"):
        Limits("Gold Plan!", 1, 1, 1, 1)
    assert check_user_id("team:alice@acme") == "team:alice@acme"
    for bad in ("", "a b", "a.b", "x" * 129, "a/b"):
        with pytest.raises(InvalidQuota, match="user_id"):
            check_user_id(bad)


def test_unknown_plan_lists_the_known_plans() -> None:
    assert str(UnknownPlan("gold", ("free", "pro"))) == "unknown plan 'gold'; known plans: free, pro"


def test_the_last_millisecond_of_a_day_belongs_to_that_day_and_midnight_to_the_next() -> None:
    last = datetime(2025, 3, 14, 23, 59, 59, 999_000, tzinfo=UTC)
    assert day_window(last) == (
        "2025-03-14",
        datetime(2025, 3, 14, tzinfo=UTC),
        datetime(2025, 3, 15, tzinfo=UTC),
    )
    assert day_window(last + timedelta(milliseconds=1)).id == "2025-03-15"


def test_month_windows_roll_over_at_the_month_and_year_boundary() -> None:
    assert month_window(datetime(2024, 2, 29, 23, 59, 59, 999_000, tzinfo=UTC)) == (
        "2024-02",
        datetime(2024, 2, 1, tzinfo=UTC),
        datetime(2024, 3, 1, tzinfo=UTC),
    )
    december = month_window(datetime(2024, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC))
    assert december.resets_at == datetime(2025, 1, 1, tzinfo=UTC)
    assert month_window(datetime(2025, 1, 1, tzinfo=UTC)).id == "2025-01"


def test_windows_are_utc_whatever_the_zone_of_the_clock() -> None:
    # 01:30 in UTC+2 on the 1st is still the last day of the previous month in UTC.
    local = datetime(2025, 4, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert day_window(local).id == "2025-03-31"
    assert month_window(local).id == "2025-03"


def test_a_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        day_window(datetime(2025, 1, 1))


def test_epoch_milliseconds_are_exact() -> None:
    moment = datetime(2024, 1, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    assert to_ms(moment) == 1_706_745_599_999
    assert to_ms(moment + timedelta(milliseconds=1)) == 1_706_745_600_000


def test_retry_after_rounds_up_and_is_at_least_one_second() -> None:
    now = datetime(2025, 1, 1, 23, 59, 58, 500_000, tzinfo=UTC)
    assert seconds_until(now, datetime(2025, 1, 2, tzinfo=UTC)) == 2
    assert seconds_until(now, now) == 1


def test_remaining_never_goes_negative() -> None:
    assert remaining(100, 30, 20) == 50
    assert remaining(100, 90, 20) == 0
