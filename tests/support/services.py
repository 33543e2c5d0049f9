"""The platform's services as real processes for e2e and fault tests: start, wait ready, stop, kill.

Each service runs as ``python -m ops.cli <service>`` with the test namespace's environment and
free ports, logging to a file whose tail is shown when something goes wrong.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.isolation import Namespace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.ready_url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready at {self.ready_url} after {timeout_s}s:\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait; returns the exit code (SIGKILL if it does not exit in time)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Platform:
    namespace: Namespace
    env: dict[str, str]
    workdir: Path
    gateway_url: str
    api_url: str
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def service(self, name: str, path: str = "/readyz") -> ServiceProcess:
        """A new process of ``name`` (gateway, worker, collector, dispatcher, api) configured like the others.

        ``path`` is what "started" means: /readyz (dependencies reachable) or /healthz (alive).
        """
        ports = {
            "gateway": "MLP_GATEWAY_PORT",
            "api": "MLP_READ_API_PORT",
            "collector": "MLP_COLLECTOR_HEALTH_PORT",
            "worker": "MLP_WORKER_HEALTH_PORT",
            "dispatcher": "MLP_DISPATCHER_HEALTH_PORT",
        }
        port = int(self.env[ports[name]])
        return ServiceProcess(
            name=name,
            argv=[sys.executable, "-m", "ops.cli", name],
            env=self.env,
            ready_url=f"http://127.0.0.1:{port}{path}",
            log_path=self.workdir / f"{name}.log",
        )

    def start(self, name: str, timeout_s: float = 60.0, path: str = "/readyz") -> ServiceProcess:
        proc = self.service(name, path).start()
        self.services[name] = proc
        proc.wait_ready(timeout_s)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.log_tail()}" for n, p in self.services.items())

    def notable_log_lines(self, per_service: int = 12) -> str:
        """Each service's distinct warnings and errors (the broker-outage reconnect noise left out), whether
        it still runs, and its last lines: what explains a failure when only a bounded output is kept."""
        parts = []
        for name, proc in self.services.items():
            exit_code = None if proc.process is None else proc.process.poll()
            state = "running" if exit_code is None else f"exited {exit_code}"
            try:
                lines = proc.log_path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                lines = []
            seen: dict[str, int] = {}
            for line in lines:
                if not any(level in line for level in _NOTABLE_LEVELS) or any(n in line for n in _OUTAGE_NOISE):
                    continue
                key = line.split('"message": ', 1)[-1][:160]
                seen[key] = seen.get(key, 0) + 1
            notable = [f"  ({count}x) {key}" for key, count in list(seen.items())[:per_service]]
            tail = [f"  | {line[:300]}" for line in lines[-4:]]
            parts.append("\n".join([f"--- {name} ({state}, {len(lines)} log lines) ---", *notable, *tail]))
        return "\n".join(parts)


_NOTABLE_LEVELS = ('"level": "warning"', '"level": "error"', '"level": "critical"', "Traceback")
_OUTAGE_NOISE = ("Connect call failed", "Reconnecting after", "error when creating transport", "Connection reset")


def platform_env(namespace: Namespace, triton_grpc_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLP_", "OTEL_"))}
    env.update(namespace.env())
    env.update(
        {
            "MLP_TRITON_URL": triton_grpc_url,
            "MLP_GATEWAY_PORT": str(free_port()),
            "MLP_READ_API_PORT": str(free_port()),
            "MLP_COLLECTOR_HEALTH_PORT": str(free_port()),
            "MLP_WORKER_HEALTH_PORT": str(free_port()),
            "MLP_DISPATCHER_HEALTH_PORT": str(free_port()),
            "MLP_LOG_FORMAT": "json",
            "OTEL_SDK_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["MLP_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{env['MLP_READ_API_PORT']}"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def running_platform(
    namespace: Namespace,
    triton_grpc_url: str,
    services: tuple[str, ...] = ("collector", "worker", "api", "gateway"),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Platform]:
    """Migrate the namespace's database, then run the given services until the context ends."""
    env = platform_env(namespace, triton_grpc_url, extra_env)
    subprocess.run([sys.executable, "-m", "ops.cli", "migrate"], env=env, check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="mlp-e2e-") as tmp:
        platform = Platform(
            namespace=namespace,
            env=env,
            workdir=Path(tmp),
            gateway_url=f"http://127.0.0.1:{env['MLP_GATEWAY_PORT']}",
            api_url=f"http://127.0.0.1:{env['MLP_READ_API_PORT']}",
        )
        try:
            for name in services:
                platform.start(name)
            yield platform
        except BaseException:
            print(platform.logs())
            raise
        finally:
            for proc in reversed(list(platform.services.values())):
                proc.terminate()
