"""The pure pieces of ``mlp bench --soak``: DURATION, the fault schedule, the rate, the verdict, RSS."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from ops.bench import main as bench
from ops.bench.soak_plan import (
    FAULT_KINDS,
    Charges,
    Fault,
    Injected,
    SoakReport,
    capacity,
    fault_counts,
    parse_duration,
    plan_faults,
    render_soak,
    soak_rate,
    verdict,
)
from ops.bench.spawn import rss_kib
from ops.bench.stats import render_rss


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("60s", 60.0), ("90", 90.0), ("1h", 3600.0), ("1m30s", 90.0), (" 2M ", 120.0), ("0.5m", 30.0)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "m", "10m-5s", "5s", "0", "25h", "-60s", "1m 30s"])
def test_bad_or_out_of_range_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|a soak lasts"):
        parse_duration(text)


def test_the_cli_refuses_a_bad_duration_and_soak_with_closed_loop_options() -> None:
    with pytest.raises(SystemExit) as bad:
        bench.build_parser().parse_args(["--soak", "soon"])
    assert bad.value.code == 2
    with pytest.raises(SystemExit) as mixed:
        bench.main(["--soak", "60s", "--concurrency", "8"])
    assert mixed.value.code == 2
    assert bench.build_parser().parse_args(["--soak", "10m", "--rate", "40"]).soak == 600.0


def test_a_sixty_second_soak_sees_every_fault_at_least_once() -> None:
    faults = plan_faults(60.0)
    assert faults == [
        Fault(15.0, "kill_worker"),
        Fault(21.0, "pause_collector", 7.5),
        Fault(30.0, "kill_worker"),
        Fault(33.0, "restart_redis"),
        Fault(45.0, "kill_worker"),
        Fault(51.0, "pause_collector", 7.5),
    ]


def test_ten_minutes_kill_a_worker_every_minute_and_restart_redis_every_three() -> None:
    faults = plan_faults(600.0)
    kills = [f.at_s for f in faults if f.kind == "kill_worker"]
    assert kills == [60.0 * k for k in range(1, 10)]
    assert [f.at_s for f in faults if f.kind == "restart_redis"] == [132.0, 312.0, 492.0]
    pauses = [f for f in faults if f.kind == "pause_collector"]
    assert [f.at_s for f in pauses] == [84.0, 204.0, 324.0, 444.0, 564.0]
    assert all(f.length_s == 10.0 for f in pauses)


@pytest.mark.parametrize("duration", [20.0, 37.0, 60.0, 95.0, 180.0, 600.0, 3600.0])
def test_every_schedule_has_each_fault_in_order_and_over_before_the_end(duration: float) -> None:
    faults = plan_faults(duration)
    assert faults == sorted(faults)
    assert {f.kind for f in faults} == set(FAULT_KINDS)
    assert all(f.at_s > 0 and f.at_s + f.length_s < duration for f in faults)
    # a pause ends before the next slot's worker kill
    kills = [f.at_s for f in faults if f.kind == "kill_worker"]
    for pause in (f for f in faults if f.kind == "pause_collector"):
        assert not any(pause.at_s < k < pause.at_s + pause.length_s for k in kills)


def test_the_rate_is_half_the_capacity_and_never_below_one() -> None:
    assert soak_rate(300.0) == 150.0
    assert soak_rate(301.0, 0.25) == 75.2
    assert soak_rate(0.0) == soak_rate(float("nan")) == soak_rate(1.5) == 1.0


def test_capacity_runs_from_the_first_submit_to_the_last_outcome() -> None:
    assert capacity(500, 100.0, 105.0) == 100.0
    assert capacity(0, 100.0, 105.0) == 0.0
    assert capacity(10, 100.0, None) == 0.0
    assert capacity(10, 100.0, 99.0) == 0.0


def _charges(**changes: int | None) -> Charges:
    base = Charges(
        completed=100,
        charged_once=100,
        uncharged=0,
        charged_not_completed=0,
        ledger_day_tokens=400,
        redis_day_tokens=400,
        open_reservations=0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _report(**changes: object) -> SoakReport:
    base = SoakReport(
        duration_s=60.0,
        rate=20.0,
        rate_source="--rate",
        user_id="soak-user",
        sent=100,
        accepted=100,
        terminal=100,
        outcomes={"InferenceCompleted": 100},
        lost_request_ids=[],
        multi_terminal_ids=[],
        charges=_charges(),
        drift=[],
        reconcile_notes=[],
        faults=[Injected(kind, 10.0, 1.0) for kind in FAULT_KINDS],
        rss_start_kib={"gateway": 80 * 1024},
        rss_end_kib={"gateway": 96 * 1024},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_clean_soak_passes() -> None:
    report = _report()
    assert verdict(report) == []
    assert report.lost == report.double_charged == 0
    text = render_soak(report)
    assert "LOST 0   DOUBLE-CHARGED 0" in text
    assert "gateway 80 -> 96 MiB" in text
    assert text.rstrip().endswith("PASSED")
    document = report.as_dict()
    assert document["lost"] == 0
    assert document["double_charged"] == 0
    assert document["problems"] == []


def test_lost_and_doubly_terminal_requests_fail_the_soak() -> None:
    report = _report(lost_request_ids=["a", "b"], multi_terminal_ids=["c"])
    assert report.lost == 3
    problems = verdict(report)
    assert any("2 accepted requests never reached" in p for p in problems)
    assert any("1 requests reached more than one terminal" in p for p in problems)
    assert "FAILED" in render_soak(report)


def test_a_counter_above_the_ledger_is_double_charging() -> None:
    report = _report(charges=_charges(redis_day_tokens=408))
    assert report.double_charged == 8
    assert any("8 tokens more than the ledger" in p for p in verdict(report))
    under = _report(charges=_charges(redis_day_tokens=392))
    assert under.double_charged == 0
    assert any("8 tokens less than the ledger" in p for p in verdict(under))


@pytest.mark.parametrize(
    ("charges", "words"),
    [
        (_charges(redis_day_tokens=None), "not built"),
        (_charges(charged_once=99, uncharged=1), "never charged"),
        (_charges(charged_not_completed=2), "without completing"),
        (_charges(open_reservations=16), "still reserved"),
    ],
)
def test_every_charge_problem_fails_the_soak(charges: Charges, words: str) -> None:
    assert any(words in p for p in verdict(_report(charges=charges)))


def test_drift_no_acceptance_and_missing_faults_fail_the_soak() -> None:
    assert any("drift" in p for p in verdict(_report(drift=["redis x: expected 1, found 2"])))
    assert any("accepted no request" in p for p in verdict(_report(accepted=0)))
    partial = _report(faults=[Injected("kill_worker", 15.0, 2.0)])
    assert any("restart_redis, pause_collector" in p for p in verdict(partial))
    assert fault_counts(partial.faults) == {"kill_worker": 1, "restart_redis": 0, "pause_collector": 0}


def test_rss_renders_each_service_and_marks_one_measured_once() -> None:
    assert render_rss({"worker": 2048, "gateway": 1024}, {"worker": 3072}) == "gateway 1 -> ? MiB, worker 2 -> 3 MiB"
    assert render_rss({}, {}) == "(no service measured)"


def test_rss_sampling_reads_this_process_and_leaves_out_the_gone() -> None:
    sampled = rss_kib({"me": os.getpid(), "gone": 2**22 + 7})
    assert set(sampled) == {"me"}
    assert sampled["me"] > 1024
