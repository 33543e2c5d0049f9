"""``mlp bench`` end to end, SHORT: the report's shape against a real platform, and a run that loses
requests (no worker consumes them) fails with exit code 1 and names them. No timing assertions."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from ml_service.launcher import TritonProcess
from ops.bench import main as bench
from ops.bench.spawn import data_service_cpu_seconds
from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform
from tests.support.triton import triton_server

pytestmark = pytest.mark.e2e

__all__ = ["triton_server"]  # the session fixture, used below


@pytest.fixture(scope="module")
def platform(triton_server: TritonProcess) -> Iterator[Platform]:
    with isolated_namespace("bench") as ns, running_platform(ns, triton_server.grpc_url) as running:
        yield running


def _run(platform: Platform, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    for name, value in platform.env.items():
        if name.startswith("MLP_"):
            monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    code = bench.main(["--gateway", platform.gateway_url, "--quiet", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_a_short_run_reports_every_figure_and_loses_nothing(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    report_path = tmp_path / "bench.json"
    code, out, err = _run(
        platform,
        monkeypatch,
        *("--rate", "20", "--requests", "30", "--warmup", "3"),
        *("--baseline-requests", "20", "--baseline-concurrency", "4"),
        *("--json", str(report_path)),
    )

    assert code == 0, out + err
    report = msgspec.json.decode(report_path.read_bytes())
    counts = report["counts"]
    assert counts["sent"] == counts["accepted"] == 30
    assert counts["completed"] == 30
    assert counts["lost"] == 0
    assert report["lost_request_ids"] == []
    assert report["mode"] == "open-loop"
    for figure in ("gateway", "end_to_end"):
        assert report[figure]["count"] == 30
        assert 0 < report[figure]["p50_ms"] <= report[figure]["p90_ms"] <= report[figure]["p99_ms"]
    assert {(b["name"], b["concurrency"]) for b in report["baselines"]} == {
        ("broker", 1),
        ("broker", 4),
        ("triton", 1),
        ("triton", 4),
    }
    assert all(b["errors"] == 0 and b["per_second"] > 0 for b in report["baselines"])
    assert report["ratios"]["e2e_p50_over_triton_p50"] > 0
    assert "submit -> terminal" in out
    assert "LOST 0" in out
    # the run ends with `mlp reconcile` of its window: the books balance
    assert "reconcile of the run (" in out
    assert "\n0 drift row(s)" in out


def test_accepted_requests_that_never_finish_fail_the_run(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    worker = platform.services["worker"]
    worker.terminate()  # requests are accepted and queued, but nothing processes them
    try:
        report_path = tmp_path / "lost.json"
        code, out, err = _run(
            platform,
            monkeypatch,
            *("--concurrency", "2", "--requests", "5", "--warmup", "0", "--no-baselines"),
            *("--grace", "2", "--json", str(report_path)),
        )
    finally:
        platform.start("worker")

    assert code == 1, out + err
    report = msgspec.json.decode(report_path.read_bytes())
    assert report["counts"]["accepted"] == 5
    assert report["counts"]["lost"] == 5
    assert len(report["lost_request_ids"]) == 5
    assert "accepted requests were lost" in err
    assert report["lost_request_ids"][0] in out


def test_spawn_runs_its_own_platform_and_reports_cpu_per_service(
    triton_server: TritonProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    report_path = tmp_path / "spawn.json"
    with isolated_namespace("bench-spawn") as ns:
        for name, value in ns.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MLP_TRITON_URL", triton_server.grpc_url)  # mlp up reuses a Triton that answers
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        out, err = io.StringIO(), io.StringIO()
        args = ["--spawn", "--quiet", "--rate", "10", "--requests", "10", "--warmup", "2", "--no-baselines"]
        code = bench.main([*args, "--json", str(report_path)], out=out, err=err)

    assert code == 0, out.getvalue() + err.getvalue()
    assert "\n0 drift row(s)" in out.getvalue()
    report = msgspec.json.decode(report_path.read_bytes())
    assert report["counts"]["completed"] == 10
    assert report["counts"]["lost"] == 0
    cpu = report["service_cpu_ms_per_request"]
    assert {"gateway", "worker", "collector"} <= set(cpu)
    assert set(data_service_cpu_seconds()) <= set(cpu)  # RabbitMQ, Postgres, Redis when they run here
    assert all(value >= 0 for value in cpu.values())
    # RSS per service at the start and the end of the load (the Triton answered already: found by its port)
    for sample in ("service_rss_kib_start", "service_rss_kib_end"):
        assert {"gateway", "worker", "collector", "read-api", "triton"} <= set(report[sample])
        assert all(kib > 0 for kib in report[sample].values())
    assert "RSS per service (start -> end of the load): " in out.getvalue()
