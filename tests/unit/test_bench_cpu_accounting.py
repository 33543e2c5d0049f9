"""``mlp bench --spawn`` counts a service's CPU across its processes' lives: a child that burned CPU and
exited stays counted in its parent (a Postgres backend closing mid-run once made a delta negative)."""

from __future__ import annotations

import os
import subprocess
import sys

from ops.bench.spawn import cpu_seconds_with_reaped

BURN_S = 0.3


def test_a_reaped_child_s_cpu_stays_counted_in_its_parent() -> None:
    before = cpu_seconds_with_reaped(os.getpid())
    burn = f"import time\nwhile time.process_time() < {BURN_S}: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)  # runs, exits, is reaped by us
    after = cpu_seconds_with_reaped(os.getpid())
    assert after - before >= BURN_S - 0.05  # clock-tick granularity (1/100 s)


def test_a_process_that_is_gone_counts_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names nothing now
    assert cpu_seconds_with_reaped(child.pid) == 0.0
