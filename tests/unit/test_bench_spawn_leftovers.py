"""``mlp bench --spawn`` stops what ``mlp up`` left running: a service outliving a stuck ``mlp up`` would
go on consuming from the shared broker during the next measurement (real processes, real signals)."""

from __future__ import annotations

import subprocess
import sys
import time

from ops.bench.spawn import _argv, _kill_leftovers


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_a_leftover_is_killed_and_a_process_that_is_not_the_one_started_is_left_alone() -> None:
    leftover, other = _sleeper(), _sleeper()
    try:
        time.sleep(0.2)  # exec'd: its command line is the one recorded
        _kill_leftovers({leftover.pid: _argv(leftover.pid), other.pid: ["python", "-m", "ops.cli", "worker"]})
        assert leftover.wait(timeout=5) == -9
        assert other.poll() is None  # its command is not the one recorded: a reused pid is never killed
    finally:
        for process in (leftover, other):
            process.kill()
            process.wait()
