"""``mlp status`` and ``mlp reconcile`` against the real platform processes: healthy, then with the
collector stopped (exit 1, the waiting events shown), then caught up again, and the books balance."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ml_service.launcher import TritonProcess
from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.e2e

USER = "ops-user"


@pytest.fixture(scope="module")
def platform(triton_server: TritonProcess) -> Iterator[Platform]:
    ports = triton_server.options.ports
    extra = {
        "MLP_TRITON_HTTP_PORT": str(ports.http),
        "MLP_TRITON_METRICS_PORT": str(ports.metrics),
        # InferenceStarted for every request: the backlog the status counts is then exactly 3 per request.
        "MLP_STARTED_EVENT_AFTER_MS": "0",
    }
    with isolated_namespace("e2e-ops") as ns, running_platform(ns, triton_server.grpc_url, extra_env=extra) as running:
        yield running


def mlp(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=platform.env, capture_output=True, text=True, timeout=120
    )


def status_json(platform: Platform) -> tuple[int, dict[str, Any]]:
    result = mlp(platform, "status", "--json")
    assert result.returncode in (0, 1), result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, body


def submit(platform: Platform, n: int) -> list[str]:
    body = {"prompt": "operate it", "user_id": USER, "model": "basic-model"}
    ids = []
    for _ in range(n):
        response = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=body, timeout=10)
        assert response.status_code == 202, response.text
        ids.append(response.json()["request_id"])
    return ids


def finish(platform: Platform, ids: list[str]) -> None:
    for request_id in ids:
        view = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 30}, timeout=40).json()
        assert view["status"] == "completed", view


def test_a_healthy_platform_is_one_screen_and_exit_0(platform: Platform) -> None:
    finish(platform, submit(platform, 3))
    code, status = status_json(platform)
    assert code == 0, status["problems"]
    assert status["healthy"] is True
    assert status["problems"] == []
    services = {s["name"]: s for s in status["services"]}
    assert set(services) == {"gateway", "read-api", "collector", "worker"}
    assert all(s["ready"] and s["version"] for s in services.values()), services
    assert services["gateway"]["checks"] == {"rabbitmq": True, "postgres": True, "redis": True}
    queues = {q["name"]: q for q in status["queues"]}
    assert queues["mlp.projections"]["consumers"] >= 1
    assert queues["mlp.requests.basic-model"]["consumers"] >= 1
    assert queues["mlp.requests.basic-model.dlq"]["messages"] == 0
    assert status["quota"]["built_at"] is not None  # the first admission built the counters
    (model,) = status["triton"]["models"]
    assert (model["name"], model["state"], model["max_batch_size"]) == ("basic-model", "READY", 64)
    assert model["mean_batch_size"] >= 1  # requests per execution, from Triton's own counters
    assert status["outcomes"]["completed"] >= 3
    assert status["outcomes"]["failure_ratio"] == 0
    screen = mlp(platform, "status")
    assert screen.returncode == 0
    assert "HEALTHY" in screen.stdout.splitlines()[0]
    assert "no problems" in screen.stdout


def test_with_the_collector_stopped_it_exits_1_and_shows_the_waiting_events(platform: Platform) -> None:
    collector = platform.services["collector"]
    assert collector.terminate() == 0
    ids = submit(platform, 4)  # Requested, Started and Completed of each wait for the collector
    deadline = time.monotonic() + 30
    while True:
        code, status = status_json(platform)
        if (status["projections"]["backlog"] or 0) >= 3 * len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 1
    assert status["healthy"] is False
    projections = status["projections"]
    assert projections["backlog"] == 3 * len(ids)
    assert projections["consumers"] == 0
    assert projections["stalled"] is True
    assert projections["lag_s"] is None  # the collector's gauge is gone with it (no other process sets it)
    problems = {p["what"] for p in status["problems"] if p["severity"] == "critical"}
    assert any(p.startswith("collector unreachable") for p in problems), problems
    assert any(p.startswith(f"projections stalled: {3 * len(ids)} event(s) waiting") for p in problems), problems
    screen = mlp(platform, "status")
    assert screen.returncode == 1
    assert "UNHEALTHY" in screen.stdout.splitlines()[0]
    assert f"projections  {3 * len(ids)} event(s) waiting" in screen.stdout

    platform.start("collector")
    finish(platform, ids)
    deadline = time.monotonic() + 30
    while (code := status_json(platform)[0]) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert code == 0, status_json(platform)[1]["problems"]


def test_the_books_of_the_run_balance(platform: Platform) -> None:
    result = mlp(platform, "reconcile", "--settle", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\n0 drift row(s)" in result.stdout
    assert "7 request(s)" in result.stdout.splitlines()[0]
