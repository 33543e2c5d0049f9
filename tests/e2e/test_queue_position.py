"""Queue position with real processes: a burst waits for a worker, then drains on slow-model (5 s a batch).

The worker takes one request at a time (prefetch 1), so each start is one step of the queue and the
interval between two starts is the service time the ETA is measured from.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.support.isolation import isolated_namespace
from tests.support.services import running_platform

pytestmark = pytest.mark.e2e

ENV = {"MLP_MODELS": "basic-model,slow-model", "MLP_PREFETCH": "1", "MLP_TRITON_TIMEOUT_S": "30"}
BURST = 3


def _view(api_url: str, request_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{api_url}/api/v1/inference/{request_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    view: dict[str, Any] = answer.json()
    return view


def test_queue_position_counts_the_requests_ahead_and_falls_as_the_burst_drains(triton_grpc_url: str) -> None:
    with (
        isolated_namespace("qpos") as ns,
        running_platform(ns, triton_grpc_url, services=("collector", "api", "gateway"), extra_env=ENV) as platform,
    ):
        ids = []
        for n in range(BURST):
            submitted = httpx.post(
                f"{platform.gateway_url}/api/v1/inference",
                json={"prompt": f"burst {n}", "user_id": "queuer", "model": "slow-model", "max_tokens": 8},
                timeout=10,
            )
            assert submitted.status_code == 202, submitted.text
            ids.append(submitted.json()["request_id"])
        # Another model's queue has its own numbering.
        other = httpx.post(
            f"{platform.gateway_url}/api/v1/inference",
            json={"prompt": "elsewhere", "user_id": "queuer", "model": "basic-model", "max_tokens": 8},
            timeout=10,
        ).json()["request_id"]

        before = [_view(platform.api_url, request_id) for request_id in ids]
        assert [v["status"] for v in before] == ["queued"] * BURST
        assert [v["queue_position"] for v in before] == list(range(1, BURST + 1))
        assert [v["eta_s"] for v in before] == [None] * BURST  # no start measured yet
        assert _view(platform.api_url, other)["queue_position"] == 1

        platform.start("worker")
        last, seen = ids[-1], []
        deadline = time.monotonic() + 90
        while True:
            view = _view(platform.api_url, last)
            if view["status"] != "queued":
                break
            seen.append((view["queue_position"], view["eta_s"]))
            assert time.monotonic() < deadline, f"the last request of the burst still queued: {seen}"
            time.sleep(0.2)
        positions = [position for position, _ in seen]
        assert positions == sorted(positions, reverse=True), seen  # it only ever falls
        assert positions[0] <= BURST
        assert positions[-1] == 1, seen
        # Two starts 5 s apart (slow-model's delay) measured the pace: the last one's ETA is about one more.
        etas = [eta for position, eta in seen if position == 1 and eta is not None]
        assert etas, seen
        assert 1.0 <= etas[-1] <= 30.0, seen

        for request_id in ids:
            final = httpx.get(
                f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 30}, timeout=40
            ).json()
            assert final["status"] == "completed", final
            assert final["queue_position"] is None  # only a queued request has a place
            assert final["eta_s"] is None
