"""Run the local Triton server (``mlp triton``) on the repository's ``triton_models/``.

``TritonProcess`` is the reusable piece (``mlp up`` and the tests use it): it builds the backend
directory, starts the bundled ``tritonserver`` in its own process group, waits until
``/v2/health/ready`` answers 200 and stops it with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

from ml_service.bundle import (
    LauncherError,
    TritonBundle,
    TritonNotSupported,
    find_bundle,
    missing_libraries,
    prepare_backend_dir,
    server_env,
)

__all__ = [
    "LauncherError",
    "ServerOptions",
    "TraceOptions",
    "TritonNotSupported",
    "TritonPorts",
    "TritonProcess",
    "TritonStartError",
    "default_model_repository",
]

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TritonStartError(LauncherError):
    """tritonserver exited or did not become ready in time; the message carries its log tail."""


def default_model_repository() -> Path:
    """``ml_service/triton_models`` when installed as a wheel, else the repository's ``triton_models/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "triton_models"
    return packaged if packaged.is_dir() else here.parents[1] / "triton_models"


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class TraceOptions:
    """Triton's own OpenTelemetry tracing. A request that carries a W3C ``traceparent`` in its gRPC
    metadata (the worker sends its client span's) gets Triton's spans in that trace, below the client
    span: the request's queue and compute time. Triton traces one request in ``rate``."""

    endpoint: str  # OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces
    rate: int = 1
    service_name: str = "triton"
    # How long Triton's batch span processor waits before exporting (the OTel default is 5000).
    export_delay_ms: int = 500


def trace_options_from_env(env: Mapping[str, str]) -> TraceOptions | None:
    """Triton's tracing from the standard ``OTEL_*`` variables the services read (None: tracing is off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if not base:
            return None
        endpoint = base.rstrip("/") + "/v1/traces"  # what the OTLP/HTTP exporters do with the base URL
    delay = env.get("OTEL_BSP_SCHEDULE_DELAY", "").strip()
    return TraceOptions(endpoint=endpoint, export_delay_ms=int(delay) if delay.isdigit() else 500)


def trace_arguments(trace: TraceOptions) -> list[str]:
    """tritonserver's ``--trace-config`` arguments for OpenTelemetry mode."""
    return [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=rate={trace.rate}",
        "--trace-config=level=TIMESTAMPS",
        f"--trace-config=opentelemetry,url={trace.endpoint}",
        f"--trace-config=opentelemetry,resource=service.name={trace.service_name}",
        f"--trace-config=opentelemetry,bsp_schedule_delay={trace.export_delay_ms}",
    ]


@dataclass(frozen=True)
class ServerOptions:
    model_repository: Path = field(default_factory=default_model_repository)
    ports: TritonPorts = TritonPorts()
    host: str = "127.0.0.1"
    # Models to load; empty loads every model of the repository.
    models: tuple[str, ...] = ()
    # How long tritonserver itself waits for in-flight requests on SIGTERM.
    exit_timeout_s: int = 10
    # Triton's OpenTelemetry tracing; None: off.
    trace: TraceOptions | None = None


def check_options(options: ServerOptions) -> None:
    repo = options.model_repository
    if not repo.is_dir():
        raise LauncherError(f"model repository {repo} does not exist")
    for name in options.models:
        if not MODEL_NAME.match(name) or not (repo / name / "config.pbtxt").is_file():
            raise LauncherError(f"model {name!r} is not in {repo} (no {name}/config.pbtxt)")


def server_command(binary: Path, backend_dir: Path, options: ServerOptions) -> list[str]:
    ports = options.ports
    command = [
        str(binary),
        f"--model-repository={options.model_repository}",
        f"--backend-directory={backend_dir}",
        f"--http-address={options.host}",
        f"--http-port={ports.http}",
        f"--grpc-address={options.host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={options.host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",  # CPU machine: no NVML/DCGM
        f"--exit-timeout-secs={options.exit_timeout_s}",
    ]
    if options.models:
        command.append("--model-control-mode=explicit")
        command += [f"--load-model={name}" for name in options.models]
    if options.trace is not None:
        command += trace_arguments(options.trace)
    return command


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log file: tritonserver wrote to this process's output)"
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    # Drop the wide option tables, keep the messages.
    kept = [line for line in text.splitlines() if line and not line.startswith(("+", "|"))]
    return "\n".join(kept[-lines:])


class TritonProcess:
    """One local tritonserver. Use as a (sync or async) context manager, or call start()/stop()."""

    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        log_path: Path | None = None,
        cache_dir: Path | None = None,
        ready_timeout_s: float = 120.0,
        stop_grace_s: float = 20.0,
        bundle: TritonBundle | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self.log_path = log_path
        self.cache_dir = cache_dir
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self._bundle = bundle
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        # Seconds from launch to ready, once ready (reported by `mlp triton` and the benchmark).
        self.startup_s: float | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.options.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def launch(self) -> None:
        """Start tritonserver without waiting for readiness."""
        if self.running():
            raise LauncherError(f"tritonserver already runs (pid {self.pid})")
        check_options(self.options)
        bundle = self._bundle or find_bundle()
        env = server_env(bundle)
        missing = missing_libraries(bundle, env)
        if missing:
            raise TritonNotSupported("shared libraries not found: " + ", ".join(missing))
        backend_dir = prepare_backend_dir(bundle, self.cache_dir)
        command = server_command(bundle.binary, backend_dir, self.options)
        output: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_path.open("ab")
        try:
            # Own session: a terminal's Ctrl-C reaches us only, and we stop Triton in order.
            self._process = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:  # not executable here (wrong architecture, broken install)
            raise TritonNotSupported(f"cannot execute {bundle.binary}: {exc}") from exc
        finally:
            if output is not None:
                output.close()
        self._started_at = time.monotonic()

    def probe(self, timeout_s: float = 2.0) -> bool:
        """One readiness probe: the server and every loaded model are ready."""
        try:
            response = httpx.get(f"{self.http_url}/v2/health/ready", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._process is None:
                raise LauncherError("tritonserver was not launched")
            code = self._process.poll()
            if code is not None:
                raise TritonStartError(f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}")
            if self.probe():
                self.startup_s = time.monotonic() - self._started_at
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TritonStartError(
                    f"tritonserver was not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def start(self) -> None:
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL to its group after the grace."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            # Give Triton its own exit timeout for in-flight requests before forcing it.
            grace = max(self.stop_grace_s, self.options.exit_timeout_s + 5.0)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # The group holds the Python stubs too; it is ours (start_new_session).
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        return process.returncode

    def wait(self) -> int:
        if self._process is None:
            raise LauncherError("tritonserver was not launched")
        return self._process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


def port_of(url: str, default: int) -> int:
    _, _, port = url.rpartition(":")
    return int(port) if port.isdigit() else default
