"""Fault 7: Triton slow (a model sleeping past the worker's timeout), then Triton stopped.

The worker points at a Triton started for this test. Requests end ``failed`` with
``triton_timeout`` / ``triton_unavailable`` after the bounded retries, their reservations released
and nothing charged; the worker's /readyz reports the outage.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.faults import (
    FaultTable,
    assert_invariant,
    check_invariant,
    error_codes,
    grant_plan,
    submit_batch,
    users_of,
    wait_terminal,
)
from tests.support.isolation import isolated_namespace
from tests.support.services import running_platform
from tests.support.triton import running_triton

pytestmark = pytest.mark.fault

# slow-model sleeps 5 s per batch: far past a 1 s timeout. One retry, short backoff: failures come fast.
ENV = {
    "MLP_MODELS": "basic-model,slow-model",
    "MLP_TRITON_TIMEOUT_S": "1",
    "MLP_TRITON_RETRIES": "1",
    "MLP_TRITON_BACKOFF_S": "0.1",
}
# Bound of each phase: retries x timeout plus backoff, with plenty of room for a busy 2-core machine.
PHASE_BOUND_S = 60


async def test_triton_slow_then_stopped(tmp_path: Path, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with (
        running_triton(tmp_path) as triton,
        isolated_namespace("f-triton") as ns,
        running_platform(ns, triton.grpc_url, extra_env=ENV) as platform,
    ):
        users = users_of("triton", 3)
        await grant_plan(ns.postgres_dsn, users)
        healthy = await submit_batch(platform.gateway_url, 10, users)
        await wait_terminal(ns.postgres_dsn, healthy.accepted, timeout_s=PHASE_BOUND_S)

        slow = await submit_batch(platform.gateway_url, 8, users, model="slow-model")
        slow_started = time.monotonic()
        await wait_terminal(ns.postgres_dsn, slow.accepted, timeout_s=PHASE_BOUND_S)
        slow_s = time.monotonic() - slow_started

        triton.stop()
        worker_ready = httpx.get(platform.services["worker"].ready_url, timeout=10).status_code
        down = await submit_batch(platform.gateway_url, 20, users)
        down_started = time.monotonic()
        await wait_terminal(ns.postgres_dsn, down.accepted, timeout_s=PHASE_BOUND_S)
        down_s = time.monotonic() - down_started

        load = healthy.merge(slow).merge(down)
        report = await check_invariant(ns, load.accepted, api_url=platform.api_url)
        fault_table.record(
            "Triton slow, then stopped",
            load,
            report,
            started,
            notes=f"slow phase settled in {slow_s:.1f}s, stopped phase in {down_s:.1f}s",
        )
        assert_invariant(report, platform)
        assert await error_codes(ns.postgres_dsn, healthy.accepted) == {"completed": 10}
        assert await error_codes(ns.postgres_dsn, slow.accepted) == {"triton_timeout": 8}
        assert await error_codes(ns.postgres_dsn, down.accepted) == {"triton_unavailable": 20}
        assert report.open_reservations == {}  # failures released what they reserved
        assert worker_ready == 503
