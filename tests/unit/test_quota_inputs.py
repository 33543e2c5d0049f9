"""Input validation at the edges of the quota context (no services needed)."""

from __future__ import annotations

from datetime import date

import pytest

from ops.quota import build_parser, main
from read_api.quota_routes import DateRangeError, date_range

TODAY = date(2025, 6, 15)


def test_usage_range_defaults_to_the_last_30_days() -> None:
    assert date_range(None, None, TODAY) == (date(2025, 5, 17), TODAY)
    assert date_range("2025-01-01", "2025-01-01", TODAY) == (date(2025, 1, 1), date(2025, 1, 1))


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [
        ("2025-02-01", "2025-01-01", "'from' (2025-02-01) must not be after 'to' (2025-01-01)"),
        ("2024-01-01", "2025-01-01", "the range covers 367 days; at most 366"),
        ("2025-02-30", "2025-03-01", "'from' is not a real date"),
        ("01/02/2025", None, "'from' must be a date as YYYY-MM-DD"),
        (None, "1735689600", "'to' must be a date as YYYY-MM-DD"),
    ],
)
def test_bad_usage_ranges_say_what_is_wrong(first: str | None, last: str | None, message: str) -> None:
    with pytest.raises(DateRangeError) as caught:
        date_range(first, last, TODAY)
    assert message in str(caught.value)


def test_a_leap_year_fits_in_the_range_limit() -> None:
    assert date_range("2024-01-01", "2024-12-31", TODAY) == (date(2024, 1, 1), date(2024, 12, 31))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set", "alice", "--tokens-per-day", "-5"], "argument --tokens-per-day: must be >= 0, got -5"),
        (["set", "alice", "--requests-per-minute", "ten"], "must be a whole number, got 'ten'"),
        (["set", "alice", "--max-tokens-per-request", str(2**53)], "must be <= 9007199254740991"),
        (["set", "not a user", "--plan", "pro"], "user_id must match"),
        (["set", "alice", "--plan", "Pro Plan"], "plan name must match"),
        (["show"], "the following arguments are required: user"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_cli_input_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_parses_every_limit_option() -> None:
    args = build_parser().parse_args(
        [
            "set",
            "alice",
            "--plan",
            "pro",
            "--tokens-per-day",
            "1",
            "--tokens-per-month",
            "2",
            "--requests-per-minute",
            "3",
            "--max-tokens-per-request",
            "4",
        ]
    )
    assert (args.plan, args.tokens_per_day, args.tokens_per_month) == ("pro", 1, 2)
    assert (args.requests_per_minute, args.max_tokens_per_request) == (3, 4)
