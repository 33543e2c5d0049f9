"""The pure report pieces of ``mlp bench`` (no services needed): percentiles, ratios, JSON, table."""

from __future__ import annotations

import math
from dataclasses import replace

import msgspec
import pytest

from ops.bench.stats import Baseline, Counts, Report, compute_ratios, percentile, render_table, summarize


def test_percentiles_are_nearest_rank() -> None:
    ordered = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(ordered, 0.5) == 50.0
    assert percentile(ordered, 0.99) == 99.0
    assert percentile(ordered, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError, match="quantile"):
        percentile(ordered, 1.5)


def test_summary_is_in_milliseconds_and_empty_is_nan() -> None:
    latency = summarize([0.003, 0.001, 0.002])
    assert latency.count == 3
    assert latency.p50_ms == pytest.approx(2.0)
    assert latency.max_ms == pytest.approx(3.0)
    assert math.isnan(summarize([]).p50_ms)


def _report(lost: list[str]) -> Report:
    baselines = [
        Baseline("broker", 1, 100, 0, 1000.0, summarize([0.001] * 100)),
        Baseline("broker", 32, 100, 0, 4000.0, summarize([0.008] * 100)),
        Baseline("triton", 1, 100, 0, 2000.0, summarize([0.0005] * 100)),
        Baseline("triton", 32, 100, 0, 3000.0, summarize([0.010] * 100)),
    ]
    gateway, e2e = summarize([0.002] * 10), summarize([0.010] * 10)
    return Report(
        mode="open-loop",
        target="at 100 req/s",
        duration_s=10.0,
        user_id="bench-user",
        model="basic-model",
        machine={"cpus": 2, "host": "test"},
        counts=Counts(10 + len(lost), 10 + len(lost), 0, 0, 10, 0, 0, len(lost), {"202": 10 + len(lost)}),
        accepted_per_s=100.0,
        completed_per_s=99.0,
        gateway=gateway,
        end_to_end=e2e,
        baselines=baselines,
        ratios=compute_ratios(gateway, e2e, 100.0, 99.0, baselines),
        lost_request_ids=lost,
    )


def test_ratios_use_unloaded_latency_and_loaded_throughput() -> None:
    ratios = _report([]).ratios
    assert ratios["e2e_p50_over_triton_p50"] == pytest.approx(20.0)  # 10 ms / 0.5 ms (c=1)
    assert ratios["gateway_p50_over_broker_rtt_p50"] == pytest.approx(2.0)  # 2 ms / 1 ms (c=1)
    assert ratios["completed_rate_over_triton_rate"] == pytest.approx(0.033, abs=1e-3)  # 99 / 3000 (c=32)
    assert ratios["accepted_rate_over_broker_rate"] == pytest.approx(0.025)  # 100 / 4000 (c=32)


def test_pipeline_cpu_is_compared_with_the_brokers_when_both_were_measured() -> None:
    gateway, e2e = summarize([0.002]), summarize([0.010])
    cpu = {"gateway": 1.0, "worker": 2.0, "collector": 1.5, "api": 0.1, "rabbitmq": 3.0, "redis": 0.4}
    ratios = compute_ratios(gateway, e2e, 100.0, 99.0, [], cpu)
    assert ratios["pipeline_cpu_over_broker_cpu"] == pytest.approx(1.5)  # (1 + 2 + 1.5) / 3
    assert "pipeline_cpu_over_broker_cpu" not in compute_ratios(gateway, e2e, 100.0, 99.0, [], {"gateway": 1.0})
    report = replace(_report([]), service_cpu_ms_per_request=cpu)
    table = render_table(report)
    assert "CPU per accepted request: api 0.10 ms, collector 1.50 ms, gateway 1.00 ms, worker 2.00 ms" in table
    assert "data services on this machine: rabbitmq 3.00 ms, redis 0.40 ms" in table


def test_json_has_no_nan_and_the_table_names_lost_requests() -> None:
    report = replace(_report(["lost-1", "lost-2"]), gateway=summarize([]))  # nothing measured: NaN
    document = msgspec.json.decode(msgspec.json.encode(report.as_dict()))
    assert document["gateway"]["p50_ms"] is None
    assert document["counts"]["lost"] == 2
    assert document["lost_request_ids"] == ["lost-1", "lost-2"]
    table = render_table(report)
    assert "LOST 2" in table
    assert "lost-1, lost-2" in table
    assert "submit -> terminal" in table
