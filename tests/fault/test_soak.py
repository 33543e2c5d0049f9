"""The short soak: ``mlp bench --soak 60s`` under its fault schedule loses nothing and charges once.

The soak runs its own platform (free ports, an isolated namespace) and a PRIVATE redis-server, the
one it restarts: it never stops the machine's shared services. Faults: three kill -9 of the
worker (each followed by a new worker), one Redis restart (the counters rebuilt from the ledger),
two SIGSTOP pauses of the collector. The checks are the soak's own (ops/bench/soak.py): every
accepted request reaches exactly one terminal state, each completed request has one token_usage
row, the Redis day counter equals the ledger with nothing left reserved, `mlp reconcile` finds no
drift. No timing assertions: the rate is low enough for a shared 2-core machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import msgspec
import pytest

from ml_service.launcher import TritonProcess
from ops.bench import main as bench
from ops.bench.soak_plan import FAULT_KINDS, plan_faults
from tests.support.isolation import isolated_namespace

pytestmark = pytest.mark.fault

SERVICES = {"gateway", "worker", "collector", "read-api", "triton"}


def test_a_sixty_second_soak_loses_nothing_and_charges_each_request_once(
    triton_server: TritonProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    report_path = tmp_path / "soak.json"
    with isolated_namespace("soak") as ns:
        for name, value in ns.env().items():
            monkeypatch.setenv(name, value)  # the private Redis replaces MLP_REDIS_URL for the services
        monkeypatch.setenv("MLP_TRITON_URL", triton_server.grpc_url)  # the soak reuses a Triton named here
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        out, err = io.StringIO(), io.StringIO()
        args = ["--soak", "60s", "--rate", "15", "--quiet", "--user", "soak-user", "--grace", "90"]
        code = bench.main([*args, "--json", str(report_path)], out=out, err=err)

    text = out.getvalue() + err.getvalue()
    assert code == 0, text
    report = msgspec.json.decode(report_path.read_bytes())
    assert report["problems"] == [], text
    assert report["accepted"] > 0
    assert report["terminal"] == report["accepted"]
    assert report["lost"] == 0
    assert report["lost_request_ids"] == []
    assert report["multi_terminal_ids"] == []
    assert report["double_charged"] == 0
    charges = report["charges"]
    assert charges["charged_once"] == charges["completed"] > 0
    assert charges["uncharged"] == charges["charged_not_completed"] == 0
    assert charges["redis_day_tokens"] == charges["ledger_day_tokens"] > 0
    assert charges["open_reservations"] == 0
    assert report["drift"] == []
    planned = plan_faults(60.0)
    for kind in FAULT_KINDS:
        ran = [f for f in report["faults"] if f["kind"] == kind]
        assert len(ran) == sum(1 for f in planned if f.kind == kind), (kind, report["faults"])
    kills = [f for f in report["faults"] if f["kind"] == "kill_worker"]
    assert all(f["detail"].split(" -> ")[0] != f["detail"].split(" -> ")[1] for f in kills)  # a new worker each time
    assert set(report["rss_start_kib"]) >= SERVICES
    assert set(report["rss_end_kib"]) >= SERVICES
    assert all(kib > 0 for kib in [*report["rss_start_kib"].values(), *report["rss_end_kib"].values()])
    assert "LOST 0   DOUBLE-CHARGED 0" in out.getvalue()
    assert "RSS per service (start -> end)" in out.getvalue()
