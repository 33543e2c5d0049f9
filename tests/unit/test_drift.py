"""The comparisons of ``mlp reconcile`` (ops.drift): pure functions from what was read to drift rows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from ops.drift import (
    CounterKey,
    Drift,
    StreamCounts,
    Usage,
    UsageKey,
    confirmed,
    count_streams,
    counter_drift,
    expected_counters,
    ledger_drift,
    render_table,
    row_drift,
    stream_drift,
)

NOW = datetime(2030, 5, 20, 12, 0, tzinfo=UTC)


def test_streams_are_counted_per_request() -> None:
    events = [
        ("b", "InferenceRequested", NOW),
        ("a", "InferenceRequested", NOW),
        ("a", "InferenceStarted", NOW + timedelta(seconds=1)),
        ("a", "InferenceCompleted", NOW + timedelta(seconds=2)),
    ]
    assert count_streams(events) == [
        StreamCounts(
            "a", requested=1, terminal=1, last_event_at=NOW + timedelta(seconds=2), outcome="InferenceCompleted"
        ),
        StreamCounts("b", requested=1, terminal=0, last_event_at=NOW),
    ]


def test_a_request_without_an_outcome_is_drift_only_after_the_grace() -> None:
    young = StreamCounts("young", 1, 0, NOW - timedelta(seconds=10))
    old = StreamCounts("old", 1, 0, NOW - timedelta(seconds=400))
    fine = StreamCounts("fine", 1, 1, NOW - timedelta(days=3))
    twice = StreamCounts("twice", 1, 2, NOW, "InferenceCompleted")
    orphan = StreamCounts("orphan", 0, 1, NOW, "InferenceCompleted")
    # a poison message that named its request: rejected, its InferenceRequested never stored
    poisoned = StreamCounts("poisoned", 0, 1, NOW, "InferenceRejected")
    resubmitted = StreamCounts("resubmitted", 2, 1, NOW, "InferenceCompleted")
    assert stream_drift([young, old, fine, twice, orphan, poisoned, resubmitted], NOW, grace_s=300) == [
        Drift("stream", "request/old", "1 terminal event", "0 terminal events"),
        Drift("stream", "request/orphan", "1 InferenceRequested", "0 InferenceRequested"),
        Drift("stream", "request/resubmitted", "1 InferenceRequested", "2 InferenceRequested"),
        Drift("stream", "request/twice", "1 terminal event", "2 terminal events"),
    ]


def test_row_drift_names_the_columns_that_differ_and_the_rows_on_one_side_only() -> None:
    fresh = {"a": {"status": "completed", "prompt": "p"}, "b": {"status": "failed"}}
    live = {"a": {"status": "running", "prompt": "p"}, "c": {"status": "queued"}}
    assert row_drift("inference_requests", fresh, live) == [
        Drift("read_model", "inference_requests/a", "status=completed", "status=running"),
        Drift("read_model", "inference_requests/b", "a row", "(missing)"),
        Drift("read_model", "inference_requests/c", "(no row)", "a row"),
    ]
    assert row_drift("inference_requests", fresh, dict(fresh)) == []


def test_row_drift_shows_times_and_nulls_readably_and_cuts_long_values() -> None:
    fresh = {"a": {"finished_at": NOW, "error_code": None, "completion": "x" * 100}}
    live = {"a": {"finished_at": None, "error_code": "model_error", "completion": "y"}}
    (drift,) = row_drift("t", fresh, live)
    assert drift.expected == f"finished_at={NOW.isoformat()}, error_code=null, completion={'x' * 57}..."
    assert drift.actual == "finished_at=null, error_code=model_error, completion=y"


def test_ledger_drift_compares_the_daily_rows_with_the_ledgers_sums() -> None:
    day = date(2030, 5, 20)
    ledger = {UsageKey("alice", day, "m"): Usage(10, 5, 15, 2), UsageKey("bob", day, "m"): Usage(1, 1, 2, 1)}
    daily = {UsageKey("alice", day, "m"): Usage(10, 5, 16, 2), UsageKey("carol", day, "m"): Usage(1, 0, 1, 1)}
    assert ledger_drift(ledger, daily) == [
        Drift(
            "ledger",
            "token_usage_daily/alice/2030-05-20/m",
            "prompt=10 completion=5 total=15 requests=2",
            "prompt=10 completion=5 total=16 requests=2",
        ),
        Drift("ledger", "token_usage_daily/bob/2030-05-20/m", "prompt=1 completion=1 total=2 requests=1", "(missing)"),
        Drift("ledger", "token_usage_daily/carol/2030-05-20/m", "(no row)", "prompt=1 completion=0 total=1 requests=1"),
    ]


def test_counters_must_equal_the_ledger_plus_the_open_reservations_and_missing_means_zero() -> None:
    expected = expected_counters(
        {("alice", "2030-05-20"): 42}, {("alice", "2030-05"): 100, ("bob", "2030-05"): 7}, {"carol": 33}
    )
    assert expected == {
        CounterKey("used_day", "alice", "2030-05-20"): 42,
        CounterKey("used_month", "alice", "2030-05"): 100,
        CounterKey("used_month", "bob", "2030-05"): 7,
        CounterKey("reserved", "carol"): 33,
    }
    actual = dict(expected)
    actual[CounterKey("used_day", "alice", "2030-05-20")] = 47
    del actual[CounterKey("reserved", "carol")]
    actual[CounterKey("used_day", "dave", "2030-05-20")] = 0  # an empty counter: nothing to report
    assert counter_drift(expected, actual) == [
        Drift("redis", "quota/reserved/carol", "33", "0"),
        Drift("redis", "quota/used_day/alice/2030-05-20", "42", "47"),
    ]


def test_only_drift_seen_by_both_looks_is_confirmed() -> None:
    transient = Drift("redis", "quota/used_day/a/d", "1", "2")
    lasting = Drift("read_model", "inference_requests/x", "status=completed", "status=running")
    changed = Drift("read_model", "inference_requests/x", "status=completed", "status=failed")
    assert confirmed([transient, lasting], [changed]) == [changed]
    assert confirmed([], [lasting]) == []


def test_the_table_has_a_header_and_a_count_even_when_empty() -> None:
    assert render_table([]) == "CHECK  KEY  EXPECTED  ACTUAL\n0 drift row(s)"
    table = render_table([Drift("redis", "quota/reserved/carol", "33", "0")]).splitlines()
    assert table[0].split() == ["CHECK", "KEY", "EXPECTED", "ACTUAL"]
    assert table[1].split() == ["redis", "quota/reserved/carol", "33", "0"]
    assert table[2] == "1 drift row(s)"
