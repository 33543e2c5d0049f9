"""``mlp bench --spawn``: run the platform (``mlp up``) for the benchmark, then stop it.

The services get free HTTP/health ports, so a spawned platform never collides with one already
listening on the default ports; the data services (RabbitMQ, Postgres, Redis) and Triton are the
ones the environment's ``MLP_*`` settings name (``mlp up`` starts a local Triton when none answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from mlp.settings import Settings
from ops.up import stop_process

# environment variable -> Settings field, for every port the spawned services listen on
_PORTS = {
    "MLP_GATEWAY_PORT": "gateway_port",
    "MLP_READ_API_PORT": "read_api_port",
    "MLP_COLLECTOR_HEALTH_PORT": "collector_health_port",
    "MLP_WORKER_HEALTH_PORT": "worker_health_port",
}


class SpawnError(RuntimeError):
    """The spawned platform exited or was not ready in time; the message carries its log tail."""


def free_ports(count: int) -> list[int]:
    """Distinct ports the kernel just handed out (held together while choosing)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def spawn_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the spawned ``mlp up``: ``base`` with free service ports."""
    env = dict(base)
    env.update({name: str(port) for name, port in zip(_PORTS, free_ports(len(_PORTS)), strict=True)})
    env["MLP_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{env['MLP_READ_API_PORT']}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass(frozen=True)
class SpawnedPlatform:
    settings: Settings  # as the spawned services see it
    log_path: Path
    pid: int  # the ``mlp up`` process; the services are its children

    def rss_kib(self) -> dict[str, int]:
        """Resident memory (KiB) of each service started by ``mlp up``, Triton included (see ``rss_kib``)."""
        # mlp up's names for the services (``read-api``, not the CLI's ``api``), as in ``--soak``
        pids = {"read-api" if name == "api" else name: pid for name, pid in service_pids(self.pid).items()}
        if "triton" not in pids:  # a Triton that answered already: ours only when it is on our port
            triton = triton_pid(self.settings.triton_url)
            if triton is not None:
                pids["triton"] = triton
        return rss_kib(pids)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each service, its child processes included, and by
        the data services running on this machine (see ``data_service_cpu_seconds``)."""
        return {**service_cpu_seconds(self.pid), **data_service_cpu_seconds()}

    @property
    def gateway_url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    def ready_urls(self) -> list[str]:
        s = self.settings
        return [
            f"http://{s.health_host}:{s.collector_health_port}/readyz",
            f"http://{s.health_host}:{s.worker_health_port}/readyz",
            f"http://{s.read_api_host}:{s.read_api_port}/readyz",
            f"{self.gateway_url}/readyz",
        ]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # gone, or not Linux
        return []


def cpu_seconds_with_reaped(pid: int) -> float:
    """User + system CPU seconds of one process and of the children it has reaped (fields 14-17 of
    /proc/<pid>/stat: utime, stime, cutime, cstime); 0 when it is gone.

    The reaped children count because a sum over live processes alone falls when one exits: a
    Postgres backend closing mid-run took its CPU with it and made a service's delta negative (CI).
    An exited child's time moves into its parent's cutime when reaped, so a sum over a service's
    live processes only grows while its root lives."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(field) for field in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    return [d for child in _children(pid) for d in (child, *_descendants(child))]


def _tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds_with_reaped(p) for p in (pid, *_descendants(pid)))


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def service_pids(up_pid: int) -> dict[str, int]:
    """The services started by ``mlp up`` (``python -m ops.cli <service>``): name -> pid."""
    pids: dict[str, int] = {}
    for child in _children(up_pid):
        argv = _argv(child)
        if "ops.cli" in argv and argv.index("ops.cli") + 1 < len(argv):
            pids[argv[argv.index("ops.cli") + 1]] = child
    return pids


def _kill_leftovers(started: Mapping[int, list[str]]) -> None:
    """SIGKILL each process of ``started`` still running the same command after ``mlp up`` stopped."""
    for pid, argv in started.items():
        if argv and _argv(pid) == argv and _rss_kib(pid) > 0:  # alive, not a zombie, not a reused pid
            print(f"mlp bench: {' '.join(argv[:4])} (pid {pid}) outlived mlp up; killed", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def service_cpu_seconds(up_pid: int) -> dict[str, float]:
    """Per service started by ``mlp up``: CPU seconds so far, its child processes included."""
    return {name: _tree_cpu_seconds(pid) for name, pid in service_pids(up_pid).items()}


def _rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone, or a zombie)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree_rss_kib(pid: int) -> int:
    return _rss_kib(pid) + sum(_tree_rss_kib(child) for child in _children(pid))


def rss_kib(pids: Mapping[str, int]) -> dict[str, int]:
    """Resident memory in KiB (``VmRSS`` of /proc/<pid>/status) of each named process, its child
    processes included (``ops.cli triton`` runs ``tritonserver``; uvicorn workers); the one sampling
    function of ``mlp bench --spawn`` and ``--soak``. A process that is gone is left out."""
    sampled = {name: _tree_rss_kib(pid) for name, pid in pids.items()}
    return {name: kib for name, kib in sampled.items() if kib > 0}


def triton_pid(triton_url: str) -> int | None:
    """The ``tritonserver`` on this machine serving gRPC at ``triton_url``'s port, if there is one."""
    port = triton_url.rsplit(":", 1)[-1].strip("/")
    wanted = f"--grpc-port={port}"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _argv(int(entry.name))
        if argv and argv[0].endswith("tritonserver") and wanted in argv:
            return int(entry.name)
    return None


# Data services whose CPU the report shows when they run on this machine: process name -> label.
DATA_SERVICES: Final = {"beam.smp": "rabbitmq", "postgres": "postgres", "redis-server": "redis"}


def data_service_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of RabbitMQ, Postgres and Redis when they run here, all their processes summed.

    They are shared: whatever else uses them during the run is counted too. A Postgres backend that
    exits between two samples stays counted, in the postmaster's reaped-children time.
    """
    used: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            label = DATA_SERVICES.get((entry / "comm").read_text().strip())
        except OSError:  # gone meanwhile
            continue
        if label is not None:
            used[label] = used.get(label, 0.0) + cpu_seconds_with_reaped(int(entry.name))
    return used


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


async def _wait_ready(process: asyncio.subprocess.Process, platform: SpawnedPlatform, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = platform.ready_urls()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while pending:
            if process.returncode is not None:
                raise SpawnError(f"mlp up exited with {process.returncode}:\n{_tail(platform.log_path)}")
            if time.monotonic() > deadline:
                raise SpawnError(f"not ready within {timeout_s:.0f}s: {pending}\n{_tail(platform.log_path)}")
            url = pending[0]
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        pending.pop(0)
                        continue
            await asyncio.sleep(0.5)


@asynccontextmanager
async def spawned_platform(
    base: Settings, base_env: Mapping[str, str], ready_timeout_s: float = 300.0
) -> AsyncIterator[SpawnedPlatform]:
    """``mlp up`` with ``base_env`` (whose ``MLP_*`` variables ``base`` was read from) on free ports."""
    env = spawn_env(base_env)
    settings = base.model_copy(update={field: int(env[name]) for name, field in _PORTS.items()})
    with tempfile.TemporaryDirectory(prefix="mlp-bench-") as tmp:
        log_path = Path(tmp) / "mlp-up.log"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ops.cli",
                "up",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # our Ctrl-C does not reach it twice; we stop it in order
            )
        platform = SpawnedPlatform(settings, log_path, process.pid)
        try:
            await _wait_ready(process, platform, ready_timeout_s)
            yield platform
        finally:
            # Its services and theirs (Triton's server), taken before the stop: each runs in its own session,
            # so one that outlives a stuck ``mlp up`` would go on consuming from the shared broker.
            started = {pid: _argv(pid) for pid in _descendants(process.pid)}
            # SIGINT is mlp up's Ctrl-C: it stops its children in order (gateway first, Triton last).
            await stop_process(process, signal.SIGINT, settings.graceful_timeout_s * 4 + 30)
            _kill_leftovers(started)
